"""Qwen3.5 targets (HF `Qwen3_5ForCausalLM` / `Qwen3_5MoeForCausalLM`, and the text model of
their `...ForConditionalGeneration` checkpoints; Qwen3.6 uses the same architecture): the two
families. A layer's pieces: dpace_jax.targets.qwen3_5.parts; the gated delta rule:
dpace_jax.targets.qwen3_5.gated_delta; the layer loop's unit (a period of layers) and the
decoding cache that commits only accepted tokens: dpace_jax.targets.qwen3_5.decoder. docs/design.md
§10 states the formulas.

Parameters (`Qwen35Layers`): the two norms and the dense MLP over all L layers (`norms`), the
gated DeltaNet of the linear-attention layers (`linear`), the gated attention of the
full-attention layers (`attn`); a Qwen3.5-MoE target adds routed experts (`experts`) and a shared
expert (`shared`) over every layer. Every RMSNorm but the DeltaNet's output norm is stored around
zero (the norm scales by 1 + w) and initialized to zeros.
"""

from __future__ import annotations

import dataclasses

import jax

from dpace_jax.nn import layers
from dpace_jax.nn.layers import LAYER, MLP, QK_NORM, LayerParams
from dpace_jax.nn.schema import ArrayInfo, split_keys, table_params, zero_centered
from dpace_jax.targets import experts as experts_lib
from dpace_jax.targets.base import LAYER_PREFIX, Family, keys, top_params
from dpace_jax.targets.experts import EXPERTS, ExpertParams, ExpertsConfig
from dpace_jax.targets.qwen3_5 import decoder
from dpace_jax.targets.qwen3_5 import parts as q35

LAYER_TYPES = ("linear_attention", "full_attention")
# transformers' Qwen3_5TextConfig defaults for fields a config.json may leave out
LINEAR_DEFAULTS = {"linear_num_key_heads": 16, "linear_num_value_heads": 32,
                   "linear_key_head_dim": 128, "linear_value_head_dim": 128,
                   "linear_conv_kernel_dim": 4}
MULTIMODAL_PREFIX = "model.language_model."  # the text model's keys in a multimodal checkpoint
NOT_TEXT_PREFIXES = ("model.visual.", "mtp.")  # its vision tower and multi-token-prediction head
LINEAR_KEY, SHARED_KEY = 3, 4  # fold_in(model key, n): the LINEAR / SHARED entries' keys

# Letters: U linear value heads (with Y their width), K the linear key heads' width,
# C = 2 * (linear key heads) * K + U * Y the convolved q|k|v channels, W the convolution's width,
# Q = 2E (per head a query and its output gate), S the shared expert's width.
LINEAR = {
    "in_qkv": ArrayInfo(("D", "C"), ("embed", None), "normal", "linear_attn.in_proj_qkv.weight",
                        "t"),
    "in_z": ArrayInfo(("D", "U", "Y"), ("embed", "heads", "head_dim"), "normal",
                      "linear_attn.in_proj_z.weight", "in_heads"),
    "in_b": ArrayInfo(("D", "U"), ("embed", "heads"), "normal", "linear_attn.in_proj_b.weight",
                      "t"),
    "in_a": ArrayInfo(("D", "U"), ("embed", "heads"), "normal", "linear_attn.in_proj_a.weight",
                      "t"),
    "conv": ArrayInfo(("C", "W"), (None, None), "normal", "linear_attn.conv1d.weight", "conv"),
    "dt_bias": ArrayInfo(("U",), ("heads",), "normal", "linear_attn.dt_bias", "same"),
    "a_log": ArrayInfo(("U",), ("heads",), "normal", "linear_attn.A_log", "same"),
    "gated_norm": ArrayInfo(("Y",), (None,), "ones", "linear_attn.norm.weight", "same"),
    "out": ArrayInfo(("U", "Y", "D"), ("heads", "head_dim", "embed"), "normal",
                     "linear_attn.out_proj.weight", "out_heads"),
}
GATED_ATTENTION = {
    "q": ArrayInfo(("D", "H", "Q"), ("embed", "heads", "head_dim"), "normal",
                   "self_attn.q_proj.weight", "in_heads"),
    **{n: LAYER[n] for n in ("k", "v", "o")},
    **{n: LAYER[n]._replace(init="zeros") for n in QK_NORM},
}
SHARED = {
    "shared_gate": ArrayInfo(("D", "S"), ("embed", "mlp"), "normal",
                             "mlp.shared_expert.gate_proj.weight", "t"),
    "shared_up": ArrayInfo(("D", "S"), ("embed", "mlp"), "normal",
                           "mlp.shared_expert.up_proj.weight", "t"),
    "shared_down": ArrayInfo(("S", "D"), ("mlp", "embed"), "normal",
                             "mlp.shared_expert.down_proj.weight", "t"),
    "shared_expert_gate": ArrayInfo(("D",), ("embed",), "normal", "mlp.shared_expert_gate.weight",
                                    "row"),
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LinearParams:
    """The gated DeltaNet, stacked over the linear-attention layers (LINEAR)."""

    in_qkv: jax.Array
    in_z: jax.Array
    in_b: jax.Array
    in_a: jax.Array
    conv: jax.Array
    dt_bias: jax.Array
    a_log: jax.Array
    gated_norm: jax.Array
    out: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class GatedAttnParams:
    """The gated attention, stacked over the full-attention layers."""

    q: jax.Array  # [La, D, H, 2E]: per head the query, then its output gate
    k: jax.Array
    v: jax.Array
    o: jax.Array
    q_norm: jax.Array
    k_norm: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SharedExpertParams:
    """The shared expert and its sigmoid gate, stacked over all layers (Qwen3.5-MoE)."""

    shared_gate: jax.Array
    shared_up: jax.Array
    shared_down: jax.Array
    shared_expert_gate: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Qwen35Layers:
    norms: LayerParams  # the two norms (and the dense MLP) of every layer
    linear: LinearParams
    attn: GatedAttnParams
    experts: ExpertParams | None = None
    shared: SharedExpertParams | None = None


@dataclasses.dataclass(frozen=True)
class Qwen35Config:
    layer_types: tuple[str, ...]
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    partial_rotary_factor: float = 1.0
    multimodal: bool = False  # the checkpoint's text model sits under model.language_model.
    experts: ExpertsConfig | None = None  # Qwen3.5-MoE: routed experts in every layer
    shared_expert_intermediate_size: int = 0

    @property
    def linear_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == "linear_attention")

    @property
    def attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == "full_attention")

    @property
    def conv_channels(self) -> int:
        """C: the convolved q|k|v channels."""
        return (2 * self.linear_num_key_heads * self.linear_key_head_dim
                + self.linear_num_value_heads * self.linear_value_head_dim)


def rotary_dim(cfg) -> int:
    return int(cfg.head_dim * cfg.family_cfg.partial_rotary_factor)


def text_tensors(tensors: dict, multimodal: bool) -> tuple[dict, dict]:
    """A checkpoint's {key: entry} restricted to the text model, under the text-only names ->
    (that dict, {text-only name: stored name}). The vision tower and the multi-token-prediction
    head are dropped (NOT_TEXT_PREFIXES); a multimodal checkpoint's model.language_model.* keys
    become model.*. Anything else stays, so the strict key check still names it."""
    out, original = {}, {}
    for key, entry in tensors.items():
        if key.startswith(NOT_TEXT_PREFIXES):
            continue
        name = key
        if multimodal and key.startswith(MULTIMODAL_PREFIX):
            name = "model." + key[len(MULTIMODAL_PREFIX):]
            original[name] = key
        out[name] = entry
    return out, original


class Qwen35(Family):
    arch = "qwen3_5"
    hf_architectures = ("Qwen3_5ForCausalLM", "Qwen3_5ForConditionalGeneration")
    model_types = ("qwen3_5", "qwen3_5_text")
    export = ("Qwen3_5ForCausalLM", "qwen3_5_text")
    config_type = Qwen35Config
    layers_type = Qwen35Layers
    norm = staticmethod(q35.rms_norm)
    moe = False

    # --------------------------------------------------------------- configuration

    def text_config(self, hf):
        """A `..ForConditionalGeneration` config nests the text model's fields under
        text_config (and its tensors under model.language_model., text_tensors)."""
        if not isinstance(hf.get("text_config"), dict):
            return hf, False
        text = dict(hf["text_config"])
        if "tie_word_embeddings" in hf:  # the outer model's setting governs the tying
            text["tie_word_embeddings"] = hf["tie_word_embeddings"]
        text["model_type"] = hf.get("model_type", text.get("model_type"))
        text["architectures"] = [a.replace("ForConditionalGeneration", "ForCausalLM")
                                 for a in hf.get("architectures") or []]
        return text, True

    def family_config(self, hf, num_layers, source, multimodal=False):
        if not hf.get("attn_output_gate", True):
            raise ValueError(f"{source}: attn_output_gate=False is not supported (Qwen3.5's "
                             "attention gates its output)")
        types = hf.get("layer_types")
        if types is None:
            every = int(hf.get("full_attention_interval", 4))
            types = ["full_attention" if (i + 1) % every == 0 else "linear_attention"
                     for i in range(num_layers)]
        rope = hf.get("rope_parameters") or {}
        fields = {k: int(hf.get(k, d)) for k, d in LINEAR_DEFAULTS.items()}
        experts, shared = None, 0
        if self.moe:
            experts = ExpertsConfig(**experts_lib.hf_fields(hf, source, norm_topk_prob=True))
            if "shared_expert_intermediate_size" not in hf:
                raise ValueError(f"{source}: missing field 'shared_expert_intermediate_size'")
            shared = int(hf["shared_expert_intermediate_size"])
        f = Qwen35Config(layer_types=tuple(str(t) for t in types), **fields,
                         partial_rotary_factor=float(rope.get(
                             "partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))),
                         multimodal=multimodal, experts=experts,
                         shared_expert_intermediate_size=shared)
        self._check(f, num_layers, int(hf.get("head_dim") or 0), source)
        return f

    def make_config(self, **fields):
        expert_fields = {f.name for f in dataclasses.fields(ExpertsConfig)}
        experts = {k: fields.pop(k) for k in list(fields) if k in expert_fields}
        if self.moe:
            experts.setdefault("norm_topk_prob", True)
            fields["experts"] = ExpertsConfig(**experts)
        elif experts:
            raise ValueError(f"arch={self.arch!r} has no experts ({sorted(experts)})")
        return Qwen35Config(**fields)

    def _check(self, f: Qwen35Config, num_layers: int, head_dim: int, source: str) -> None:
        types = f.layer_types
        if len(types) != num_layers or any(t not in LAYER_TYPES for t in types):
            raise ValueError(f"{source}: layer_types={list(types)} must hold {num_layers} "
                             f"entries from {LAYER_TYPES}")
        if f.linear_num_key_heads < 1 or f.linear_num_value_heads % f.linear_num_key_heads:
            raise ValueError(f"{source}: linear_num_value_heads={f.linear_num_value_heads} must "
                             f"be a multiple of linear_num_key_heads={f.linear_num_key_heads}")
        if f.linear_conv_kernel_dim < 1:
            raise ValueError(f"{source}: linear_conv_kernel_dim={f.linear_conv_kernel_dim} must "
                             "be >= 1")
        rot = head_dim * f.partial_rotary_factor
        if head_dim and (not 0 < f.partial_rotary_factor <= 1 or rot != int(rot) or int(rot) % 2):
            raise ValueError(f"{source}: partial_rotary_factor={f.partial_rotary_factor} must "
                             f"give an even number of rotary dimensions of head_dim={head_dim}")
        if (f.experts is not None) != self.moe:
            raise ValueError(f"{source}: a {self.arch} target "
                             f"{'needs' if self.moe else 'has no'} routed experts")
        if f.experts is not None:
            experts_lib.check(f.experts, source)

    def check_fields(self, cfg, source="config"):
        self._check(cfg.family_cfg, cfg.num_layers, cfg.head_dim, source)

    def check(self, cfg, source="config"):
        self.check_fields(cfg, source)
        if cfg.rope_scaling:
            raise ValueError(f"rope_parameters: rope_type={cfg.scaling_dict.get('rope_type')!r} "
                             "is not supported for a Qwen3.5 target (only the default RoPE)")

    def hf_config(self, cfg, out):
        f = cfg.family_cfg
        del out["rope_theta"], out["rope_scaling"]
        out.update({k: getattr(f, k) for k in LINEAR_DEFAULTS})
        out.update(layer_types=list(f.layer_types), attn_output_gate=True,
                   rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta,
                                    "partial_rotary_factor": f.partial_rotary_factor})
        if self.moe:
            del out["intermediate_size"]
            out.update(num_experts=f.experts.num_experts,
                       num_experts_per_tok=f.experts.num_experts_per_tok,
                       moe_intermediate_size=f.experts.moe_intermediate_size,
                       shared_expert_intermediate_size=f.shared_expert_intermediate_size,
                       output_router_logits=False)

    # --------------------------------------------------------------- parameters

    def dims(self, cfg):
        f = cfg.family_cfg
        out = {**layers.dims(cfg), "U": f.linear_num_value_heads, "K": f.linear_key_head_dim,
               "Y": f.linear_value_head_dim, "W": f.linear_conv_kernel_dim,
               "C": f.conv_channels, "Q": 2 * cfg.head_dim,
               "S": f.shared_expert_intermediate_size}
        return {**out, **(f.experts.dims() if f.experts else {})}

    def params(self, cfg):
        f = cfg.family_cfg
        _, layer_keys = keys(["embed", "lm_head"])
        every = tuple(range(cfg.num_layers))
        norms = ("attn_norm", "mlp_norm") + (() if self.moe else MLP)
        out = (top_params(cfg, zero_centered)
               + table_params(LAYER, ("layers", "norms"), LAYER_PREFIX, every, layer_keys,
                              names=norms, info=zero_centered)
               + table_params(GATED_ATTENTION, ("layers", "attn"), LAYER_PREFIX,
                              f.attention_layers, layer_keys)
               + table_params(LINEAR, ("layers", "linear"), LAYER_PREFIX, f.linear_layers,
                              split_keys(LINEAR, (("fold", LINEAR_KEY),))))
        if self.moe:
            out += table_params(EXPERTS, ("layers", "experts"), LAYER_PREFIX, every,
                                split_keys(EXPERTS, (("fold", experts_lib.EXPERTS_KEY),)),
                                experts=f.experts.num_experts)
            out += table_params(SHARED, ("layers", "shared"), LAYER_PREFIX, every,
                                split_keys(SHARED, (("fold", SHARED_KEY),)))
        return out

    def nodes(self):
        return {**super().nodes(), ("layers", "norms"): LayerParams,
                ("layers", "linear"): LinearParams, ("layers", "attn"): GatedAttnParams,
                ("layers", "experts"): ExpertParams, ("layers", "shared"): SharedExpertParams}

    def checkpoint_tensors(self, cfg, hf, raw, source):
        tensors, original = text_tensors(raw, cfg.family_cfg.multimodal)
        return tensors, {}, original

    # --------------------------------------------------------------- forwards

    def rope(self, cfg, positions):
        """cos, sin [B, T, R] of the rotary dimensions R = rotary_dim(cfg)."""
        return layers.rope_cos_sin(positions, layers.rope_inv_freq(rotary_dim(cfg),
                                                                   cfg.rope_theta))

    def layers_per_unit(self, cfg):
        return decoder.period(cfg)

    def unit_params(self, tree, cfg, u):
        per = decoder.period(cfg)
        lin, att = decoder.kinds(cfg)
        return {"layers": decoder.rows(tree.norms, u, per),
                "linear": decoder.rows(tree.linear, u, len(lin)),
                "attn": decoder.rows(tree.attn, u, len(att)),
                "experts": None if tree.experts is None else decoder.rows(tree.experts, u, per),
                "shared": None if tree.shared is None else decoder.rows(tree.shared, u, per)}

    def unit(self, x, buf, p, u, ctx, cache, cfg):
        return decoder.unit(x, buf, p, u, ctx, cache, cfg)

    def init_cache(self, cfg, batch, length, dtype, num_units=None):
        return decoder.zeros(cfg, batch, length, dtype, num_units)

    def init_pipeline_cache(self, cfg, batch, length, dtype, num_units, num_stages):
        """Rings of the recurrent states of the last num_stages + W + 1 positions (decoder's
        RingCache: a flush rewinds by at most num_stages, the convolution reads W - 1 back)."""
        ring = num_stages + cfg.family_cfg.linear_conv_kernel_dim + 1
        return decoder.ring_zeros(cfg, batch, length, dtype, num_units, ring)

    def unit_cache(self, cache, cfg, u):
        return decoder.unit_cache(cache, cfg, u)

    def set_unit_cache(self, cache, cfg, u, value):
        return decoder.set_unit_cache(cache, cfg, u, value)

    def begin(self, cache, cfg, tokens, keep):
        return decoder.begin(cache, cfg, tokens, keep)

    def commit(self, cache, cfg, keep):
        return decoder.commit(cache, keep)

    def check_stages(self, cfg, num_stages):
        per = decoder.period(cfg)
        if self.num_units(cfg) % num_stages:
            raise ValueError(f"num_stages={num_stages} must divide the target's "
                             f"{self.num_units(cfg)} periods of {per} layers (layer_types "
                             "repeats every period; a stage holds whole periods)")


class Qwen35Moe(Qwen35):
    arch = "qwen3_5_moe"
    hf_architectures = ("Qwen3_5MoeForCausalLM", "Qwen3_5MoeForConditionalGeneration")
    model_types = ("qwen3_5_moe", "qwen3_5_moe_text")
    export = ("Qwen3_5MoeForCausalLM", "qwen3_5_moe_text")
    dense_mlp = False
    moe = True


DENSE = Qwen35()
MOE = Qwen35Moe()
