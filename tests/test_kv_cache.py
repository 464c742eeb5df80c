"""The target's fixed-size KV cache: appending blocks with rollbacks reproduces a full forward."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpace_jax.targets.model import KVCache, ModelConfig, forward, forward_cached, init_params

CACHE_LEN = 48
CONFIGS = {
    "qwen3": ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0),
    "llama": ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                         arch="llama",
                         rope_scaling=(("factor", 8.0), ("high_freq_factor", 4.0),
                                       ("low_freq_factor", 1.0),
                                       ("original_max_position_embeddings", 16),
                                       ("rope_type", "llama3"))),
}

full_forward = jax.jit(forward, static_argnames=("cfg", "feature_layers", "logits"))


def padded_logits(params, cfg, seqs):
    """Full causal forward over each sequence (list of token lists), right-padded to CACHE_LEN:
    causality makes the logits of real positions independent of the padding, and one shape
    means one compilation."""
    tokens = np.zeros((len(seqs), CACHE_LEN), np.int32)
    for b, seq in enumerate(seqs):
        tokens[b, :len(seq)] = seq
    return np.asarray(full_forward(params, cfg, jnp.asarray(tokens)).logits)


@functools.cache
def cached_step(cfg):
    @jax.jit
    def step(params, cache, tokens, start):
        out = forward_cached(params, cfg, tokens, cache, start)
        return out.logits, out.cache

    return step


def _params(cfg, seed=0):
    params = init_params(cfg, jax.random.key(seed), jnp.float32, scale=0.08)
    # non-unit norm weights so that a norm applied in the wrong place shows
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype)
        if "norm" in jax.tree_util.keystr(path) else x, params)


# (start, block length): prefill 16, then blocks of 1, 5 and 16 with rollbacks (start < length)
SCHEDULE = [(0, 16), (16, 5), (18, 16), (34, 1), (25, 5), (30, 1), (31, 16), (44, 1)]


@pytest.mark.slow
def test_blocks_with_rollbacks_match_full_forward():
    cfg = CONFIGS["qwen3"]
    params = _params(cfg)
    step = cached_step(cfg)
    rng = np.random.default_rng(1)
    batch = 2
    cache = KVCache.zeros(cfg, batch, CACHE_LEN, jnp.float32)
    seq = np.zeros((batch, 0), np.int64)
    for start, length in SCHEDULE:
        assert start <= seq.shape[1]  # start < current length is a rollback
        block = rng.integers(0, cfg.vocab_size, (batch, length))
        seq = np.concatenate([seq[:, :start], block], axis=1)
        logits, cache = step(params, cache, jnp.asarray(block),
                             jnp.full((batch,), start, jnp.int32))
        ref = padded_logits(params, cfg, list(seq))[:, start:seq.shape[1]]
        np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-5, rtol=0,
                                   err_msg=f"block at {start} of length {length}")
    # the final sequence, in one full forward, against the logits of a last 1-token query
    n = seq.shape[1]
    final = padded_logits(params, cfg, list(seq))[:, :n]
    logits, _ = step(params, cache, jnp.asarray(seq[:, n - 1:]), jnp.full((batch,), n - 1,
                                                                          jnp.int32))
    np.testing.assert_allclose(np.asarray(logits[:, 0]), final[:, -1], atol=1e-5)


@pytest.mark.slow
def test_per_sequence_starts():
    """Sequences in one batch at different lengths (one rolled back further) stay independent."""
    cfg = CONFIGS["qwen3"]
    params = _params(cfg, seed=2)
    step = cached_step(cfg)
    rng = np.random.default_rng(3)
    prompt = rng.integers(0, cfg.vocab_size, (2, 16))
    cache = KVCache.zeros(cfg, 2, CACHE_LEN, jnp.float32)
    _, cache = step(params, cache, jnp.asarray(prompt), jnp.zeros((2,), jnp.int32))
    seqs = [list(prompt[0, :11]), list(prompt[1])]  # sequence 0 rolls back to length 11
    for starts, length in [((11, 16), 5), ((13, 21), 16), ((29, 30), 1)]:
        block = rng.integers(0, cfg.vocab_size, (2, length))
        logits, cache = step(params, cache, jnp.asarray(block), jnp.asarray(starts, jnp.int32))
        for b, s in enumerate(starts):
            seqs[b] = seqs[b][:s] + list(block[b])
        ref = padded_logits(params, cfg, seqs)
        for b, s in enumerate(starts):
            np.testing.assert_allclose(np.asarray(logits[b]), ref[b, s:s + length], atol=1e-5,
                                       err_msg=f"sequence {b}, start {s}")


@pytest.mark.slow
def test_cached_step_does_not_recompile_per_start():
    cfg = CONFIGS["llama"]  # (llama3 rope scaling: positions feed a scaled table)
    params = _params(cfg)
    traces = []

    @jax.jit
    def step(params, cache, tokens, start):
        traces.append(start.shape)  # runs only while tracing
        out = forward_cached(params, cfg, tokens, cache, start)
        return out.logits, out.cache

    cache = KVCache.zeros(cfg, 2, CACHE_LEN, jnp.float32)
    tokens = jnp.ones((2, 5), jnp.int32)
    for start in [(0, 0), (5, 3), (2, 30), (40, 17)]:
        _, cache = step(params, cache, tokens, jnp.asarray(start, jnp.int32))
    assert len(traces) == 1
