"""A model's parameters as a list of `Param`s, built from the tables of dpace_jax.nn.params: the
schema from which initialization, abstract shapes and the strict HF key maps derive (the target's
and the DFlash drafter's)."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dpace_jax.nn.params import (
    DRAFTER,
    EXPERTS,
    GATED_ATTENTION,
    GPT_OSS,
    GROUPS,
    LAYER,
    LINEAR,
    MLP,
    QK_NORM,
    SHARED,
    TARGET,
    ArrayInfo,
    DrafterParams,
    TargetParams,
    dims,
    get,
    group_layers,
)

HYBRID_ARCHS = ("qwen3_5", "qwen3_5_moe")  # the Qwen3.5 targets (dpace_jax.targets.qwen3_5.layers)


def zero_centered(info: ArrayInfo) -> ArrayInfo:
    """A Qwen3.5 norm: stored around zero (scale 1 + w), so initialized to zeros."""
    return info._replace(init="zeros") if info.init == "ones" else info


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
        if layout in ("conv", "row"):
            return (s[0], 1, s[1]) if layout == "conv" else (1, s[0])
        return (s[1] * s[2], s[0]) if layout == "in_heads" else (s[2], s[0] * s[1])

    def from_hf(self, w: np.ndarray, dims: dict[str, int]) -> np.ndarray:
        if self.info.layout in ("conv", "row"):
            return w.reshape(self.tensor_shape(dims))
        return w if self.info.layout == "same" else w.T.reshape(self.tensor_shape(dims))

    def to_hf(self, x: np.ndarray, dims: dict[str, int]) -> np.ndarray:
        if self.info.layout in ("conv", "row"):
            return x.reshape(self.hf_shape(dims))
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
        config's MLPs in its "mlp" and "experts" stacks; a Qwen3.5 config's own stacks)."""
        arch = getattr(cfg, "arch", None) if self.tree is TargetParams else None
        hybrid = arch in HYBRID_ARCHS
        moe = arch in ("qwen3_moe", "gpt_oss", "qwen3_5_moe")
        top = [Param((n, ), zero_centered(i) if hybrid else i, i.hf) for n, i in self.top.items()
               if not (n == "lm_head" and cfg.tie_word_embeddings)]

        def stack(group, table, names=None, info=lambda i: i):
            return [Param((group, n), info(i), self.layer_prefix + i.hf) for n, i in table.items()
                    if names is None or n in names]

        if hybrid:
            layer = stack("layers", LAYER, ("attn_norm", "mlp_norm") + (() if moe else MLP),
                          zero_centered)
            layer += stack("attn", GATED_ATTENTION) + stack("linear", LINEAR)
            return top + layer + (stack("experts", EXPERTS) + stack("shared", SHARED)
                                  if moe else [])
        layer = stack("layers", LAYER, [n for n in LAYER if (cfg.qk_norm or n not in QK_NORM)
                                        and not (moe and n in MLP)])
        if moe:
            layer += stack("mlp", LAYER, MLP) if cfg.dense_mlp_layers else []
            layer += stack("experts", EXPERTS) if cfg.moe_layers else []
        if arch == "gpt_oss":
            layer += stack("oss", GPT_OSS)
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
        The experts' keys come from fold_in(key, 1) (one per EXPERTS entry), gpt-oss's, Qwen3.5's
        linear attention's and shared expert's from fold_in(key, 2 / 3 / 4); a MoE config's dense
        MLPs use the layer keys of gate / up / down, Qwen3.5's gated attention those of q..o."""
        top_normal = [n for n, i in self.top.items() if i.init == "normal"]
        layer_normal = [n for n, i in LAYER.items() if i.init == "normal"]
        k_layers, *k_top = jax.random.split(key, 1 + len(top_normal))
        keys = {**dict(zip(top_normal, k_top, strict=True)),
                **dict(zip(layer_normal, jax.random.split(k_layers, len(layer_normal)),
                           strict=True)),
                **dict(zip(EXPERTS, jax.random.split(jax.random.fold_in(key, 1), len(EXPERTS)),
                           strict=True))}
        own = {"oss": GPT_OSS, "linear": LINEAR, "shared": SHARED}
        own_keys = {group: dict(zip(table, jax.random.split(jax.random.fold_in(key, 2 + n),
                                                            len(table)), strict=True))
                    for n, (group, table) in enumerate(own.items())}
        leaves = {}
        for p in self.params(cfg):
            shape = p.leaf_shape(cfg)
            if p.info.init in ("ones", "zeros"):
                leaves[p.path] = (jnp.ones if p.info.init == "ones" else jnp.zeros)(shape, dtype)
                continue
            k = own_keys.get(p.path[0], keys)[p.path[-1]]
            leaves[p.path] = (scale * jax.random.normal(k, shape, jnp.float32)).astype(dtype)
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
