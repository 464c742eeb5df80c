"""bench/compare_opd.py's bookkeeping without training: per-round rows from a run's files, the
eval sample counts, the plot for any seeds (it crashed from seed 4 on: matplotlib's alpha left
[0, 1]) and the report table."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import compare_opd as C  # noqa: E402


def _run(tmp_path: Path, rounds: int = 2, per_round: int = 3) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "rounds.jsonl").write_text("".join(json.dumps(
        {"round": r, "on_policy_tau": 2.0 + r, "tokens": 10}) + "\n" for r in range(rounds)))
    (run / "metrics.jsonl").write_text("".join(json.dumps(
        {"step": s, "accuracy": s / 10, "q_real": 0.5, "p_real": 1.0}) + "\n"
        for s in range(1, rounds * per_round + 1)))
    return run


def test_round_rows_average_each_rounds_steps(tmp_path):
    rows = C.round_rows(_run(tmp_path), 3)
    assert [r["accuracy"] for r in rows] == pytest.approx([0.2, 0.5])  # steps 1-3, 4-6
    assert rows[1]["q_real"] == 0.5 and rows[0]["p_real"] == 1.0
    assert C.rollout_tokens(tmp_path / "run") == 20


def test_plot_any_number_of_seeds(tmp_path):
    rows = C.round_rows(_run(tmp_path), 3)
    rounds = {"opd-softmax": {s: rows for s in range(7)}, "tv-verify": {4: rows}}
    C.plot(rounds, tmp_path)
    assert (tmp_path / "rounds.png").stat().st_size > 0
    assert all(0 <= C.seed_alpha(i, n) <= 1 for n in (1, 2, 9) for i in range(n))


def test_eval_samples_and_arms_are_checked():
    assert C.parse_samples("164,64", [0.0, 1.0]) == {"0": 164, "1": 64}
    assert C.parse_samples("16", [0.0, 1.0]) == {"0": 16, "1": 16}
    with pytest.raises(SystemExit, match="--eval-samples='1,2,3'"):
        C.parse_samples("1,2,3", [0.0, 1.0])
    with pytest.raises(SystemExit, match="--arms: unknown arm 'opd-x'"):
        C.arm_config("opd-x", Path("runs/demo"), Path("w"), 0, False)


def test_markdown_table_has_intervals_and_paired_differences():
    results = {"tau": {"0": {"sft-dpace": {"mean": 2.0, "lo": 1.8, "hi": 2.2},
                             "opd-verify": {"mean": 2.1, "lo": 1.9, "hi": 2.3}}},
               "paired": {"0": {"opd-verify": {"mean": 0.1, "mean_percent": 5.0,
                                               "per_seed_percent": {0: 4.0, 1: 6.0}}}},
               "eval_samples": {"0": 164}, "rollout_tokens": {"opd-verify": 100}}
    text = C.markdown(results, "cmd", "cpu", 60.0)
    assert "### T = 0 (164 HumanEval prompts)" in text
    assert "| opd-verify | 2.100 (1.900-2.300) | +0.100 (+5.0%): +4.0%, +6.0% |" in text
