"""The one layer loop of every target forward (training features, the whole model, the cached
decoding forward and a pipeline stage of SPD), run per family (dpace_jax.targets.base.Family).

`Context` is what a unit needs besides its parameters and cache slice: positions and their RoPE,
how to attend (`attend`: causal over the block without a cache, or written into a cache at
`start` and masked by position), what a Qwen3.5 recurrent layer commits (`keep`), and where each
layer's output goes for the drafter's features (`record`). `run_layers` scans the units with an
index, so each unit's weights and cache slice are read in place from the stacks, and the cache
rides in the loop's carry (updated in place).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from dpace_jax.nn import layers

# The cache-free forwards' `attention` -> layers.causal_attention's implementation.
ATTENTION = {
    "einsum": None,  # our einsum attention (layers.attention_logits / masked_softmax)
    "cudnn": "cudnn",  # jax.nn.dot_product_attention's fused cuDNN kernel (NVIDIA, bf16/fp16)
    "dot_product": "xla",  # jax.nn.dot_product_attention's XLA implementation (tests)
}


def write_at(buf: jax.Array, update: jax.Array, start: jax.Array) -> jax.Array:
    """Per sequence b, write update [B, T, ...] into buf [B, S, ...] at rows start[b] + 0..T-1."""

    def one(b, u, s):
        return jax.lax.dynamic_update_slice_in_dim(b, u.astype(b.dtype), s, axis=0)

    return jax.vmap(one)(buf, update, start)


@dataclasses.dataclass(frozen=True)
class Context:
    """One forward's per-token inputs (see the module doc); built by `context`."""

    positions: jax.Array  # [B, T]
    cos: jax.Array  # [B, T, R] (R: the rotary dimensions)
    sin: jax.Array
    start: jax.Array | None = None  # [B]: the cache slot of each sequence's first token
    keep: jax.Array | None = None  # [B]: tokens a recurrent layer commits (None: pending)
    implementation: str = "einsum"  # the cache-free attention (ATTENTION)
    slots: jax.Array | None = None  # [L] feature-buffer slot per layer (the trash slot: none)
    trash: int = 2**31 - 1  # a pipeline stage's never-read cache slot (an empty slot's position)

    def attend(self, q, k, v, kv=None, *, window=None, sinks=None):
        """Attention of queries q [B, T, H, E] given this layer's new keys / values
        [B, T, G, E] -> (output [B, T, H, E], new cache slice). Without a cache: causal over
        the block. With kv = (ck, cv) [B, S, G, E]: k, v written at `start`, a query at
        position p sees cache slots s <= p (slots past the live length are stale and never
        seen). `window` (traced int, 0: none): also p - s < window. `sinks` [H]: a per-head
        logit in the softmax's denominator only (gpt-oss)."""
        if kv is None:
            if sinks is None and window is None and ATTENTION[self.implementation] is not None:
                return layers.causal_attention(q, k, v, ATTENTION[self.implementation]), None
            keys, values, k_pos = k, v, self.positions
        else:
            keys, values = write_at(kv[0], k, self.start), write_at(kv[1], v, self.start)
            k_pos = jnp.arange(keys.shape[1], dtype=jnp.int32)[None]
            kv = (keys, values) if type(kv) is tuple else type(kv)(keys, values)
        diff = self.positions[:, :, None] - k_pos[:, None, :]
        visible = diff >= 0
        if window is not None:
            visible &= (window <= 0) | (diff < window)
        mask = visible[:, None, None]  # [B, 1, 1, T, S]
        return layers.sink_attention(q, keys, values, mask, sinks), kv

    def record(self, buf, x, layer):
        """buf with layer `layer`'s output x in its feature slot (buf None: no features)."""
        if buf is None:
            return None
        return jax.lax.dynamic_update_index_in_dim(buf, x, self.slots[layer], axis=0)


def context(family, cfg, positions, *, start=None, keep=None, implementation="einsum",
            feature_layers=(), trash: int = 2**31 - 1) -> Context:
    cos, sin = family.rope(cfg, positions)
    slots = None
    if feature_layers:
        distinct = sorted(set(feature_layers))
        slots = jnp.asarray([distinct.index(i) if i in distinct else len(distinct)
                             for i in range(cfg.num_layers)], jnp.int32)
    return Context(positions, cos, sin, start, keep, implementation, slots, trash)


def run_layers(family, cfg, tree, x, ctx: Context, cache=None, *, stop: int | None = None,
               feature_layers=(), offset: Any = 0):
    """Units 0..stop-1 (default: all of `tree`'s) on x [B, T, D] -> (x, the outputs of
    `feature_layers` in order [n, B, T, D] or None, new cache or None). `offset`: the global
    index of the first unit of `tree` (a pipeline stage's; traced allowed)."""
    n = family.num_units(cfg) if stop is None else stop
    distinct = sorted(set(feature_layers))
    buf = jnp.zeros((len(distinct) + 1, *x.shape), x.dtype) if feature_layers else None

    def step(carry, u):
        x, buf, cache = carry
        p = family.unit_params(tree, cfg, u)
        unit_cache = None if cache is None else family.unit_cache(cache, cfg, u)
        x, buf, unit_cache = family.unit(x, buf, p, u + offset, ctx, unit_cache, cfg)
        if cache is not None:
            cache = family.set_unit_cache(cache, cfg, u, unit_cache)
        return (x, buf, cache), None

    if cache is not None:
        cache = family.begin(cache, cfg, x.shape[1], ctx.keep)
    (x, buf, cache), _ = jax.lax.scan(step, (x, buf, cache), jnp.arange(n, dtype=jnp.int32))
    features = None if buf is None else jnp.stack([buf[distinct.index(j)]
                                                   for j in feature_layers])
    return x, features, cache
