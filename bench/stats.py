"""Statistics of the objective comparisons: tau with a bootstrap interval over training seeds
and prompts, and paired per-seed differences.

`per_seed` maps a training seed to the acceptance lengths of its evaluation, one list per prompt
(`[[acc + 1 per verify step] per prompt]`). tau is pooled as the decoder reports it: all verify
steps of all prompts, averaged. The interval resamples seeds with replacement, then prompts with
replacement within each drawn seed (a two-level bootstrap), and takes the 2.5 / 97.5 percentiles
of the pooled tau.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from dpace_jax.infer.decode import mean_acceptance  # tau as the decoder reports it


def bootstrap_tau(per_seed: Mapping[int, Sequence[Sequence[int]]], *, draws: int = 2000,
                  level: float = 0.95, seed: int = 0) -> dict:
    """{"mean": pooled tau of every seed and prompt, "lo", "hi": the bootstrap interval,
    "seeds": number of seeds}."""
    seeds = sorted(per_seed)
    if not seeds or any(not per_seed[s] for s in seeds):
        raise ValueError("bootstrap_tau: every seed needs at least one prompt")
    sums = [np.array([sum(p) for p in per_seed[s]], float) for s in seeds]
    counts = [np.array([len(p) for p in per_seed[s]], float) for s in seeds]
    rng = np.random.default_rng(seed)
    taus = np.empty(draws)
    for d in range(draws):
        total = steps = 0.0
        for i in rng.integers(0, len(seeds), len(seeds)):
            pick = rng.integers(0, len(sums[i]), len(sums[i]))
            total += sums[i][pick].sum()
            steps += counts[i][pick].sum()
        taus[d] = total / steps if steps else np.nan
    tail = (1 - level) / 2 * 100
    lo, hi = np.nanpercentile(taus, [tail, 100 - tail])
    mean = sum(s.sum() for s in sums) / sum(c.sum() for c in counts)
    return {"mean": float(mean), "lo": float(lo), "hi": float(hi), "seeds": len(seeds)}


def paired_differences(arm: Mapping[int, Sequence[Sequence[int]]],
                       base: Mapping[int, Sequence[Sequence[int]]]) -> dict:
    """Per shared seed, tau(arm) - tau(base), in absolute and relative (%) terms, and their
    means."""
    shared = sorted(set(arm) & set(base))
    if not shared:
        raise ValueError("paired_differences: the two arms share no seed")
    diff = {s: mean_acceptance(arm[s]) - mean_acceptance(base[s]) for s in shared}
    rel = {s: 100 * diff[s] / mean_acceptance(base[s]) for s in shared}
    return {"per_seed": diff, "per_seed_percent": rel,
            "mean": float(np.mean(list(diff.values()))),
            "mean_percent": float(np.mean(list(rel.values())))}
