"""The one layer loop of every target forward (training features, the whole model, the cached
decoding forward and a pipeline stage of SPD), run per family (dpace_jax.targets.base.Family).

`Context` is what a unit needs besides its parameters and cache slice: positions and their RoPE,
how to attend (`attend`: causal over the block without a cache; with one, over the cache slots
before `start` and the block itself), what a Qwen3.5 recurrent layer commits (`keep`), and where
each layer's output goes for the drafter's features (`record`). `run_layers` scans the units with
an index, so each unit's weights and cache slice are read in place from the stacks.

A cache's position-indexed entries (the fields k, v [L, B, S, G, E] of every family's cache) are
only read inside the loop: a layer attends over the first `visible` slots of its cache (the
caller's static bound on the filled part; the slots from `start` on are masked) and over the
block's own keys, and returns just the block's entries [B, T, G, E]; the loop's carry collects
those ([L, B, T, G, E]) and they are written at `start` once, after the loop. So a step reads the
filled part of the cache once and writes the block once, instead of moving every layer's whole
cache slice through the carry (docs/performance.md, "Decode").
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


UNROLL = 16  # _write_rows: the largest batch written by unrolled updates


def write_at(buf: jax.Array, update: jax.Array, start: jax.Array) -> jax.Array:
    """Per sequence b, write update [B, T, ...] into buf [B, S, ...] at rows start[b] + 0..T-1."""
    return _write_rows(buf, update, start, 0)


def _write_rows(buf: jax.Array, update: jax.Array, start: jax.Array, axis: int) -> jax.Array:
    """write_at along batch axis `axis` (the slot axis after it): one dynamic_update_slice per
    sequence, which XLA does in place (a vmapped one is a scatter, which the CPU backend does by
    copying the whole buffer: a full cache copy per write). Up to UNROLL sequences are written
    by unrolled updates; more by a loop, whose program does not grow with the batch (unrolled, a
    6,000-row sampled SPD decode took 21 GB to compile)."""
    update = update.astype(buf.dtype)

    def write(b, buf):
        row = jax.lax.dynamic_slice_in_dim(update, b, 1, axis=axis)
        at = [jnp.zeros((), jnp.int32)] * buf.ndim
        at[axis], at[axis + 1] = jnp.asarray(b, jnp.int32), start[b].astype(jnp.int32)
        return jax.lax.dynamic_update_slice(buf, row, at)

    if buf.shape[axis] <= UNROLL:
        for b in range(buf.shape[axis]):
            buf = write(b, buf)
        return buf
    return jax.lax.fori_loop(0, buf.shape[axis], write, buf)


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
    visible: int | None = None  # static: cache slots a query may read (None: all; 0: none)

    def attend(self, q, k, v, kv=None, *, window=None, sinks=None):
        """Attention of queries q [B, T, H, E] given this layer's new keys / values
        [B, T, G, E] -> (output [B, T, H, E], the block's cache entries or None). Without a
        cache: causal over the block. With kv = (ck, cv) [B, S, G, E] (read only): a query at
        position p = start + t sees the cache slots s < start among the first `visible` and the
        block's keys t' <= t; the entries returned (k, v in the cache's dtype and type) are
        written at `start` by run_layers. `window` (traced int, 0: none): also p - s < window.
        `sinks` [H]: a per-head logit in the softmax's denominator only (gpt-oss)."""
        if kv is None:
            if sinks is None and window is None and ATTENTION[self.implementation] is not None:
                return layers.causal_attention(q, k, v, ATTENTION[self.implementation]), None
            diff = self.positions[:, :, None] - self.positions[:, None, :]
            mask = _visible(diff, diff >= 0, window)[:, None, None]  # [B, 1, 1, T, S]
            return layers.sink_attention(q, k, v, mask, sinks), None
        ck, cv = kv
        k, v = k.astype(ck.dtype), v.astype(cv.dtype)
        t = jnp.arange(k.shape[1], dtype=jnp.int32)
        diff = t[:, None] - t[None, :]
        parts = [(k, v, _visible(diff, diff >= 0, window)[None, None, None])]
        n = ck.shape[1] if self.visible is None else min(self.visible, ck.shape[1])
        if n > 0:  # the cache slots before the block, within the filled bound
            s = jnp.arange(n, dtype=jnp.int32)
            diff = self.positions[:, :, None] - s[None, None, :]
            seen = _visible(diff, s[None, None, :] < self.start[:, None, None], window)
            parts.insert(0, (ck[:, :n], cv[:, :n], seen[:, None, None]))
        out = layers.parts_attention(q, parts, sinks)
        return out, (k, v) if type(kv) is tuple else type(kv)(k, v)

    def record(self, buf, x, layer):
        """buf with layer `layer`'s output x in its feature slot (buf None: no features)."""
        if buf is None:
            return None
        return jax.lax.dynamic_update_index_in_dim(buf, x, self.slots[layer], axis=0)


def _visible(diff, seen, window):
    """seen, and within the window (diff = query - key position) where there is one."""
    return seen if window is None else seen & ((window <= 0) | (diff < window))


def context(family, cfg, positions, *, start=None, keep=None, implementation="einsum",
            feature_layers=(), trash: int = 2**31 - 1, visible: int | None = None) -> Context:
    cos, sin = family.rope(cfg, positions)
    slots = None
    if feature_layers:
        distinct = sorted(set(feature_layers))
        slots = jnp.asarray([distinct.index(i) if i in distinct else len(distinct)
                             for i in range(cfg.num_layers)], jnp.int32)
    return Context(positions, cos, sin, start, keep, implementation, slots, trash, visible)


def run_layers(family, cfg, tree, x, ctx: Context, cache=None, *, stop: int | None = None,
               feature_layers=(), offset: Any = 0):
    """Units 0..stop-1 (default: all of `tree`'s) on x [B, T, D] -> (x, the outputs of
    `feature_layers` in order [n, B, T, D] or None, new cache or None). `offset`: the global
    index of the first unit of `tree` (a pipeline stage's; traced allowed). The cache's k, v
    are read in place and written once, after the loop (module doc)."""
    n = family.num_units(cfg) if stop is None else stop
    distinct = sorted(set(feature_layers))
    buf = jnp.zeros((len(distinct) + 1, *x.shape), x.dtype) if feature_layers else None
    full_k = full_v = None
    if cache is not None:
        cache = family.begin(cache, cfg, x.shape[1], ctx.keep)
        full_k, full_v = cache.k, cache.v
        shape = (*full_k.shape[:2], x.shape[1], *full_k.shape[3:])
        cache = cache._replace(k=jnp.zeros(shape, full_k.dtype), v=jnp.zeros(shape, full_v.dtype))

    # The whole k, v ride in the carry unchanged (read in place): as a loop invariant captured
    # by the scan, XLA copies them in before the loop, since they are written after it.
    def step(carry, u):
        x, buf, cache, full = carry
        p = family.unit_params(tree, cfg, u)
        unit_cache = (None if cache is None
                      else family.unit_cache(cache._replace(k=full[0], v=full[1]), cfg, u))
        x, buf, unit_cache = family.unit(x, buf, p, u + offset, ctx, unit_cache, cfg)
        if cache is not None:
            cache = family.set_unit_cache(cache, cfg, u, unit_cache)
        return (x, buf, cache, full), None

    (x, buf, cache, (full_k, full_v)), _ = jax.lax.scan(
        step, (x, buf, cache, (full_k, full_v)), jnp.arange(n, dtype=jnp.int32))
    if cache is not None:
        cache = cache._replace(k=_write_block(full_k, cache.k, ctx.start),
                               v=_write_block(full_v, cache.v, ctx.start))
    features = None if buf is None else jnp.stack([buf[distinct.index(j)]
                                                   for j in feature_layers])
    return x, features, cache


def _write_block(buf: jax.Array, block: jax.Array, start: jax.Array) -> jax.Array:
    """buf [L, B, S, ...] with block [L, B, T, ...] written at slots start[b].. of sequence b."""
    return _write_rows(buf, block, start, 1)
