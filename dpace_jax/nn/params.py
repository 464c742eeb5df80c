"""Every parameter of the target and of the drafter, declared once.

An `ArrayInfo` per parameter gives its shape (in the letters of docs/design.md §1), its logical
axes (dpace_jax.sharding maps them to mesh axes), its initializer and its Hugging Face tensor: the
name and the layout. Initialization, abstract shapes, the sharding rules and the HF key maps of the
target (dpace_jax.targets.hf) and of the DFlash drafter (dpace_jax.drafters.hf) all derive from the
tables below. The parameters live in typed pytrees: `LayerParams` (decoder layers, stacked on a
leading L axis; the target and the drafter share it), `TargetParams` and `DrafterParams`.

A Qwen3-MoE target (dpace_jax.targets.qwen3_moe) keeps its attention and norms in `LayerParams`
(stacked over all L layers, without the MLP) and its feed-forwards in two more stacks:
`ExpertParams` (router and experts, stacked over the layers with experts) and `MlpParams` (the dense
MLP of the other layers, its `mlp_only_layers`). An expert's HF tensors are one per expert ("{e}" in
the name); ours stack them on a P axis after the layer axis.

A gpt-oss target (dpace_jax.targets.gpt_oss.layers): attention and norms in `LayerParams`, the rest
of a layer (biases, sinks, router, experts fused in HF's layout: GPT_OSS) in `GptOssParams` over all
L layers.

A Qwen3.5 target (dpace_jax.targets.qwen3_5.layers): the two norms and the dense MLP in
`LayerParams` over all L layers (no q/k/v/o there), the gated DeltaNet of the linear-attention
layers in `LinearParams`, the gated attention of the full-attention layers in `GatedAttnParams`; a
Qwen3.5-MoE target adds `ExpertParams` over every layer and the shared expert in
`SharedExpertParams`. Its RMSNorm weights are stored around zero (the norm scales by 1 + w) and
initialized to zeros.

The per-module HF loading and the schema built from these tables: dpace_jax.nn.schema.

Layouts, from an HF PyTorch Linear weight [out, in] to ours:
  same       as stored (norms, the embedding)
  t          transposed, [in, out]
  in_heads   [heads * E, D] -> [D, heads, E]   (q, k, v)
  out_heads  [D, H * E] -> [H, E, D]           (o)
  flat       [heads * E] -> [heads, E]          (q, k, v biases)
  conv       [C, 1, W] -> [C, W]                (a depthwise convolution's kernel)
  row        [1, D] -> [D]                      (a Linear with one output)
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax


class ArrayInfo(NamedTuple):
    shape: tuple[str, ...]  # dimension letters (docs/design.md §1); X: the drafter's n * D
    axes: tuple[str | None, ...]  # logical axes, one per dimension
    init: str  # "normal" (scaled), "ones" or "zeros"
    hf: str  # the HF tensor's name (a layer's: under the schema's layer prefix)
    layout: str  # see the module doc


LAYER = {
    "attn_norm": ArrayInfo(("D",), (None,), "ones", "input_layernorm.weight", "same"),
    "q": ArrayInfo(("D", "H", "E"), ("embed", "heads", "head_dim"), "normal",
                   "self_attn.q_proj.weight", "in_heads"),
    "k": ArrayInfo(("D", "G", "E"), ("embed", "kv_heads", "head_dim"), "normal",
                   "self_attn.k_proj.weight", "in_heads"),
    "v": ArrayInfo(("D", "G", "E"), ("embed", "kv_heads", "head_dim"), "normal",
                   "self_attn.v_proj.weight", "in_heads"),
    "o": ArrayInfo(("H", "E", "D"), ("heads", "head_dim", "embed"), "normal",
                   "self_attn.o_proj.weight", "out_heads"),
    "mlp_norm": ArrayInfo(("D",), (None,), "ones", "post_attention_layernorm.weight", "same"),
    "gate": ArrayInfo(("D", "F"), ("embed", "mlp"), "normal", "mlp.gate_proj.weight", "t"),
    "up": ArrayInfo(("D", "F"), ("embed", "mlp"), "normal", "mlp.up_proj.weight", "t"),
    "down": ArrayInfo(("F", "D"), ("mlp", "embed"), "normal", "mlp.down_proj.weight", "t"),
    # Qwen3 only (per-head RMSNorm of q and k)
    "q_norm": ArrayInfo(("E",), (None,), "ones", "self_attn.q_norm.weight", "same"),
    "k_norm": ArrayInfo(("E",), (None,), "ones", "self_attn.k_norm.weight", "same"),
}
QK_NORM = ("q_norm", "k_norm")
MLP = ("gate", "up", "down")

# Qwen3-MoE: a sparse layer's router and experts (P experts of width M)
EXPERTS = {
    "router": ArrayInfo(("D", "P"), ("embed", None), "normal", "mlp.gate.weight", "t"),
    "expert_gate": ArrayInfo(("P", "D", "M"), ("expert", "embed", "mlp"), "normal",
                             "mlp.experts.{e}.gate_proj.weight", "t"),
    "expert_up": ArrayInfo(("P", "D", "M"), ("expert", "embed", "mlp"), "normal",
                           "mlp.experts.{e}.up_proj.weight", "t"),
    "expert_down": ArrayInfo(("P", "M", "D"), ("expert", "mlp", "embed"), "normal",
                             "mlp.experts.{e}.down_proj.weight", "t"),
}

def _oss(shape, axes, hf, layout="same"):
    return ArrayInfo(shape, axes, "normal", hf, layout)


GPT_OSS = {  # N = 2M: gate and up interleaved on the last axis, as HF stores them
    "q_bias": _oss(("H", "E"), ("heads", "head_dim"), "self_attn.q_proj.bias", "flat"),
    "k_bias": _oss(("G", "E"), ("kv_heads", "head_dim"), "self_attn.k_proj.bias", "flat"),
    "v_bias": _oss(("G", "E"), ("kv_heads", "head_dim"), "self_attn.v_proj.bias", "flat"),
    "o_bias": _oss(("D",), (None,), "self_attn.o_proj.bias"),
    "sinks": _oss(("H",), ("heads",), "self_attn.sinks"),
    "router": _oss(("D", "P"), ("embed", None), "mlp.router.weight", "t"),
    "router_bias": _oss(("P",), (None,), "mlp.router.bias"),
    "expert_gate_up": _oss(("P", "D", "N"), ("expert", "embed", "mlp"), "mlp.experts.gate_up_proj"),
    "expert_gate_up_bias": _oss(("P", "N"), ("expert", "mlp"), "mlp.experts.gate_up_proj_bias"),
    "expert_down": _oss(("P", "M", "D"), ("expert", "mlp", "embed"), "mlp.experts.down_proj"),
    "expert_down_bias": _oss(("P", "D"), ("expert", None), "mlp.experts.down_proj_bias"),
}

# Qwen3.5. Letters: U linear value heads (with Y their width), K the linear key heads' width,
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
    "conv": ArrayInfo(("C", "W"), (None, None), "normal", "linear_attn.conv1d.weight",
                      "conv"),
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

TARGET = {
    "embed": ArrayInfo(("V", "D"), ("vocab", "embed"), "normal", "model.embed_tokens.weight",
                       "same"),
    "final_norm": ArrayInfo(("D",), (None,), "ones", "model.norm.weight", "same"),
    "lm_head": ArrayInfo(("D", "V"), ("embed", "vocab"), "normal", "lm_head.weight", "t"),
}

DRAFTER = {
    "fc": ArrayInfo(("X", "D"), ("features", "embed"), "normal", "fc.weight", "t"),
    "hidden_norm": ArrayInfo(("D",), (None,), "ones", "hidden_norm.weight", "same"),
    "final_norm": ArrayInfo(("D",), (None,), "ones", "norm.weight", "same"),
}

# name -> logical axes (without the stacked layer axis), for dpace_jax.sharding
AXES = {name: info.axes
        for table in (LAYER, EXPERTS, GPT_OSS, LINEAR, GATED_ATTENTION, SHARED, TARGET, DRAFTER)
        for name, info in table.items()}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerParams:
    """Decoder layers, each array with a leading L axis (see LAYER). A Qwen3.5 target's hold only
    the norms and the dense MLP (its attention: GatedAttnParams, LinearParams)."""

    attn_norm: jax.Array
    q: jax.Array | None = None
    k: jax.Array | None = None
    v: jax.Array | None = None
    o: jax.Array | None = None
    mlp_norm: jax.Array | None = None
    gate: jax.Array | None = None  # None in a Qwen3-MoE target (its MLPs: MlpParams, ExpertParams)
    up: jax.Array | None = None
    down: jax.Array | None = None
    q_norm: jax.Array | None = None
    k_norm: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MlpParams:
    """A Qwen3-MoE target's dense MLPs, stacked over its layers without experts."""

    gate: jax.Array  # [Ld, D, F]
    up: jax.Array  # [Ld, D, F]
    down: jax.Array  # [Ld, F, D]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ExpertParams:
    """A Qwen3-MoE target's routers and experts, stacked over its layers with experts."""

    router: jax.Array  # [Ls, D, P]
    expert_gate: jax.Array  # [Ls, P, D, M]
    expert_up: jax.Array  # [Ls, P, D, M]
    expert_down: jax.Array  # [Ls, P, M, D]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class GptOssParams:
    """A gpt-oss target's GPT_OSS parameters, stacked over all its layers (shapes: GPT_OSS)."""
    q_bias: jax.Array
    k_bias: jax.Array
    v_bias: jax.Array
    o_bias: jax.Array
    sinks: jax.Array
    router: jax.Array
    router_bias: jax.Array
    expert_gate_up: jax.Array
    expert_gate_up_bias: jax.Array
    expert_down: jax.Array
    expert_down_bias: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LinearParams:
    """A Qwen3.5 target's gated DeltaNet, stacked over its linear-attention layers (LINEAR)."""
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
    """A Qwen3.5 target's gated attention, stacked over its full-attention layers."""
    q: jax.Array  # [La, D, H, 2E]: per head the query, then its output gate
    k: jax.Array
    v: jax.Array
    o: jax.Array
    q_norm: jax.Array
    k_norm: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SharedExpertParams:
    """A Qwen3.5-MoE target's shared expert and its sigmoid gate, stacked over all layers."""
    shared_gate: jax.Array
    shared_up: jax.Array
    shared_down: jax.Array
    shared_expert_gate: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TargetParams:
    embed: jax.Array  # [V, D]
    layers: LayerParams
    final_norm: jax.Array  # [D]
    lm_head: jax.Array | None = None  # [D, V]; None when tied to the embedding
    mlp: MlpParams | None = None  # Qwen3-MoE only
    experts: ExpertParams | None = None  # Qwen3-MoE only
    oss: GptOssParams | None = None  # gpt-oss only
    linear: LinearParams | None = None  # Qwen3.5 only
    attn: GatedAttnParams | None = None  # Qwen3.5 only
    shared: SharedExpertParams | None = None  # Qwen3.5-MoE only


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DrafterParams:
    fc: jax.Array  # [n * D, D]
    hidden_norm: jax.Array  # [D]
    layers: LayerParams
    final_norm: jax.Array  # [D]


GROUPS = {"layers": LayerParams, "mlp": MlpParams, "experts": ExpertParams, "oss": GptOssParams,
          "linear": LinearParams, "attn": GatedAttnParams, "shared": SharedExpertParams}


def group_layers(group: str, cfg) -> tuple[int, ...]:
    """The layer ids a stack holds, in order: every layer, those without / with experts
    (Qwen3-MoE), or those of one kind (Qwen3.5: linear or full attention)."""
    if group in ("layers", "oss", "shared"):
        return tuple(range(cfg.num_layers))
    if group in ("linear", "attn"):
        return cfg.linear_layers if group == "linear" else cfg.attention_layers
    return cfg.dense_mlp_layers if group == "mlp" else cfg.moe_layers



def dims(cfg) -> dict[str, int]:
    """The dimension letters' sizes for a ModelConfig or DrafterConfig."""
    out = {"D": cfg.hidden_size, "H": cfg.num_heads, "G": cfg.num_kv_heads, "E": cfg.head_dim,
           "F": cfg.intermediate_size, "V": cfg.vocab_size,
           "P": getattr(cfg, "num_experts", 0), "M": getattr(cfg, "moe_intermediate_size", 0),
           "N": 2 * getattr(cfg, "moe_intermediate_size", 0), "Q": 2 * cfg.head_dim}
    for letter, field in (("U", "linear_num_value_heads"), ("K", "linear_key_head_dim"),
                          ("Y", "linear_value_head_dim"), ("W", "linear_conv_kernel_dim"),
                          ("S", "shared_expert_intermediate_size")):
        out[letter] = getattr(cfg, field, 0)
    out["C"] = 2 * getattr(cfg, "linear_num_key_heads", 0) * out["K"] + out["U"] * out["Y"]
    if hasattr(cfg, "feature_size"):
        out["X"] = cfg.feature_size
    return out


def get(tree, path: tuple[str, ...]):
    """The node at `path` of a typed tree or of nested dicts (e.g. a tree of shardings)."""
    for part in path:
        tree = tree[part] if isinstance(tree, dict) else getattr(tree, part)
    return tree


def flatten(tree) -> dict[tuple[str, ...], object]:
    """{path: leaf} of the present (non-None) parameters of a typed tree."""
    out = {}
    for field in dataclasses.fields(tree):
        value = getattr(tree, field.name)
        if isinstance(value, tuple(GROUPS.values())):
            out.update(((field.name, k), v) for (k,), v in flatten(value).items())
        elif value is not None:
            out[(field.name,)] = value
    return out
