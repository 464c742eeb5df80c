"""The target's configuration: `ModelConfig`, read from an HF config.json (`from_hf`) with the
fields of every supported architecture (Qwen3, Llama-3.1, Qwen3-MoE, gpt-oss, Qwen3.5 dense and
MoE); the architecture-specific fields are parsed and checked by dpace_jax.targets.qwen3_moe,
gpt_oss, qwen3_5.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dpace_jax.targets import qwen3_moe as moe
from dpace_jax.targets.gpt_oss import layers as gpt_oss
from dpace_jax.targets.qwen3_5 import decoder as hybrid
from dpace_jax.targets.qwen3_5 import layers as qwen3_5

SUPPORTED_ARCHITECTURES = {"Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama",
                           "Qwen3MoeForCausalLM": "qwen3_moe", "GptOssForCausalLM": "gpt_oss",
                           "Qwen3_5ForCausalLM": "qwen3_5", "Qwen3_5MoeForCausalLM": "qwen3_5_moe"}
MODEL_TYPES = {"qwen3": "qwen3", "llama": "llama", "qwen3_moe": "qwen3_moe", "gpt_oss": "gpt_oss",
               "qwen3_5": "qwen3_5", "qwen3_5_text": "qwen3_5", "qwen3_5_moe": "qwen3_5_moe",
               "qwen3_5_moe_text": "qwen3_5_moe"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qk_norm: bool = True
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # hashable form of the HF dict
    max_position_embeddings: int = 40960
    arch: str = "qwen3"
    # Qwen3-MoE (arch "qwen3_moe", dpace_jax.targets.qwen3_moe); unused by the dense architectures
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    moe_dispatch: str = "sorted"  # "dense" (the reference) or "sorted"; not an HF field
    # gpt-oss (arch "gpt_oss", dpace_jax.targets.gpt_oss.layers; also
    # num_experts..moe_intermediate_size)
    sliding_window: int = 0
    layer_types: tuple[str, ...] = ()
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    # Qwen3.5 (archs "qwen3_5", "qwen3_5_moe": dpace_jax.targets.qwen3_5.layers; layer_types: linear
    # / full attention; the MoE variant also uses num_experts..moe_intermediate_size)
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 0
    partial_rotary_factor: float = 1.0
    shared_expert_intermediate_size: int = 0
    multimodal: bool = False  # the checkpoint's text model sits under model.language_model.

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> ModelConfig:
        """Build from an HF config.json dict; unsupported architectures raise ValueError."""
        hf, multimodal = qwen3_5.text_config(hf)
        archs = hf.get("architectures") or []
        known = [SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES]
        arch = known[0] if known else None
        if arch is None and not archs:
            arch = MODEL_TYPES.get(hf.get("model_type"))
        if arch is None:
            raise ValueError(
                f"{source}: unsupported architecture {archs or hf.get('model_type')!r}; "
                f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
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
            return cls(
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"] if arch != "qwen3_5_moe"
                                      else hf.get("intermediate_size", 0)),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(hf.get("head_dim") or hidden // heads),
                rope_theta=float(theta if theta is not None else 10000.0),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                qk_norm=arch in ("qwen3", "qwen3_moe", *qwen3_5.ARCHS),
                rope_scaling=freeze_scaling(scaling),
                max_position_embeddings=int(hf.get("max_position_embeddings", 40960)),
                arch=arch,
                **(moe.hf_fields(hf, int(hf["num_hidden_layers"]), source)
                   if arch == "qwen3_moe" else {}),
                **(gpt_oss.hf_fields(hf, int(hf["num_hidden_layers"]), source)
                   if arch == "gpt_oss" else {}),
                **(dict(qwen3_5.hf_fields(hf, n_layers, arch, source), multimodal=multimodal)
                   if arch in qwen3_5.ARCHS else {}),
            )
        except KeyError as e:
            raise ValueError(f"{source}: missing field {e.args[0]!r}") from None

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """The layer ids with experts (Qwen3-MoE, Qwen3.5-MoE); () for a dense model."""
        return hybrid.moe_layers(self) if self.hybrid else moe.sparse_layers(self)

    @property
    def hybrid(self) -> bool:
        """A Qwen3.5 target (linear and full attention layers;
        dpace_jax.targets.qwen3_5.decoder)."""
        return self.arch in qwen3_5.ARCHS

    @property
    def linear_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == "linear_attention")

    @property
    def attention_layers(self) -> tuple[int, ...]:
        """The full-attention layer ids of a Qwen3.5 target."""
        return tuple(i for i, t in enumerate(self.layer_types) if t == "full_attention")

    @property
    def dense_mlp_layers(self) -> tuple[int, ...]:
        """A Qwen3-MoE model's layer ids without experts (its dense MLP stack); () otherwise."""
        sparse = self.moe_layers
        return (tuple(i for i in range(self.num_layers) if i not in sparse)
                if self.arch == "qwen3_moe" else ())

    @property
    def scaling_dict(self) -> dict | None:
        return dict(self.rope_scaling) if self.rope_scaling else None


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
