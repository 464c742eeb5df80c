"""Parameters declared once: each parameter is a `Param` (its path in the typed tree, shape in the
letters of docs/design.md §1, logical axes, initializer, and its Hugging Face tensor: name and
layout). A `Schema` is a model's list of Params with the container types of its tree; from it
derive initialization, abstract shapes, the sharding rules (dpace_jax.sharding, by path) and the
strict HF key maps (dpace_jax.targets.hf, dpace_jax.drafters.hf). Each target family and each
drafter family declares its own tables and schema; the decoder layer both share is
dpace_jax.nn.layers.LAYER.

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
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class ArrayInfo(NamedTuple):
    shape: tuple[str, ...]  # dimension letters (docs/design.md §1)
    axes: tuple[str | None, ...]  # logical axes, one per dimension (dpace_jax.sharding)
    init: str  # "normal" (scaled), "ones", "zeros" or "first_tap" (a convolution's identity)
    hf: str  # the HF tensor's name (a layer's: under the schema's layer prefix)
    layout: str  # see the module doc


def zero_centered(info: ArrayInfo) -> ArrayInfo:
    """A norm stored around zero (it scales by 1 + w, Qwen3.5), so initialized to zeros."""
    return info._replace(init="zeros") if info.init == "ones" else info


# How a parameter's initial values are drawn from the model's key: a chain of operations,
# ("split", n, i) -> jax.random.split(key, n)[i], ("fold", n) -> jax.random.fold_in(key, n).
KeyPath = tuple[tuple, ...]


class Param(NamedTuple):
    path: tuple[str, ...]  # in the typed tree: ("embed",), ("layers", "q"), ...
    info: ArrayInfo
    hf: str  # HF name; "{i}": the layer index of a stacked parameter, "{e}": the expert index
    layers: tuple[int, ...] | None = None  # the layer ids a stacked leaf holds, in order
    experts: int = 0  # > 0: one HF tensor per expert (their count)
    key: KeyPath = ()

    @property
    def stacked(self) -> bool:
        return self.layers is not None

    def hf_items(self) -> list[tuple[tuple[int, ...], str]]:
        """(index into the leaf, HF key) of each HF tensor: () for a top-level parameter, (l,)
        for the l-th layer of a stack, (l, e) for its expert e."""
        if not self.stacked:
            return [((), self.hf)]
        if not self.experts:
            return [((n,), self.hf.format(i=i)) for n, i in enumerate(self.layers)]
        return [((n, e), self.hf.format(i=i, e=e)) for n, i in enumerate(self.layers)
                for e in range(self.experts)]

    def hf_keys(self) -> list[str]:
        return [key for _, key in self.hf_items()]

    def shape(self, dims: dict[str, int]) -> tuple[int, ...]:
        """Our shape, per layer for a stacked parameter."""
        return tuple(dims[d] for d in self.info.shape)

    def tensor_shape(self, dims: dict[str, int]) -> tuple[int, ...]:
        """Our shape of what one HF tensor holds (one expert's, for a per-expert parameter)."""
        s = self.shape(dims)
        return s[1:] if self.experts else s

    def leaf_shape(self, dims: dict[str, int]) -> tuple[int, ...]:
        """The whole leaf's shape: with the leading layer axis of a stacked parameter."""
        s = self.shape(dims)
        return (len(self.layers), *s) if self.stacked else s

    def leaf_axes(self) -> tuple[str | None, ...]:
        return (("layers", *self.info.axes) if self.stacked else self.info.axes)

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


def table_params(table: dict[str, ArrayInfo], group: tuple[str, ...], prefix: str,
                 layers: tuple[int, ...] | None, keys: dict[str, KeyPath], *,
                 names=None, info: Callable[[ArrayInfo], ArrayInfo] = lambda i: i,
                 experts: int = 0) -> list[Param]:
    """The Params of `table`'s entries (those in `names`, in table order) under `group`,
    stacked over `layers` (None: top level), their HF names under `prefix`; keys[name] is
    each normal-initialized entry's key path."""
    return [Param(group + (n,), info(i), prefix + i.hf, layers,
                  experts if "{e}" in i.hf else 0, keys.get(n, ()))
            for n, i in table.items() if names is None or n in names]


def split_keys(names, base: KeyPath) -> dict[str, KeyPath]:
    """Key paths for `names`: base, then split into len(names) keys, one each in order."""
    names = list(names)
    return {n: (*base, ("split", len(names), j)) for j, n in enumerate(names)}


def normal_names(table: dict[str, ArrayInfo]) -> list[str]:
    return [n for n, i in table.items() if i.init == "normal"]


def _draw(key: jax.Array, path: KeyPath) -> jax.Array:
    for op in path:
        key = (jax.random.split(key, op[1])[op[2]] if op[0] == "split"
               else jax.random.fold_in(key, op[1]))
    return key


def get(tree, path: tuple[str, ...]):
    """The node at `path` of a typed tree or of nested dicts (e.g. a tree of shardings)."""
    for part in path:
        tree = tree[part] if isinstance(tree, dict) else getattr(tree, part)
    return tree


def flatten(tree) -> dict[tuple[str, ...], Any]:
    """{path: leaf} of the present (non-None) leaves of a typed tree of dataclasses."""
    out = {}
    for field in dataclasses.fields(tree):
        value = getattr(tree, field.name)
        if dataclasses.is_dataclass(value):
            out.update(((field.name, *k), v) for k, v in flatten(value).items())
        elif value is not None:
            out[(field.name,)] = value
    return out


@dataclasses.dataclass(frozen=True)
class Schema:
    """A model's parameters: `params(cfg)` lists them, `dims(cfg)` sizes the shape letters and
    `nodes` gives the dataclass of each container in the tree by its path (() the root)."""

    name: str
    params: Callable[[Any], list[Param]]
    dims: Callable[[Any], dict[str, int]]
    nodes: dict[tuple[str, ...], type]

    def build(self, leaves: dict[tuple[str, ...], Any]):
        """The typed tree from {path: leaf} (containers without a leaf stay None)."""

        def node(prefix):
            fields = {}
            for f in dataclasses.fields(self.nodes[prefix]):
                path = (*prefix, f.name)
                if path in self.nodes:
                    if any(k[:len(path)] == path for k in leaves):
                        fields[f.name] = node(path)
                elif path in leaves:
                    fields[f.name] = leaves[path]
            return self.nodes[prefix](**fields)

        unknown = [p for p in leaves if p[:-1] not in self.nodes]
        if unknown:
            raise ValueError(f"{self.name}: no container for parameter(s) {unknown[:3]}")
        return node(())

    def rules(self, cfg) -> dict[tuple[str, ...], tuple[str | None, ...]]:
        """{path: logical axes of the whole leaf} (the sharding rules of dpace_jax.sharding)."""
        return {p.path: p.leaf_axes() for p in self.params(cfg)}

    def abstract(self, cfg, dtype=jnp.float32):
        """ShapeDtypeStructs of `cfg`'s parameters."""
        d = self.dims(cfg)
        return self.build({p.path: jax.ShapeDtypeStruct(p.leaf_shape(d), dtype)
                           for p in self.params(cfg)})

    def init(self, cfg, key: jax.Array, dtype=jnp.float32, scale: float = 0.02):
        """Random parameters: normal(0, scale) matrices (each from its Param's key path, so a
        seed gives the same values whatever the config leaves out), unit or zero norms."""
        d, leaves = self.dims(cfg), {}
        for p in self.params(cfg):
            shape = p.leaf_shape(d)
            if p.info.init in ("ones", "zeros"):
                leaves[p.path] = (jnp.ones if p.info.init == "ones" else jnp.zeros)(shape, dtype)
            elif p.info.init == "first_tap":  # [..., taps, channels]: tap 0 = 1, the others 0
                leaves[p.path] = jnp.zeros(shape, dtype).at[..., 0, :].set(1)
            else:
                k = _draw(key, p.key)
                leaves[p.path] = (scale * jax.random.normal(k, shape, jnp.float32)).astype(dtype)
        return self.build(leaves)

    def to_hf(self, cfg, tree, dtype=None) -> dict[str, np.ndarray]:
        """{HF key: array in HF layout}, `dtype` casting (None keeps each array's)."""
        d, out = self.dims(cfg), {}
        for p in self.params(cfg):
            x = np.asarray(get(tree, p.path))
            x = x.astype(dtype) if dtype is not None else x
            want = p.leaf_shape(d)
            if x.shape != want:
                raise ValueError(f"parameter {'/'.join(p.path)} has shape {x.shape}, expected "
                                 f"{want} for this {self.name} config")
            for index, key in p.hf_items():
                out[key] = np.ascontiguousarray(p.to_hf(x[index], d))
        return out

    def expected_hf(self, cfg) -> dict[str, tuple[int, ...]]:
        """{HF key: HF shape} of every tensor a checkpoint of `cfg` holds."""
        d = self.dims(cfg)
        return {k: p.hf_shape(d) for p in self.params(cfg) for k in p.hf_keys()}

    def from_hf(self, cfg, tensors: dict[str, np.ndarray], source: str):
        """The typed tree from {HF key: array}; strict: a missing, unexpected or misshapen
        tensor is a ValueError naming it (and `source`)."""
        d, params = self.dims(cfg), self.params(cfg)
        expected = self.expected_hf(cfg)

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
            items = p.hf_items()
            first = p.from_hf(tensors[items[0][1]], d)
            host = np.empty(p.leaf_shape(d), first.dtype)
            for index, key in items:
                host[index] = p.from_hf(tensors[key], d)
            leaves[p.path] = jnp.asarray(host)
        return self.build(leaves)
