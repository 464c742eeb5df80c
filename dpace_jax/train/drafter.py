"""The drafter a run starts from: built from drafter.* for the target (its widths, the mask token,
the feature layers, each layer's attention), or read from drafter.init_from (a DFlash HF
directory or a training run directory); checked against the target either way."""

from __future__ import annotations

from typing import Any

from dpace_jax.drafters import dflash as drafter_lib
from dpace_jax.infer import generation
from dpace_jax.targets import model as model_lib


def mask_token_id(d, tokenizer, target_cfg: model_lib.ModelConfig) -> int:
    """The drafter's mask token: the configured id, else the tokenizer's `<|MASK|>`, else the
    first id past the tokenizer (Qwen3: 151669, inside the padded vocabulary)."""
    if d.mask_token_id >= 0:
        mask_id = int(d.mask_token_id)
    else:
        mask_id = tokenizer.convert_tokens_to_ids("<|MASK|>")
        if mask_id is None or mask_id == tokenizer.unk_token_id:
            mask_id = len(tokenizer)
    if not 0 <= mask_id < target_cfg.vocab_size:
        raise ValueError(
            f"drafter.mask_token_id={mask_id} is outside the target vocabulary "
            f"({target_cfg.vocab_size}); set --config.drafter.mask_token_id"
        )
    return mask_id


def attention_layout(drafter) -> dict:
    """layer_types / sliding_window / is_causal of the drafter from drafter.*, checked."""
    window = int(drafter.sliding_window)
    types = tuple(str(t) for t in drafter.layer_types)
    if window < 0:
        raise ValueError(f"drafter.sliding_window={window} must be >= 0 (0: no sliding window)")
    if types:
        if len(types) != int(drafter.num_layers):
            raise ValueError(f"drafter.layer_types has {len(types)} entries; expected one per "
                             f"layer (drafter.num_layers={drafter.num_layers})")
        bad = sorted({t for t in types if t not in drafter_lib.LAYER_TYPES})
        if bad:
            raise ValueError(f"drafter.layer_types: unknown {bad}; expected "
                             f"{' or '.join(drafter_lib.LAYER_TYPES)}")
        sliding = "sliding_attention" in types
        if sliding and not window:
            raise ValueError("drafter.layer_types has sliding_attention layers: set "
                             "drafter.sliding_window >= 1")
        if window and not sliding:
            raise ValueError(f"drafter.sliding_window={window} but drafter.layer_types has no "
                             "sliding_attention layer")
    elif window:
        types = ("sliding_attention",) * int(drafter.num_layers)
    causal = None if drafter.is_causal is None else bool(drafter.is_causal)
    return {"layer_types": types, "sliding_window": window, "is_causal": causal}


def family_config(d):
    """The drafter family's own config (DFlash 2's: its drafter.* fields), or None."""
    from dpace_jax.drafters import drafter_family

    family = drafter_family(d.arch)
    if family.config_type is None:
        return None
    try:
        return family.config_type(**{k: type(getattr(family.config_type, k))(v)
                                     for k, v in d.family.items()})
    except (TypeError, ValueError) as e:
        raise ValueError(f"drafter.*: {e}") from None


def build_drafter(d, target_cfg, tokenizer) -> tuple[drafter_lib.DrafterConfig, Any]:
    """(drafter config, its initial params) from the drafter.* settings `d`
    (dpace_jax.train.settings.DrafterSettings): drafter.init_from's (a DFlash HF directory or a
    training run directory), else the drafter.* fields' (params None: initialize)."""
    params = None
    if d.init_from:
        loaded = generation.load_drafter(d.init_from)
        dcfg, params = loaded.config, loaded.params
        field = f"{loaded.source}: dflash_config.target_layer_ids"
    else:
        field = "drafter.target_layer_ids"
        dcfg = drafter_lib.DrafterConfig.for_target(
            target_cfg, num_layers=d.num_layers, block_size=d.block_size,
            mask_token_id=mask_token_id(d, tokenizer, target_cfg),
            target_layer_ids=tuple(d.target_layer_ids) or None,
            intermediate_size=d.intermediate_size, num_heads=d.heads[0],
            num_kv_heads=d.heads[1], head_dim=d.heads[2], **attention_layout(d), arch=d.arch,
            family_cfg=family_config(d))
    drafter_lib.check_compatible(dcfg, target_cfg, source="drafter config")
    drafter_lib.warn_if_last_layer(dcfg.target_layer_ids, target_cfg.num_layers, field)
    return dcfg, params
