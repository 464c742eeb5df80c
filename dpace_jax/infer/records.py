"""What a rollout records per verify step for on-policy training (decode(record=True);
docs/design.md §9): the target's log-probs of the emitted tokens and of the drafts, the first
rejected draft, and the same under the decoding's own distribution."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dpace_jax.infer import sampling as sampling_lib
from dpace_jax.infer.sampling import Sampling


class Records(NamedTuple):
    """What a rollout records for on-policy training (decode(record=True); docs/design.md §9):
    per sequence b and verify step s, with M = max_steps. Log-probs are the target's at
    temperature 1, whatever the decoding temperature."""

    first_logp: jax.Array  # [B] of the prefill's token (the first generated one)
    anchors: jax.Array  # [B, M] position of the step's anchor (the last token before it)
    emitted: jax.Array  # [B, M] tokens the step added: acc + 1, fewer when a stop / the limit cut
    realized_logp: jax.Array  # [B, M, K] of the added tokens, the i-th at block offset i + 1
    rejected: jax.Array  # [B, M] first rejected draft (at block offset acc + 1), -1 if none
    rejected_logp: jax.Array  # [B, M] of that draft token (0 if none)
    # For the verification-matched teacher and the rejected suffix (dpace_jax.train.opd):
    # "vlogp" is the log-prob under the decoding's own distribution (T = 0: 0 for the target's
    # argmax, VLOGP_FLOOR for any other token; T > 0: the tempered, filtered one), p = 0 stored
    # as VLOGP_FLOOR so that the JSONL rollout files stay plain JSON.
    first_vlogp: jax.Array  # [B]
    realized_vlogp: jax.Array  # [B, M, K] like realized_logp
    drafts: jax.Array  # [B, M, K] the verified block: the anchor's token, then drafts at 1..K-1
    draft_logp: jax.Array  # [B, M, K] of drafts[j] given the block before it (0 at j = 0)
    draft_vlogp: jax.Array  # [B, M, K] likewise, under the decoding's distribution


def empty(first_logits: jax.Array, first: jax.Array, sampler: Sampling, max_steps: int,
          k_block: int) -> Records:
    """The records of a batch before its first verify step: the prefill token's log-probs
    (first_logits [B, V], first [B]), every step empty."""
    batch = first.shape[0]
    per_block = jnp.zeros((batch, max_steps, k_block), jnp.float32)
    return Records(logp(first_logits, first), jnp.zeros((batch, max_steps), jnp.int32),
                   jnp.zeros((batch, max_steps), jnp.int32), per_block,
                   jnp.full((batch, max_steps), -1, jnp.int32),
                   jnp.zeros((batch, max_steps), jnp.float32),
                   vlogp(first_logits.astype(jnp.float32), first, sampler), per_block,
                   per_block.astype(jnp.int32), per_block, per_block)


def logp(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log_softmax(logits)[..., tokens] in fp32: logits [..., V], tokens [...]."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


VLOGP_FLOOR = -1e9  # p = 0 in Records' vlogp fields: every OPD loss clips log-probs far above it


def vlogp(logits: jax.Array, tokens: jax.Array, sampler: Sampling) -> jax.Array:
    """The log-prob of tokens [...] under the decoding's distribution of logits [..., V]."""
    if sampler.greedy:
        best = jnp.argmax(logits, axis=-1)
        return jnp.where(tokens == best, 0.0, VLOGP_FLOOR).astype(jnp.float32)
    logp = sampling_lib.filtered_log_probs(logits, sampler)
    picked = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    return jnp.maximum(picked, VLOGP_FLOOR)


def record_step(r: Records, slot, anchors, block, emitted, verify_logits, acc, n_emit,
                 sampler: Sampling):
    """Records with step `slot` (per sequence; out of range: dropped) written."""
    k_block = block.shape[1]
    rows = jnp.arange(block.shape[0])
    logits = verify_logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)  # [B, K]: log-probs are logit - lse
    picked = jnp.take_along_axis(logits, emitted[..., None], axis=-1)[..., 0] - lse
    live = jnp.arange(k_block) < n_emit[:, None]
    realized = jnp.where(live, picked, 0)
    realized_v = jnp.where(live, vlogp(logits, emitted, sampler), 0)
    # drafts[j] is judged by verify row j - 1 (the block up to j - 1, rejected drafts included)
    nxt = jnp.concatenate([block[:, 1:], block[:, :1]], axis=1)  # [B, K]: row i -> block[i + 1]
    first_col = jnp.arange(k_block) == 0
    block_logp = jnp.roll(jnp.take_along_axis(logits, nxt[..., None], axis=-1)[..., 0] - lse, 1,
                          axis=1)
    block_v = jnp.roll(vlogp(logits, nxt, sampler), 1, axis=1)
    offset = jnp.minimum(acc + 1, k_block - 1)
    has = (acc < k_block - 1) & (n_emit == acc + 1)  # a draft was rejected, the step not cut
    draft = jnp.take_along_axis(block, offset[:, None], axis=1)[:, 0]
    draft_logp = logits[rows, acc, draft] - lse[rows, acc]

    def put(buf, value):
        return buf.at[rows, slot].set(value, mode="drop")

    return r._replace(anchors=put(r.anchors, anchors), emitted=put(r.emitted, n_emit),
                      realized_logp=put(r.realized_logp, realized),
                      rejected=put(r.rejected, jnp.where(has, draft, -1)),
                      rejected_logp=put(r.rejected_logp, jnp.where(has, draft_logp, 0.0)),
                      realized_vlogp=put(r.realized_vlogp, realized_v),
                      drafts=put(r.drafts, block),
                      draft_logp=put(r.draft_logp, jnp.where(first_col, 0.0, block_logp)),
                      draft_vlogp=put(r.draft_vlogp, jnp.where(first_col, 0.0, block_v)))
