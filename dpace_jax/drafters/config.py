"""A drafter's configuration: widths, block size, mask token, the target's feature layers, each
layer's attention (full or sliding window), and its family (`arch`, dpace_jax.drafters.DRAFTERS)
with the family's own nested config; checks against a target.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

from dpace_jax.targets.config import ModelConfig


def default_target_layer_ids(num_target_layers: int, num_features: int) -> tuple[int, ...]:
    """DFlash's feature layers: round(1 + i*(L-4)/(n-1)) for i < n (n=1: L//2)."""
    if num_features < 1:
        raise ValueError(f"number of target features must be >= 1, got {num_features}")
    if num_features == 1:
        ids = (num_target_layers // 2,)
    else:
        span = num_target_layers - 4
        ids = tuple(int(round(1 + i * span / (num_features - 1))) for i in range(num_features))
    if any(not 0 <= j < num_target_layers for j in ids):
        raise ValueError(
            f"default target_layer_ids {list(ids)} fall outside the target's "
            f"{num_target_layers} layers; pass target_layer_ids explicitly"
        )
    return ids


LAYER_TYPES = ("full_attention", "sliding_attention")
# The ModelConfig fields a drafter takes from its target (DFlash) or from its config.json; its
# depth is its own, and it never ties embeddings (it has none) nor drops the q/k norms.
SHARED_FIELDS = ("hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
                 "vocab_size", "rope_theta", "rms_norm_eps", "rope_scaling",
                 "max_position_embeddings")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DrafterConfig:
    """The drafter's layer stack (Qwen3-style decoder layers with q/k norms and no embedding or
    LM head of their own: its widths, depth `num_layers`, rope, eps) and what makes it a
    block drafter of the target."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 40960
    block_size: int
    mask_token_id: int
    target_layer_ids: tuple[int, ...]
    num_target_layers: int
    layer_types: tuple[str, ...] = ()  # per layer, from LAYER_TYPES; () = all full_attention
    sliding_window: int = 0  # W of the sliding_attention layers (0: none)
    # Inside the block (z-lab's rule): None (the field absent) = sliding_attention layers causal,
    # full_attention layers bidirectional; True = every layer causal; False = none.
    is_causal: bool | None = None
    arch: str = "dflash"  # the drafter family (dpace_jax.drafters.DRAFTERS)
    family_cfg: Any = None  # the family's own settings (None for DFlash)

    qk_norm = True  # its layers are Qwen3-style

    @property
    def scaling_dict(self) -> dict | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    def __post_init__(self):
        object.__setattr__(self, "target_layer_ids", tuple(int(j) for j in self.target_layer_ids))
        types = tuple(str(t) for t in self.layer_types) or ("full_attention",) * self.num_layers
        object.__setattr__(self, "layer_types", types)
        if len(types) != self.num_layers:
            raise ValueError(f"drafter config: layer_types has {len(types)} entries, expected one "
                             f"per layer (num_layers={self.num_layers})")
        unknown = sorted({t for t in types if t not in LAYER_TYPES})
        if unknown:
            raise ValueError(f"drafter config: layer_types {unknown} unknown; expected "
                             f"{' or '.join(LAYER_TYPES)}")
        sliding = "sliding_attention" in types
        if int(self.sliding_window) < 0 or (sliding and int(self.sliding_window) < 1):
            raise ValueError(f"drafter config: sliding_window={self.sliding_window}; sliding_"
                             "attention layers need a window >= 1")
        # without sliding layers the window has no effect: one spelling of it, 0
        object.__setattr__(self, "sliding_window", int(self.sliding_window) if sliding else 0)
        object.__setattr__(self, "is_causal",
                           None if self.is_causal is None else bool(self.is_causal))
        from dpace_jax.drafters import drafter_family

        drafter_family(self.arch).check(self)
        positive = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                    "head_dim", "vocab_size", "num_target_layers")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"drafter config: {name} must be >= 1, got {getattr(self, name)}")
        if self.block_size < 2:
            raise ValueError(f"drafter config: block_size must be >= 2, got {self.block_size}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"drafter config: num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if not self.target_layer_ids:
            raise ValueError("drafter config: target_layer_ids is empty")
        bad = [j for j in self.target_layer_ids if not 0 <= j < self.num_target_layers]
        if bad:
            raise ValueError(f"drafter config: target_layer_ids {bad} out of range for "
                             f"num_target_layers={self.num_target_layers}")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"drafter config: mask_token_id={self.mask_token_id} is outside the "
                             f"vocabulary (vocab_size={self.vocab_size})")

    @classmethod
    def for_target(cls, target_cfg: ModelConfig, *, num_layers: int = 5, block_size: int = 16,
                   mask_token_id: int, target_layer_ids=None, layer_types=(),
                   sliding_window: int = 0, is_causal: bool | None = None,
                   intermediate_size: int = 0, num_heads: int = 0, num_kv_heads: int = 0,
                   head_dim: int = 0, arch: str = "dflash", family_cfg=None) -> DrafterConfig:
        """A drafter with the target's widths (as DFlash builds it) and `num_layers` layers; the
        default feature layers are `default_target_layer_ids(L, num_layers)`. `intermediate_size`
        > 0 replaces the target's MLP width (required for a target without a dense one, e.g.
        Qwen3.5-MoE); `num_heads`, `num_kv_heads`, `head_dim` > 0 replace its attention layout
        (the drafter's attention is its own: published drafters of Qwen3.6-27B have 32 / 8 heads
        of 128 against the target's 24 / 4 of 256)."""
        if target_layer_ids is None:
            target_layer_ids = default_target_layer_ids(target_cfg.num_layers, num_layers)
        shared = {f: getattr(target_cfg, f) for f in SHARED_FIELDS}
        if intermediate_size:
            shared["intermediate_size"] = int(intermediate_size)
        elif not target_cfg.intermediate_size:
            raise ValueError(f"drafter.intermediate_size: the target ({target_cfg.arch}) has no "
                             "dense MLP width to copy; set the drafter's MLP width (> 0)")
        for name, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim)):
            if value:
                shared[name] = int(value)
        return cls(**shared, num_layers=num_layers,
                   num_target_layers=target_cfg.num_layers, block_size=block_size,
                   mask_token_id=mask_token_id, target_layer_ids=tuple(target_layer_ids),
                   layer_types=tuple(layer_types), sliding_window=int(sliding_window),
                   is_causal=is_causal, arch=arch, family_cfg=family_cfg)

    @property
    def layer_windows(self) -> tuple[int, ...]:
        """Per layer, the sliding window (0 for full_attention layers)."""
        return tuple(self.sliding_window if t == "sliding_attention" else 0
                     for t in self.layer_types)

    @property
    def layer_causal(self) -> tuple[bool, ...]:
        """Per layer, whether block positions see only the block positions up to their own."""
        return tuple(t == "sliding_attention" if self.is_causal is None else self.is_causal
                     for t in self.layer_types)

    @property
    def num_features(self) -> int:
        return len(self.target_layer_ids)

    @property
    def feature_size(self) -> int:
        """F = n * D, the width of the concatenated target features."""
        return self.num_features * self.hidden_size


_WARNED_LAST_LAYER: set = set()


def warn_if_last_layer(target_layer_ids, num_target_layers: int, field: str) -> bool:
    """Warn (once per field and value) when the feature layers include the target's last layer.
    Its feature is HF's hidden_states[L], the state after the final norm, which is what this
    package and DFlash's reference decoder use; serving engines that capture auxiliary hidden
    states before the final norm would feed the drafter something else. Returns whether it
    applies."""
    ids = tuple(int(j) for j in target_layer_ids)
    if num_target_layers - 1 not in ids:
        return False
    key = (field, ids, num_target_layers)
    if key not in _WARNED_LAST_LAYER:
        _WARNED_LAST_LAYER.add(key)
        warnings.warn(
            f"{field}={list(ids)} includes the target's last layer ({num_target_layers - 1}): "
            "its feature is the state after the target's final norm (HF hidden_states[L]), "
            "which some serving engines do not capture; prefer layers below "
            f"{num_target_layers - 1}", UserWarning, stacklevel=2)
    return True


def check_compatible(cfg: DrafterConfig, target_cfg: ModelConfig, source: str = "drafter") -> None:
    """Raise ValueError naming the field when the drafter cannot run on this target. (Its feature
    layers and mask token then fit as well: DrafterConfig keeps them within num_target_layers
    and vocab_size.)"""
    def fail(what):
        raise ValueError(f"{source}: {what} does not match the target")

    if cfg.hidden_size != target_cfg.hidden_size:
        fail(f"hidden_size={cfg.hidden_size} (target hidden_size={target_cfg.hidden_size})")
    if cfg.vocab_size != target_cfg.vocab_size:
        fail(f"vocab_size={cfg.vocab_size} (target vocab_size={target_cfg.vocab_size})")
    if cfg.num_target_layers != target_cfg.num_layers:
        fail(f"num_target_layers={cfg.num_target_layers} "
             f"(target num_hidden_layers={target_cfg.num_layers})")
