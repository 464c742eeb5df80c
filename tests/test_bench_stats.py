"""bench/stats.py on made-up results: pooled tau, the two-level bootstrap interval, paired
differences."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import stats  # noqa: E402


def test_pooled_tau_weights_prompts_by_their_steps():
    assert stats.mean_acceptance([[1, 3], [2]]) == 2.0
    assert stats.mean_acceptance([[4], [1, 1, 1]]) == pytest.approx(7 / 4)
    assert np.isnan(stats.mean_acceptance([[], []]))


def test_bootstrap_is_degenerate_without_spread_and_covers_the_truth_with_it():
    same = {s: [[2, 2], [2]] for s in range(3)}
    assert stats.bootstrap_tau(same, draws=200) == {"mean": 2.0, "lo": 2.0, "hi": 2.0,
                                                    "seeds": 3}
    rng = np.random.default_rng(1)
    # 5 seeds whose true tau differs (seed effect) plus prompt noise; true mean 3.0
    per_seed = {s: [list(rng.poisson(3.0 + off, 20)) for _ in range(30)]
                for s, off in enumerate((-0.2, -0.1, 0.0, 0.1, 0.2))}
    out = stats.bootstrap_tau(per_seed, draws=1000)
    assert out["lo"] < out["mean"] < out["hi"] and out["lo"] < 3.0 < out["hi"]
    # dropping the seed spread narrows the interval
    flat = {s: per_seed[2] for s in range(5)}
    narrow = stats.bootstrap_tau(flat, draws=1000)
    assert narrow["hi"] - narrow["lo"] < out["hi"] - out["lo"]
    with pytest.raises(ValueError, match="at least one prompt"):
        stats.bootstrap_tau({0: []})


def test_paired_differences_per_seed():
    base = {0: [[2, 2]], 1: [[4]], 2: [[1]]}
    arm = {0: [[3, 3]], 1: [[5]], 5: [[9]]}
    out = stats.paired_differences(arm, base)
    assert out["per_seed"] == {0: 1.0, 1: 1.0}
    assert out["per_seed_percent"] == {0: 50.0, 1: 25.0}
    assert out["mean"] == 1.0 and out["mean_percent"] == 37.5
    with pytest.raises(ValueError, match="share no seed"):
        stats.paired_differences({7: [[1]]}, base)
