"""DFlash drafters in the HF format that DFlash's reference code, SGLang and vLLM load.

A directory with
  config.json        a Qwen3 config with architectures ["DFlashDraftModel"], num_hidden_layers =
                     drafter depth, block_size, num_target_layers and
                     dflash_config {mask_token_id, target_layer_ids}; the attention of each
                     layer in layer_types ("full_attention" / "sliding_attention"), with
                     sliding_window (use_sliding_window true when a layer slides) and is_causal
  model.safetensors  layers.{i}.self_attn.{q,k,v,o}_proj.weight, layers.{i}.self_attn.{q,k}_norm
                     .weight, layers.{i}.mlp.{gate,up,down}_proj.weight,
                     layers.{i}.{input,post_attention}_layernorm.weight, norm.weight, fc.weight,
                     hidden_norm.weight; PyTorch Linear layout [out, in].

Conversion is transposes and reshapes only, so export -> import is bit-exact in any dtype.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax  # noqa: F401  (registers bfloat16 with numpy before safetensors.numpy is used)
import numpy as np
from safetensors.numpy import load_file, save_file

from dpace_jax.drafters import drafter_family, family_of_architectures
from dpace_jax.drafters.config import SHARED_FIELDS, DrafterConfig
from dpace_jax.io import digest
from dpace_jax.io.atomic import atomic_dir, atomic_path, umask_mode
from dpace_jax.targets.config import ModelConfig
from dpace_jax.targets.hf import INDEX_NAME, WEIGHTS_NAME, index_tensors, read_config_json

CONFIG_NAME = "config.json"
CHECKSUMS_NAME = digest.SUMS_NAME

_DTYPE_NAMES = ("float32", "bfloat16", "float16")


def _dtype_name(dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype.name in _DTYPE_NAMES:
        return dtype.name
    raise ValueError(f"unsupported parameter dtype {dtype} (expected one of {list(_DTYPE_NAMES)})")


def config_to_hf(cfg: DrafterConfig, dtype_name: str = "bfloat16") -> dict:
    """The config.json dict of a drafter."""
    family = drafter_family(cfg.arch)
    out = {
        "architectures": [family.architecture],
        "model_type": "qwen3",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.scaling_dict,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "layer_types": list(cfg.layer_types),
        # transformers' Qwen3Config keeps sliding_window only when use_sliding_window is set
        "use_sliding_window": "sliding_attention" in cfg.layer_types,
        "sliding_window": cfg.sliding_window if "sliding_attention" in cfg.layer_types else None,
        "tie_word_embeddings": False,
        "block_size": cfg.block_size,
        "num_target_layers": cfg.num_target_layers,
        "dflash_config": {"mask_token_id": cfg.mask_token_id,
                          "target_layer_ids": list(cfg.target_layer_ids)},
        "torch_dtype": dtype_name,
    }
    if cfg.is_causal is not None:  # absent: the readers' default (sliding layers causal)
        out["is_causal"] = cfg.is_causal
    family.config_to_hf(cfg, out)
    return out


def config_from_hf(hf: dict, source: str = CONFIG_NAME) -> DrafterConfig:
    """Parse a DFlash config.json dict; wrong architecture or missing fields raise ValueError."""
    family = family_of_architectures(hf.get("architectures"), source)
    base = ModelConfig.from_hf({**hf, "architectures": ["Qwen3ForCausalLM"]}, source)
    dflash = hf.get("dflash_config")
    if not isinstance(dflash, dict):
        raise ValueError(f"{source}: missing field 'dflash_config' "
                         "({mask_token_id, target_layer_ids})")
    for name in ("mask_token_id", "target_layer_ids"):
        if dflash.get(name) is None:
            raise ValueError(f"{source}: missing field 'dflash_config.{name}'")
    if hf.get("block_size") is None and dflash.get("block_size") is not None:
        hf = {**hf, "block_size": dflash["block_size"]}  # some drafters keep it there
    for name in ("block_size", "num_target_layers"):
        if hf.get(name) is None:
            raise ValueError(f"{source}: missing field {name!r}")
    layer_types, window = _attention_layout(hf, base.num_layers, source)
    try:
        return DrafterConfig(
            **{f: getattr(base, f) for f in SHARED_FIELDS}, num_layers=base.num_layers,
            block_size=int(hf["block_size"]),
            mask_token_id=int(dflash["mask_token_id"]),
            target_layer_ids=tuple(int(j) for j in dflash["target_layer_ids"]),
            num_target_layers=int(hf["num_target_layers"]),
            layer_types=layer_types,
            sliding_window=window,
            is_causal=None if hf.get("is_causal") is None else bool(hf["is_causal"]),
            arch=family.arch, family_cfg=family.config_from_hf(hf, dflash, source),
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from None


def _attention_layout(hf: dict, num_layers: int, source: str) -> tuple[tuple[str, ...], int]:
    """(layer_types, sliding_window) of a config.json, read as transformers' Qwen3Config reads
    them: sliding_window counts only with use_sliding_window; without layer_types, the layers
    from max_window_layers (default 28) on slide. Contradictions are errors."""
    use = bool(hf.get("use_sliding_window") or False)
    raw_window = hf.get("sliding_window")
    if raw_window is not None and (isinstance(raw_window, bool) or not isinstance(raw_window, int)
                                   or raw_window < 1):
        raise ValueError(f"{source}: field 'sliding_window' is {raw_window!r}, expected an "
                         "integer >= 1 or null")
    window = int(raw_window) if use and raw_window is not None else 0
    types = hf.get("layer_types")
    if types is None:
        first = int(hf.get("max_window_layers", 28))
        return tuple("sliding_attention" if window and i >= first else "full_attention"
                     for i in range(num_layers)), window
    if not isinstance(types, list | tuple) or not all(isinstance(t, str) for t in types):
        raise ValueError(f"{source}: field 'layer_types' is {types!r}, expected a list of "
                         "layer type names")
    if "sliding_attention" in types and not window:
        raise ValueError(f"{source}: field 'layer_types' has sliding_attention layers but "
                         f"use_sliding_window={hf.get('use_sliding_window')!r} and "
                         f"sliding_window={raw_window!r} give them no window (transformers "
                         "drops sliding_window unless use_sliding_window is true)")
    return tuple(types), window


def export_drafter(params, cfg: DrafterConfig, out_dir, *, dtype=None) -> Path:
    """Write config.json + model.safetensors + checksums.sha256 (written last) to out_dir;
    `dtype` casts the weights (e.g. jnp.bfloat16), default: keep the params' dtype. The files
    are written into a staging directory that then replaces out_dir whole, so a failure (a full
    disk, a crash) leaves the previous export or none, never a mix of two; a directory holding
    other files too keeps them (its export files are then replaced one by one). Parameters that
    are not all finite are refused (ValueError naming the tensors): no serving engine should
    get them."""
    out = Path(out_dir)
    np_dtype = np.dtype(dtype) if dtype is not None else None
    tensors = drafter_family(cfg.arch).schema.to_hf(cfg, params, np_dtype)  # the key map
    bad = [k for k, v in tensors.items() if not np.isfinite(v.astype(np.float32)).all()]
    if bad:
        raise ValueError(f"refusing to export to {out}: {len(bad)} tensor(s) hold NaN or inf "
                         f"({', '.join(sorted(bad)[:3])}{' ...' if len(bad) > 3 else ''})")
    name = _dtype_name(np_dtype if np_dtype is not None else tensors["fc.weight"].dtype)
    writers = {WEIGHTS_NAME: lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
               CONFIG_NAME: lambda p: p.write_text(
                   json.dumps(config_to_hf(cfg, name), indent=2) + "\n")}
    if not out.is_dir() or {p.name for p in out.iterdir()} <= {*writers, digest.SUMS_NAME}:
        with atomic_dir(out, lambda _: False) as tmp:
            for file, write in writers.items():
                write(tmp / file)
                os.chmod(tmp / file, umask_mode())  # safetensors creates it owner-only
            digest.write_sums(tmp, writers)
        return out
    (out / digest.SUMS_NAME).unlink(missing_ok=True)  # until the new files are all in place
    for file, write in writers.items():
        with atomic_path(out / file) as tmp:
            write(tmp)
    digest.write_sums(out, writers)
    return out


def load_config(path) -> DrafterConfig:
    path = Path(path)
    cfg_path = path / CONFIG_NAME if path.is_dir() else path
    return config_from_hf(read_config_json(cfg_path), str(cfg_path))


def import_drafter(path) -> tuple[dict, DrafterConfig]:
    """Read a DFlash HF directory -> (params, cfg). Weights keep the file's dtype; tensor names
    may carry a "model." prefix, and the family's aliases (other writers' spellings) are read as
    the names they stand for; missing, unexpected or misshapen tensors are errors."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"drafter directory {path} does not exist")
    cfg = load_config(path)
    files = sorted({file for file, _ in index_tensors(path).values()})
    tensors = {k.removeprefix("model."): v for f in files for k, v in load_file(str(f)).items()}
    source = path / WEIGHTS_NAME if (path / WEIGHTS_NAME).is_file() else path / INDEX_NAME
    family = drafter_family(cfg.arch)
    for alias, name in family.hf_aliases.items():
        if alias in tensors:
            if name in tensors:
                raise ValueError(f"{source}: holds both {name} and {alias} (the same tensor "
                                 "under two names)")
            tensors[name] = tensors.pop(alias)
    return family.schema.from_hf(cfg, tensors, str(source)), cfg
