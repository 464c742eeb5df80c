"""Hugging Face checkpoints <-> the target's parameters (`dpace_jax.nn.params.TargetParams`).

A checkpoint is a directory (or an HF hub id resolved through the HF cache) holding config.json and
either model.safetensors or shards listed in model.safetensors.index.json. The key map (each
parameter's HF name and layout) is declared once in dpace_jax.nn.params; here it is enforced
strictly: missing, unexpected or misshapen tensors are errors that name them, and tied
embeddings are checked.

Loading reads tensor by tensor and fills each stacked [L, ...] host array layer by layer, so at
most one parameter's host copy exists besides what is already on the devices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy before safetensors is used)
import numpy as np
from safetensors import SafetensorError, safe_open

from dpace_jax.io.atomic import atomic_path
from dpace_jax.nn.schema import Schema, flatten, get
from dpace_jax.targets.model import ModelConfig, schema

HF_ALLOW_PATTERNS = [
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.*",
]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry
_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


# ----------------------------------------------------------------------------- locating files


def hub_offline(*names: str) -> bool:
    """Whether the HF hub is off limits: HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE or one of `names`
    set in the environment, or huggingface_hub's own setting."""
    truthy = {"1", "ON", "YES", "TRUE"}
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", *names)
    if any(os.environ.get(v, "").upper() in truthy for v in names):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def resolve_checkpoint(path_or_id: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                       revision: str | None = None) -> Path:
    """A local checkpoint directory, or an HF hub id fetched through the HF cache (config,
    safetensors and tokenizer files only; only the cache when HF_HUB_OFFLINE is set)."""
    local = Path(path_or_id).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise ValueError(f"{local} is a file; expected a checkpoint directory or an HF hub id")
    name = str(path_or_id)
    if not _REPO_ID.match(name) or ".." in name or "--" in name:
        raise FileNotFoundError(f"checkpoint directory {name} does not exist")
    offline = hub_offline()
    from huggingface_hub import snapshot_download

    try:
        found = snapshot_download(name, allow_patterns=HF_ALLOW_PATTERNS, cache_dir=cache_dir,
                                  revision=revision, local_files_only=offline)
    except Exception as e:  # hub errors (not found, offline cache miss, network) share no base
        where = "the HF cache (HF_HUB_OFFLINE is set)" if offline else "the HF hub or its cache"
        raise FileNotFoundError(
            f"{name!r} is neither a local directory nor found in {where}: {type(e).__name__}: "
            f"{' '.join(str(e).split())[:300]}") from e
    return Path(found)


def read_config_json(path: Path) -> dict:
    """A checkpoint's config.json as a dict; missing or malformed files raise, naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (every checkpoint needs a config.json)")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return hf


def load_config(path_or_id: str | os.PathLike) -> ModelConfig:
    """ModelConfig from the checkpoint's config.json; unsupported variants raise ValueError."""
    path = resolve_checkpoint(path_or_id) / "config.json"
    hf = read_config_json(path)
    cfg = ModelConfig.from_hf(hf, source=str(path))
    fam = cfg.family
    fam.check_quantization(hf, str(path))
    hf = fam.text_config(hf)[0]
    for field, (bad, expected) in fam.unsupported(hf).items():
        if bad:
            raise ValueError(
                f"{path}: {field}={hf[field]!r} is not supported (expected {expected!r})")
    return cfg


# ----------------------------------------------------------------------------- loading


def index_tensors(ckpt: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """HF key -> (file, shape) from the safetensors headers (no tensor data is read)."""
    index_path = ckpt / INDEX_NAME
    if (ckpt / WEIGHTS_NAME).is_file():
        files, weight_map = [ckpt / WEIGHTS_NAME], None
    elif index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index_path}: expected JSON with a 'weight_map' ({e})") from None
        files = [ckpt / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"shard {file.name} listed in {index_path} is missing")
    else:
        others = sorted(p.name for p in ckpt.glob("*.bin"))
        hint = f" (found {others}: only safetensors is supported)" if others else ""
        raise FileNotFoundError(f"{ckpt}: neither {WEIGHTS_NAME} nor {INDEX_NAME} found{hint}")

    tensors: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="numpy") as fh:
                for key in fh.keys():
                    if key in tensors:
                        raise ValueError(f"tensor {key} is in both {tensors[key][0]} and {file}")
                    tensors[key] = (file, tuple(fh.get_slice(key).get_shape()))
        except SafetensorError as e:
            raise ValueError(f"{file}: corrupt or truncated safetensors file: {e}") from None
    for key, name in (weight_map or {}).items():
        if key not in tensors or tensors[key][0].name != name:
            raise ValueError(f"{index_path} puts {key} in {name}, but that file does not hold it")
    return tensors


def _check_keys(ckpt: Path, cfg: ModelConfig, target_schema: Schema, tensors: dict) -> None:
    expected = target_schema.expected_hf(cfg)
    allowed = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    missing = [k for k in expected if k not in tensors]
    unexpected = sorted(k for k in tensors if k not in expected and k not in allowed
                        and not k.endswith(_IGNORED_SUFFIXES))
    wrong = [f"{k}: {list(tensors[k][1])}, expected {list(s)}" for k, s in expected.items()
             if k in tensors and tensors[k][1] != s]
    if cfg.tie_word_embeddings and "lm_head.weight" in tensors:
        shape = tensors["lm_head.weight"][1]
        if shape != (cfg.vocab_size, cfg.hidden_size):
            wrong.append(f"lm_head.weight: {list(shape)}, expected "
                         f"{[cfg.vocab_size, cfg.hidden_size]}")
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            shown = "\n    ".join(items[:20]) + ("\n    ..." if len(items) > 20 else "")
            problems.append(f"  {len(items)} {title} tensor(s):\n    {shown}")
    if problems:
        raise ValueError(
            f"{ckpt}: checkpoint does not match its config ({cfg.arch}, {cfg.num_layers} layers, "
            f"hidden {cfg.hidden_size}, vocab {cfg.vocab_size}):\n" + "\n".join(problems)
        )


def _sharding_for(shardings: Any, path: tuple[str, ...]):
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        return shardings
    if callable(shardings) and not dataclasses.is_dataclass(shardings):
        return shardings(path)
    try:
        return get(shardings, path)
    except (KeyError, AttributeError, TypeError):
        raise ValueError(f"shardings has no entry for parameter {'/'.join(path)}") from None


def _place(host: np.ndarray, sharding) -> jax.Array:
    if sharding is None:
        return jnp.asarray(host)
    # Each addressable device receives (a view of) only its own slice of the host array.
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


@jax.jit
def _all_finite(x):
    return jnp.isfinite(x).all()


def _check_finite(array, entry, read, ckpt: Path) -> None:
    """ValueError naming the tensor when a loaded parameter holds NaN or inf: a target with
    them makes every training step non-finite (skipped under train.nan_policy=skip-step, and the
    run would export the drafter it started from). Checked on the devices (fast); the host
    only looks for the culprit."""
    if not jnp.issubdtype(array.dtype, jnp.floating) or bool(_all_finite(array)):
        return
    for _, key in entry.hf_items():
        if not np.isfinite(read(key)).all():
            raise ValueError(f"{ckpt}: tensor {key} holds NaN or inf; a target's weights must "
                             "be finite (a damaged download or a diverged fine-tune?)")
    raise ValueError(f"{ckpt}: parameter {'/'.join(entry.path)} overflows to inf in "
                     f"{array.dtype} (load it in another target.dtype)")


def load_target(path_or_id: str | os.PathLike, *, dtype=jnp.bfloat16, shardings=None):
    """Load an HF Qwen3 / Llama / Qwen3-MoE / gpt-oss / Qwen3.5 checkpoint -> (params, cfg);
    gpt-oss's MXFP4 experts are dequantized (dpace_jax.targets.gpt_oss.mxfp4); of a Qwen3.5
    checkpoint only the text model is read (qwen3_5.text_tensors).

    dtype: the parameters' dtype (None keeps each tensor's stored dtype). shardings: None (the
    default device), one Sharding for every array, a pytree of shardings matching the param tree,
    or a callable param path (e.g. ("layers", "q")) -> sharding. A tensor holding NaN or inf is
    a ValueError naming it.
    """
    ckpt = resolve_checkpoint(path_or_id)
    cfg = load_config(ckpt)
    fam, target_schema = cfg.family, schema(cfg)
    raw = index_tensors(ckpt)
    tensors, packed, original = fam.checkpoint_tensors(
        cfg, read_config_json(ckpt / "config.json"), raw, str(ckpt))
    fam.check_tensors(cfg, tensors, str(ckpt))
    _check_keys(ckpt, cfg, target_schema, tensors)
    target = None if dtype is None else np.dtype(dtype)

    with contextlib.ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def read(key: str) -> np.ndarray:
            if key in packed:
                return fam.unpack(key, [read(k) for k in packed[key]])
            file = (tensors[key] if key in tensors else raw[key])[0]
            try:
                if file not in handles:
                    handles[file] = stack.enter_context(safe_open(str(file), framework="numpy"))
                return handles[file].get_tensor(original.get(key, key))
            except SafetensorError as e:
                raise ValueError(f"{file}: cannot read tensor {key}: {e}") from None

        if cfg.tie_word_embeddings and "lm_head.weight" in tensors:
            if not np.array_equal(read("lm_head.weight"), read("model.embed_tokens.weight")):
                raise ValueError(f"{ckpt}: tie_word_embeddings is true but lm_head.weight differs "
                                 "from model.embed_tokens.weight")

        leaves = {}
        d = target_schema.dims(cfg)
        for entry in target_schema.params(cfg):
            host = None
            for index, key in entry.hf_items():  # a stacked array layer (expert) by layer
                w = entry.from_hf(read(key), d)
                if host is None:
                    host = np.empty(entry.leaf_shape(d), w.dtype if target is None else target)
                host[index] = w.astype(host.dtype, copy=False)
                del w
            leaves[entry.path] = _place(host, _sharding_for(shardings, entry.path))
            del host
            _check_finite(leaves[entry.path], entry, read, ckpt)
    return target_schema.build(leaves), cfg


# ----------------------------------------------------------------------------- saving


def hf_config(cfg: ModelConfig, dtype_name: str = "float32") -> dict:
    """A config.json dict that transformers loads as Qwen3ForCausalLM / LlamaForCausalLM /
    Qwen3MoeForCausalLM / GptOssForCausalLM (unquantized) / Qwen3_5ForCausalLM /
    Qwen3_5MoeForCausalLM (the text model alone)."""
    name, model_type = cfg.family.export
    out = {
        "architectures": [name], "model_type": model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": cfg.scaling_dict,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": False,
        "attention_dropout": 0.0, "torch_dtype": dtype_name, "dtype": dtype_name,
    }
    cfg.family.hf_config(cfg, out)
    return out


def save_target(params, cfg: ModelConfig, out_dir: str | os.PathLike, *, tokenizer=None,
                dtype=None) -> Path:
    """Write `params` as an HF checkpoint (config.json + model.safetensors [+ tokenizer files]).

    dtype: the stored dtype (None keeps each array's dtype). Tensors are streamed to disk one
    layer at a time; tokenizer is a transformers tokenizer or a checkpoint path/hub id to copy
    it from.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target_schema = schema(cfg)
    entries, d = target_schema.params(cfg), target_schema.dims(cfg)
    want = {e.path: e.leaf_shape(d) for e in entries}
    have = {path: tuple(leaf.shape) for path, leaf in flatten(params).items()}
    problems = [f"{'/'.join(p)}: missing" for p in want if p not in have]
    problems += [f"{'/'.join(p)}: unexpected" for p in have if p not in want]
    problems += [f"{'/'.join(p)}: {list(have[p])}, expected {list(s)}"
                 for p, s in want.items() if p in have and have[p] != s]
    if problems:
        raise ValueError("params do not match the config:\n  " + "\n  ".join(problems))

    # (key, dtype, hf shape, thunk producing the tensor) in file order
    plan = []
    for e in entries:
        leaf = get(params, e.path)
        dt = np.dtype(dtype if dtype is not None else leaf.dtype)
        if dt.name not in _SAFETENSORS_DTYPES:
            raise ValueError(f"cannot store {'/'.join(e.path)} as {dt.name}; "
                             f"expected one of {sorted(_SAFETENSORS_DTYPES)}")
        for index, key in e.hf_items():
            # leaf[l] of a layer (leaf[l, e] of an expert), read when that tensor is written
            at = None if not index else index[0] if len(index) == 1 else index
            plan.append((key, dt, e.hf_shape(d), lambda e=e, leaf=leaf, at=at, dt=dt:
                         e.to_hf(np.asarray(leaf if at is None else leaf[at]), d).astype(dt)))

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, dt, shape, _ in plan:
        size = math.prod(shape) * dt.itemsize
        header[key] = {"dtype": _SAFETENSORS_DTYPES[dt.name], "shape": list(shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    names = {np.dtype(dtype if dtype is not None else leaf.dtype).name
             for leaf in flatten(params).values()}
    dtype_name = "bfloat16" if "bfloat16" in names else sorted(names)[0]
    with atomic_path(out / WEIGHTS_NAME) as tmp, open(tmp, "wb") as fh:
        fh.write(len(blob).to_bytes(8, "little"))
        fh.write(blob)
        for _key, _dt, shape, make in plan:
            arr = np.ascontiguousarray(make())
            assert arr.shape == tuple(shape), (arr.shape, shape)
            fh.write(arr.reshape(-1).view(np.uint8).data)
    (out / INDEX_NAME).unlink(missing_ok=True)  # a stale index would name other files
    with atomic_path(out / "config.json") as tmp:
        tmp.write_text(json.dumps(hf_config(cfg, dtype_name), indent=2) + "\n")
    if tokenizer is not None:
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer)
        tokenizer.save_pretrained(str(out))
    return out


# ----------------------------------------------------------------------------- tokenizer


def load_tokenizer(path_or_id: str | os.PathLike):
    """The checkpoint's tokenizer (with its chat template) via transformers.AutoTokenizer."""
    ckpt = resolve_checkpoint(path_or_id)
    if not any((ckpt / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{ckpt}: no tokenizer files (expected one of {TOKENIZER_FILES})")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ckpt))
