"""The speculative decoder against brute force (a full forward per token, no cache), transformers'
generate on the PyTorch twin, and exact target distributions of the first tokens."""

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references
from test_sampling import np_filtered_probs

from dpace_jax.infer import decode
from dpace_jax.infer.sampling import Sampling
from dpace_jax.targets import model
from dpace_jax.targets.model import ModelConfig

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, rope_theta=10000.0)
P, NEW = 8, 24
REF_BATCH, REF_WIDTH = 4, 48  # one compilation of the brute-force forward for every test


def numpy_params(init, seed, scale):
    """init's parameter tree filled from NumPy (no per-op compilation): norms 1, else normal."""
    rs = np.random.RandomState(seed)

    def fill(path, leaf):
        if str(path[-1].name).endswith("norm"):
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.asarray(scale * rs.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, jax.eval_shape(init, jax.random.PRNGKey(0)))


def random_target(seed, cfg=CFG, scale=0.3):
    return numpy_params(lambda key: model.init_params(cfg, key), seed, scale)


def greedy_reference(params, prompts, lengths, n):
    """Brute force (tests/references.py) as an array [B, n], one compilation for every test."""
    rows = [prompts[b, : lengths[b]] for b in range(len(lengths))]
    return np.asarray(references.greedy_reference(params, CFG, rows, n, rows=REF_BATCH,
                                                  width=REF_WIDTH))


def mid_stop(row):
    """A stop set whose first hit in row is in its middle third (empty if there is none)."""
    row = list(row)
    for i in range(len(row) // 3, 2 * len(row) // 3):
        if row[i] not in row[:i]:
            return {int(row[i])}
    return set()


def truncate(tokens, stops):
    tokens = list(tokens)
    hits = [i for i, t in enumerate(tokens) if t in stops]
    return tokens[: hits[0] + 1] if hits else tokens


# ---------------------------------------------------------------------------------------------
# test drafters (module-level functions so that equal drafters share a compilation)


def _no_cache(params, config, batch, length):
    return ()


def _no_extend(params, config, cache, tokens, features, start):
    return cache


def _script_draft(params, config, target_params, cache, anchor_tokens, anchors):
    """Drafts the token stored for position anchor + k (flipped where params["flip"])."""
    k_block, vocab = config
    pos = anchors[:, None] + jnp.arange(k_block)
    tok = jnp.take_along_axis(params["seq"], pos, axis=1)
    tok = jnp.where(jnp.take_along_axis(params["flip"], pos, axis=1), (tok + 1) % vocab, tok)
    return 5.0 * jax.nn.one_hot(tok, vocab)


def script_drafter(prompts, lengths, continuation, k_block, flip_rate, seed, vocab=CFG.vocab_size):
    """An oracle that knows each sequence's greedy continuation (flip_rate 0: it copies the
    target), with a fraction flip_rate of its positions made wrong."""
    batch = len(lengths)
    width = prompts.shape[1] + NEW + k_block
    seq = np.zeros((batch, width), np.int32)
    for b in range(batch):
        full = list(prompts[b, : lengths[b]]) + list(continuation[b])
        seq[b, : len(full)] = full
    flip = np.random.RandomState(seed).rand(batch, width) < flip_rate
    return decode.Drafter({"seq": jnp.asarray(seq), "flip": jnp.asarray(flip)},
                          (k_block, vocab), _no_cache, _no_extend,
                          decode.logits_proposer(_script_draft), k_block)


def _table_draft(params, config, target_params, cache, anchor_tokens, anchors):
    """Logits looked up by the anchor token only: a drafter that ignores the rest of the context."""
    return params["table"][anchor_tokens]


# ---------------------------------------------------------------------------------------------
# greedy


def check_greedy(result, ref, stops, pad=0):
    tokens, num = np.asarray(result.tokens), np.asarray(result.num_tokens)
    for b in range(len(ref)):
        expected = truncate(ref[b], stops)
        assert num[b] == len(expected), (b, num[b], expected)
        assert tokens[b, : num[b]].tolist() == expected
        assert np.all(tokens[b, num[b]:] == pad)


@pytest.mark.slow
@pytest.mark.parametrize("batch,k_block,seeds", [(4, 5, (0, 1, 2)), (1, 16, (3, 4)),
                                                 (4, 2, (5, 6))])
def test_greedy_equals_brute_force_and_oracle_accepts_whole_blocks(batch, k_block, seeds):
    for seed in seeds:
        rs = np.random.RandomState(seed)
        params = random_target(seed)
        lengths = rs.randint(1, P + 1, batch)
        prompts = rs.randint(0, CFG.vocab_size, (batch, P))  # pad slots hold garbage tokens
        # The reference runs K tokens past NEW so that the oracle knows every block it drafts.
        ref = greedy_reference(params, prompts, lengths, NEW + k_block)
        drafter_ref, ref = ref, ref[:, :NEW]
        stops = mid_stop(ref[0])  # row 0 ends mid-way (EOS in the middle)
        for flip_rate in (0.0, 0.3):
            drafter = script_drafter(prompts, lengths, drafter_ref, k_block, flip_rate, seed)
            # min_batch=batch: the scripted drafter's tables are per row, so every row stays
            # in the batch to the end (finished rows leaving it: tests/test_decode_loop.py)
            res = decode.decode(params, CFG, drafter, prompts, lengths, max_new_tokens=NEW,
                                stop_token_ids=stops, min_batch=batch)
            check_greedy(res, ref, stops)
            assert not stops or np.asarray(res.num_tokens)[0] < NEW
            steps = decode.acceptance_lengths(res)
            for b, row in enumerate(steps):
                n_out = int(res.num_tokens[b])
                assert sum(row) >= n_out - 1 and all(1 <= a <= k_block for a in row)
                if flip_rate == 0.0:  # the copy is accepted whole
                    assert row == [k_block] * math.ceil((n_out - 1) / k_block)
            if flip_rate == 0.0:
                assert decode.tau(res) == k_block
            else:
                assert 1.0 < decode.tau(res) < k_block


def test_rollout_records_match_brute_force():
    """decode(record=True) against brute force: the boundaries and rejected drafts recomputed
    from the scripted drafts and the greedy continuation, the log-probs from a full forward."""
    batch, k_block, seed = 4, 5, 11
    rs = np.random.RandomState(seed)
    params = random_target(seed)
    lengths = rs.randint(1, P + 1, batch)
    prompts = rs.randint(0, CFG.vocab_size, (batch, P))
    ref = greedy_reference(params, prompts, lengths, NEW + k_block)
    stops = mid_stop(ref[0, :NEW])
    drafter = script_drafter(prompts, lengths, ref, k_block, 0.3, seed)
    res = decode.decode(params, CFG, drafter, prompts, lengths, max_new_tokens=NEW,
                        stop_token_ids=stops, record=True, min_batch=batch)  # per-row script
    rec = jax.tree.map(np.asarray, res.records)
    drafts = np.where(np.asarray(drafter.params["flip"]), (np.asarray(drafter.params["seq"]) + 1)
                      % CFG.vocab_size, np.asarray(drafter.params["seq"]))
    seqs = np.zeros((REF_BATCH, REF_WIDTH), np.int32)
    for b in range(batch):
        n = int(res.num_tokens[b])
        seqs[b, : lengths[b] + n] = [*prompts[b, : lengths[b]], *np.asarray(res.tokens)[b, :n]]
    logits = np.asarray(references.full_logits(CFG)(params, jnp.asarray(seqs)), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    cut_steps = rejections = 0
    for b in range(batch):
        seq, n_out, steps = seqs[b], int(res.num_tokens[b]), int(res.num_steps[b])
        end = lengths[b] + n_out  # the sequence's length
        np.testing.assert_allclose(rec.first_logp[b], logp[b, lengths[b] - 1, seq[lengths[b]]],
                                   atol=1e-5)
        a = lengths[b]
        for s in range(steps):
            assert rec.anchors[b, s] == a, (b, s)
            acc = 0  # brute force: drafts at a+1.. accepted while they equal the sequence
            while acc < k_block - 1 and a + acc + 1 < end and drafts[b, a + acc + 1] == seq[
                    a + acc + 1]:
                acc += 1
            n_emit = rec.emitted[b, s]
            assert n_emit == min(acc + 1, end - 1 - a) and n_emit <= res.acceptance[b, s]
            want = [logp[b, a + i, seq[a + i + 1]] for i in range(n_emit)]
            np.testing.assert_allclose(rec.realized_logp[b, s, :n_emit], want, atol=1e-5)
            assert np.all(rec.realized_logp[b, s, n_emit:] == 0)
            if n_emit == acc + 1 and acc < k_block - 1:
                rejected = drafts[b, a + acc + 1]
                assert rejected != seq[a + acc + 1] and rec.rejected[b, s] == rejected
                np.testing.assert_allclose(rec.rejected_logp[b, s], logp[b, a + acc, rejected],
                                           atol=1e-5)
                rejections += 1
            else:
                assert rec.rejected[b, s] == -1 and rec.rejected_logp[b, s] == 0
                cut_steps += n_emit < acc + 1
            a += n_emit
        assert a == end - 1  # every generated token but the prefill's is some step's
        assert np.all(rec.emitted[b, steps:] == 0)
    assert rejections >= 5 and cut_steps >= 1  # both kinds of step were seen


def test_compiles_once_per_bucket_and_block_size_one_is_autoregressive():
    shape = (3, 12, 1)  # batch, padded prompt length, block size: a bucket used only here
    before, counts = decode.TRACE_COUNTS[shape], dict(decode.TRACE_COUNTS)
    params = random_target(7)
    rs = np.random.RandomState(7)
    for case, lengths in enumerate(([3, 12, 7], [1, 5, 9], [12, 12, 2])):
        prompts = rs.randint(0, CFG.vocab_size, (3, 12))
        ref = greedy_reference(params, prompts, lengths, NEW)
        # the last case stops row 0 at its very first token (the prefill's)
        stops = mid_stop(ref[1]) if case < 2 else {int(ref[0, 0])}
        res = decode.decode(params, CFG, None, prompts, lengths, max_new_tokens=NEW,
                            stop_token_ids=stops)
        check_greedy(res, ref, stops)
        np.testing.assert_array_equal(res.num_steps, np.asarray(res.num_tokens) - 1)
        assert decode.tau(res) == 1.0
    assert decode.TRACE_COUNTS[shape] - before == 1
    # each loop segment (stage, phase) compiled once, when first reached
    segments = [n - counts.get(k, 0) for k, n in decode.TRACE_COUNTS.items()
                if k[0] == "segment" and k[2:4] == shape[1:]]
    assert max(segments) == 1 and sum(segments) >= 2


def test_a_new_temperature_does_not_recompile():
    shape = (2, 16, 1)  # a bucket used only here
    params = random_target(8)
    prompts = np.random.RandomState(8).randint(0, CFG.vocab_size, (2, 16))
    before = decode.TRACE_COUNTS[shape]
    outs = [np.asarray(decode.decode(params, CFG, None, prompts, [16, 9], max_new_tokens=6,
                                     sampling=Sampling(t, top_k=5),
                                     rng=jax.random.PRNGKey(1)).tokens)
            for t in (0.5, 0.9, 2.0)]
    assert decode.TRACE_COUNTS[shape] - before == 1
    assert not np.array_equal(outs[0], outs[2])  # the traced temperature is used


@pytest.mark.slow
def test_matches_transformers_generate_with_dflash_drafter(tmp_path):
    torch = pytest.importorskip("torch")
    from hf_fixtures import make_tiny_hf_target

    from dpace_jax.drafters import dflash
    from dpace_jax.targets.hf import load_target

    path, hf = make_tiny_hf_target(tmp_path, seed=1)
    params, cfg = load_target(path, dtype=jnp.float32)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    rs = np.random.RandomState(1)
    lengths = [5, 12, 9]
    prompts = rs.randint(0, cfg.vocab_size, (3, 12))

    def hf_greedy(b, eos):
        ids = torch.as_tensor(prompts[b : b + 1, : lengths[b]], dtype=torch.long)
        with torch.no_grad():
            out = hf.generate(ids, do_sample=False, max_new_tokens=NEW, eos_token_id=eos,
                              pad_token_id=0)
        return out[0, lengths[b]:].tolist()

    stops = mid_stop(hf_greedy(0, None))
    assert stops
    expected = [hf_greedy(b, sorted(stops)) for b in range(3)]
    dcfg = dflash.DrafterConfig.for_target(cfg, num_layers=1, block_size=4,
                                           mask_token_id=cfg.vocab_size - 1)
    dparams = numpy_params(lambda key: dflash.init_drafter_params(dcfg, key), 0, 0.02)
    res = decode.decode(params, cfg, decode.dflash_drafter(dparams, dcfg, cfg), prompts, lengths,
                        max_new_tokens=NEW, stop_token_ids=stops)
    for b in range(3):
        assert np.asarray(res.tokens)[b, : int(res.num_tokens[b])].tolist() == expected[b]
    assert 1.0 <= decode.tau(res) < 1.3  # a random drafter almost never agrees
    hist = decode.acceptance_histogram(res, 4)
    assert hist.shape == (5,) and hist[0] == 0 and hist.sum() == int(np.sum(res.num_steps))


# ---------------------------------------------------------------------------------------------
# sampling: the empirical distribution of the first 3 tokens is the target's exact distribution

SCFG = ModelConfig(vocab_size=6, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                   num_kv_heads=1, head_dim=8, rope_theta=10000.0)
SPROMPT = [3, 1, 4, 1, 5]


def exact_conditionals(params, temperature, top_k, top_p, cfg=SCFG, prompt=SPROMPT):
    """p(t0 | prompt) [V], p(t1 | t0) [V, V], p(t2 | t0, t1) [V, V, V] from full forwards of
    the target `cfg` over every (t0, t1)."""
    v, n = cfg.vocab_size, len(prompt)
    pairs = np.array(list(itertools.product(range(v), repeat=2)))
    seqs = np.concatenate([np.tile(prompt, (len(pairs), 1)), pairs], axis=1)
    logits = np.asarray(references.full_logits(cfg)(params, seqs), np.float64)
    p0 = np_filtered_probs(logits[0, n - 1], temperature, top_k, top_p)
    p1 = np_filtered_probs(logits[:, n], temperature, top_k, top_p).reshape(v, v, v)[:, 0]
    p2 = np_filtered_probs(logits[:, n + 1], temperature, top_k, top_p).reshape(v, v, v)
    return p0, p1, p2


def near_target_drafter(p1, p2, seed, noise=1.0):
    """Block size 3, keyed by the anchor token: position 1 from log p(t1 | t0), position 2 from
    log p(t2 | t0) (t1 marginalized), both with Gaussian noise: it agrees only sometimes."""
    rs = np.random.RandomState(seed)
    v = p1.shape[0]
    table = np.zeros((v, 3, v))
    table[:, 1] = np.log(p1 + 1e-3)
    table[:, 2] = np.log(np.einsum("ab,abc->ac", p1, p2) + 1e-3)
    table[:, 1:] += noise * rs.standard_normal((v, 2, v))
    return decode.Drafter({"table": jnp.asarray(table, jnp.float32)}, 3, _no_cache, _no_extend,
                          decode.logits_proposer(_table_draft), 3)


def chi_square_z(counts, probs, min_expected=5.0):
    """Wilson-Hilferty z-score of Pearson's chi-square (cells expected < 5 pooled)."""
    expected = probs * counts.sum()
    small = expected < min_expected
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    stat = np.sum((obs[keep] - exp[keep]) ** 2 / exp[keep])
    df = keep.sum() - 1
    return ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))


def check_sampling(params, cfg, rule, temperature, top_k, top_p, *, n=12000, both_paths=True):
    """Sampled speculative decoding of `cfg`'s target with a near-target drafter: the first three
    tokens after SPROMPT follow the exact filtered conditionals (Pearson chi-square over the V^3
    cells, z < 3.5), nothing falls outside the support, and (both_paths) accepting and rejecting
    both happen."""
    v = cfg.vocab_size
    p0, p1, p2 = exact_conditionals(params, temperature, top_k, top_p, cfg=cfg)
    res = decode.decode(params, cfg, near_target_drafter(p1, p2, seed=3),
                        np.tile(SPROMPT, (n, 1)), [len(SPROMPT)] * n, max_new_tokens=3,
                        sampling=Sampling(temperature, rule, top_k, top_p),
                        rng=jax.random.PRNGKey(5))
    tokens = np.asarray(res.tokens)
    assert np.all(np.asarray(res.num_tokens) == 3)
    counts = np.bincount(tokens[:, 0] * v * v + tokens[:, 1] * v + tokens[:, 2],
                         minlength=v**3)
    exact = (p0[:, None, None] * p1[:, :, None] * p2).reshape(-1)
    assert counts[exact == 0].sum() == 0  # nothing outside the filtered support
    assert chi_square_z(counts, exact) < 3.5
    hist = decode.acceptance_histogram(res, 3)
    if both_paths:
        assert hist[1] > 0.1 * hist.sum() and hist[2:].sum() > 0.1 * hist.sum()


@pytest.mark.slow
@pytest.mark.parametrize("rule,temperature,top_k,top_p", [("dflash", 1.0, 0, 1.0),
                                                           ("speculative", 0.7, 4, 0.9)])
def test_sampling_is_lossless(rule, temperature, top_k, top_p):
    check_sampling(random_target(11, SCFG, scale=0.5), SCFG, rule, temperature, top_k, top_p)


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_input_fails_before_decoding():
    from dpace_jax.drafters import dflash

    params = dparams = None  # every check runs before the parameters are used
    prompts, lengths = np.zeros((2, 4), np.int32), [2, 4]
    dcfg = dflash.DrafterConfig.for_target(CFG, num_layers=1, block_size=4,
                                           mask_token_id=CFG.vocab_size - 1)
    wider = dataclasses.replace(dcfg, hidden_size=48)
    with pytest.raises(ValueError, match="hidden_size"):
        decode.decode(params, CFG, decode.dflash_drafter(dparams, wider), prompts, lengths,
                      max_new_tokens=4)
    with pytest.raises(ValueError, match="hidden_size"):
        decode.dflash_drafter(dparams, wider, CFG)
    deeper = dataclasses.replace(dcfg, num_target_layers=6, target_layer_ids=(1, 5))
    with pytest.raises(ValueError, match="num_target_layers|target_layer_ids"):
        decode.decode(params, CFG, decode.dflash_drafter(dparams, deeper), prompts, lengths,
                      max_new_tokens=4)
    bigger_vocab = dataclasses.replace(dcfg, vocab_size=80, mask_token_id=70)
    with pytest.raises(ValueError, match="vocab_size"):
        decode.dflash_drafter(dparams, bigger_vocab, CFG)
    bad_ids = dataclasses.replace(decode.autoregressive(), target_layer_ids=(0, 2))
    with pytest.raises(ValueError, match="target_layer_ids"):
        decode.decode(params, CFG, bad_ids, prompts, lengths, max_new_tokens=4)
    zero_block = dataclasses.replace(decode.autoregressive(), block_size=0)
    with pytest.raises(ValueError, match="block_size"):
        decode.decode(params, CFG, zero_block, prompts, lengths, max_new_tokens=4)
    cases = [
        (dict(lengths=[0, 4]), "lengths"),
        (dict(lengths=[2, 5]), "lengths"),
        (dict(lengths=[2]), "lengths"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(stop_token_ids=(64,)), "stop_token_ids"),
    ]
    for kw, field in cases:
        args = dict(lengths=lengths, max_new_tokens=4) | kw
        with pytest.raises(ValueError, match=field):
            decode.decode(params, CFG, None, prompts, args.pop("lengths"), **args)


def test_pad_prompts_buckets():
    prompts, lengths = decode.pad_prompts([[5, 6, 7], [1]], bucket=4, pad_token_id=9)
    np.testing.assert_array_equal(prompts, [[5, 6, 7, 9], [1, 9, 9, 9]])
    np.testing.assert_array_equal(lengths, [3, 1])
    assert decode.pad_prompts([[1] * 5], bucket=4)[0].shape == (1, 8)
    with pytest.raises(ValueError, match="at least one token"):
        decode.pad_prompts([[1], []])
