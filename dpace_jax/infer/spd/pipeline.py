"""Speculative pipeline decoding (SPD, arXiv 2605.30852; docs/spd.md) on a `stage` mesh axis.

The target's L decoder layers are split into n contiguous stages (stage s: layers
[s*L/n, (s+1)*L/n), one device each: the stacked layer axis and the KV cache are sharded over
`stage`). One jitted `lax.while_loop` inside `shard_map` runs the pipeline for a batch of B
independent sequences (each with its own positions, flushes and counters); shapes: B batch, P
padded prompt length, S = P + max_new_tokens + n + 2 cache slots (the last one is a trash slot
no query ever sees), D hidden, V vocabulary.

Pipeline step t (all stages in lockstep):
  1. stage 0 holds the newest token, the *head* (position h, just embedded); stage s holds the
     partial state of token h - s: the output of layer s*L/n - 1, its *boundary state* b_s.
  2. these n inputs are gathered (`all_gather`) for the draft module, which predicts the token
     at h + 1 from them (and from its own context of finished tokens): it runs beside the stage
     forwards and uses nothing they compute this step.
  3. every stage runs its layers on the token it holds, writing that token's keys / values at
     its position into its own cache slice; `ppermute` shifts the outputs one stage on (a ring:
     the last stage's output lands on stage 0).
  4. stage 0 applies the final norm + LM head to the token that left the last stage (position
     e = h - n + 1 in steady state); its logits give the target's distribution for e + 1, which
     verifies the drafted token sitting at e + 1 (in flight since step t - n + 2).
       accepted: e + 1 is committed; the new head is h + 1 with the draft of step 2.
       rejected: the target's token (greedy: its argmax; sampling: a draw from the residual)
                 replaces it and is committed; every token in flight (positions > e + 1) is
                 stale: the pipeline is flushed and the new head is e + 1 (the correction).
     Tokens carry the `epoch` they entered in; a flush bumps stage 0's epoch, so stale tokens
     still in the stages are recognised (and ignored) when they reach stage 0 or the draft
     module. Cropping every stage's cache is rewinding the write position: the KV cache masks
     by position (`model.forward_cached`), each stage sees tokens in entry order, and the valid
     token at a position is written after any stale one there, before any later query reads it.
  After a flush the pipeline refills: for n - 1 steps no valid token leaves the last stage, so a
  rejection costs n - 1 steps without a commit; without rejections one token is committed per
  step. Each verification commits exactly one token (accepted draft or correction), so the
  emitted sequence is the target's: greedy decoding gives exactly its greedy continuation, and
  sampling follows the target's distribution (rule "speculative": draft d ~ q, accepted with
  probability min(1, p(d)/q(d)), else a draw from norm(max(p - q, 0)); rule "dflash": the draft
  is q's argmax and is accepted iff it equals the target's own sample, which is emitted).

Prefill: the prompt passes the stages one after the other (n steps); its last logits choose the
first new token (committed; the first head). A sequence is done once max_new_tokens tokens are
committed or a committed token is a stop token (kept); it then enters no more tokens. Stage 0's
bookkeeping is computed on every device (SPMD, cheap) but only stage 0's copy is used; the draft
module and the LM head run on stage 0 only (`lax.cond` on the stage index), which holds
embedding, final norm and LM head. Stages and the mesh: dpace_jax.infer.spd.stage.

Drafters (`SpdDrafter`): static functions over a params pytree (dpace_jax.infer.spd.draft holds the
trained draft module; tests script others):
  init(params, config, target_params, prompts [B, P], boundary [n, B, P, D], size) -> state
      boundary[k - 1]: the prompt's boundary states b_k (b_n after the final norm).
  draft(params, config, target_params, state, view: View) -> (state, logits [B, V]) for h + 1.
  complete(params, config, state, pos [B], final [B, D], valid [B]) -> state: the token at pos
      left the last stage (final: after the final norm); only where valid.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dpace_jax.drafters.config import DrafterConfig
from dpace_jax.infer import decode as decode_lib
from dpace_jax.infer import sampling as sampling_lib
from dpace_jax.infer.rows import gather_rows, is_stop, set_rows
from dpace_jax.infer.sampling import Sampling
from dpace_jax.infer.spd.stage import (  # noqa: F401  (public names of the pipeline)
    AXIS,
    check_stages,
    stage_cache,
    stage_forward,
    stage_layer_ids,
    stage_mesh,
    target_specs,
)
from dpace_jax.targets.model import ModelConfig, lm_head


@functools.partial(jax.tree_util.register_dataclass, data_fields=["params"],
                   meta_fields=["config", "init", "draft", "complete"])
@dataclasses.dataclass(frozen=True)
class SpdDrafter:
    """A draft module for the pipeline (see the module docstring for the three functions)."""

    params: Any
    config: Any
    init: Callable
    draft: Callable
    complete: Callable


class View(NamedTuple):
    """What the draft module sees at the start of a step (on stage 0)."""

    seq: jax.Array  # [B, S] tokens by position: committed, then in flight up to head
    head: jax.Array  # [B] position of the token entering stage 0 (the draft predicts head + 1)
    exited: jax.Array  # [B] last position that left the last stage (positions <= it: finished)
    states: jax.Array  # [n, B, D] stage s's input: boundary state b_s of position head - s
    valid: jax.Array  # [n, B] whether states[s] belongs to the live token head - s (s = 0: True)


class Slot(NamedTuple):
    """The token a stage processes this step."""

    x: jax.Array  # [B, D] its hidden state entering the stage
    pos: jax.Array  # [B] its position (the trash slot for an empty slot)
    tag: jax.Array  # [B] the epoch it entered in (-1: empty)


class SpdResult(NamedTuple):
    tokens: jax.Array  # [B, max_new_tokens], 0 past num_tokens
    num_tokens: jax.Array  # [B] generated tokens, the stop token included
    verified: jax.Array  # [B] verifications of a drafted token
    accepted: jax.Array  # [B] of which accepted
    steps: jax.Array  # [B] pipeline steps until the sequence was done (prefill excluded)


class _State(NamedTuple):
    cache: Any  # this stage's layers' cache (a KVCache: k, v [L/n, B, S, G, E])
    slot: Slot
    seq: jax.Array  # [B, S]
    head: jax.Array  # [B]
    exited: jax.Array  # [B]
    epoch: jax.Array  # [B]
    committed: jax.Array  # [B] positions < committed are final
    stopped: jax.Array  # [B] a stop token was committed
    qring: jax.Array  # [B, R, V] draft distributions of in-flight positions (pos % R); [B,1,1]
    draft_state: Any
    key: jax.Array
    verified: jax.Array
    accepted: jax.Array
    steps: jax.Array
    step: jax.Array  # scalar


def _final(params, cfg: ModelConfig, x):
    return cfg.family.norm(x, params.final_norm, cfg.rms_norm_eps)


def _verify(key, logits, drafted, q_drafted, in_flight, s: Sampling):
    """Verify the drafted token at e + 1 with the target's logits [B, V] there -> (accept [B],
    the target's token [B] used on rejection)."""
    if s.greedy or s.rule == "dflash":
        target = sampling_lib.choose(key, logits, s)
        return in_flight & (drafted == target), target
    k_u, k_res = jax.random.split(key)
    p = jnp.exp(sampling_lib.filtered_log_probs(logits, s))  # [B, V]
    p_d = jnp.take_along_axis(p, drafted[:, None], axis=1)[:, 0]
    q_d = jnp.take_along_axis(q_drafted, drafted[:, None], axis=1)[:, 0]
    u = jax.random.uniform(k_u, p_d.shape)
    accept = in_flight & (u * q_d < p_d)
    res = jnp.where(in_flight[:, None], jnp.maximum(p - q_drafted, 0.0), p)
    res = jnp.where(jnp.sum(res, -1, keepdims=True) > 0, res, p)
    return accept, jax.random.categorical(k_res, jnp.log(res), axis=-1).astype(jnp.int32)


def _logits_f32(out):
    state, logits = out
    return state, logits.astype(jnp.float32)


def _pipeline(target_params, drafter: SpdDrafter, prompts, lengths, stop_ids, key, temperature,
              *, cfg: ModelConfig, n: int, max_new: int, sampling_key: Sampling):
    """The per-device program (inside shard_map): prefill, then the pipeline loop."""
    s_idx = jax.lax.axis_index(AXIS)
    first_stage = s_idx == 0
    sampler = sampling_key.with_temperature(temperature)
    speculative = not sampler.greedy and sampler.rule == "speculative"
    batch, plen = prompts.shape
    size = plen + max_new + n + 2
    trash = size - 1
    ring = [(i, (i + 1) % n) for i in range(n)]
    dp, dc = drafter.params, drafter.config
    embed = target_params.embed
    cache = stage_cache(cfg, n, batch, size, embed.dtype)

    # Prefill: stage k runs the prompt at pipeline step k; boundary k + 1 is shared (psum).
    with jax.named_scope("spd_prefill"):
        x = jnp.take(embed, prompts, axis=0)
        zeros = jnp.zeros((batch,), jnp.int32)
        boundary = []
        for k in range(n):
            y, new_cache = stage_forward(target_params.layers, cfg, x, cache, zeros,
                                         num_stages=n, keep=lengths)
            mine = s_idx == k
            cache = jax.tree.map(lambda a, b, m=mine: jnp.where(m, a, b), new_cache, cache)
            b_k = jax.lax.psum(jnp.where(mine, y, jnp.zeros_like(y)), AXIS)
            boundary.append(_final(target_params, cfg, b_k) if k == n - 1 else b_k)
            x = jax.lax.ppermute(y, AXIS, ring)
        boundary = jnp.stack(boundary)  # [n, B, P, D]
        last = jnp.take_along_axis(boundary[-1], (lengths - 1)[:, None, None], axis=1)[:, 0]
        key, sub = jax.random.split(key)
        first = sampling_lib.choose(sub, lm_head(target_params, last), sampler)
    seq = jnp.zeros((batch, size), jnp.int32).at[:, :plen].set(prompts)
    seq = jax.vmap(lambda r, i, t: r.at[i].set(t))(seq, lengths, first)
    epoch = jnp.zeros((batch,), jnp.int32)
    empty = Slot(jnp.zeros((batch, cfg.hidden_size), embed.dtype), jnp.full((batch,), trash),
                 jnp.full((batch,), -1))
    entry = Slot(jnp.take(embed, first, axis=0), lengths, epoch)
    slot = jax.tree.map(lambda a, b: jnp.where(first_stage, a, b), entry, empty)
    ring_len = n + 1
    qring = (jnp.zeros((batch, ring_len, cfg.vocab_size), jnp.float32) if speculative
             else jnp.zeros((batch, 1, 1), jnp.float32))
    state = _State(cache, slot, seq, lengths, lengths - 1, epoch, lengths + 1,
                   is_stop(first, stop_ids), qring,
                   drafter.init(dp, dc, target_params, prompts, boundary, size), key,
                   zeros, zeros, zeros, jnp.zeros((), jnp.int32))
    max_steps = n * (max_new + 2)

    no_logits = jnp.zeros((batch, cfg.vocab_size), jnp.float32)

    def on_stage0(fn, elsewhere):
        """fn() on stage 0's device; the other stages skip the work (their copy is unused)."""
        return jax.lax.cond(first_stage, fn, lambda: elsewhere)

    def done_of(st: _State):
        return st.stopped | (st.committed - lengths >= max_new)

    def cond(st: _State):
        live = jnp.where(first_stage, jnp.sum(~done_of(st)), 0)
        return (jax.lax.psum(live, AXIS) > 0) & (st.step < max_steps)

    def body(st: _State) -> _State:
        done = done_of(st)
        key, k_draft, k_verify = jax.random.split(st.key, 3)
        with jax.named_scope("spd_draft"):
            gathered = jax.tree.map(lambda a: jax.lax.all_gather(a, AXIS), st.slot)
            valid = (gathered.tag == st.epoch[None]) & (jnp.arange(n) > 0)[:, None]
            valid = valid.at[0].set(True)
            view = View(st.seq, st.head, st.exited, gathered.x, valid)
            draft_state, draft_logits = on_stage0(
                lambda: _logits_f32(drafter.draft(dp, dc, target_params, st.draft_state, view)),
                (st.draft_state, no_logits))
            if speculative:
                q = jnp.exp(sampling_lib.filtered_log_probs(draft_logits, sampler))
                drafted = jax.random.categorical(k_draft, jnp.log(q), axis=-1).astype(jnp.int32)
            else:
                drafted = jnp.argmax(draft_logits, axis=-1).astype(jnp.int32)
        with jax.named_scope("spd_stage"):
            y, cache = stage_forward(target_params.layers, cfg, st.slot.x[:, None], st.cache,
                                     st.slot.pos, num_stages=n)
        out = jax.lax.ppermute(Slot(y[:, 0], st.slot.pos, st.slot.tag), AXIS, ring)
        with jax.named_scope("spd_verify"):
            out_valid = (out.tag == st.epoch) & ~done
            final = _final(target_params, cfg, out.x)
            v = jnp.minimum(out.pos + 1, trash)
            in_flight = v <= st.head
            q_v = (gather_rows(st.qring, v % ring_len) if speculative
                   else jnp.zeros((batch, cfg.vocab_size)))
            logits = on_stage0(lambda: lm_head(target_params, final), no_logits)
            accept, corr = _verify(k_verify, logits, gather_rows(st.seq, v), q_v, in_flight,
                                   sampler)
            reject = out_valid & ~accept
            verified_tok = jnp.where(accept, gather_rows(st.seq, v), corr)
            stopped = st.stopped | (out_valid & is_stop(verified_tok, stop_ids))
            new_head = jnp.where(reject, v, st.head + 1)
            new_tok = jnp.where(reject, corr, drafted)
            enter = ~done
            seq = set_rows(st.seq, new_head, new_tok, enter)
            qring = (set_rows(st.qring, new_head % ring_len, q, enter & ~reject)
                     if speculative else st.qring)
            epoch = st.epoch + reject.astype(jnp.int32)
            draft_state = on_stage0(lambda: drafter.complete(dp, dc, draft_state, out.pos,
                                                             final, out_valid), draft_state)
            entry = Slot(jnp.take(embed, new_tok, axis=0), jnp.where(enter, new_head, trash),
                         jnp.where(enter, epoch, -1))
        slot = jax.tree.map(lambda a, b: jnp.where(first_stage, a, b), entry, out)
        checked = out_valid & in_flight
        return _State(
            cache, slot, seq, jnp.where(enter, new_head, st.head),
            jnp.where(out_valid, out.pos, st.exited), epoch,
            jnp.where(out_valid, v + 1, st.committed), stopped, qring, draft_state, key,
            st.verified + checked, st.accepted + (checked & accept),
            st.steps + (~done).astype(jnp.int32), st.step + 1)

    final = jax.lax.while_loop(cond, body, state)
    cols = lengths[:, None] + jnp.arange(max_new, dtype=jnp.int32)[None, :]
    num_tokens = jnp.minimum(final.committed - lengths, max_new)
    tokens = jnp.take_along_axis(final.seq, cols, axis=1)
    tokens = jnp.where(jnp.arange(max_new)[None, :] < num_tokens[:, None], tokens, 0)
    return jax.tree.map(lambda a: a[None], SpdResult(tokens, num_tokens, final.verified,
                                                     final.accepted, final.steps))


_COMPILED: dict = {}


def _compiled(mesh: Mesh, cfg: ModelConfig, n: int, max_new: int, sampling_key: Sampling,
              target_params, drafter):
    """The jitted shard_map program, one per static setting and parameter structure."""
    key = (mesh, cfg, n, max_new, sampling_key, jax.tree.structure((target_params, drafter)))
    if key in _COMPILED:
        return _COMPILED[key]
    fn = functools.partial(_pipeline, cfg=cfg, n=n, max_new=max_new, sampling_key=sampling_key)
    param_specs = target_specs(target_params)
    drafter_specs = jax.tree.map(lambda _: P(), drafter)
    mapped = jax.shard_map(fn, mesh=mesh,
                           in_specs=(param_specs, drafter_specs, P(), P(), P(), P(), P()),
                           out_specs=P(AXIS), check_vma=False)
    _COMPILED[key] = jax.jit(mapped)
    return _COMPILED[key]


def decode(target_params, cfg: ModelConfig, drafter: SpdDrafter, prompts, lengths, *,
           num_stages: int, max_new_tokens: int, sampling: Sampling = sampling_lib.GREEDY,
           stop_token_ids=(), rng: jax.Array | None = None, devices=None) -> SpdResult:
    """SPD of right-padded prompts [B, P] (lengths [B], each >= num_stages) on the first
    num_stages devices -> SpdResult (tokens [B, max_new_tokens], per-sequence counts). A
    sequence stops after max_new_tokens tokens or the first of stop_token_ids (kept)."""
    check_stages(cfg, num_stages)
    if isinstance(drafter.config, DrafterConfig):  # a draft module of dpace_jax.infer.spd.draft
        want = stage_layer_ids(cfg, num_stages)
        got = (drafter.config.block_size, tuple(drafter.config.target_layer_ids))
        if got != (num_stages, want):
            raise ValueError(f"the draft module is for {got[0]} stages (block_size {got[0]}, "
                             f"target_layer_ids {list(got[1])}); num_stages={num_stages} needs "
                             f"block_size {num_stages}, target_layer_ids {list(want)}")
    prompts, lengths, stops = decode_lib.check_inputs(
        prompts, lengths, max_new_tokens, stop_token_ids, cfg.vocab_size, min_length=num_stages,
        why="at least num_stages tokens of prompt")
    stops = jnp.asarray(stops, jnp.int32)
    mesh = stage_mesh(num_stages, devices)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    temperature = jnp.asarray(0.0 if sampling.greedy else sampling.temperature, jnp.float32)
    fn = _compiled(mesh, cfg, int(num_stages), int(max_new_tokens), sampling.compile_key(),
                   target_params, drafter)
    # place (committed) inputs on the mesh: the layers split over `stage`, the rest replicated
    target_params = jax.device_put(target_params, jax.tree.map(
        lambda spec: NamedSharding(mesh, spec), target_specs(target_params)))
    replicated = NamedSharding(mesh, P())
    drafter, prompts, lengths, stops, rng, temperature = jax.device_put(
        (drafter, prompts, lengths, stops, rng, temperature), replicated)
    out = fn(target_params, drafter, prompts, lengths, stops, rng, temperature)
    return jax.tree.map(lambda a: a[0], out)


def acceptance_rate(result: SpdResult) -> float:
    """Accepted / verified drafts over the batch (nan without verifications)."""
    verified = int(np.sum(np.asarray(result.verified)))
    return float(np.sum(np.asarray(result.accepted))) / verified if verified else float("nan")
