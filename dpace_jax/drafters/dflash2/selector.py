"""DFlash 2's candidate path selector, as pure JAX functions (decoding walks and training stats).

Shape letters (docs/design.md §1): B batch, N blocks per sequence, K block size, D hidden, V
vocabulary, R = `selector_rank`, and Z = `selector_top_k`, the number of candidates per position
(Z because K is the block size). The draft positions of a block are its positions 1..K-1.

    unary_k   = softcap(output_multiplier * (h_k @ head))     (head [D, V] the target's LM head,
                softcap(u) = cap * tanh(u / cap) when final_logit_softcapping is set and > 0)
    C_k, u_k  = the Z largest unary scores of position k, descending (ties: lower token id first)
    score_k(p -> c) = u_k[c] + < predecessor_codebook[p] * (h_k @ hidden_projection),
                                 successor_codebook[C_k[c]] >
    walk: the predecessor of position 1 is the anchor token, that of position k > 1 the token
    chosen at k - 1; greedy takes the argmax over c (ties: the lowest candidate index, i.e. the
    higher unary score); sampled draws c from softmax(score_k / T), whose scatter onto the
    vocabulary (zero outside C_k) is the draft distribution q_k for speculative sampling.

h_k is the drafter's final hidden state (after its final norm), as the LM head reads it.
Parameters (`SelectorParams`), ours vs HF `candidate_selector.*`: hidden_projection [D, R] = HF
`hidden_projection.weight` [R, D] transposed; predecessor_codebook / successor_codebook [V, R] as
in HF (keys without `.weight`). A new selector has a zero successor codebook, so its walk is the
unary argmax (DFlash).

Precision: unary scores, the projection and the transition score in fp32 (the z-lab reference
rounds them to the model dtype; vLLM keeps the unary scores in fp32).

Training (teacher forcing): at block position k >= 1 the predecessor is the gold token at k - 1
(the anchor for k = 1), and the selector's cross-entropy is over the Z unary candidates, only at
positions whose gold token is among them. The per-position statistics are in
`selector_loss_stats`; how they are weighted and normalised belongs to the caller
(SpecForge: the base objective's weights times the covered mask, selector and base numerators
summed over the base denominator, the selector weight from `selector_alpha`).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp

DEFAULT_CHUNK_SIZE = 2048  # rows of [rows, V] unary logits alive at a time in training


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SelectorParams:
    hidden_projection: jax.Array  # [D, R]
    predecessor_codebook: jax.Array  # [V, R]
    successor_codebook: jax.Array  # [V, R]


class Candidates(NamedTuple):
    ids: jax.Array  # [..., Z] int32, by descending unary score
    scores: jax.Array  # [..., Z] fp32 unary scores
    gold_in: jax.Array | None  # [...] bool: the gold token is among ids (None: no gold given)
    gold_index: jax.Array | None  # [...] int32: its index in ids, -1 when absent


class Walk(NamedTuple):
    tokens: jax.Array  # [..., K-1] int32, the chosen token per draft position
    index: jax.Array  # [..., K-1] int32, its index among the position's candidates
    probs: jax.Array | None  # [..., K-1, Z] fp32 walk distribution over the candidates (sampled)
    q: jax.Array | None  # [..., K-1, V] fp32 the same on the vocabulary, 0 outside the candidates


class SelectorStats(NamedTuple):
    ce: jax.Array  # [B, N, K] fp32 selector CE, 0 where not covered
    covered: jax.Array  # [B, N, K] bool: loss position whose gold token is in the top-Z
    correct: jax.Array  # [B, N, K] bool: covered and the selector's argmax is the gold token
    recall: jax.Array  # [] fp32 covered / loss positions (top-Z recall)
    accuracy: jax.Array  # [] fp32 correct / covered (teacher-forced selector accuracy)


def init(key: jax.Array, dim: int, vocab: int, rank: int, dtype=jnp.float32,
         scale: float = 0.02) -> SelectorParams:
    """normal(0, scale) projection and predecessor codebook, a zero successor codebook."""
    k1, k2 = jax.random.split(key)
    return SelectorParams(
        (scale * jax.random.normal(k1, (dim, rank), jnp.float32)).astype(dtype),
        (scale * jax.random.normal(k2, (vocab, rank), jnp.float32)).astype(dtype),
        jnp.zeros((vocab, rank), dtype))


def from_hf(hidden_projection_weight, predecessor_codebook, successor_codebook) -> SelectorParams:
    return SelectorParams(jnp.asarray(hidden_projection_weight).T,
                          jnp.asarray(predecessor_codebook), jnp.asarray(successor_codebook))


def unary_logits(hidden: jax.Array, head: jax.Array, output_multiplier: float = 1.0,
                 softcap: float | None = None) -> jax.Array:
    """hidden [..., D], head [D, V] -> fp32 [..., V]: the multiplier first, then the softcap."""
    logits = jnp.einsum("...d,dv->...v", hidden.astype(head.dtype), head,
                        preferred_element_type=jnp.float32)
    return _transform(logits, output_multiplier, softcap)


def _transform(logits, output_multiplier, softcap):
    logits = logits * output_multiplier
    if softcap is not None and softcap > 0:  # static: a config value
        logits = softcap * jnp.tanh(logits / softcap)
    return logits


def top_candidates(logits: jax.Array, top_k: int, gold: jax.Array | None = None) -> Candidates:
    """The top_k (= Z) of logits [..., V], descending; with gold [...] also where gold lies."""
    scores, ids = jax.lax.top_k(logits, top_k)
    ids = ids.astype(jnp.int32)
    if gold is None:
        return Candidates(ids, scores.astype(jnp.float32), None, None)
    hit = ids == gold[..., None]
    gold_in = hit.any(-1)
    gold_index = jnp.where(gold_in, jnp.argmax(hit, -1), -1).astype(jnp.int32)
    return Candidates(ids, scores.astype(jnp.float32), gold_in, gold_index)


def top_candidates_from_hidden(hidden: jax.Array, head: jax.Array, top_k: int,
                               gold: jax.Array | None = None, *, output_multiplier: float = 1.0,
                               softcap: float | None = None,
                               chunk_size: int = DEFAULT_CHUNK_SIZE) -> Candidates:
    """`top_candidates(unary_logits(hidden, head, ...), top_k, gold)` for hidden [..., D], with
    the [rows, V] logits computed `chunk_size` rows at a time under `jax.checkpoint`, so that
    neither the forward nor the backward pass holds more than one chunk of them. The scores
    carry gradients to hidden and head."""
    if isinstance(chunk_size, bool) or operator.index(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    lead = tuple(hidden.shape[:-1])
    d = hidden.shape[-1]
    rows = math.prod(lead)
    chunk = max(1, min(int(chunk_size), rows))
    n = -(-rows // chunk)
    pad = n * chunk - rows
    h = jnp.pad(hidden.reshape(rows, d), ((0, pad), (0, 0))).reshape(n, chunk, d)
    g = jnp.zeros((rows,), jnp.int32) if gold is None else gold.reshape(rows).astype(jnp.int32)
    g = jnp.pad(g, (0, pad)).reshape(n, chunk)

    @jax.checkpoint
    def one_chunk(hc, gc):
        c = top_candidates(unary_logits(hc, head, output_multiplier, softcap), top_k, gc)
        return c.ids, c.scores, c.gold_in, c.gold_index

    ids, scores, gold_in, gold_index = jax.lax.map(lambda a: one_chunk(*a), (h, g))

    def unpad(x, tail=()):
        return x.reshape(n * chunk, *tail)[:rows].reshape(*lead, *tail)

    ids, scores = unpad(ids, (top_k,)), unpad(scores, (top_k,))
    if gold is None:
        return Candidates(ids, scores, None, None)
    return Candidates(ids, scores, unpad(gold_in), unpad(gold_index))


def project(params: SelectorParams, hidden: jax.Array) -> jax.Array:
    """hidden [..., D] @ hidden_projection -> fp32 [..., R]."""
    w = params.hidden_projection
    return jnp.einsum("...d,dr->...r", hidden.astype(w.dtype), w,
                      preferred_element_type=jnp.float32)


def _edges(params, ctx, pred_ids, succ):
    """The transition part: ctx [..., R] (the projected hidden), pred_ids [...], succ [..., Z, R]
    -> [..., Z]."""
    pred = params.predecessor_codebook[pred_ids].astype(jnp.float32)
    return jnp.einsum("...r,...zr->...z", pred * ctx, succ)


def _successors(params, cand_ids):
    return params.successor_codebook[cand_ids].astype(jnp.float32)  # [..., Z, R]


def transition_scores(params: SelectorParams, hidden: jax.Array, pred_ids: jax.Array,
                      cand_ids: jax.Array, cand_scores: jax.Array) -> jax.Array:
    """score(pred -> c) for every candidate: hidden [..., D], pred_ids [...], cand_ids and
    cand_scores [..., Z] -> fp32 [..., Z] (unary score plus the low-rank transition score)."""
    ctx = project(params, hidden)
    return cand_scores.astype(jnp.float32) + _edges(params, ctx, pred_ids,
                                                    _successors(params, cand_ids))


def _walk(params, hidden, anchor_ids, cand_ids, cand_scores, choose, keys):
    """Scan over the draft positions (axis -2 of hidden, -2 of cand_*), carrying the predecessor.
    choose(scores [..., Z], key) -> (index [...], extra)."""
    if hidden.shape[:-1] != cand_ids.shape[:-1] or cand_ids.shape != cand_scores.shape:
        raise ValueError(f"shapes: hidden {tuple(hidden.shape)} [..., K-1, D], cand_ids "
                         f"{tuple(cand_ids.shape)} and cand_scores {tuple(cand_scores.shape)} "
                         "[..., K-1, Z]")
    ctx = jnp.moveaxis(project(params, hidden), -2, 0)  # [K-1, ..., R]
    succ = jnp.moveaxis(_successors(params, cand_ids), -3, 0)  # [K-1, ..., Z, R]
    ids = jnp.moveaxis(cand_ids, -2, 0)
    unary = jnp.moveaxis(cand_scores.astype(jnp.float32), -2, 0)

    def step(prev, xs):
        ctx_t, succ_t, ids_t, u_t, key_t = xs
        scores = u_t + _edges(params, ctx_t, prev, succ_t)
        index, extra = choose(scores, key_t)
        token = jnp.take_along_axis(ids_t, index[..., None], -1)[..., 0]
        return token, (token, index, extra)

    _, (tokens, index, extra) = jax.lax.scan(
        step, anchor_ids.astype(jnp.int32), (ctx, succ, ids, unary, keys))
    back = lambda x: jnp.moveaxis(x, 0, anchor_ids.ndim)  # noqa: E731  (position axis to -1/-2)
    return back(tokens), back(index), extra if extra is None else back(extra)


def greedy_walk(params: SelectorParams, hidden: jax.Array, anchor_ids: jax.Array,
                cand_ids: jax.Array, cand_scores: jax.Array) -> Walk:
    """The T = 0 path of one block per sequence: hidden [..., K-1, D] (block positions 1..K-1),
    anchor_ids [...], cand_ids / cand_scores [..., K-1, Z] -> Walk (probs and q None)."""
    def choose(scores, _):
        return jnp.argmax(scores, -1).astype(jnp.int32), None  # first maximum: lowest index

    keys = jnp.zeros((hidden.shape[-2],), jnp.uint32)  # unused; scan needs one leaf per step
    tokens, index, _ = _walk(params, hidden, anchor_ids, cand_ids, cand_scores, choose, keys)
    return Walk(tokens, index, None, None)


def sampled_walk(key: jax.Array, params: SelectorParams, hidden: jax.Array,
                 anchor_ids: jax.Array, cand_ids: jax.Array, cand_scores: jax.Array,
                 temperature, vocab_size: int) -> Walk:
    """The T > 0 path: at each draft position, draw a candidate from softmax(score / T) given the
    token drawn before it. Shapes as in `greedy_walk`; returns the tokens and each position's
    distribution, over the candidates (probs) and over the vocabulary (q [..., K-1, V], zero
    outside the candidates). Each q_k is conditional on the drafted prefix, which is exactly what
    speculative sampling (accept with min(1, p/q), resample from max(p - q, 0)) needs to be
    lossless; DFlash's match rule is lossless with any draft."""
    def choose(scores, key_t):
        logits = scores / temperature
        return (jax.random.categorical(key_t, logits, -1).astype(jnp.int32),
                jax.nn.softmax(logits, -1))

    keys = jax.random.split(key, hidden.shape[-2])
    tokens, index, probs = _walk(params, hidden, anchor_ids, cand_ids, cand_scores, choose, keys)
    return Walk(tokens, index, probs, scatter_to_vocab(cand_ids, probs, vocab_size))


def scatter_to_vocab(cand_ids: jax.Array, probs: jax.Array, vocab_size: int) -> jax.Array:
    """probs [..., Z] over distinct candidate ids [..., Z] -> [..., V], zero elsewhere."""
    lead = cand_ids.shape[:-1]
    rows = math.prod(lead)
    ids = cand_ids.reshape(rows, -1)
    q = jnp.zeros((rows, vocab_size), probs.dtype)
    q = q.at[jnp.arange(rows)[:, None], ids].set(probs.reshape(rows, -1))
    return q.reshape(*lead, vocab_size)


def selector_loss_stats(params: SelectorParams, hidden: jax.Array, targets: jax.Array,
                        mask: jax.Array, cand: Candidates, *,
                        stop_gradient: bool = False) -> SelectorStats:
    """Teacher-forced selector statistics of all blocks at once.

    hidden [B, N, K, D] (final hidden states of every block position), targets [B, N, K] (the
    token at a + k; position 0 holds the anchor token), mask [B, N, K] (the base objective's loss
    positions), cand: `top_candidates_from_hidden(hidden, head, Z, gold=targets, ...)`. The
    predecessor of position k is targets[..., k - 1] (the anchor for k = 1). `stop_gradient`
    detaches hidden and the unary scores inside the selector term (SpecForge's option), leaving
    gradients only to the selector's own parameters."""
    if cand.gold_index is None:
        raise ValueError("cand must be computed with gold=targets")
    if stop_gradient:
        hidden = jax.lax.stop_gradient(hidden)
        cand = cand._replace(scores=jax.lax.stop_gradient(cand.scores))
    vocab = params.predecessor_codebook.shape[0]
    # Masked positions may hold any label (e.g. -100): clip so that the lookups stay in range.
    pred = jnp.clip(jnp.concatenate([targets[..., :1], targets[..., :-1]], -1), 0, vocab - 1)
    scores = transition_scores(params, hidden, pred, cand.ids, cand.scores)  # [B, N, K, Z]
    covered = (mask != 0) & cand.gold_in
    gold_score = jnp.take_along_axis(scores, jnp.maximum(cand.gold_index, 0)[..., None], -1)
    ce = jnp.where(covered, jax.nn.logsumexp(scores, -1) - gold_score[..., 0], 0.0)
    correct = covered & (jnp.argmax(scores, -1) == cand.gold_index)
    n_mask = jnp.sum(mask != 0)
    n_cov = jnp.sum(covered)
    recall = n_cov / jnp.maximum(n_mask, 1)
    accuracy = jnp.sum(correct) / jnp.maximum(n_cov, 1)
    return SelectorStats(ce, covered, correct, recall.astype(jnp.float32),
                         accuracy.astype(jnp.float32))


def selector_alpha(step, total_steps: int, alpha: float = 1.0, warmup_ratio: float = 0.0,
                   ramp_ratio: float = 0.0):
    """SpecForge's selector-loss weight after `step` completed optimizer steps: 0 for the first
    int(total_steps * warmup_ratio) steps, then alpha * min((step - warmup + 1) / ramp, 1) with
    ramp = int(total_steps * ramp_ratio) (alpha at once when ramp = 0). Works on traced steps."""
    warmup = int(total_steps * warmup_ratio)
    ramp = int(total_steps * ramp_ratio)
    step = jnp.asarray(step, jnp.float32)
    frac = 1.0 if ramp <= 0 else jnp.clip((step - warmup + 1) / ramp, 0.0, 1.0)
    return jnp.where(step < warmup, 0.0, alpha * frac)
