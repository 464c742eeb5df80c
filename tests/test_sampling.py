"""dpace_jax.infer.sampling against NumPy re-derivations of the filters and the acceptance rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpace_jax.infer import sampling


def np_filtered_probs(logits, temperature, top_k=0, top_p=1.0):
    """float64 NumPy: softmax(logits / T), kept to the top_k, then to the shortest prefix of the
    sorted distribution whose mass reaches top_p, renormalized."""
    x = np.asarray(logits, np.float64) / temperature
    out = np.zeros_like(x)
    for idx in np.ndindex(x.shape[:-1]):
        row = x[idx].copy()
        if top_k:
            row[row < np.sort(row)[::-1][min(top_k, row.size) - 1]] = -np.inf
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        if top_p < 1.0:
            order = np.argsort(-probs)
            n_keep = int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1
            kept = np.zeros_like(probs)
            kept[order[:n_keep]] = probs[order[:n_keep]]
            probs = kept / kept.sum()
        out[idx] = probs
    return out


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.6, 3, 1.0),
                                                     (1.3, 0, 0.7), (0.8, 5, 0.5)])
def test_filtered_log_probs_match_numpy(temperature, top_k, top_p):
    logits = np.random.RandomState(0).normal(0, 2, (3, 4, 11)).astype(np.float32)
    s = sampling.Sampling(temperature, "dflash", top_k, top_p)
    got = np.exp(np.asarray(sampling.filtered_log_probs(jnp.asarray(logits), s)))
    np.testing.assert_allclose(got, np_filtered_probs(logits, temperature, top_k, top_p),
                               atol=1e-6)


def test_choose_greedy_is_argmax():
    logits = jnp.asarray(np.random.RandomState(1).normal(size=(5, 9)), jnp.float32)
    got = sampling.choose(jax.random.PRNGKey(0), logits, sampling.Sampling(0.0, top_k=2,
                                                                            top_p=0.3))
    np.testing.assert_array_equal(got, np.argmax(np.asarray(logits), -1))


def test_verify_match_accounting():
    # target argmax per position: [5, 6, 7, 1]; drafts d_1..d_3 = [5, 6, 0] -> acc 2, emit 5, 6, 7
    chosen = np.array([[5, 6, 7, 1], [2, 2, 2, 2], [3, 4, 5, 6]])
    logits = jnp.asarray(np.eye(8)[chosen] * 4.0, jnp.float32)
    drafts = jnp.asarray([[9, 5, 6, 0], [9, 1, 2, 2], [9, 3, 4, 5]], jnp.int32)
    acc, tokens = sampling.verify_match(jax.random.PRNGKey(0), logits, drafts, sampling.GREEDY)
    np.testing.assert_array_equal(acc, [2, 0, 3])
    np.testing.assert_array_equal(tokens, [[5, 6, 7, 0], [2, 0, 0, 0], [3, 4, 5, 6]])


def test_speculative_first_token_follows_target_and_exact_drafter_accepts_all():
    rs = np.random.RandomState(2)
    k_block, vocab, n = 3, 5, 20000
    target = rs.normal(0, 1.5, (1, k_block, vocab)).astype(np.float32)
    draft = rs.normal(0, 1.5, (1, k_block, vocab)).astype(np.float32)

    @jax.jit
    def run(keys, t_logits, d_logits):
        def one(key):
            k1, k2 = jax.random.split(key)
            s = sampling.Sampling(1.0, "speculative")
            drafts = sampling.propose(k1, d_logits, s)
            return sampling.verify(k2, t_logits, sampling.draft_probs(d_logits, s), drafts, s)

        return jax.vmap(one)(keys)

    keys = jax.random.split(jax.random.PRNGKey(3), n)
    acc, tokens = run(keys, jnp.asarray(target), jnp.asarray(draft))
    # Position 0's distribution does not depend on the block, so the first emitted token must
    # follow p_0 exactly, whatever q is.
    freq = np.bincount(np.asarray(tokens)[:, 0, 0], minlength=vocab) / n
    p0 = np_filtered_probs(target[0, 0], 1.0)
    assert 0.5 * np.abs(freq - p0).sum() < 0.02
    rate = np.mean(np.asarray(acc)[:, 0] >= 1)
    expected = np.minimum(np_filtered_probs(draft[0, 1], 1.0), p0).sum()  # sum_x min(p, q)
    assert abs(rate - expected) < 0.015
    # A drafter whose q_k is the target's p_{k-1} is always accepted.
    same = np.concatenate([np.zeros_like(target[:, :1]), target[:, :-1]], axis=1)
    acc_same, _ = run(keys, jnp.asarray(target), jnp.asarray(same))
    assert np.all(np.asarray(acc_same) == k_block - 1)


def test_sampling_rejects_bad_arguments_and_keys_compilations():
    with pytest.raises(ValueError, match="temperature"):
        sampling.Sampling(-1.0, "dflash", 0, 1.0)
    with pytest.raises(ValueError, match="rule"):
        sampling.Sampling(1.0, "eagle", 0, 1.0)
    with pytest.raises(ValueError, match="top_k"):
        sampling.Sampling(1.0, "dflash", -2, 1.0)
    with pytest.raises(ValueError, match="top_p"):
        sampling.Sampling(1.0, "dflash", 0, 0.0)
    # temperatures above 0 share a compile key; greedy and the other fields do not
    def key(t, top_k=3):
        return sampling.Sampling(t, "speculative", top_k, 0.9).compile_key()

    keys = {key(t) for t in (0.3, 0.7, 1.5)}
    assert len(keys) == 1 and key(0.0) not in keys and key(0.7, top_k=4) not in keys
