"""The speculative decoder's loop (dpace_jax.infer.decode): the prefill, one verify step, and the
`lax.while_loop`s that run the steps so that a step's work follows what is live.

Two things grow or shrink while a batch decodes, and the loop is split where they change, each
piece (a segment) one `while_loop` with static shapes (one compiled body each, no per-step
branch). decode runs each segment as its own jitted call and first asks on the host whether it
would take a step (`runs`), so only the segments a decode reaches are compiled: a batch whose
rows all finish at once compiles one stage, a short generation only its first phases.

- the filled part of the caches. Phase j reads only the first `bounds[j]` cache slots (the
  target's attention through `model.forward_cached(visible=...)`, the drafter's context by its
  cache cut to them) and runs while every anchor lies within them; the bounds are the prompt
  width plus `phase_tokens` generated tokens, doubling, then the whole cache. So a step reads
  at most about twice the live part of the context, never the whole buffer from the start.
- the live rows. Stage i runs `sizes[i]` rows (the batch, halved down to `min_batch`) and ends
  once no more than the next size are unfinished; the finished rows' results go to the output
  and the unfinished ones (in order, filled up with finished ones) carry on in a smaller batch,
  caches included. A finished row stops costing work within a factor of two.

A row's steps are the same in any stage or phase (its own anchor, cache rows and tokens), so the
tokens equal those of one loop over the whole buffer up to floating-point summation order (the
tests check greedy outputs token for token). The random key of a sampled step is split per
step for the whole batch, so sampled outputs depend on the stage a row is in (still lossless).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dpace_jax.infer import records as records_lib
from dpace_jax.infer import sampling as sampling_lib
from dpace_jax.infer.rows import is_stop, write_rows
from dpace_jax.targets import model


class State(NamedTuple):
    """Per row (axis 0; the caches along their own batch axis) unless said otherwise."""

    tokens: jax.Array  # [B, N + K]
    num_tokens: jax.Array  # [B]
    last: jax.Array  # [B] the last emitted token (at the anchor position)
    acceptance: jax.Array  # [B, max_steps]
    num_steps: jax.Array  # [B]
    done: jax.Array  # [B] bool
    lengths: jax.Array  # [B] prompt lengths
    rows: jax.Array  # [B] the row of the output each row is
    cache: Any  # the target's: model.KVCache, or a Qwen3.5 target's HybridCache
    draft_cache: Any
    key: jax.Array  # scalar key, for the whole batch
    step: jax.Array  # scalar: steps run
    records: records_lib.Records | None


class Setup(NamedTuple):
    """What every step reads besides the state: arrays (traced) and settings (static)."""

    target_params: Any
    drafter: Any  # decode.Drafter
    stop_ids: jax.Array  # [n]
    sampler: sampling_lib.Sampling  # the temperature traced
    target_cfg: Any
    prompt_len: int  # P, the prompts' padded width
    max_new_tokens: int
    record: bool

    @property
    def size(self) -> int:
        """The caches' slots: P + max_new_tokens + K, so that no write is ever clamped."""
        return self.prompt_len + self.max_new_tokens + self.drafter.block_size


def prefill(u: Setup, prompts, lengths, key, pad_token_id: int) -> State:
    """The prompts (right-padded [B, P]) through the target into a cache of P + N + K slots,
    the first token chosen, the drafter's context filled."""
    batch, size = prompts.shape[0], u.size
    drafter, tp, cfg = u.drafter, u.target_params, u.target_cfg
    k_block, n_new = drafter.block_size, u.max_new_tokens
    zeros = jnp.zeros((batch,), jnp.int32)
    # The prompt fills slots 0..P-1 and reads no cache slot (visible=0); pad rows are garbage
    # no query sees before the first block overwrites them.
    cache = model.init_cache(cfg, batch, size, tp.embed.dtype)
    out = model.forward_cached(tp, cfg, prompts, cache, zeros, logits=False, keep=lengths,
                               feature_layers=tuple(drafter.target_layer_ids), visible=0)
    last_hidden = jnp.take_along_axis(out.hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    key, sub = jax.random.split(key)
    first_logits = model.lm_head(tp, last_hidden)
    first = sampling_lib.choose(sub, first_logits, u.sampler)
    max_steps = max(n_new - 1, 1)
    records = (records_lib.empty(first_logits, first, u.sampler, max_steps, k_block)
               if u.record else None)
    dp, dc = drafter.params, drafter.config
    draft_cache = drafter.extend(dp, dc, drafter.init_cache(dp, dc, batch, size), prompts,
                                 out.features, zeros)
    tokens = jnp.full((batch, n_new + k_block), pad_token_id, jnp.int32).at[:, 0].set(first)
    return State(tokens, jnp.ones((batch,), jnp.int32), first,
                 jnp.zeros((batch, max_steps), jnp.int32), zeros,
                 is_stop(first, u.stop_ids) | (n_new <= 1), lengths,
                 jnp.arange(batch, dtype=jnp.int32), out.cache, draft_cache, key,
                 jnp.zeros((), jnp.int32), records)


def step(u: Setup, s: State, visible: int | None = None) -> State:
    """One verify step of every row (docs/design.md §6); `visible` (static) bounds the anchors,
    and so the cache slots read."""
    drafter, sampler, k_block, n_new = u.drafter, u.sampler, u.drafter.block_size, u.max_new_tokens
    dp, dc = drafter.params, drafter.config
    ids = tuple(drafter.target_layer_ids)
    batch = s.num_tokens.shape[0]
    anchors = s.lengths + s.num_tokens - 1
    key, k_draft, k_verify = jax.random.split(s.key, 3)
    if k_block > 1:
        context = (s.draft_cache if visible is None
                   else cut(s.draft_cache, visible, drafter, batch, u.size))
        block, draft_q = drafter.propose(dp, dc, u.target_params, context, s.last, anchors,
                                         k_draft, sampler)
    else:
        block = s.last[:, None]
    with jax.named_scope("verify"):
        verified = model.forward_cached(u.target_params, u.target_cfg, block, s.cache, anchors,
                                        feature_layers=ids, visible=visible)
    if k_block > 1:
        acc, emitted = sampling_lib.verify(k_verify, verified.logits, draft_q, block, sampler)
    else:
        acc, emitted = sampling_lib.verify_match(k_verify, verified.logits, block, sampler)

    # How many of the acc + 1 tokens count: up to the first stop token, within max_new.
    j = jnp.arange(k_block, dtype=jnp.int32)[None, :]
    stop_hit = is_stop(emitted, u.stop_ids) & (j <= acc[:, None])
    n_emit = jnp.where(jnp.any(stop_hit, axis=1), jnp.argmax(stop_hit, axis=1) + 1, acc + 1)
    n_emit = jnp.minimum(n_emit, n_new - s.num_tokens)
    active = ~s.done
    n_emit = jnp.where(active, n_emit, 0)
    stopped = jnp.any(stop_hit & (j < n_emit[:, None]), axis=1)
    num_tokens = s.num_tokens + n_emit
    last_emitted = jnp.take_along_axis(emitted, jnp.maximum(n_emit - 1, 0)[:, None], 1)[:, 0]
    step_slot = jnp.where(active, s.num_steps, s.acceptance.shape[1])  # inactive: dropped
    acceptance = s.acceptance.at[jnp.arange(batch), step_slot].set(acc + 1, mode="drop")
    records = s.records
    if u.record:
        records = records_lib.record_step(records, step_slot, anchors, block, emitted,
                                          verified.logits, acc, n_emit, sampler)
    draft_cache = s.draft_cache
    if k_block > 1:
        draft_cache = drafter.extend(dp, dc, draft_cache, block, verified.features, anchors)
    return s._replace(
        tokens=write_rows(s.tokens, emitted, s.num_tokens, n_emit), num_tokens=num_tokens,
        last=jnp.where(active, last_emitted, s.last), acceptance=acceptance,
        num_steps=s.num_steps + active.astype(jnp.int32),
        done=s.done | stopped | (num_tokens >= n_new),
        cache=model.commit(u.target_cfg, verified.cache, acc + 1), draft_cache=draft_cache,
        key=key, step=s.step + 1, records=records)


# --------------------------------------------------------------------------- phases and stages


def bounds(prompt_len: int, size: int, phase_tokens: int) -> list[int]:
    """The phases' cache bounds: P + phase_tokens * 2^j below the cache size, then the size."""
    if phase_tokens < 1:
        raise ValueError(f"phase_tokens must be >= 1, got {phase_tokens}")
    out, span = [], phase_tokens
    while prompt_len + span < size:
        out.append(prompt_len + span)
        span *= 2
    return out + [size]


def sizes(batch: int, min_batch: int) -> list[int]:
    """The stages' batch sizes: batch, halved (rounded up) while not below min_batch."""
    if min_batch < 1:
        raise ValueError(f"min_batch must be >= 1, got {min_batch}")
    out = [batch]
    while (nxt := -(-out[-1] // 2)) >= min_batch and nxt < out[-1]:
        out.append(nxt)
    return out


def _axes(tree, other) -> Any:
    """Per leaf, the first axis where its shape differs from `other`'s leaf (-1: none)."""
    return jax.tree.map(lambda x, y: next((i for i, (m, n) in enumerate(
        zip(x.shape, y.shape, strict=True)) if m != n), -1), tree, other)


def _draft_shapes(drafter, batch: int, size: int):
    dc = drafter.config
    return jax.eval_shape(lambda p: drafter.init_cache(p, dc, batch, size), drafter.params)


def cut(cache, visible: int, drafter, batch: int, size: int) -> Any:
    """The drafter cache (batch rows, size slots) with only its first `visible` slots (the slot
    axis: the one init_cache sizes by its length)."""
    axes = _axes(_draft_shapes(drafter, batch, size), _draft_shapes(drafter, batch, size + 1))
    return jax.tree.map(lambda x, a: x if a < 0 else jax.lax.slice_in_dim(x, 0, visible, axis=a),
                        cache, axes)


def _take_rows(s: State, idx: jax.Array, u: Setup, size: int) -> State:
    """The state of rows idx [b] (their caches too: batch axes found by init_cache)."""
    batch, cfg, dtype = s.num_tokens.shape[0], u.target_cfg, u.target_params.embed.dtype
    t_axes = _axes(jax.eval_shape(lambda: model.init_cache(cfg, batch, size, dtype)),
                   jax.eval_shape(lambda: model.init_cache(cfg, batch + 1, size, dtype)))
    d_axes = _axes(_draft_shapes(u.drafter, batch, size),
                   _draft_shapes(u.drafter, batch + 1, size))

    def take(tree, axes=None):
        if axes is None:
            return jax.tree.map(lambda x: jnp.take(x, idx, axis=0), tree)
        return jax.tree.map(lambda x, a: x if a < 0 else jnp.take(x, idx, axis=a), tree, axes)

    rows = take((s.tokens, s.num_tokens, s.last, s.acceptance, s.num_steps, s.done, s.lengths,
                 s.rows))
    return State(*rows, take(s.cache, t_axes), take(s.draft_cache, d_axes), s.key, s.step,
                 take(s.records))


class Output(NamedTuple):
    """The per-row results of the whole batch, [B, ...]."""

    tokens: jax.Array
    num_tokens: jax.Array
    acceptance: jax.Array
    num_steps: jax.Array
    records: records_lib.Records | None


def put(out: Output, s: State) -> Output:
    """out with the rows of s written at s.rows."""
    write = functools.partial(jax.tree.map, lambda o, x: o.at[s.rows].set(x))
    return Output(*write((out.tokens, out.num_tokens, out.acceptance, out.num_steps),
                         (s.tokens, s.num_tokens, s.acceptance, s.num_steps)),
                  None if out.records is None else write(out.records, s.records))


def runs(u: Setup, s: State, bound: int, nxt: int) -> bool:
    """Whether the segment (phase `bound`, next stage size `nxt`; 0: last stage) would take a
    step from s: its while_loop's condition evaluated on the host (one transfer of the counters),
    so that a segment that would not run is never compiled."""
    return bool(_go(np, u, bound, nxt, *jax.device_get((s.step, s.done, s.lengths,
                                                        s.num_tokens))))


def finished(u: Setup, s: State) -> bool:
    """No row has a step left."""
    return not runs(u, s, u.size, 0)


def segment(u: Setup, s: State, bound: int, nxt: int) -> State:
    """The steps of one phase of one stage: while some row is live and max_new_tokens steps
    have not run, every anchor within `bound` slots (bound < the cache size), and more rows
    than `nxt` unfinished (nxt > 0)."""
    return jax.lax.while_loop(functools.partial(_cond, u, bound, nxt),
                              functools.partial(_body, u, bound, u.size), s)


def shrink(u: Setup, s: State, rows: int) -> State:
    """The next stage's state: the unfinished rows first, in order (argsort is stable), filled
    up with finished ones to `rows`."""
    return _take_rows(s, jnp.argsort(s.done)[:rows], u, u.size)


def _go(xp, u: Setup, bound: int, nxt: int, step, done, lengths, num_tokens):
    """The segment's loop condition, with xp = jnp (in the loop) or np (on the host)."""
    go = (step < u.max_new_tokens) & ~xp.all(done)
    if bound < u.size:  # every anchor within the bound (anchors never move back)
        go &= xp.max(lengths + num_tokens - 1) <= bound
    if nxt:
        go &= xp.sum(~done) > nxt
    return go


def _cond(u: Setup, bound: int, nxt: int, s: State):
    return _go(jnp, u, bound, nxt, s.step, s.done, s.lengths, s.num_tokens)


def _body(u: Setup, bound: int, size: int, s: State) -> State:
    return step(u, s, None if bound >= size else bound)
