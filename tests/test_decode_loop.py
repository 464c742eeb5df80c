"""The decoder's loop that follows the live work (dpace_jax.infer.loop): phases that read only the
filled part of the caches, stages that drop finished rows, against brute-force greedy decoding
and against the single loop over the whole buffer (phases and stages off)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references
from test_decode import (
    CFG,
    NEW,
    P,
    _no_cache,
    _no_extend,
    _table_draft,
    check_greedy,
    greedy_reference,
    random_target,
)

from dpace_jax.infer import decode, loop
from dpace_jax.targets import model
from dpace_jax.targets.model import ModelConfig

K = 4


def test_bounds_and_sizes():
    assert loop.bounds(10, 40, 4) == [14, 18, 26, 40]  # P + 4, 8, 16 tokens, then the buffer
    assert loop.bounds(10, 40, 100) == [40]
    assert loop.sizes(8, 2) == [8, 4, 2]
    assert loop.sizes(5, 1) == [5, 3, 2, 1]
    assert loop.sizes(4, 4) == [4] and loop.sizes(1, 2) == [1]
    with pytest.raises(ValueError, match="phase_tokens"):
        loop.bounds(10, 40, 0)
    with pytest.raises(ValueError, match="min_batch"):
        loop.sizes(4, 0)


def bigram_drafter(ref, vocab=CFG.vocab_size):
    """A row-independent drafter that proposes, after each token, the token that followed it
    somewhere in the greedy continuations ref [B, n] (so blocks are often accepted in part)."""
    table = np.zeros((vocab, K, vocab), np.float32)
    for row in ref:
        for i in range(len(row) - K):
            table[row[i], np.arange(K), row[i: i + K]] = 5.0
    return decode.Drafter({"table": jnp.asarray(table)}, K, _no_cache, _no_extend,
                          decode.logits_proposer(_table_draft), K)


def test_every_phase_and_stage_decodes_the_brute_force_greedy_tokens():
    """Rows of different prompt lengths that stop at different steps, with cache bounds every
    few tokens and the batch halved down to one row: the brute-force greedy tokens, and the same
    steps and rollout records as the single loop over the whole buffer."""
    batch, seed = 4, 21
    rs = np.random.RandomState(seed)
    params = random_target(seed)
    lengths = np.asarray([P, 2, 5, P])
    prompts = rs.randint(0, CFG.vocab_size, (batch, P))
    ref = greedy_reference(params, prompts, lengths, NEW)
    # rows 0 and 2 stop early (each at a token new to its own row), rows 1 and 3 run to NEW
    stops = set()
    for b, at in ((0, 5), (2, 12)):
        at = next(i for i in range(at, NEW) if ref[b, i] not in ref[b, :i])
        stops.add(int(ref[b, at]))
    drafter = bigram_drafter(ref)
    runs = {(phase, mb): decode.decode(params, CFG, drafter, prompts, lengths,
                                       max_new_tokens=NEW, stop_token_ids=stops, record=True,
                                       phase_tokens=phase, min_batch=mb)
            for phase, mb in ((3, 1), (10**6, batch))}
    staged, single = runs[(3, 1)], runs[(10**6, batch)]
    check_greedy(staged, ref, stops)
    check_greedy(single, ref, stops)
    num = np.asarray(staged.num_tokens)
    assert len(set(num.tolist())) >= 3 and num.min() < NEW // 2  # rows finish apart
    for name in ("tokens", "num_tokens", "acceptance", "num_steps"):
        np.testing.assert_array_equal(getattr(staged, name), getattr(single, name), err_msg=name)
    for name, a, b in zip(decode.Records._fields, staged.records, single.records, strict=True):
        if np.issubdtype(np.asarray(a).dtype, np.integer):
            np.testing.assert_array_equal(a, b, err_msg=name)
        else:
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)
    assert decode.tau(staged) > 1.2  # the bigram drafter gets blocks accepted


def test_visible_reads_only_the_filled_slots():
    """forward_cached(visible=n) with garbage (NaN) in every slot past n: the logits of the
    full forward without a cache (the slots it reads are exactly the filled ones)."""
    params = random_target(5)
    rs = np.random.RandomState(5)
    tokens = rs.randint(0, CFG.vocab_size, (2, 12))
    cache = model.init_cache(CFG, 2, 32, jnp.float32)
    start = jnp.zeros((2,), jnp.int32)
    cache = model.forward_cached(params, CFG, jnp.asarray(tokens[:, :8]), cache, start,
                                 visible=0).cache
    poison = (jnp.arange(32) >= 8)[None, None, :, None, None]
    cache = cache._replace(k=jnp.where(poison, jnp.nan, cache.k),
                           v=jnp.where(poison, jnp.nan, cache.v))
    out = model.forward_cached(params, CFG, jnp.asarray(tokens[:, 8:]), cache,
                               jnp.full((2,), 8, jnp.int32), visible=8)
    full = np.asarray(references.full_logits(CFG)(params, jnp.asarray(tokens)))
    np.testing.assert_allclose(out.logits, full[:, 8:], atol=1e-5)
    # the block's entries are written at 8..11, the slots after them untouched
    assert np.all(np.isfinite(np.asarray(out.cache.k[:, :, :12])))
    assert np.all(np.isnan(np.asarray(out.cache.k[:, :, 12:])))


def test_finished_rows_leave_the_batch_with_their_results():
    """Autoregressive rows that stop after 1, 3, ... tokens: each row's output is its own
    (written back to its original row), whatever stage it finished in."""
    batch = 4
    params = random_target(9)
    rs = np.random.RandomState(9)
    lengths = np.asarray([3, P, 1, 6])
    prompts = rs.randint(0, CFG.vocab_size, (batch, P))
    ref = greedy_reference(params, prompts, lengths, NEW)
    stops = {int(ref[2, 0])}  # row 2 stops at its first token (the prefill's)
    res = decode.decode(params, CFG, None, prompts, lengths, max_new_tokens=NEW,
                        stop_token_ids=stops, min_batch=1, phase_tokens=5)
    check_greedy(res, ref, stops)
    assert int(res.num_tokens[2]) == 1 and int(res.num_steps[2]) == 0
    jax.block_until_ready(res)


@pytest.mark.parametrize("arch", ["gpt_oss", "qwen3_5"])
def test_phases_and_stages_on_sink_window_and_hybrid_targets(arch):
    """gpt-oss (sinks, a sliding window shorter than the sequences) and Qwen3.5 (recurrent
    layers: their state and pending block leave the batch with their rows): the brute-force
    greedy tokens with bounds every 2 tokens and the batch dropping to one row."""
    if arch == "gpt_oss":
        from test_gpt_oss_target import _oss_cfg, _random_params

        cfg = _oss_cfg()
        params = _random_params(cfg, seed=3, scale=0.3)
    else:
        cfg = ModelConfig.make(vocab_size=64, hidden_size=16, intermediate_size=32,
                               num_layers=3, num_heads=2, num_kv_heads=1, head_dim=8,
                               rope_theta=10000.0, arch="qwen3_5", partial_rotary_factor=0.5,
                               layer_types=("linear_attention", "full_attention",
                                            "linear_attention"),
                               linear_num_key_heads=1, linear_num_value_heads=2,
                               linear_key_head_dim=4, linear_value_head_dim=4,
                               linear_conv_kernel_dim=3)
        params = random_target(4, cfg, scale=0.5)
    references.check_greedy_speculative(params, cfg, staged=True)
