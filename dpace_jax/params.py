"""Every parameter of the target and of the drafter, declared once.

An `ArrayInfo` per parameter gives its shape (in the letters of docs/design.md §1), its logical
axes (dpace_jax.sharding maps them to mesh axes), its initializer and its Hugging Face tensor: the
name and the layout. Initialization, abstract shapes, the sharding rules and the HF key maps of the
target (dpace_jax.convert) and of the DFlash drafter (dpace_jax.drafter_hf) all derive from the
tables below. The parameters live in typed pytrees: `LayerParams` (decoder layers, stacked on a
leading L axis; the target and the drafter share it), `TargetParams` and `DrafterParams`.

A Qwen3-MoE target (dpace_jax.moe) keeps its attention and norms in `LayerParams` (stacked over all
L layers, without the MLP) and its feed-forwards in two more stacks: `ExpertParams` (router and
experts, stacked over the layers with experts) and `MlpParams` (the dense MLP of the other layers,
its `mlp_only_layers`). An expert's HF tensors are one per expert ("{e}" in the name); ours stack
them on a P axis after the layer axis.

A gpt-oss target (dpace_jax.gpt_oss): attention and norms in `LayerParams`, the rest of a layer
(biases, sinks, router, experts fused in HF's layout: GPT_OSS) in `GptOssParams` over all L layers.

Layouts, from an HF PyTorch Linear weight [out, in] to ours:
  same       as stored (norms, the embedding)
  t          transposed, [in, out]
  in_heads   [heads * E, D] -> [D, heads, E]   (q, k, v)
  out_heads  [D, H * E] -> [H, E, D]           (o)
  flat       [heads * E] -> [heads, E]          (q, k, v biases)
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class ArrayInfo(NamedTuple):
    shape: tuple[str, ...]  # dimension letters (docs/design.md §1); X: the drafter's n * D
    axes: tuple[str | None, ...]  # logical axes, one per dimension
    init: str  # "normal" (scaled) or "ones"
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
AXES = {name: info.axes for table in (LAYER, EXPERTS, GPT_OSS, TARGET, DRAFTER)
        for name, info in table.items()}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerParams:
    """Decoder layers, each array with a leading L axis (see LAYER)."""

    attn_norm: jax.Array
    q: jax.Array
    k: jax.Array
    v: jax.Array
    o: jax.Array
    mlp_norm: jax.Array
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
class TargetParams:
    embed: jax.Array  # [V, D]
    layers: LayerParams
    final_norm: jax.Array  # [D]
    lm_head: jax.Array | None = None  # [D, V]; None when tied to the embedding
    mlp: MlpParams | None = None  # Qwen3-MoE only
    experts: ExpertParams | None = None  # Qwen3-MoE only
    oss: GptOssParams | None = None  # gpt-oss only


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DrafterParams:
    fc: jax.Array  # [n * D, D]
    hidden_norm: jax.Array  # [D]
    layers: LayerParams
    final_norm: jax.Array  # [D]


GROUPS = {"layers": LayerParams, "mlp": MlpParams, "experts": ExpertParams, "oss": GptOssParams}


def group_layers(group: str, cfg) -> tuple[int, ...]:
    """The layer ids a stack holds, in order: every layer, or (Qwen3-MoE) those without / with
    experts."""
    if group in ("layers", "oss"):
        return tuple(range(cfg.num_layers))
    return cfg.dense_mlp_layers if group == "mlp" else cfg.moe_layers


class Param(NamedTuple):
    path: tuple[str, ...]  # ("embed",), or (group, name): ("layers", "q"), ("experts", "router")
    info: ArrayInfo
    hf: str  # HF name; "{i}": the layer index of a stacked parameter, "{e}": the expert index

    @property
    def stacked(self) -> bool:
        return len(self.path) == 2

    @property
    def per_expert(self) -> bool:
        return "{e}" in self.hf

    def hf_items(self, cfg) -> list[tuple[tuple[int, ...], str]]:
        """(index into the leaf, HF key) of each HF tensor: () for a top-level parameter, (l,)
        for the l-th layer of a stack, (l, e) for its expert e."""
        if not self.stacked:
            return [((), self.hf)]
        ids = group_layers(self.path[0], cfg)
        if not self.per_expert:
            return [((n,), self.hf.format(i=i)) for n, i in enumerate(ids)]
        return [((n, e), self.hf.format(i=i, e=e)) for n, i in enumerate(ids)
                for e in range(cfg.num_experts)]

    def hf_keys(self, cfg) -> list[str]:
        return [key for _, key in self.hf_items(cfg)]

    def shape(self, dims: dict[str, int]) -> tuple[int, ...]:
        """Our shape, per layer for a stacked parameter."""
        return tuple(dims[d] for d in self.info.shape)

    def tensor_shape(self, dims: dict[str, int]) -> tuple[int, ...]:
        """Our shape of what one HF tensor holds (one expert's, for a per-expert parameter)."""
        s = self.shape(dims)
        return s[1:] if self.per_expert else s

    def leaf_shape(self, cfg) -> tuple[int, ...]:
        """The whole leaf's shape: with the leading layer axis of a stacked parameter."""
        s = self.shape(dims(cfg))
        return (len(group_layers(self.path[0], cfg)), *s) if self.stacked else s

    def hf_shape(self, dims: dict[str, int]) -> tuple[int, ...]:
        s, layout = self.tensor_shape(dims), self.info.layout
        if layout == "same":
            return s
        if layout == "t":
            return s[::-1]
        if layout == "flat":
            return (s[0] * s[1],)
        return (s[1] * s[2], s[0]) if layout == "in_heads" else (s[2], s[0] * s[1])

    def from_hf(self, w: np.ndarray, dims: dict[str, int]) -> np.ndarray:
        return w if self.info.layout == "same" else w.T.reshape(self.tensor_shape(dims))

    def to_hf(self, x: np.ndarray, dims: dict[str, int]) -> np.ndarray:
        return x if self.info.layout == "same" else x.reshape(self.hf_shape(dims)[::-1]).T


@dataclasses.dataclass(frozen=True)
class Schema:
    """A model's parameters: its own tables, the shared decoder layer, its HF layer prefix (and,
    for the target, the Qwen3-MoE stacks when the config has them)."""

    name: str
    top: dict[str, ArrayInfo]
    layer_prefix: str
    tree: type

    def params(self, cfg) -> list[Param]:
        """The parameters `cfg` has (q/k norms only with qk_norm; lm_head only untied; a MoE
        config's MLPs in its "mlp" and "experts" stacks)."""
        arch = getattr(cfg, "arch", None) if self.tree is TargetParams else None
        moe = arch in ("qwen3_moe", "gpt_oss")
        top = [Param((n, ), i, i.hf) for n, i in self.top.items()
               if not (n == "lm_head" and cfg.tie_word_embeddings)]
        layer = [Param(("layers", n), i, self.layer_prefix + i.hf) for n, i in LAYER.items()
                 if (cfg.qk_norm or n not in QK_NORM) and not (moe and n in MLP)]
        if moe:
            layer += [Param(("mlp", n), LAYER[n], self.layer_prefix + LAYER[n].hf)
                      for n in MLP if cfg.dense_mlp_layers]
            layer += [Param(("experts", n), i, self.layer_prefix + i.hf)
                      for n, i in EXPERTS.items() if cfg.moe_layers]
        if arch == "gpt_oss":
            layer += [Param(("oss", n), i, self.layer_prefix + i.hf) for n, i in GPT_OSS.items()]
        return top + layer

    def build(self, leaves: dict[tuple[str, ...], object]):
        """The typed tree from {path: leaf}."""
        groups = {g: {p[1]: v for p, v in leaves.items() if p[0] == g}
                  for g in GROUPS if any(p[0] == g for p in leaves)}
        return self.tree(**{g: GROUPS[g](**fields) for g, fields in groups.items()},
                         **{p[0]: v for p, v in leaves.items() if len(p) == 1})

    def abstract(self, cfg, dtype=jnp.float32):
        """ShapeDtypeStructs of `cfg`'s parameters."""
        return self.build({p.path: jax.ShapeDtypeStruct(p.leaf_shape(cfg), dtype)
                           for p in self.params(cfg)})

    def init(self, cfg, key: jax.Array, dtype=jnp.float32, scale: float = 0.02):
        """Random parameters: normal(0, scale) matrices, unit norms. `key` splits into one key
        for the layers (split again, one per layer matrix in table order) and one per top-level
        matrix in table order, so a seed gives the same values whatever the config leaves out.
        The experts' keys come from fold_in(key, 1) (one per EXPERTS entry); a MoE config's
        dense MLPs use the layer keys of gate / up / down."""
        top_normal = [n for n, i in self.top.items() if i.init == "normal"]
        layer_normal = [n for n, i in LAYER.items() if i.init == "normal"]
        k_layers, *k_top = jax.random.split(key, 1 + len(top_normal))
        keys = {**dict(zip(top_normal, k_top, strict=True)),
                **dict(zip(layer_normal, jax.random.split(k_layers, len(layer_normal)),
                           strict=True)),
                **dict(zip(EXPERTS, jax.random.split(jax.random.fold_in(key, 1), len(EXPERTS)),
                           strict=True))}
        oss_keys = dict(zip(GPT_OSS, jax.random.split(jax.random.fold_in(key, 2), len(GPT_OSS)),
                            strict=True))
        leaves = {}
        for p in self.params(cfg):
            shape = p.leaf_shape(cfg)
            leaves[p.path] = (
                jnp.ones(shape, dtype) if p.info.init == "ones" else
                (scale * jax.random.normal((oss_keys if p.path[0] == "oss" else keys)[p.path[-1]],
                                           shape, jnp.float32)).astype(dtype))
        return self.build(leaves)

    def to_hf(self, cfg, tree, dtype=None) -> dict[str, np.ndarray]:
        """{HF key: array in HF layout}, `dtype` casting (None keeps each array's)."""
        d, out = dims(cfg), {}
        for p in self.params(cfg):
            x = np.asarray(get(tree, p.path))
            x = x.astype(dtype) if dtype is not None else x
            want = p.leaf_shape(cfg)
            if x.shape != want:
                raise ValueError(f"parameter {'/'.join(p.path)} has shape {x.shape}, expected "
                                 f"{want} for this {self.name} config")
            for index, key in p.hf_items(cfg):
                out[key] = np.ascontiguousarray(p.to_hf(x[index], d))
        return out

    def from_hf(self, cfg, tensors: dict[str, np.ndarray], source: str):
        """The typed tree from {HF key: array}; strict: a missing, unexpected or misshapen
        tensor is a ValueError naming it (and `source`)."""
        d, params = dims(cfg), self.params(cfg)
        expected = {k: p.hf_shape(d) for p in params for k in p.hf_keys(cfg)}

        def listed(keys):
            return f"{keys[:8]}{' ...' if len(keys) > 8 else ''}"

        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise ValueError(f"{source}: missing key(s) {listed(missing)}")
        unexpected = sorted(set(tensors) - set(expected))
        if unexpected:
            raise ValueError(f"{source}: unexpected key(s) {listed(unexpected)}")
        for key, shape in expected.items():
            if tuple(tensors[key].shape) != shape:
                raise ValueError(f"{source}: key {key} has shape {tuple(tensors[key].shape)}, "
                                 f"expected {shape}")
        leaves = {}
        for p in params:
            items = p.hf_items(cfg)
            first = p.from_hf(tensors[items[0][1]], d)
            host = np.empty(p.leaf_shape(cfg), first.dtype)
            for index, key in items:
                host[index] = p.from_hf(tensors[key], d)
            leaves[p.path] = jnp.asarray(host)
        return self.build(leaves)


TARGET_SCHEMA = Schema("target", TARGET, "model.layers.{i}.", TargetParams)
DRAFTER_SCHEMA = Schema("drafter", DRAFTER, "layers.{i}.", DrafterParams)


def dims(cfg) -> dict[str, int]:
    """The dimension letters' sizes for a ModelConfig or DrafterConfig."""
    out = {"D": cfg.hidden_size, "H": cfg.num_heads, "G": cfg.num_kv_heads, "E": cfg.head_dim,
           "F": cfg.intermediate_size, "V": cfg.vocab_size,
           "P": getattr(cfg, "num_experts", 0), "M": getattr(cfg, "moe_intermediate_size", 0),
           "N": 2 * getattr(cfg, "moe_intermediate_size", 0)}
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
