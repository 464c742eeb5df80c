"""Anchor sampling and block labels for DFlash training (docs/design.md §4), jit-friendly.

Per sequence, up to N distinct anchors are drawn uniformly from positions a with loss_mask[a] = 1
and a <= S - K, sorted ascending; missing ones are padded (anchor 0, keep False). Block n covers
positions a_n .. a_n + K - 1: position 0 holds the real token at a_n, positions 1..K-1 hold MASK,
and the label of block position k is token a_n + k. A block position is a loss position when its
block is kept, k >= 1, a_n + k < S and loss_mask[a_n + k] = 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_anchors(
    key: jax.Array, loss_mask_BxS: jax.Array, num_anchors: int, block_size: int
) -> tuple[jax.Array, jax.Array]:
    """Returns anchors [B, N] int32 (sorted, kept ones first) and keep [B, N] bool."""
    batch, seq = loss_mask_BxS.shape
    if num_anchors > seq:
        raise ValueError(f"num_anchors={num_anchors} exceeds the sequence length {seq}")
    positions = jnp.arange(seq)
    eligible = (loss_mask_BxS > 0) & (positions <= seq - block_size)[None, :]
    # Uniform sampling without replacement: the N largest of i.i.d. uniform scores.
    scores = jnp.where(eligible, jax.random.uniform(key, (batch, seq)), -1.0)
    top_scores, top_pos = jax.lax.top_k(scores, num_anchors)
    keep = top_scores >= 0.0
    # Sort kept anchors ascending and push the padding to the end.
    order_key = jnp.where(keep, top_pos, seq + top_pos)
    order = jnp.argsort(order_key, axis=-1)
    anchors = jnp.take_along_axis(jnp.where(keep, top_pos, 0), order, axis=-1)
    keep = jnp.take_along_axis(keep, order, axis=-1)
    return anchors.astype(jnp.int32), keep


def block_labels(
    tokens_BxS: jax.Array,
    loss_mask_BxS: jax.Array,
    anchors_BxN: jax.Array,
    keep_BxN: jax.Array,
    block_size: int,
) -> tuple[jax.Array, jax.Array]:
    """Label tokens [B, N, K] (token a + k) and the loss mask [B, N, K] of the blocks."""
    seq = tokens_BxS.shape[1]
    k = jnp.arange(block_size)
    pos = anchors_BxN[..., None] + k  # [B, N, K]
    in_range = pos < seq
    safe = jnp.minimum(pos, seq - 1)
    gather = jax.vmap(lambda row, idx: row[idx])
    targets = gather(tokens_BxS, safe)
    label_mask = gather(loss_mask_BxS, safe) > 0
    mask = keep_BxN[..., None] & (k >= 1) & in_range & label_mask
    return targets, mask
