"""Anchor sampling and block labels against a direct NumPy reading of docs/design.md §4."""

import jax
import numpy as np
import pytest

from dpace_jax.train import anchors


def _random_mask(rng, batch, seq):
    mask = np.zeros((batch, seq), np.int32)
    for b in range(batch):
        start = rng.integers(0, seq // 2)
        mask[b, start: rng.integers(start + 1, seq + 1)] = 1
    return mask


@pytest.mark.parametrize("num_anchors", [3, 8, 40])
def test_anchors_are_distinct_sorted_and_eligible(num_anchors):
    rng = np.random.default_rng(0)
    seq, block = 40, 5
    mask = _random_mask(rng, 4, seq)
    mask[3] = 0  # a sequence with no loss tokens keeps no block
    got, keep = jax.jit(anchors.sample_anchors, static_argnums=(2, 3))(
        jax.random.PRNGKey(1), mask, num_anchors, block)
    got, keep = np.asarray(got), np.asarray(keep)
    for b in range(4):
        eligible = {a for a in range(seq - block + 1) if mask[b, a]}
        kept = got[b][keep[b]]
        assert len(kept) == min(num_anchors, len(eligible))
        assert set(kept) <= eligible
        assert len(set(kept)) == len(kept)
        assert np.all(np.diff(kept) > 0)
        assert not keep[b, len(kept):].any()  # padding sits at the end
        assert np.all(got[b][~keep[b]] == 0)


def test_sampling_is_uniform_over_eligible_positions():
    seq, block, n = 12, 4, 2
    mask = np.ones((1, seq), np.int32)
    mask[0, :2] = 0
    sample = jax.jit(jax.vmap(lambda k: anchors.sample_anchors(k, mask, n, block)[0]))
    draws = np.asarray(sample(jax.random.split(jax.random.PRNGKey(0), 4000)))[:, 0]
    counts = np.bincount(draws.ravel(), minlength=seq)
    eligible = np.arange(2, seq - block + 1)
    assert counts[[0, 1, 10, 11]].sum() == 0
    expected = 4000 * n / len(eligible)
    assert np.all(np.abs(counts[eligible] - expected) < 5 * np.sqrt(expected))


def test_block_labels_match_reference():
    rng = np.random.default_rng(3)
    batch, seq, block, n = 3, 30, 6, 5
    tokens = rng.integers(0, 50, (batch, seq)).astype(np.int32)
    mask = _random_mask(rng, batch, seq)
    anchor = rng.integers(0, seq, (batch, n)).astype(np.int32)
    keep = rng.random((batch, n)) < 0.8
    targets, lmask = anchors.block_labels(tokens, mask, anchor, keep, block)
    for b in range(batch):
        for i in range(n):
            for k in range(block):
                p = anchor[b, i] + k
                expect_mask = keep[b, i] and k >= 1 and p < seq and mask[b, p] == 1
                assert bool(lmask[b, i, k]) == expect_mask
                if p < seq:
                    assert targets[b, i, k] == tokens[b, p]


def test_too_many_anchors_is_an_error():
    with pytest.raises(ValueError, match="num_anchors"):
        anchors.sample_anchors(jax.random.PRNGKey(0), np.ones((1, 8)), 9, 2)
