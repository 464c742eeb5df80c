"""Batched speculative decoding (docs/design.md §6) as one jitted call: a prefill, then verify
steps in `lax.while_loop`s (dpace_jax.infer.loop: split where the caches' filled bound or the
batch of unfinished rows changes, so that a step's work follows what is live).

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
from dpace_jax.infer import loop
from dpace_jax.infer import sampling as sampling_lib
from dpace_jax.infer.records import VLOGP_FLOOR, Records  # noqa: F401  (re-exported)
from dpace_jax.infer.sampling import Sampling
from dpace_jax.targets.model import KVCache, ModelConfig

# Number of times decode's programs have been traced (= compiled): the prefill by (B, P, block
# size), each loop segment by ("segment", rows, P, block size, cache bound, next stage size).
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

    Rows leave the batch when they finish (decode's min_batch), and propose may get the cache
    cut to its first slots (decode's phase_tokens): `params` must be shared by all rows (per-row
    state belongs in the cache, along the axis init_cache sizes by `batch`), and the cache's
    slot axis is the one it sizes by `length`.
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


class DecodeResult(NamedTuple):
    tokens: jax.Array  # [B, max_new_tokens] generated tokens, pad_token_id past num_tokens
    num_tokens: jax.Array  # [B] generated tokens, the stop token included
    acceptance: jax.Array  # [B, max_steps] acc + 1 (1..K) per verify step, 0 past num_steps
    num_steps: jax.Array  # [B] verify steps (the prefill's first token is not a step)
    records: Records | None = None  # decode(record=True) only


class _Static(NamedTuple):
    """The settings that select a decode program (hashable: jit's static argument)."""

    target_cfg: ModelConfig
    prompt_len: int
    max_new_tokens: int
    sampling_key: Sampling
    record: bool


def _setup(target_params, drafter: Drafter, stops, temperature, st: _Static) -> loop.Setup:
    return loop.Setup(target_params, drafter, stops, st.sampling_key.with_temperature(temperature),
                      st.target_cfg, st.prompt_len, st.max_new_tokens, st.record)


@functools.partial(jax.jit, static_argnames=("st", "pad_token_id"))
def _prefill(target_params, drafter, stops, temperature, prompts, lengths, key, *, st,
             pad_token_id):
    TRACE_COUNTS[(prompts.shape[0], st.prompt_len, drafter.block_size)] += 1
    u = _setup(target_params, drafter, stops, temperature, st)
    return loop.prefill(u, prompts, lengths, key, pad_token_id)


@functools.partial(jax.jit, static_argnames=("st", "bound", "nxt"))
def _segment(target_params, drafter, stops, temperature, s, *, st, bound, nxt):
    rows = s.num_tokens.shape[0]
    TRACE_COUNTS[("segment", rows, st.prompt_len, drafter.block_size, bound, nxt)] += 1
    return loop.segment(_setup(target_params, drafter, stops, temperature, st), s, bound, nxt)


@functools.partial(jax.jit, static_argnames=("st", "rows"))
def _shrink(target_params, drafter, stops, temperature, s, *, st, rows):
    return loop.shrink(_setup(target_params, drafter, stops, temperature, st), s, rows)


_put = jax.jit(loop.put)


def _run(target_params, drafter: Drafter, stops, temperature, prompts, lengths, key, st: _Static,
         pad_token_id: int, phase_tokens: int, min_batch: int) -> loop.Output:
    """The prefill, then per stage (batch size) and phase (cache bound) one jitted while_loop,
    each compiled when first reached (dpace_jax.infer.loop's module doc): a segment the host
    sees would take no step is skipped, so a batch whose rows all finish together compiles one
    stage, and a short generation only the phases it reaches."""
    args = (target_params, drafter, stops, temperature)
    u = _setup(*args, st)
    s = _prefill(*args, prompts, lengths, key, st=st, pad_token_id=pad_token_id)
    out = loop.Output(s.tokens, s.num_tokens, s.acceptance, s.num_steps, s.records)
    stages = loop.sizes(prompts.shape[0], min_batch)
    shrunk = False
    for i, rows in enumerate(stages):
        if i:
            if loop.finished(u, s):
                break
            out, s, shrunk = _put(out, s), _shrink(*args, s, st=st, rows=rows), True
        nxt = stages[i + 1] if i + 1 < len(stages) else 0
        for bound in loop.bounds(st.prompt_len, u.size, phase_tokens):
            if loop.runs(u, s, bound, nxt):
                s = _segment(*args, s, st=st, bound=bound, nxt=nxt)
    if not shrunk:  # s holds every row in order
        return loop.Output(s.tokens, s.num_tokens, s.acceptance, s.num_steps, s.records)
    return _put(out, s)


PHASE_TOKENS = 256  # decode's default: generated tokens before the first cache bound
MIN_BATCH = 2  # decode's default: the smallest batch finished rows are dropped down to


def decode(target_params, target_cfg: ModelConfig, drafter: Drafter | None, prompts, lengths,
           *, max_new_tokens: int, sampling: Sampling = sampling_lib.GREEDY,
           stop_token_ids: Sequence[int] = (), rng: jax.Array | None = None,
           pad_token_id: int = 0, record: bool = False, phase_tokens: int = PHASE_TOKENS,
           min_batch: int = MIN_BATCH) -> DecodeResult:
    """Generate up to max_new_tokens tokens after each right-padded prompt.

    prompts [B, P] int, lengths [B] (1 <= lengths <= P). drafter None = autoregressive.
    `sampling` (dpace_jax.infer.sampling.Sampling): greedy by default; top_k / top_p filter target
    and drafter alike. Generation stops after the first token in stop_token_ids (kept) or
    max_new_tokens tokens. `record` adds the rollout Records (on-policy training).

    How the loop follows the live work (dpace_jax.infer.loop; the same tokens either way):
    steps read the caches only up to P + phase_tokens generated tokens (doubling, then all of
    them), and rows that finished leave the batch, halving it, down to min_batch rows (a
    min_batch >= B keeps every row to the end). Each phase and batch size compiles its own
    loop, the first time a decode reaches it.
    """
    drafter = autoregressive() if drafter is None else drafter
    drafter.check(target_cfg)
    prompts, lengths, stops = check_inputs(prompts, lengths, max_new_tokens, stop_token_ids,
                                           target_cfg.vocab_size)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    temperature = jnp.asarray(0.0 if sampling.greedy else sampling.temperature, jnp.float32)
    st = _Static(target_cfg, prompts.shape[1], int(max_new_tokens), sampling.compile_key(),
                 bool(record))
    out = _run(target_params, drafter, jnp.asarray(stops, jnp.int32), temperature, prompts,
               lengths, rng, st, int(pad_token_id), int(phase_tokens), int(min_batch))
    return DecodeResult(out.tokens[:, :max_new_tokens], out.num_tokens, out.acceptance,
                        out.num_steps, out.records)


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
