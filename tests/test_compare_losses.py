"""bench/compare_losses.py's report: the markdown table and the plots, on synthetic results
(the training runs themselves are the product's train / evaluate paths, tested elsewhere)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import compare_losses as cl  # noqa: E402
from dpace_jax.demo.config import get_config  # noqa: E402

K = 4


def _result(tau0, tau1, with_metrics):
    hist = [0, 5, 3, 1, 1]
    metrics = [{"step": s, "weight_per_position": [0.0] + [s / 10 / k for k in range(1, K)]}
               for s in (10, 20, 30)] if with_metrics else []
    return {"train": {"accuracy_per_position": [1.0, 0.9, 0.8, 0.7]}, "metrics": metrics,
            "eval": {"0": {"tau": tau0, "histogram": hist}, "1": {"tau": tau1, "histogram": hist}}}


def test_markdown_names_seed_and_gain():
    config = get_config("cpu")
    results = {"dflash": _result(2.0, 1.0, False), "dpace": _result(2.2, 1.1, True)}
    text = cl.markdown(results, config, "python bench/compare_losses.py --seed 3", "cpu:cpu",
                       90.0, seed=3)
    assert "training seed 3" in text and "--seed 3" in text
    assert "| dpace | 2.200 | 1.100 | 5 3 1 1 | 0.90 0.80 0.70 |" in text
    assert "D-PACE vs DFlash at T=0: +10.0% tau." in text
    assert "D-PACE vs DFlash at T=1: +10.0% tau." in text


def test_plots_only_the_weighted_objectives_that_ran(tmp_path):
    both = {"dflash": _result(2.0, 1.0, False), "dpace": _result(2.2, 1.1, True)}
    cl.plot(both, tmp_path, K)
    assert (tmp_path / "weights.png").stat().st_size > 0
    assert (tmp_path / "histograms.png").stat().st_size > 0
    unweighted = tmp_path / "dflash_only"
    unweighted.mkdir()
    cl.plot({"dflash": _result(2.0, 1.0, False)}, unweighted, K)
    assert not (unweighted / "weights.png").exists()  # no empty weight panel
    assert (unweighted / "histograms.png").exists()


def test_cached_eval_only_for_the_same_config(tmp_path):
    import json

    config = get_config("cpu")
    path = tmp_path / "eval_T0.json"
    assert cl.cached_eval(path, config) is None  # nothing yet
    report = {"benchmarks": {"humaneval": {"tau": 2.0}},
              "config": json.loads(json.dumps(config.to_dict(), default=str))}
    path.write_text(json.dumps(report, indent=1, default=str))
    assert cl.cached_eval(path, config)["benchmarks"]["humaneval"]["tau"] == 2.0
    other = config.copy_and_resolve_references()
    other.seed = 1  # another training: the report is not reused
    assert cl.cached_eval(path, other) is None
    path.write_text(path.read_text()[:40])  # a report cut off mid-write
    assert cl.cached_eval(path, config) is None


def _with_samples(accs0, accs1):
    """A per-seed result whose T=0 / T=1 evaluations hold these prompts' acceptance lengths."""
    return {"eval": {"0": {"samples": [{"acceptance_lengths": a} for a in accs0]},
                     "1": {"samples": [{"acceptance_lengths": a} for a in accs1]}}}


def test_seed_statistics_pool_seeds_and_pair_them_against_dflash():
    per_seed = {
        0: {"dflash": _with_samples([[2, 2], [2]], [[1]]), "dpace": _with_samples([[3, 3], [3]],
                                                                                  [[1]])},
        1: {"dflash": _with_samples([[4], [4]], [[1]]), "dpace": _with_samples([[5], [5]], [[2]])},
    }
    st = cl.seed_statistics(per_seed)
    assert st["0"]["tau"]["dflash"]["mean"] == (6 + 8) / 5
    assert st["0"]["tau"]["dpace"]["mean"] == (9 + 10) / 5
    assert st["0"]["paired"]["dpace"]["per_seed_percent"] == {0: 50.0, 1: 25.0}
    assert st["1"]["paired"]["dpace"]["per_seed_percent"] == {0: 0.0, 1: 100.0}
    assert "dflash" not in st["0"]["paired"]
    lo, hi = st["0"]["tau"]["dpace"]["lo"], st["0"]["tau"]["dpace"]["hi"]
    assert 3.0 <= lo <= hi <= 5.0
    text = cl.markdown_statistics(st, [0, 1])
    assert "## Over training seeds 0, 1" in text
    assert "| dpace | 3.800 (" in text and "| +37.5% (+50.0%, +25.0%) |" in text
