"""The Qwen3.5 layer loop's unit (one period of layers) and its decoding cache.

A unit is a period: the shortest p dividing L with layer_types[i] = layer_types[i mod p] (p = 4
for the published models), its layers unrolled, and inside it a run of consecutive linear layers
scanned, so one linear layer and one attention layer are compiled whatever L. Every stack is read
in place: unit u holds rows [u * n, (u + 1) * n) of a stack with n rows per period.

`HybridCache`: the full-attention layers' KV cache k, v [La, B, S, G, E] (a query at position p
sees slots 0..p, so writing at an earlier start rolls back), and per linear layer the
convolution's history [Ll, B, W-1, C] and the recurrent state [Ll, B, U, K, Y] (fp32). A recurrent
state cannot be rolled back by position, so a cached forward either commits the first keep[b]
tokens of its block (prefill: keep = the prompt lengths; the tokens after them leave the state
untouched) or, without `keep` (speculative verification, where the accepted length is known only
from the logits), leaves history and state as they were and returns the block's rule inputs in
`pending`; `commit(cache, keep)` then advances them by the accepted prefix (a K-token recurrence
per layer, no projection recomputed).

`RingCache` (a pipeline stage's, dpace_jax.infer.spd): the KV cache as above, and per linear layer
the state after each of the last R positions and their pre-convolution rows, in ring slots
p mod R. A stage runs one token at a time in entry order and a flush rewinds to an earlier
position, so the token at p reads the state after p - 1 (and the rows of p - W + 1..p - 1) from
the ring and writes its own: tokens written by a flushed (stale) token are overwritten by the
valid one before anything reads them, and with R >= stages + W the slots a rewound position needs
are never those a stale token writes. A write at the trash slot (S - 1, an empty pipeline slot)
changes nothing.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dpace_jax.nn import layers
from dpace_jax.targets.qwen3_5 import gated_delta
from dpace_jax.targets.qwen3_5 import parts as q35


class Pending(NamedTuple):
    """The last block's rule inputs per linear layer (see layers.Recurrence), not yet in the
    state: rows [Ll, B, T, C], k [Ll, B, T, U, K], v [Ll, B, T, U, Y], g, beta [Ll, B, T, U]."""

    rows: jax.Array
    k: jax.Array
    v: jax.Array
    g: jax.Array
    beta: jax.Array


class HybridCache(NamedTuple):
    k: jax.Array  # [La, B, S, G, E]
    v: jax.Array  # [La, B, S, G, E]
    history: jax.Array  # [Ll, B, W-1, C]
    state: jax.Array  # [Ll, B, U, K, Y] fp32
    pending: Pending | None = None


class RingCache(NamedTuple):
    k: jax.Array  # [La, B, S, G, E]
    v: jax.Array  # [La, B, S, G, E]
    rows: jax.Array  # [Ll, B, R, C] the pre-convolution rows of positions p, at p mod R
    state: jax.Array  # [Ll, B, R, U, K, Y] fp32: the state after position p, at p mod R


def period(cfg) -> int:
    """The shortest p dividing L with layer_types periodic of period p."""
    types, n = cfg.family_cfg.layer_types, cfg.num_layers
    return next(p for p in range(1, n + 1)
                if n % p == 0 and all(types[i] == types[i % p] for i in range(n)))


def kinds(cfg) -> tuple[list[int], list[int]]:
    """The positions in a period of its linear and of its attention layers."""
    types = cfg.family_cfg.layer_types[:period(cfg)]
    return ([j for j, t in enumerate(types) if t == "linear_attention"],
            [j for j, t in enumerate(types) if t == "full_attention"])


def linear_zeros(cfg, batch: int, dtype) -> tuple[jax.Array, jax.Array]:
    """One linear layer's empty convolution history [B, W-1, C] and state [B, U, K, Y] (fp32)."""
    f = cfg.family_cfg
    return (jnp.zeros((batch, f.linear_conv_kernel_dim - 1, f.conv_channels), dtype),
            jnp.zeros((batch, f.linear_num_value_heads, f.linear_key_head_dim,
                       f.linear_value_head_dim), jnp.float32))


def zeros(cfg, batch: int, length: int, dtype, num_units: int | None = None) -> HybridCache:
    """An empty cache of `length` slots for `num_units` periods (default: all)."""
    units = cfg.num_layers // period(cfg) if num_units is None else num_units
    lin, att = kinds(cfg)
    kv = (units * len(att), batch, length, cfg.num_kv_heads, cfg.head_dim)
    history, state = (jnp.broadcast_to(a, (units * len(lin), *a.shape))
                      for a in linear_zeros(cfg, batch, dtype))
    return HybridCache(jnp.zeros(kv, dtype), jnp.zeros(kv, dtype), history, state)


def ring_zeros(cfg, batch: int, length: int, dtype, num_units: int, ring: int) -> RingCache:
    """An empty pipeline-stage cache of `length` slots for `num_units` periods, rings of R."""
    f = cfg.family_cfg
    lin, att = kinds(cfg)
    kv = (num_units * len(att), batch, length, cfg.num_kv_heads, cfg.head_dim)
    n = num_units * len(lin)
    return RingCache(jnp.zeros(kv, dtype), jnp.zeros(kv, dtype),
                     jnp.zeros((n, batch, ring, f.conv_channels), dtype),
                     jnp.zeros((n, batch, ring, f.linear_num_value_heads, f.linear_key_head_dim,
                                f.linear_value_head_dim), jnp.float32))


def ring_read(rows_ring, state_ring, start, width: int):
    """The convolution history [B, W-1, C] and state [B, U, K, Y] before position start[b]
    (zeros before position 0), read from the ring slots."""
    ring = rows_ring.shape[1]
    pos = start[:, None] - (width - 1) + jnp.arange(width - 1)  # [B, W-1]
    history = jnp.take_along_axis(rows_ring, (pos % ring)[:, :, None], axis=1)
    history = jnp.where((pos >= 0)[:, :, None], history, 0)
    state = jax.vmap(lambda s, i: s[i])(state_ring, (start - 1) % ring)
    return history, jnp.where((start >= 1)[:, None, None, None], state, 0.0)


def ring_write(rows_ring, state_ring, rows_, new_state, start, keep, valid):
    """The rings with the block's kept rows (positions start..start+keep-1, the last R of them)
    and the state after them, where `valid` [B] (not an empty pipeline slot)."""
    ring = rows_ring.shape[1]
    last = start + keep - 1  # [B]
    slot = jnp.arange(ring)
    pos = last[:, None] - (last[:, None] - slot[None, :]) % ring  # [B, R]: the slot's newest
    fresh = valid[:, None] & (pos >= start[:, None])
    idx = jnp.clip(pos - start[:, None], 0, rows_.shape[1] - 1)
    taken = jnp.take_along_axis(rows_, idx[:, :, None], axis=1)
    rows_ring = jnp.where(fresh[:, :, None], taken.astype(rows_ring.dtype), rows_ring)
    at = jax.nn.one_hot(last % ring, ring, dtype=bool) & valid[:, None]  # [B, R]
    state_ring = jnp.where(at[:, :, None, None, None], new_state[:, None], state_ring)
    return rows_ring, state_ring


def rows(tree, u, n: int):
    """Rows [u * n, (u + 1) * n) of every array of a stacked tree (u traced), read in place."""
    return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, u * n, n), tree)


def set_rows(tree, u, n: int, value):
    return jax.tree.map(lambda a, b: jax.lax.dynamic_update_slice_in_dim(a, b.astype(a.dtype),
                                                                         u * n, 0), tree, value)


def _take(tree, first: int, n: int):
    return jax.tree.map(lambda a: a[first:first + n], tree)


def _run(kinds_):
    """Runs of consecutive layers of one kind within a period: [(kind, first, count)]."""
    runs = []
    for j, kind in enumerate(kinds_):
        if runs and runs[-1][0] == kind:
            runs[-1][2] += 1
        else:
            runs.append([kind, j, 1])
    return runs


def unit(x, buf, p, u, ctx, cache, cfg):
    """Period u (global, traced) on x [B, T, D]: p its parameter rows (layers, linear, attn,
    experts, shared), cache its rows (k, v, history, state, pending) or None -> (x, buf,
    new cache rows)."""
    per = period(cfg)
    lin, att = kinds(cfg)
    moe = cfg.family_cfg.experts is not None
    new = {"k": [], "v": [], "history": [], "state": [], "pending": [], "rows": []}

    def layer(x, buf, index, lp, mixer, e, s):
        mix, entries = mixer(q35.rms_norm(x, lp.attn_norm, cfg.rms_norm_eps))
        x = x + mix
        h = q35.rms_norm(x, lp.mlp_norm, cfg.rms_norm_eps)
        x = x + (q35.moe_mlp(h, e, s, cfg) if moe else layers.mlp(h, lp))
        return x, ctx.record(buf, x, index), entries

    def pick(tree, j):
        return None if tree is None else jax.tree.map(lambda a: a[j], tree)

    ring = isinstance(cache, RingCache)
    for kind, j0, r in _run(cfg.family_cfg.layer_types[:per]):
        if kind == "linear_attention":  # a scan over the run: one compiled linear layer
            n0 = lin.index(j0)
            state_rows = ((None, None) if cache is None else (cache.rows, cache.state) if ring
                          else (cache.history, cache.state))
            run_xs = (_take((p["layers"], p["experts"], p["shared"]), j0, r),
                      _take((p["linear"], *state_rows), n0, r), jnp.arange(r, dtype=jnp.int32))

            def step(c, xs_, j0=j0):
                (lp, e, s), (lin_p, hist, st), i = xs_
                mixer = (lambda h: _ring_linear(h, lin_p, cfg, hist, st, ctx)) if ring else (
                    lambda h: _linear(h, lin_p, cfg, hist, st, cache is not None, ctx.keep))
                x, buf, entries = layer(*c, u * per + j0 + i, lp, mixer, e, s)
                return (x, buf), entries

            (x, buf), entries = jax.lax.scan(step, (x, buf), run_xs)
            for name, value in entries.items():
                new[name].append(value)
            continue
        for j in range(j0, j0 + r):
            n = att.index(j)
            kv = None if cache is None else (cache.k[n], cache.v[n])

            def mixer(h, n=n, kv=kv):
                return q35.gated_attention(h, pick(p["attn"], n), ctx.cos, ctx.sin, cfg,
                                           lambda q, k, v: ctx.attend(q, k, v, kv))

            x, buf, kv = layer(x, buf, u * per + j, pick(p["layers"], j), mixer,
                               pick(p["experts"], j), pick(p["shared"], j))
            if kv is not None:
                new["k"].append(kv[0][None])
                new["v"].append(kv[1][None])
    if cache is None:
        return x, buf, None
    cat = {k: jax.tree.map(lambda *a: jnp.concatenate(a), *v) if v else None
           for k, v in new.items()}
    if ring:
        return x, buf, RingCache(cat["k"], cat["v"], *(
            (cache.rows, cache.state) if cat["rows"] is None else (cat["rows"], cat["state"])))
    return x, buf, HybridCache(cat["k"], cat["v"],
                               cache.history if cat["history"] is None else cat["history"],
                               cache.state if cat["state"] is None else cat["state"],
                               cat["pending"])


def _linear(h, lp, cfg, history, state, cached: bool, keep):
    """One linear-attention mixer -> (output [B, T, D], {"history", "state"} committed, or
    {"pending"} when a cache runs without keep, or {} without a cache)."""
    if history is None:  # no cache: the sequence starts here
        history, state = linear_zeros(cfg, h.shape[0], h.dtype)
    r = q35.Recurrence(h, lp, cfg, history)
    g, beta = (r.g, r.beta) if keep is None else (q35.kept(r.g, keep), q35.kept(r.beta, keep))
    chunk = gated_delta.chunk_size(h.shape[1])
    core, new_state = gated_delta.chunked(r.q, r.k, r.v, g, beta, state, chunk)
    out = q35.linear_mixer_output(core, h, lp, cfg)
    if not cached:
        return out, {}
    if keep is None:
        return out, {"pending": Pending(r.rows, r.k, r.v, r.g, r.beta.astype(jnp.float32))}
    return out, {"history": gated_delta.conv_history(history, r.rows, keep), "state": new_state}


def _ring_linear(h, lp, cfg, rows_ring, state_ring, ctx):
    """One linear-attention mixer of a pipeline stage: the block [B, T] at ctx.start reads its
    history and state from the rings, commits its first ctx.keep tokens (all without keep) and
    writes them back (module doc) -> (output [B, T, D], {"rows", "state"})."""
    t = h.shape[1]
    start = ctx.start
    keep = jnp.full(start.shape, t, jnp.int32) if ctx.keep is None else ctx.keep
    history, state = ring_read(rows_ring, state_ring, start, cfg.family_cfg.linear_conv_kernel_dim)
    r = q35.Recurrence(h, lp, cfg, history)
    core, new_state = gated_delta.chunked(r.q, r.k, r.v, q35.kept(r.g, keep),
                                          q35.kept(r.beta, keep), state,
                                          gated_delta.chunk_size(t))
    valid = start < ctx.trash
    rows_ring, state_ring = ring_write(rows_ring, state_ring, r.rows, new_state, start, keep,
                                       valid)
    return q35.linear_mixer_output(core, h, lp, cfg), {"rows": rows_ring, "state": state_ring}


def unit_cache(cache: HybridCache, cfg, u):
    lin, att = kinds(cfg)
    if isinstance(cache, RingCache):
        return RingCache(*rows((cache.k, cache.v), u, len(att)),
                         *rows((cache.rows, cache.state), u, len(lin)))
    pending = None if cache.pending is None else rows(cache.pending, u, len(lin))
    return HybridCache(*rows((cache.k, cache.v), u, len(att)),
                       *rows((cache.history, cache.state), u, len(lin)), pending)


def set_unit_cache(cache: HybridCache, cfg, u, value: HybridCache):
    lin, att = kinds(cfg)
    if isinstance(cache, RingCache):
        return RingCache(*set_rows((cache.k, cache.v), u, len(att), (value.k, value.v)),
                         *set_rows((cache.rows, cache.state), u, len(lin),
                                   (value.rows, value.state)))
    k, v = set_rows((cache.k, cache.v), u, len(att), (value.k, value.v))
    history, state = set_rows((cache.history, cache.state), u, len(lin),
                              (value.history, value.state))
    pending = (cache.pending if value.pending is None
               else set_rows(cache.pending, u, len(lin), value.pending))
    return HybridCache(k, v, history, state, pending)


def begin(cache: HybridCache, cfg, tokens: int, keep) -> HybridCache:
    """Without keep, room for the pending block of `tokens` tokens of every linear layer."""
    if isinstance(cache, RingCache):
        return cache
    if keep is not None:
        return cache._replace(pending=None)
    f = cfg.family_cfg
    n, b = cache.state.shape[0], cache.state.shape[1]
    u, kd, vd = f.linear_num_value_heads, f.linear_key_head_dim, f.linear_value_head_dim
    pending = Pending(jnp.zeros((n, b, tokens, f.conv_channels), cache.history.dtype),
                      jnp.zeros((n, b, tokens, u, kd), jnp.float32),
                      jnp.zeros((n, b, tokens, u, vd), jnp.float32),
                      jnp.zeros((n, b, tokens, u), jnp.float32),
                      jnp.zeros((n, b, tokens, u), jnp.float32))
    return cache._replace(pending=pending)


def commit(cache: HybridCache, keep: jax.Array) -> HybridCache:
    """Advance the linear layers' history and state by the first keep[b] tokens of the pending
    block (at most its length); the KV cache needs nothing (module doc)."""
    pend = cache.pending
    if pend is None:
        raise ValueError("commit: the cache holds no pending block (run forward_cached without "
                         "keep first)")
    keep = keep.astype(jnp.int32)

    def one(history, state, rows_, k, v, g, beta):
        _, state = gated_delta.chunked(k, k, v, q35.kept(g, keep), q35.kept(beta, keep),
                                       state, gated_delta.chunk_size(k.shape[1]))
        return gated_delta.conv_history(history, rows_, keep), state

    history, state = jax.lax.map(lambda a: one(*a), (cache.history, cache.state, *pend))
    return HybridCache(cache.k, cache.v, history, state, None)
