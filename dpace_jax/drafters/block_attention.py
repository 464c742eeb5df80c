"""Attention of the drafter's training blocks: the DFlash training mask, three ways.

Inputs (one drafter layer, all N blocks of every sequence at once):

  q [B, N, K, H, E]   block keys/values kb, vb [B, N, K, G, E]   context ck, cv [B, S, G, E]
  anchors [B, N]      -> output [B, N, K, H, E] in v's dtype

Block n of sequence b attends to the context slots s < anchors[b, n] and to the K positions of
its own block (bidirectional), never to another block; scores are scaled by 1/sqrt(E). Two
per-layer options narrow this (they may be traced scalars, so one compiled layer scan serves
layers of both kinds):

  window > 0   sliding window: block position k (absolute position a + k) sees only the context
               slots s with a + k - window < s < a, and the block positions j with
               |k - j| < window (z-lab's mask; with window >= K the whole block);
  causal       block position k sees block positions 0..k only (DrafterConfig.layer_causal:
               sliding layers by default, every or no layer when config.json's is_causal says).

  dense    context scores [B, H, N*K, S] and in-block scores [B, H, N, K, K] share one
           softmax; everything is materialized (simple, fastest at small shapes).
  grouped  `dense` over groups of `group` blocks in turn (`lax.map`), each group
           rematerialized in the backward pass: scores held at once shrink to
           [B, H, group*K, S], at the price of recomputing the group forward.
  flash    online softmax over context tiles of `tile` columns for each group of `group`
           blocks, with its own backward pass (`jax.custom_vjp`) that recomputes the scores of
           one tile at a time from the saved log-sum-exp. Only the output and the log-sum-exp
           [B, N*K, H] are kept for the backward pass. A group visits only the tiles below its
           largest anchor (a `while_loop` with that trip count), so with sorted anchors about
           half of the context area, the part no block can see, is never computed.

All three are pure XLA (CPU, GPU, TPU) and agree up to rounding (tests/test_block_attention.py).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from dpace_jax.nn import layers

IMPLEMENTATIONS = ("dense", "flash")
DEFAULT_FLASH_GROUP = 64  # blocks per group (1024 query rows at K = 16)
DEFAULT_FLASH_TILE = 1024  # context columns per tile


def context_visible(anchors, kk: int, s: int, window=0):
    """[B, N, K, S] bool: which context slots block position k of each block sees."""
    anchors = anchors.astype(jnp.int32)
    cols = jnp.arange(s, dtype=jnp.int32)
    row_pos = anchors[:, :, None] + jnp.arange(kk, dtype=jnp.int32)  # [B, N, K]
    window = jnp.asarray(window, jnp.int32)
    before = cols < anchors[:, :, None, None]
    in_window = (window <= 0) | (cols > row_pos[..., None] - window)
    return before & in_window


def block_visible(kk: int, causal=False, window=0):
    """[K, K] bool: block position k (rows) sees block position j (columns): j <= k when causal,
    |k - j| < window when window > 0 (the diagonal always)."""
    k = jnp.arange(kk)
    window = jnp.asarray(window, jnp.int32)
    distance = jnp.abs(k[:, None] - k[None, :])
    return ((jnp.logical_not(jnp.asarray(causal, bool)) | (k[None, :] <= k[:, None]))
            & ((window <= 0) | (distance < window)))


def dense(q, kb, vb, ck, cv, anchors, window=0, causal=False):
    """One softmax over the visible context scores and the in-block scores (see module doc)."""
    b, n, kk, h, e = q.shape
    s = ck.shape[1]
    g = ck.shape[2]
    ctx = layers.attention_logits(q.reshape(b, n * kk, h, e), ck)  # [B, G, R, NK, S]
    ctx = ctx.reshape(b, g, h // g, n, kk, s)
    blk = layers.attention_logits(q, kb)  # [B, N, G, R, K, K]
    blk = jnp.moveaxis(blk, 1, 3)  # [B, G, R, N, K, K]
    visible = context_visible(anchors, kk, s, window)[:, None, None]  # [B, 1, 1, N, K, S]
    in_block = block_visible(kk, causal, window)  # the diagonal is visible: a finite peak
    ctx = jnp.where(visible, ctx, -jnp.inf)
    blk = jnp.where(in_block, blk, -jnp.inf)
    peak = jnp.maximum(jnp.max(ctx, axis=-1, keepdims=True), jnp.max(blk, axis=-1, keepdims=True))
    peak = jax.lax.stop_gradient(peak)
    e_ctx = jnp.where(visible, jnp.exp(ctx - peak), 0.0)
    e_blk = jnp.where(in_block, jnp.exp(blk - peak), 0.0)
    denom = jnp.sum(e_ctx, axis=-1, keepdims=True) + jnp.sum(e_blk, axis=-1, keepdims=True)
    p_ctx = (e_ctx / denom).reshape(b, g, h // g, n * kk, s)
    p_blk = jnp.moveaxis(e_blk / denom, 3, 1)  # [B, N, G, R, K, K]
    out_ctx = layers.attention_output(p_ctx, cv).reshape(b, n, kk, h, e)
    return out_ctx + layers.attention_output(p_blk, vb)


def _pad_blocks(t, groups: int, group: int):
    """[B, N, ...] -> [groups, B, group, ...], N padded to groups * group with zeros."""
    pad = groups * group - t.shape[1]
    t = jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2))
    return jnp.moveaxis(t.reshape(t.shape[0], groups, group, *t.shape[2:]), 1, 0)


def _unpad_blocks(t, n: int):
    """[groups, B, group, ...] -> [B, N, ...]."""
    t = jnp.moveaxis(t, 0, 1)
    return t.reshape(t.shape[0], t.shape[1] * t.shape[2], *t.shape[3:])[:, :n]


def grouped(q, kb, vb, ck, cv, anchors, group: int, window=0, causal=False):
    """`dense` over groups of `group` blocks (padding blocks see no context and are dropped)."""
    n = q.shape[1]
    if group <= 0 or group >= n:
        return dense(q, kb, vb, ck, cv, anchors, window, causal)
    groups = -(-n // group)

    def one_group(args):
        return dense(*args[:3], ck, cv, args[3], window, causal)

    parts = tuple(_pad_blocks(t, groups, group) for t in (q, kb, vb, anchors))
    return _unpad_blocks(jax.lax.map(jax.checkpoint(one_group), parts), n)


# ----------------------------------------------------------------------------- flash

# Inside a group (one per lax.map / scan step), with C = group * K query rows:
#   q [B, C, G, R, E]   kb, vb [B, c, K, G, E]
#   rows: (row_anchor [B, C], row_lo [B, C] (first visible context slot), in_block [C, K])
#   span: (first tile, end tile), scalars
#   ck, cv [B, S', G, E] (S' = S padded to a multiple of the tile)
# Scores are [B, C, G, R, cols] fp32; m, l, lse are [B, C, G, R].


def _block_scores(q, kb, in_block, scale):
    """In-block scores [B, C, G, R, K] of q [B, C, G, R, E] against kb [B, c, K, G, E], -inf
    where in_block [C, K] hides a position."""
    b, c, kk = kb.shape[:3]
    qb = q.reshape(b, c, kk, *q.shape[2:])
    s = jnp.einsum("bckgre,bcjge->bckgrj", qb, kb, preferred_element_type=jnp.float32)
    s = (s * scale).reshape(b, c * kk, *s.shape[3:])
    return jnp.where(in_block[None, :, None, None, :], s, -jnp.inf)


def _block_values(p, vb):
    """p [B, C, G, R, K] x vb [B, c, K, G, E] -> [B, C, G, R, E] fp32."""
    b, c, kk = vb.shape[:3]
    p = p.reshape(b, c, kk, *p.shape[2:]).astype(vb.dtype)
    out = jnp.einsum("bckgrj,bcjge->bckgre", p, vb, preferred_element_type=jnp.float32)
    return out.reshape(b, c * kk, *out.shape[3:])


def _tile_scores(q, ck, rows, t, tile, scale):
    """Scores [B, C, G, R, tile] of context tile t (columns t*tile ..), -inf where a row's
    block cannot see the column, and that visibility mask [B, C, 1, 1, tile]."""
    row_anchor, row_lo, _ = rows
    kt = jax.lax.dynamic_slice_in_dim(ck, t * tile, tile, axis=1)
    s = jnp.einsum("bcgre,bsge->bcgrs", q, kt, preferred_element_type=jnp.float32) * scale
    cols = t * tile + jnp.arange(tile)
    visible = ((cols[None, None, :] < row_anchor[:, :, None])
               & (cols[None, None, :] >= row_lo[:, :, None]))[:, :, None, None, :]
    return jnp.where(visible, s, -jnp.inf), visible


def _group_forward(q, kb, vb, ck, cv, rows, span, tile, scale):
    """Output [B, C, G, R, E] fp32 and log-sum-exp [B, C, G, R] of one group."""
    s = _block_scores(q, kb, rows[2], scale)
    m = jnp.max(s, axis=-1)  # every row sees its own position: m is finite
    p = jnp.exp(s - m[..., None])
    l = jnp.sum(p, axis=-1)
    acc = _block_values(p, vb)

    def body(carry):
        t, m, l, acc = carry
        st, visible = _tile_scores(q, ck, rows, t, tile, scale)
        m_new = jnp.maximum(m, jnp.max(st, axis=-1))
        corr = jnp.exp(m - m_new)
        p = jnp.where(visible, jnp.exp(st - m_new[..., None]), 0.0)
        vt = jax.lax.dynamic_slice_in_dim(cv, t * tile, tile, axis=1)
        pv = jnp.einsum("bcgrs,bsge->bcgre", p.astype(cv.dtype), vt,
                        preferred_element_type=jnp.float32)
        return t + 1, m_new, l * corr + jnp.sum(p, axis=-1), acc * corr[..., None] + pv

    first, end = span
    _, m, l, acc = jax.lax.while_loop(lambda c: c[0] < end, body, (first, m, l, acc))
    return acc / l[..., None], m + jnp.log(l)


def _group_backward(q, kb, vb, ck, cv, rows, span, o, lse, do, dck, dcv, tile, scale):
    """Gradients of one group: dq [B, C, G, R, E], dkb, dvb [B, c, K, G, E] (fp32), and the
    context gradients dck, dcv [B, S', G, E] (fp32) with this group's part added."""
    dt = q.dtype
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)  # [B, C, G, R]
    b, c, kk = kb.shape[:3]

    # In-block part.
    p = jnp.exp(_block_scores(q, kb, rows[2], scale) - lse[..., None])  # [B, C, G, R, K]
    pb = p.reshape(b, c, kk, *p.shape[2:])
    do_b = do.reshape(b, c, kk, *do.shape[2:])
    q_b = q.reshape(b, c, kk, *q.shape[2:])
    dvb = jnp.einsum("bckgrj,bckgre->bcjge", pb.astype(dt), do_b,
                     preferred_element_type=jnp.float32)
    dp = jnp.einsum("bckgre,bcjge->bckgrj", do_b, vb, preferred_element_type=jnp.float32)
    ds = (pb * (dp - delta.reshape(b, c, kk, *delta.shape[2:])[..., None]) * scale).astype(dt)
    dq = jnp.einsum("bckgrj,bcjge->bckgre", ds, kb, preferred_element_type=jnp.float32)
    dq = dq.reshape(q.shape).astype(jnp.float32)
    dkb = jnp.einsum("bckgrj,bckgre->bcjge", ds, q_b, preferred_element_type=jnp.float32)

    # Context tiles.
    def body(carry):
        t, dq, dck, dcv = carry
        st, visible = _tile_scores(q, ck, rows, t, tile, scale)
        p = jnp.where(visible, jnp.exp(st - lse[..., None]), 0.0)
        kt = jax.lax.dynamic_slice_in_dim(ck, t * tile, tile, axis=1)
        vt = jax.lax.dynamic_slice_in_dim(cv, t * tile, tile, axis=1)
        dv_t = jnp.einsum("bcgrs,bcgre->bsge", p.astype(dt), do,
                          preferred_element_type=jnp.float32)
        dp = jnp.einsum("bcgre,bsge->bcgrs", do, vt, preferred_element_type=jnp.float32)
        ds = (p * (dp - delta[..., None]) * scale).astype(dt)
        dq = dq + jnp.einsum("bcgrs,bsge->bcgre", ds, kt, preferred_element_type=jnp.float32)
        dk_t = jnp.einsum("bcgrs,bcgre->bsge", ds, q, preferred_element_type=jnp.float32)

        def add(acc, part):
            old = jax.lax.dynamic_slice_in_dim(acc, t * tile, tile, axis=1)
            return jax.lax.dynamic_update_slice_in_dim(acc, old + part, t * tile, axis=1)

        return t + 1, dq, add(dck, dk_t), add(dcv, dv_t)

    first, end = span
    _, dq, dck, dcv = jax.lax.while_loop(lambda c: c[0] < end, body, (first, dq, dck, dcv))
    return dq, dkb, dvb, dck, dcv


def _flash_layout(q, kb, vb, ck, cv, anchors, window, causal, group, tile):
    """Groups of blocks ([J, B, ...] each), the padded context, each group's row visibility
    (row_anchor, row_lo [J, B, C]; in_block [C, K]) and tile span (first, end [J])."""
    b, n, kk, h, e = q.shape
    s, g = ck.shape[1], ck.shape[2]
    groups = -(-n // group)
    s_pad = -(-s // tile) * tile
    ctx_pad = [(0, 0), (0, s_pad - s), (0, 0), (0, 0)]
    ck, cv = jnp.pad(ck, ctx_pad), jnp.pad(cv, ctx_pad)
    qg = _pad_blocks(q.reshape(b, n, kk, g, h // g, e), groups, group)  # [J, B, c, K, G, R, E]
    qg = qg.reshape(groups, b, group * kk, g, h // g, e)
    kbg, vbg = _pad_blocks(kb, groups, group), _pad_blocks(vb, groups, group)
    anchors = _pad_blocks(anchors.astype(jnp.int32), groups, group)  # [J, B, c]
    # An anchor past the context sees all of it (as in `dense`).
    ag = jnp.minimum(anchors, s)
    row_anchor = jnp.repeat(ag, kk, axis=2)  # [J, B, C]
    row_k = jnp.tile(jnp.arange(kk, dtype=jnp.int32), group)  # [C]
    window = jnp.asarray(window, jnp.int32)
    row_lo = jnp.where(window > 0, jnp.repeat(anchors, kk, axis=2) + row_k - window + 1, 0)
    row_lo = jnp.maximum(row_lo, 0)
    in_block = jnp.tile(block_visible(kk, causal, window), (group, 1))  # [C, K]
    # A group's tiles run from the lowest first visible slot of its rows that see any context
    # (a sliding window skips the tiles before it) to its largest anchor.
    sees = row_lo < row_anchor
    first = jnp.min(jnp.where(sees, row_lo, s_pad), axis=(1, 2)) // tile  # [J]
    end = (jnp.max(ag, axis=(1, 2)) + tile - 1) // tile  # [J], the same for all sequences
    return (qg, kbg, vbg, ck, cv, (row_anchor, row_lo, in_block),
            (first.astype(jnp.int32), end.astype(jnp.int32)))


def _flash_forward(q, kb, vb, ck, cv, anchors, window, causal, group, tile):
    b, n, kk, h, e = q.shape
    scale = 1.0 / math.sqrt(e)
    qg, kbg, vbg, ckp, cvp, rows, span = _flash_layout(q, kb, vb, ck, cv, anchors, window,
                                                       causal, group, tile)
    in_block = rows[2]

    def one_group(args):
        qj, kbj, vbj, aj, loj, fj, ej = args
        o, lse = _group_forward(qj, kbj, vbj, ckp, cvp, (aj, loj, in_block), (fj, ej), tile,
                                scale)
        return o.astype(vb.dtype), lse

    o, lse = jax.lax.map(one_group, (qg, kbg, vbg, *rows[:2], *span))  # [J, B, C, G, R, (E)]
    out = _unpad_blocks(o.reshape(*o.shape[:2], group, kk, h, e), n)
    return out, (o, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def _flash(q, kb, vb, ck, cv, anchors, window, causal, group, tile):
    return _flash_forward(q, kb, vb, ck, cv, anchors, window, causal, group, tile)[0]


def _flash_fwd(q, kb, vb, ck, cv, anchors, window, causal, group, tile):
    out, (o, lse) = _flash_forward(q, kb, vb, ck, cv, anchors, window, causal, group, tile)
    return out, (q, kb, vb, ck, cv, anchors, window, causal, o, lse)


def _flash_bwd(group, tile, res, d_out):
    q, kb, vb, ck, cv, anchors, window, causal, o, lse = res
    b, n, kk, h, e = q.shape
    s, g = ck.shape[1], ck.shape[2]
    scale = 1.0 / math.sqrt(e)
    qg, kbg, vbg, ckp, cvp, rows, span = _flash_layout(q, kb, vb, ck, cv, anchors, window,
                                                       causal, group, tile)
    in_block = rows[2]
    dog = _pad_blocks(d_out.astype(q.dtype).reshape(b, n, kk, g, h // g, e), qg.shape[0],
                      group).reshape(qg.shape)

    def one_group(carry, args):
        dck, dcv = carry
        qj, kbj, vbj, aj, loj, fj, ej, oj, lsej, doj = args
        dq, dkb, dvb, dck, dcv = _group_backward(qj, kbj, vbj, ckp, cvp, (aj, loj, in_block),
                                                 (fj, ej), oj, lsej, doj, dck, dcv, tile, scale)
        return (dck, dcv), (dq.astype(q.dtype), dkb.astype(kb.dtype), dvb.astype(vb.dtype))

    zeros = jnp.zeros(ckp.shape, jnp.float32)
    (dck, dcv), (dq, dkb, dvb) = jax.lax.scan(
        one_group, (zeros, zeros), (qg, kbg, vbg, *rows[:2], *span, o, lse, dog))
    dq = _unpad_blocks(dq.reshape(*dq.shape[:2], group, kk, h, e), n)
    return (dq, _unpad_blocks(dkb, n), _unpad_blocks(dvb, n),
            dck[:, :s].astype(ck.dtype), dcv[:, :s].astype(cv.dtype), None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash(q, kb, vb, ck, cv, anchors, group: int = DEFAULT_FLASH_GROUP,
          tile: int = DEFAULT_FLASH_TILE, window=0, causal=False):
    """The flash-style path (see module doc): `group` blocks per group, `tile` context columns
    per step. Differentiable in q, kb, vb, ck, cv."""
    if group < 1 or tile < 1:
        raise ValueError(f"flash block attention needs group >= 1 and tile >= 1, got group="
                         f"{group}, tile={tile}")
    return _flash(q, kb, vb, ck, cv, anchors, jnp.asarray(window, jnp.int32),
                  jnp.asarray(causal, bool), min(int(group), q.shape[1]), int(tile))


def attend(q, kb, vb, ck, cv, anchors, *, window=0, causal=False, implementation: str = "dense",
           group: int = 0, tile: int = DEFAULT_FLASH_TILE):
    """Dispatch: "dense" (group > 0: `grouped`) or "flash" (group 0: DEFAULT_FLASH_GROUP);
    `window` (0: none) and `causal` as in the module doc."""
    if implementation == "dense":
        return grouped(q, kb, vb, ck, cv, anchors, group, window, causal)
    if implementation == "flash":
        return flash(q, kb, vb, ck, cv, anchors, group or DEFAULT_FLASH_GROUP, tile, window,
                     causal)
    raise ValueError(f"drafter attention implementation {implementation!r}; expected one of "
                     f"{IMPLEMENTATIONS}")
