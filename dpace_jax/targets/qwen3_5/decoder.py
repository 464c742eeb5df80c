"""The Qwen3.5 hybrid target's forwards (layers: dpace_jax.targets.qwen3_5.layers) and its decoding
cache.

Layers run as a `lax.scan` over periods: the shortest p dividing L with layer_types[i] =
layer_types[i mod p] (p = 4 for the published models), each period's p layers unrolled, so every
stack is read in place whatever the mix of layer kinds.

`HybridCache`: the full-attention layers' KV cache k, v [La, B, S, G, E] (as model.KVCache: a
query at position p sees slots 0..p, so writing at an earlier start rolls back), and per linear
layer the convolution's history [Ll, B, W-1, C] and the recurrent state [Ll, B, U, K, Y] (fp32).
A recurrent state cannot be rolled back by position, so `forward_cached` either commits the first
keep[b] tokens of the block it runs (prefill: keep = the prompt lengths; the tokens after them
leave the state untouched) or, without `keep` (speculative verification, where the accepted
length is known only from the logits), leaves history and state as they were and returns the
block's rule inputs in `pending`; `commit(cache, keep)` then advances them by the accepted prefix
(a K-token recurrence per layer, no projection recomputed).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dpace_jax.nn import layers
from dpace_jax.nn import params as params_lib
from dpace_jax.targets import qwen3_moe as moe
from dpace_jax.targets.qwen3_5 import gated_delta
from dpace_jax.targets.qwen3_5 import layers as qwen3_5


class Pending(NamedTuple):
    """The last block's rule inputs per linear layer (see qwen3_5.Recurrence), not yet in the
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

    @classmethod
    def zeros(cls, cfg, batch: int, length: int, dtype=jnp.bfloat16) -> HybridCache:
        kv = (len(cfg.attention_layers), batch, length, cfg.num_kv_heads, cfg.head_dim)
        n = len(cfg.linear_layers)
        history, state = (jnp.broadcast_to(a, (n, *a.shape))
                          for a in linear_zeros(cfg, batch, dtype))
        return cls(jnp.zeros(kv, dtype), jnp.zeros(kv, dtype), history, state)


def linear_zeros(cfg, batch: int, dtype) -> tuple[jax.Array, jax.Array]:
    """One linear layer's empty convolution history [B, W-1, C] and state [B, U, K, Y] (fp32)."""
    c = params_lib.dims(cfg)["C"]
    return (jnp.zeros((batch, cfg.linear_conv_kernel_dim - 1, c), dtype),
            jnp.zeros((batch, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                       cfg.linear_value_head_dim), jnp.float32))


def period(cfg) -> int:
    """The shortest p dividing L with layer_types periodic of period p."""
    types, n = cfg.layer_types, cfg.num_layers
    return next(p for p in range(1, n + 1)
                if n % p == 0 and all(types[i] == types[i % p] for i in range(n)))


def _periods(tree, p_kind: int, count: int):
    """A stack [count * p_kind, ...] -> [count, p_kind, ...] (None stays None)."""
    return jax.tree.map(lambda a: a.reshape(count, p_kind, *a.shape[1:]), tree)


def _flat(tree):
    return jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), tree)


def _rows(tree, start: int, n: int):
    return jax.tree.map(lambda a: a[start:start + n], tree)


def _slot(tree, j: int):
    return jax.tree.map(lambda a: a[j], tree)


def rope(cfg, positions):
    """cos, sin [B, T, R] of the rotary dimensions R = qwen3_5.rotary_dim(cfg)."""
    inv_freq = layers.rope_inv_freq(qwen3_5.rotary_dim(cfg), cfg.rope_theta)
    return layers.rope_cos_sin(positions, inv_freq)


def run(params, cfg, x, cos, sin, *, attend, cache=None, keep=None, feature_layers=(),
        only_features: bool = False):
    """The decoder layers on x [B, T, D] -> (x, per-feature-layer outputs [n, B, T, D] or None,
    new cache or None). `attend(q, k, v, ck, cv)` -> (output, (ck', cv')) for a full-attention
    layer with its cache slice (None, None without a cache); linear layers start from the cache's
    history and state (zeros without a cache) and commit per `keep` (module doc).
    `only_features`: stop after the period holding the deepest feature layer (x is then not the
    last layer's)."""
    n_layers, p = cfg.num_layers, period(cfg)
    count = n_layers // p
    types = cfg.layer_types[:p]
    lin = [j for j in range(p) if types[j] == "linear_attention"]
    att = [j for j in range(p) if types[j] == "full_attention"]
    last = max(feature_layers, default=n_layers - 1)
    used = last // p + 1 if only_features else count
    distinct = sorted(set(feature_layers))
    slot_of = [distinct.index(i) if i in distinct else len(distinct) for i in range(n_layers)]
    slots = jnp.asarray(slot_of, jnp.int32)
    if cache is None:  # each linear layer starts from zeros made where it runs (_linear)
        history = state = None
        kv = (None, None)
    else:
        history, state = (_periods(a, len(lin), count) for a in (cache.history, cache.state))
        kv = (_periods(cache.k, len(att), count), _periods(cache.v, len(att), count))
    xs = dict(layers=_periods(params.layers, p, count), linear=_periods(params.linear, len(lin),
                                                                          count),
              attn=_periods(params.attn, len(att), count), history=history, state=state, kv=kv,
              experts=_periods(params.experts, p, count), shared=_periods(params.shared, p, count))
    xs = jax.tree.map(lambda a: a[:used], xs)
    buf = jnp.zeros((len(distinct) + 1, *x.shape), x.dtype) if feature_layers else None

    segments = []  # runs of consecutive layers of one kind within a period: (kind, first, n)
    for j in range(p):
        if segments and segments[-1][0] == types[j]:
            segments[-1][2] += 1
        else:
            segments.append([types[j], j, 1])

    def layer(x, buf, index, lp, mixer, e, s):
        """Layer `index` (traced) on x: mixer(normed x) -> (out, new cache entries)."""
        mix, new = mixer(qwen3_5.rms_norm(x, lp.attn_norm, cfg.rms_norm_eps))
        x = x + mix
        h = qwen3_5.rms_norm(x, lp.mlp_norm, cfg.rms_norm_eps)
        x = x + (qwen3_5.moe_mlp(h, e, s, cfg) if cfg.arch == "qwen3_5_moe"
                 else layers.mlp(h, lp))
        if buf is not None:
            buf = jax.lax.dynamic_update_index_in_dim(buf, x, slots[index], axis=0)
        return x, buf, new

    def body(carry, inputs):
        x, buf, g = carry
        outs = dict(history=[], state=[], k=[], v=[], pending=[])
        for kind, j0, r in segments:
            if kind == "linear_attention":  # a scan over the run: one compiled linear layer
                n0 = lin.index(j0)
                run_xs = (_rows((inputs["layers"], inputs["experts"], inputs["shared"]), j0, r),
                          _rows((inputs["linear"], inputs["history"], inputs["state"]), n0, r),
                          jnp.arange(r, dtype=jnp.int32))

                def step(c, xs_, j0=j0):
                    (lp, e, s), (lin_p, hist, st), i = xs_
                    x, buf, new = layer(*c, g * p + j0 + i, lp, lambda h: _linear(
                        h, lin_p, cfg, hist, st, cache, keep), e, s)
                    return (x, buf), new

                (x, buf), new = jax.lax.scan(step, (x, buf), run_xs)
                for name, value in new.items():
                    outs[name].append(value)
                continue
            for j in range(j0, j0 + r):
                n = att.index(j)
                ck = None if cache is None else inputs["kv"][0][n]
                cv = None if cache is None else inputs["kv"][1][n]

                def mixer(h, n=n, ck=ck, cv=cv):
                    return qwen3_5.gated_attention(
                        h, _slot(inputs["attn"], n), cos, sin, cfg,
                        lambda q, k, v: attend(q, k, v, ck, cv))

                x, buf, (ck, cv) = layer(x, buf, g * p + j, _slot(inputs["layers"], j), mixer,
                                         _slot(inputs["experts"], j), _slot(inputs["shared"], j))
                outs["k"].append(None if ck is None else ck[None])
                outs["v"].append(None if cv is None else cv[None])
        stacked = {k: (jax.tree.map(lambda *a: jnp.concatenate(a), *v)
                       if v and v[0] is not None else None) for k, v in outs.items()}
        return (x, buf, g + 1), stacked

    (x, buf, _), ys = jax.lax.scan(body, (x, buf, jnp.zeros((), jnp.int32)), xs)
    features = None if buf is None else jnp.stack([buf[distinct.index(j)]
                                                   for j in feature_layers])
    new_cache = None
    if cache is not None:
        pending = None if ys["pending"] is None else _flat(ys["pending"])
        new_cache = HybridCache(_flat(ys["k"]), _flat(ys["v"]),
                                _flat(ys["history"]) if ys["history"] is not None else
                                cache.history,
                                _flat(ys["state"]) if ys["state"] is not None else cache.state,
                                pending)
    return x, features, new_cache


def _linear(h, lp, cfg, history, state, cache, keep):
    """One linear-attention mixer -> (output [B, T, D], {"history", "state"} committed, or
    {"pending"} when a cache runs without keep, or {} without a cache)."""
    if history is None:  # no cache: the sequence starts here
        history, state = linear_zeros(cfg, h.shape[0], h.dtype)
    r = qwen3_5.Recurrence(h, lp, cfg, history)
    g, beta = (r.g, r.beta) if keep is None else (qwen3_5.kept(r.g, keep),
                                                   qwen3_5.kept(r.beta, keep))
    chunk = gated_delta.chunk_size(h.shape[1])
    core, new_state = gated_delta.chunked(r.q, r.k, r.v, g, beta, state, chunk)
    out = qwen3_5.linear_mixer_output(core, h, lp, cfg)
    if cache is None:
        return out, {}
    if keep is None:
        return out, {"pending": Pending(r.rows, r.k, r.v, r.g, r.beta.astype(jnp.float32))}
    return out, {"history": gated_delta.conv_history(history, r.rows, keep), "state": new_state}


def commit(cache: HybridCache, keep: jax.Array) -> HybridCache:
    """Advance the linear layers' history and state by the first keep[b] tokens of the pending
    block (at most its length); the KV cache needs nothing (module doc)."""
    pend = cache.pending
    if pend is None:
        raise ValueError("commit: the cache holds no pending block (run forward_cached without "
                         "keep first)")
    keep = keep.astype(jnp.int32)

    def one(history, state, rows, k, v, g, beta):
        _, state = gated_delta.chunked(k, k, v, qwen3_5.kept(g, keep), qwen3_5.kept(beta, keep),
                                       state, gated_delta.chunk_size(k.shape[1]))
        return gated_delta.conv_history(history, rows, keep), state

    history, state = jax.lax.map(lambda a: one(*a), (cache.history, cache.state, *pend))
    return HybridCache(cache.k, cache.v, history, state, None)


def moe_layers(cfg) -> tuple[int, ...]:
    return tuple(range(cfg.num_layers)) if cfg.arch == "qwen3_5_moe" else ()


def check(cfg) -> None:
    qwen3_5.check(cfg)
    if cfg.arch == "qwen3_5_moe" and cfg.moe_dispatch not in moe.DISPATCHES:
        raise ValueError(f"moe_dispatch={cfg.moe_dispatch!r}; choose one of {moe.DISPATCHES}")
