"""Independent references shared by the tests.

`greedy_reference` is brute-force greedy decoding of the target: every new token is the argmax of
a fresh causal forward over the whole sequence (no cache, no rollback), so it shares nothing with
the cached speculative decoder under test but the model's forward.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import numpy as np

from dpace_jax.targets import model


@functools.lru_cache
def full_logits(cfg: model.ModelConfig):
    """A jitted `(params, tokens [B, T]) -> logits [B, T, V]` causal forward of the target."""
    return jax.jit(lambda params, tokens: model.forward(params, cfg, tokens).logits)


def greedy_reference(params, cfg: model.ModelConfig, prompts: Sequence[Sequence[int]],
                     max_new: int, stop_ids=(), *, rows: int | None = None,
                     width: int | None = None) -> list[list[int]]:
    """Per prompt, the greedy continuation: up to and including the first token in stop_ids, at
    most max_new tokens. The batch is padded to `rows` rows of `width` positions (default: the
    prompts, the longest rounded up to 128) so that callers can share one compiled forward."""
    stops = set(stop_ids)
    rows = rows or len(prompts)
    need = max(len(p) for p in prompts) + max_new
    width = width or 128 * -(-need // 128)
    assert len(prompts) <= rows and need <= width, (len(prompts), rows, need, width)
    seqs = np.zeros((rows, width), np.int32)
    lens = np.ones(rows, np.int64)
    for b, p in enumerate(prompts):
        seqs[b, : len(p)] = p
        lens[b] = len(p)
    out = [[] for _ in prompts]
    live = [True] * len(prompts)
    for _ in range(max_new):
        logits = np.asarray(full_logits(cfg)(params, seqs))
        nxt = np.argmax(logits[np.arange(rows), lens - 1], axis=-1)
        seqs[np.arange(rows), lens] = nxt
        lens += 1
        for b in range(len(prompts)):
            if live[b]:
                out[b].append(int(nxt[b]))
                live[b] = int(nxt[b]) not in stops
        if not any(live):
            break
    return out


@functools.lru_cache
def _cached_forward(cfg: model.ModelConfig, feature_layers: tuple[int, ...]):
    return jax.jit(lambda params, cache, tokens, start: model.forward_cached(
        params, cfg, tokens, cache, start, feature_layers=feature_layers))


@functools.lru_cache
def _full_forward(cfg: model.ModelConfig, feature_layers: tuple[int, ...]):
    return jax.jit(lambda params, tokens: model.forward(params, cfg, tokens,
                                                        feature_layers=feature_layers))


def check_cached_blocks(params, cfg: model.ModelConfig, blocks, *, batch: int = 2,
                        width: int = 32, feature_layers=(0, 2), seed: int = 1) -> None:
    """The cached forward over `blocks` [(start, length)] of random tokens (a prefill, appends,
    rollbacks: a block at start < the length so far replaces the rest) gives, for each block,
    the logits and features of a full forward over the sequence so far."""
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    cache = model.KVCache.zeros(cfg, batch, width, jnp.float32)
    seq = np.zeros((batch, 0), np.int64)
    for start, length in blocks:
        block = rng.integers(0, cfg.vocab_size, (batch, length))
        seq = np.concatenate([seq[:, :start], block], axis=1)
        out = _cached_forward(cfg, tuple(feature_layers))(
            params, cache, jnp.asarray(block), jnp.full((batch,), start, jnp.int32))
        cache = out.cache
        padded = np.zeros((batch, width), np.int32)
        padded[:, :seq.shape[1]] = seq
        ref = _full_forward(cfg, tuple(feature_layers))(params, jnp.asarray(padded))
        now = slice(start, seq.shape[1])
        np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref.logits)[:, now],
                                   atol=1e-5, rtol=0, err_msg=f"block at {start}")
        np.testing.assert_allclose(np.asarray(out.features), np.asarray(ref.features)[:, now],
                                   atol=1e-5, rtol=0, err_msg=f"block at {start}")


def check_greedy_speculative(params, cfg: model.ModelConfig, *, new: int = 14,
                             staged: bool = False) -> None:
    """Greedy speculative decoding with a random one-layer DFlash drafter (block 4, mask id 63,
    features of layers 0 and 2) on the target `cfg` equals greedy_reference, for three prompts
    of different lengths. `staged`: row 0 stops half-way (a stop token), the caches are read in
    bounds every 2 tokens and finished rows leave the batch down to one row
    (dpace_jax.infer.loop)."""
    import jax.numpy as jnp

    from dpace_jax.drafters import dflash
    from dpace_jax.infer import decode

    dcfg = dflash.DrafterConfig.for_target(cfg, num_layers=1, block_size=4, mask_token_id=63,
                                           target_layer_ids=(0, 2))
    dparams = dflash.init_drafter_params(dcfg, jax.random.key(0), jnp.float32, 0.02)
    lengths = [5, 9, 7]
    prompts = np.random.RandomState(0).randint(0, 63, (3, 9))
    rows = [prompts[b, :lengths[b]] for b in range(3)]
    expected = greedy_reference(params, cfg, rows, new, rows=3, width=32)
    stops, kw = (), {}
    if staged:
        stops = (expected[0][new // 2],)
        expected = greedy_reference(params, cfg, rows, new, stops, rows=3, width=32)
        kw = {"phase_tokens": 2, "min_batch": 1}
    res = decode.decode(params, cfg, decode.dflash_drafter(dparams, dcfg, cfg), prompts, lengths,
                        max_new_tokens=new, stop_token_ids=stops, **kw)
    got = np.asarray(res.tokens)
    assert [got[b, :int(res.num_tokens[b])].tolist() for b in range(3)] == expected
    assert int(np.sum(res.num_steps)) > 0


def replay_of_a_rollout(target_params, target_cfg, drafter_params, drafter_cfg, prompts, *,
                        max_new: int, seq_len: int, step_cfg, stop_ids=()):
    """Roll `prompts` out greedily with the drafter (decode(record=True)), replay the rows at
    their block boundaries with the training forward, and check that the replay drafts what the
    cached decoder drafted: in every block with a recorded rejection, the drafts (the argmax; a
    DFlash 2 drafter's greedy walk) at offsets 1..acc are the accepted tokens and at acc + 1 the
    rejected draft; in every block whose drafts were all accepted, the drafts at 1..K-1 are its
    tokens. -> (rows, batch, logits [B, N, K, V] (DFlash 2: its unary scores), number of draft
    positions checked, deepest offset checked)."""
    import jax.numpy as jnp

    from dpace_jax.infer import decode
    from dpace_jax.train import step as step_lib
    from dpace_jax.train.opd import replay

    k = drafter_cfg.block_size
    padded, lengths = decode.pad_prompts(prompts, bucket=16)
    out = decode.decode(target_params, target_cfg,
                        decode.dflash_drafter(drafter_params, drafter_cfg, target_cfg), padded,
                        lengths, max_new_tokens=max_new, stop_token_ids=stop_ids, record=True)
    rows = replay.rows_from_result(jax.tree.map(np.asarray, out), prompts)
    batch, dropped = replay.replay_batch(rows, block_size=k, seq_len=seq_len,
                                         num_blocks=max_new + 1)
    assert dropped == 0
    hidden, head = jax.jit(lambda p, t, tokens, anchors: step_lib.drafter_hidden(
        p, t, tokens, anchors, target_cfg=target_cfg, drafter_cfg=drafter_cfg, cfg=step_cfg))(
        drafter_params, target_params, jnp.asarray(batch["input_ids"]),
        jnp.asarray(batch["anchors"]))
    logits = np.asarray(jnp.einsum("bnkd,dv->bnkv", hidden, head))
    drafts = logits[:, :, 1:].argmax(-1)  # [B, N, K-1]
    if drafter_cfg.arch == "dflash2":  # its unary scores, and its drafts walk the selector
        from dpace_jax.drafters.dflash2 import selector

        transform = step_lib.logit_transform(drafter_cfg)
        logits = np.asarray(transform(jnp.asarray(logits))) if transform else logits
        cand = selector.top_candidates(jnp.asarray(logits[:, :, 1:]),
                                       drafter_cfg.family_cfg.selector_top_k)
        anchor_tokens = np.take_along_axis(batch["input_ids"], batch["anchors"], 1)
        drafts = np.asarray(selector.greedy_walk(drafter_params.selector, hidden[:, :, 1:],
                                                 jnp.asarray(anchor_tokens), cand.ids,
                                                 cand.scores).tokens)
    checked = deepest = 0
    for b, row in enumerate(rows):
        for n, blk in enumerate(replay.blocks(row, k)[1:], start=1):
            accepted = len(blk.realized_logp) - 1 if blk.rejected >= 0 else len(blk.realized_logp)
            if blk.rejected < 0 and accepted < k - 1:
                continue  # cut by a stop token or the length limit: no draft to compare
            tokens = batch["input_ids"][b, blk.anchor + 1: blk.anchor + 1 + accepted]
            np.testing.assert_array_equal(drafts[b, n, :accepted], tokens,
                                          err_msg=f"row {b} block {n}")
            checked += accepted
            if blk.rejected >= 0:
                assert drafts[b, n, accepted] == blk.rejected, (b, n)
                checked += 1
            deepest = max(deepest, accepted + (blk.rejected >= 0))
    return rows, batch, logits, checked, deepest
