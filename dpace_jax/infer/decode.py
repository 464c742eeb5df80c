"""Batched speculative decoding (docs/design.md §6) as one jitted `lax.while_loop`.

Positions: sequence b's prompt fills positions 0..lengths[b]-1 of a right-padded [B, P] array;
generated token j sits at position lengths[b] + j. Before each step the last emitted token sits at
the anchor a = lengths + num_tokens - 1; the target's KV cache and the drafter's context hold
positions < a (slots at or past a are stale and invisible to every query).

One step, per sequence: the drafter fills block positions 1..K-1 of [last token, MASK...] in one
call; the target runs the block [last, d_1..d_{K-1}] at positions a..a+K-1 in one forward (writing
its cache at start=a, which is also the rollback); a rule of dpace_jax.infer.sampling accepts acc
drafts and adds one target token (a Qwen3.5 target's recurrent layers then commit the acc + 1 kept
block tokens: model.commit); the block's target features become drafter context at start=a (rows
past a+acc are invisible to the next block, which anchors at a+acc+1, and are later overwritten).
Sequences advance by their own acc and stop at a stop token (kept) or max_new_tokens. Block size 1
is plain autoregressive decoding with the same loop (the speedup baseline).

Caches hold P + max_new_tokens + K slots, so no write is ever clamped. The compiled function
depends only on the shapes (B, P, number of stop ids), the configs and the static options
(max_new_tokens, `Sampling.compile_key()`: greedy or not, rule, top_k, top_p; the temperature
itself is traced): prompts of different lengths padded to the same P (see pad_prompts) share one
compilation. Prefill runs inside the same call; time a call with
max_new_tokens=1 to separate it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dpace_jax.drafters import dflash
from dpace_jax.infer import sampling as sampling_lib
from dpace_jax.infer.rows import is_stop, write_rows
from dpace_jax.infer.sampling import Sampling
from dpace_jax.targets import model
from dpace_jax.targets.model import KVCache, ModelConfig

# Number of times the decode loop has been traced (= compiled), by (B, P, block size).
TRACE_COUNTS: collections.Counter = collections.Counter()


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["params"],
    meta_fields=["config", "init_cache", "extend", "propose", "block_size", "target_layer_ids"],
)
@dataclasses.dataclass(frozen=True)
class Drafter:
    """What the decoder needs from a drafter. `params` is a pytree passed to the compiled loop;
    everything else is static (hashable: use module-level functions so that equal drafters hit
    the same compilation).

      init_cache(params, config, batch, length) -> cache pytree
      extend(params, config, cache, tokens [B, T], features [B, T, F] | None, start [B]) -> cache
          context: the tokens at positions start..start+T-1 and their target features (the
          outputs of target layers `target_layer_ids`, concatenated; None when there are none).
          Only rows before the next anchor are valid; the drafter must ignore slots >= anchor.
      propose(params, config, target_params, cache, anchor_tokens [B], anchors [B], key,
              sampling) -> (block [B, K] int32: the anchor token, then the drafts d_1..d_{K-1}
              of the tokens at anchors + k; q [B, K, V] fp32 or None): q[:, k] is the
          distribution d_k was drawn from, what the "speculative" rule needs when sampling
          (None otherwise; any proposal is lossless under the other rules).
    """

    params: Any
    config: Any
    init_cache: Callable
    extend: Callable
    propose: Callable
    block_size: int
    target_layer_ids: tuple[int, ...] = ()

    def check(self, target_cfg: ModelConfig) -> None:
        """ValueError when this drafter cannot run on the target."""
        if int(self.block_size) < 1:
            raise ValueError(f"drafter block_size must be >= 1, got {self.block_size}")
        bad = [j for j in self.target_layer_ids if not 0 <= j < target_cfg.num_layers]
        if bad:
            raise ValueError(f"drafter target_layer_ids {bad} out of range: the target has "
                             f"{target_cfg.num_layers} layers")
        if self.init_cache is _dflash_init:
            dflash.check_compatible(self.config, target_cfg)


def _no_cache(params, config, batch, length):
    return ()


def _no_extend(params, config, cache, tokens, features, start):
    return cache


def _no_propose(params, config, target_params, cache, anchor_tokens, anchors, key, sampling):
    raise ValueError("the autoregressive drafter never drafts")


def autoregressive() -> Drafter:
    """Block size 1: plain autoregressive decoding of the target (the speedup baseline)."""
    return Drafter(None, None, _no_cache, _no_extend, _no_propose, 1, ())


def _dflash_init(params, cfg, batch, length):
    return KVCache.zeros(cfg, batch, length, params.fc.dtype)


def _dflash_extend(params, cfg, cache, tokens, features, start):
    return dflash.extend_cache(params, cfg, cache, features, start)


@functools.cache
def logits_proposer(draft: Callable) -> Callable:
    """A `propose` from a function `draft(params, config, target_params, cache, anchor_tokens,
    anchors) -> logits [B, K, V]`: their argmax, or samples from them under the speculative rule
    (q: the filtered distribution they were drawn from). Cached, so that a given `draft` always
    gives the same function (one compilation)."""

    def propose(params, cfg, target_params, cache, anchor_tokens, anchors, key, sampler):
        logits = draft(params, cfg, target_params, cache, anchor_tokens, anchors)
        block = sampling_lib.propose(key, logits, sampler).at[:, 0].set(anchor_tokens)
        return block, sampling_lib.draft_probs(logits, sampler)

    return propose


_logits_propose = logits_proposer(dflash.draft_logits)


def _walk_propose(params, cfg, target_params, cache, anchor_tokens, anchors, key, sampler):
    """DFlash 2: the candidate selector's walk (greedy, or sampled under the speculative rule,
    q its distribution), dpace_jax.drafters.dflash2.propose."""
    from dpace_jax.drafters import dflash2

    return dflash2.propose(params, cfg, target_params, cache, anchor_tokens, anchors, key,
                           sampler)


def dflash_drafter(params, cfg, target_cfg: ModelConfig | None = None,
                   source: str = "drafter", *, selector: bool = True) -> Drafter:
    """A drafter of dpace_jax.drafters (params, DrafterConfig: DFlash, or DFlash 2 whose drafts
    walk its candidate selector; `selector=False` drafts DFlash 2's unary argmax instead);
    checked against the target config when given (ValueError naming the field that does not
    fit)."""
    if target_cfg is not None:
        dflash.check_compatible(cfg, target_cfg, source=source)
    propose = _walk_propose if cfg.arch == "dflash2" and selector else _logits_propose
    return Drafter(params, cfg, _dflash_init, _dflash_extend, propose, cfg.block_size,
                   tuple(cfg.target_layer_ids))


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


class DecodeResult(NamedTuple):
    tokens: jax.Array  # [B, max_new_tokens] generated tokens, pad_token_id past num_tokens
    num_tokens: jax.Array  # [B] generated tokens, the stop token included
    acceptance: jax.Array  # [B, max_steps] acc + 1 (1..K) per verify step, 0 past num_steps
    num_steps: jax.Array  # [B] verify steps (the prefill's first token is not a step)
    records: Records | None = None  # decode(record=True) only


class _State(NamedTuple):
    tokens: jax.Array  # [B, N + K]
    num_tokens: jax.Array  # [B]
    last: jax.Array  # [B] the last emitted token (at the anchor position)
    acceptance: jax.Array  # [B, max_steps]
    num_steps: jax.Array  # [B]
    done: jax.Array  # [B] bool
    cache: Any  # the target's: model.KVCache, or a Qwen3.5 target's hybrid.HybridCache
    draft_cache: Any
    key: jax.Array
    step: jax.Array  # scalar
    records: Records | None


def _logp(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log_softmax(logits)[..., tokens] in fp32: logits [..., V], tokens [...]."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


VLOGP_FLOOR = -1e9  # p = 0 in Records' vlogp fields: every OPD loss clips log-probs far above it


def _vlogp(logits: jax.Array, tokens: jax.Array, sampler: Sampling) -> jax.Array:
    """The log-prob of tokens [...] under the decoding's distribution of logits [..., V]."""
    if sampler.greedy:
        best = jnp.argmax(logits, axis=-1)
        return jnp.where(tokens == best, 0.0, VLOGP_FLOOR).astype(jnp.float32)
    logp = sampling_lib.filtered_log_probs(logits, sampler)
    picked = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    return jnp.maximum(picked, VLOGP_FLOOR)


def _record_step(r: Records, slot, anchors, block, emitted, verify_logits, acc, n_emit,
                 sampler: Sampling):
    """Records with step `slot` (per sequence; out of range: dropped) written."""
    k_block = block.shape[1]
    rows = jnp.arange(block.shape[0])
    logits = verify_logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)  # [B, K]: log-probs are logit - lse
    picked = jnp.take_along_axis(logits, emitted[..., None], axis=-1)[..., 0] - lse
    live = jnp.arange(k_block) < n_emit[:, None]
    realized = jnp.where(live, picked, 0)
    realized_v = jnp.where(live, _vlogp(logits, emitted, sampler), 0)
    # drafts[j] is judged by verify row j - 1 (the block up to j - 1, rejected drafts included)
    nxt = jnp.concatenate([block[:, 1:], block[:, :1]], axis=1)  # [B, K]: row i -> block[i + 1]
    first_col = jnp.arange(k_block) == 0
    block_logp = jnp.roll(jnp.take_along_axis(logits, nxt[..., None], axis=-1)[..., 0] - lse, 1,
                          axis=1)
    block_v = jnp.roll(_vlogp(logits, nxt, sampler), 1, axis=1)
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


def _decode_impl(target_params, drafter: Drafter, prompts, lengths, stop_token_ids, key,
                 temperature, *, target_cfg, max_new_tokens, sampling_key: Sampling,
                 pad_token_id, record: bool):
    batch, prompt_len = prompts.shape
    k_block, n_new = drafter.block_size, max_new_tokens
    TRACE_COUNTS[(batch, prompt_len, k_block)] += 1
    ids = tuple(drafter.target_layer_ids)
    size = prompt_len + n_new + k_block
    sampler = sampling_key.with_temperature(temperature)
    dp, dc = drafter.params, drafter.config
    zeros = jnp.zeros((batch,), jnp.int32)

    # Prefill: the prompt fills slots 0..P-1; pad rows are garbage no query sees before the
    # first block overwrites them.
    cache = model.init_cache(target_cfg, batch, size, target_params.embed.dtype)
    out = model.forward_cached(target_params, target_cfg, prompts, cache, zeros,
                               feature_layers=ids, logits=False, keep=lengths)
    last_hidden = jnp.take_along_axis(out.hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    key, sub = jax.random.split(key)
    first_logits = model.lm_head(target_params, last_hidden)
    first = sampling_lib.choose(sub, first_logits, sampler)
    max_steps = max(n_new - 1, 1)
    records = None
    if record:
        per_block = jnp.zeros((batch, max_steps, k_block), jnp.float32)
        records = Records(_logp(first_logits, first), jnp.zeros((batch, max_steps), jnp.int32),
                          jnp.zeros((batch, max_steps), jnp.int32), per_block,
                          jnp.full((batch, max_steps), -1, jnp.int32),
                          jnp.zeros((batch, max_steps), jnp.float32),
                          _vlogp(first_logits.astype(jnp.float32), first, sampler), per_block,
                          per_block.astype(jnp.int32), per_block, per_block)
    draft_cache = drafter.extend(dp, dc, drafter.init_cache(dp, dc, batch, size), prompts,
                                 out.features, zeros)
    tokens = jnp.full((batch, n_new + k_block), pad_token_id, jnp.int32).at[:, 0].set(first)
    state = _State(
        tokens=tokens,
        num_tokens=jnp.ones((batch,), jnp.int32),
        last=first,
        acceptance=jnp.zeros((batch, max_steps), jnp.int32),
        num_steps=zeros,
        done=is_stop(first, stop_token_ids) | (n_new <= 1),
        cache=out.cache,
        draft_cache=draft_cache,
        key=key,
        step=jnp.zeros((), jnp.int32),
        records=records,
    )

    def cond(s: _State):
        return (s.step < n_new) & ~jnp.all(s.done)

    def body(s: _State) -> _State:
        anchors = lengths + s.num_tokens - 1
        key, k_draft, k_verify = jax.random.split(s.key, 3)
        if k_block > 1:
            block, draft_q = drafter.propose(dp, dc, target_params, s.draft_cache, s.last,
                                             anchors, k_draft, sampler)
        else:
            block = s.last[:, None]
        with jax.named_scope("verify"):
            verified = model.forward_cached(target_params, target_cfg, block, s.cache, anchors,
                                            feature_layers=ids)
        if k_block > 1:
            acc, emitted = sampling_lib.verify(k_verify, verified.logits, draft_q, block,
                                               sampler)
        else:
            acc, emitted = sampling_lib.verify_match(k_verify, verified.logits, block, sampler)

        # How many of the acc + 1 tokens count: up to the first stop token, within max_new.
        j = jnp.arange(k_block, dtype=jnp.int32)[None, :]
        stop_hit = is_stop(emitted, stop_token_ids) & (j <= acc[:, None])
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
        if record:
            records = _record_step(records, step_slot, anchors, block, emitted,
                                   verified.logits, acc, n_emit, sampler)
        draft_cache = s.draft_cache
        if k_block > 1:
            draft_cache = drafter.extend(dp, dc, draft_cache, block, verified.features, anchors)
        return _State(
            tokens=write_rows(s.tokens, emitted, s.num_tokens, n_emit),
            num_tokens=num_tokens,
            last=jnp.where(active, last_emitted, s.last),
            acceptance=acceptance,
            num_steps=s.num_steps + active.astype(jnp.int32),
            done=s.done | stopped | (num_tokens >= n_new),
            cache=model.commit(target_cfg, verified.cache, acc + 1),
            draft_cache=draft_cache,
            key=key,
            step=s.step + 1,
            records=records,
        )

    final = jax.lax.while_loop(cond, body, state)
    return DecodeResult(final.tokens[:, :n_new], final.num_tokens, final.acceptance,
                        final.num_steps, final.records)


_decode_jit = jax.jit(
    _decode_impl,
    static_argnames=("target_cfg", "max_new_tokens", "sampling_key", "pad_token_id",
                     "record"),
)


def decode(target_params, target_cfg: ModelConfig, drafter: Drafter | None, prompts, lengths,
           *, max_new_tokens: int, sampling: Sampling = sampling_lib.GREEDY,
           stop_token_ids: Sequence[int] = (), rng: jax.Array | None = None,
           pad_token_id: int = 0, record: bool = False) -> DecodeResult:
    """Generate up to max_new_tokens tokens after each right-padded prompt.

    prompts [B, P] int, lengths [B] (1 <= lengths <= P). drafter None = autoregressive.
    `sampling` (dpace_jax.infer.sampling.Sampling): greedy by default; top_k / top_p filter target
    and drafter alike. Generation stops after the first token in stop_token_ids (kept) or
    max_new_tokens tokens. `record` adds the rollout Records (on-policy training).
    """
    drafter = autoregressive() if drafter is None else drafter
    drafter.check(target_cfg)
    prompts, lengths, stops = check_inputs(prompts, lengths, max_new_tokens, stop_token_ids,
                                           target_cfg.vocab_size)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    temperature = jnp.asarray(0.0 if sampling.greedy else sampling.temperature, jnp.float32)
    return _decode_jit(target_params, drafter, prompts, lengths, jnp.asarray(stops, jnp.int32),
                       rng, temperature, target_cfg=target_cfg,
                       max_new_tokens=int(max_new_tokens), sampling_key=sampling.compile_key(),
                       pad_token_id=int(pad_token_id), record=bool(record))


def check_inputs(prompts, lengths, max_new_tokens, stop_token_ids, vocab_size: int,
                 min_length: int = 1, why: str = "the padded prompt length"):
    """Validated (prompts [B, P] int32, lengths [B] int32, sorted stop ids); ValueError naming
    the argument that is wrong. Shared by this decoder and dpace_jax.infer.spd.pipeline."""
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens}")
    prompts = jnp.asarray(prompts, jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    if prompts.ndim != 2 or lengths.shape != prompts.shape[:1]:
        raise ValueError(f"prompts must be [B, P] and lengths [B]; got prompts {prompts.shape}, "
                         f"lengths {lengths.shape}")
    host = np.asarray(lengths)
    if host.min() < min_length or host.max() > prompts.shape[1]:
        raise ValueError(f"lengths must lie in {min_length}..{prompts.shape[1]} ({why}), got "
                         f"{host.tolist()}")
    stops = sorted({int(t) for t in stop_token_ids})
    bad = [t for t in stops if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"stop_token_ids {bad} are outside the vocabulary "
                         f"(vocab_size={vocab_size})")
    return prompts, lengths, stops


def pad_prompts(prompts: Sequence[Sequence[int]], *, bucket: int = 64,
                pad_token_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token lists to P = the longest rounded up to a multiple of `bucket`, so that
    batches of similar lengths share a compilation -> (prompts [B, P] int32, lengths [B])."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("pad_prompts: every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    width = bucket * math.ceil(longest / bucket)
    out = np.full((len(prompts), width), pad_token_id, np.int32)
    for i, p in enumerate(prompts):
        out[i, : len(p)] = p
    return out, np.array([len(p) for p in prompts], np.int32)


def acceptance_lengths(result: DecodeResult) -> list[list[int]]:
    """Per sequence, the acceptance length (acc + 1) of each verify step."""
    acc, steps = np.asarray(result.acceptance), np.asarray(result.num_steps)
    return [acc[b, : steps[b]].tolist() for b in range(acc.shape[0])]


def mean_acceptance(lengths: Iterable[Sequence[int]]) -> float:
    """tau of per-sequence acceptance lengths: the mean over all their verify steps (nan
    without steps)."""
    steps = [a for row in lengths for a in row]
    return float(np.mean(steps)) if steps else float("nan")


def tau(result: DecodeResult) -> float:
    """Mean acceptance length over all verify steps of all sequences (nan without steps)."""
    return mean_acceptance(acceptance_lengths(result))


def acceptance_histogram(result: DecodeResult, block_size: int) -> np.ndarray:
    """Counts [block_size + 1] of verify steps by acceptance length (index 0 is always 0)."""
    flat = [n for row in acceptance_lengths(result) for n in row]
    return np.bincount(np.asarray(flat, np.int64), minlength=block_size + 1)[: block_size + 1]
