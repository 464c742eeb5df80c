"""The target's configuration: `ModelConfig`, the fields every family has, plus `family_cfg`, the
family's own nested config (None for Qwen3 / Llama; e.g. a Qwen3MoeConfig, GptOssConfig,
Qwen35Config). Read from an HF config.json with `from_hf`, through the family registry
(dpace_jax.targets.FAMILIES).
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # a dense MLP's width (0 where no layer has one: Qwen3.5-MoE)
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # hashable form of the HF dict
    max_position_embeddings: int = 40960
    arch: str = "qwen3"
    family_cfg: Any = None

    def __post_init__(self):
        fam = self.family
        want = fam.config_type
        if want is None and self.family_cfg is not None:
            raise ValueError(f"arch={self.arch!r} has no family config; got "
                             f"{type(self.family_cfg).__name__}")
        if want is not None and not isinstance(self.family_cfg, want):
            raise ValueError(f"arch={self.arch!r} needs family_cfg={want.__name__}(...), got "
                             f"{type(self.family_cfg).__name__}")

    @classmethod
    def make(cls, *, arch: str = "qwen3", **fields) -> ModelConfig:
        """A config from flat fields: the common ones, and the family's own (e.g. num_experts
        for arch="qwen3_moe"), which go into its nested config (tests, benchmarks)."""
        from dpace_jax.targets import family

        common = {f.name for f in dataclasses.fields(cls)} - {"arch", "family_cfg"}
        own = {k: v for k, v in fields.items() if k not in common}
        return cls(**{k: v for k, v in fields.items() if k in common}, arch=arch,
                   family_cfg=family(arch).make_config(**own))

    @property
    def family(self):
        """The registry entry of this config's family (dpace_jax.targets.base.Family)."""
        from dpace_jax.targets import family

        return family(self.arch)

    @property
    def qk_norm(self) -> bool:
        return self.family.qk_norm

    @property
    def scaling_dict(self) -> dict | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> ModelConfig:
        """Build from an HF config.json dict; unsupported architectures and bad fields raise
        ValueError naming them."""
        from dpace_jax.targets import family_of_hf

        fam = family_of_hf(hf, source)
        hf, multimodal = fam.text_config(hf)
        try:
            heads = int(hf["num_attention_heads"])
            hidden = int(hf["hidden_size"])
            scaling = hf.get("rope_scaling")
            theta = hf.get("rope_theta")
            if theta is None and isinstance(hf.get("rope_parameters"), dict):
                theta = hf["rope_parameters"].get("rope_theta")
                rope_type = hf["rope_parameters"].get("rope_type", "default")
                if scaling is None and rope_type != "default":
                    scaling = hf["rope_parameters"]
            n_layers = int(hf["num_hidden_layers"])
            cfg = cls(
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"] if fam.dense_mlp
                                      else hf.get("intermediate_size", 0)),
                num_layers=n_layers,
                num_heads=heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(hf.get("head_dim") or hidden // heads),
                rope_theta=float(theta if theta is not None else 10000.0),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                rope_scaling=freeze_scaling(scaling),
                max_position_embeddings=int(hf.get("max_position_embeddings", 40960)),
                arch=fam.arch,
                family_cfg=fam.family_config(hf, n_layers, source, multimodal=multimodal),
            )
        except KeyError as e:
            raise ValueError(f"{source}: missing field {e.args[0]!r}") from None
        fam.check_fields(cfg, source)
        return cfg


def freeze_scaling(scaling: dict | None) -> tuple | None:
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    keys = ("rope_type", "factor", "low_freq_factor", "high_freq_factor",
            "original_max_position_embeddings", "beta_fast", "beta_slow", "truncate",
            "attention_factor", "mscale", "mscale_all_dim")
    frozen = {"rope_type": kind, **{k: scaling[k] for k in keys[1:] if k in scaling}}
    return tuple(sorted(frozen.items()))
