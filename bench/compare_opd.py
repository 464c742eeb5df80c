"""On-policy post-training vs continued SFT on the embedded demo, from the same SFT drafter.

    python -m dpace_jax.demo                     # the SFT drafter, in runs/demo
    python bench/compare_opd.py --sft runs/demo --workdir runs/compare_opd --out docs/opd \
        --seeds 0,1,2

Four arms continue the SFT drafter for the same number of optimizer steps at the same batch size
(so the same number of training target forwards) and learning-rate schedule (configs/demo_opd.py):
`sft-dflash` and `sft-dpace` train on the SFT run's regenerated data (uniform anchors), `opd` and
`opd-dpace` on rounds of their own rollouts (train.mode=opd, without / with D-PACE weights on the
realized tokens); the rollouts are the on-policy arms' extra compute (reported). Every drafter,
and the SFT drafter itself, is evaluated on held-out HumanEval prompts at temperature 0 and 1;
per arm: pooled tau with a 95% bootstrap interval over seeds and prompts, and the paired per-seed
difference against `sft-dpace` (bench/stats.py). OUT gets results.json, results.md and
rounds.png (per-round on-policy tau of the OPD arms).

Every run and evaluation is cached under WORKDIR: the same command after an interruption does
only what is missing.
"""

from __future__ import annotations

import argparse
import json
import runpy
import shlex
import sys
import time
from pathlib import Path

import stats

ARMS = ("sft-dflash", "sft-dpace", "opd", "opd-dpace")
BASELINE = "sft-dpace"
ROOT = Path(__file__).resolve().parents[1]


def arm_config(arm: str, sft: Path, workdir: Path, seed: int, progress: bool):
    c = runpy.run_path(str(ROOT / "configs" / "demo_opd.py"))["get_config"](str(sft))
    c.workdir, c.seed, c.train.progress = str(workdir), seed, progress
    steps = c.opd.rounds * c.opd.epochs_per_round * (c.opd.prompts_per_round // c.train.batch_size)
    if arm.startswith("sft-"):
        c.train.mode, c.train.loss = "sft", arm.removeprefix("sft-")
        c.train.max_steps = steps
        c.train.num_anchors = 32  # the SFT run's
        c.data.paths = (str(sft / "data" / "regenerated.jsonl"),)
    else:
        c.opd.dpace_weights = arm == "opd-dpace"
    return c


def evaluate(config, temperature: float, path: Path, samples: int, progress: bool) -> dict:
    """The HumanEval report of config's drafter at `temperature` (cached at `path`)."""
    from dpace_jax.infer import evaluation

    if path.exists():
        return json.loads(path.read_text())
    config = config.copy_and_resolve_references()
    config.eval.temperature, config.eval.num_samples = temperature, samples
    return evaluation.evaluate(config, progress=progress, output=str(path))


def acceptance(report: dict) -> list[list[int]]:
    return [s["acceptance_lengths"] for s in report["benchmarks"]["humaneval"]["samples"]]


def rollout_tokens(workdir: Path) -> int:
    rounds = workdir / "rounds.jsonl"
    if not rounds.exists():
        return 0
    return sum(json.loads(line)["tokens"] for line in rounds.read_text().splitlines())


def markdown(results: dict, command: str, device: str, seconds: float) -> str:
    lines = [f"Device: {device}; {seconds / 60:.1f} min; command: `{command}`", ""]
    for t, per_arm in results["tau"].items():
        lines += [f"### T = {t}", "", "| drafter | tau (95% CI) | vs sft-dpace, paired per seed |",
                  "|---|---|---|"]
        for arm, r in per_arm.items():
            d = results["paired"][t].get(arm)
            diff = ""
            if d is not None:
                seeds = ", ".join(f"{v:+.1f}%" for v in d["per_seed_percent"].values())
                diff = f"{d['mean']:+.3f} ({d['mean_percent']:+.1f}%): {seeds}"
            lines.append(f"| {arm} | {r['mean']:.3f} ({r['lo']:.3f}-{r['hi']:.3f}) | {diff} |")
        lines.append("")
    lines.append(f"Rollout tokens per OPD run (its extra target decoding): "
                 f"{results['rollout_tokens']}")
    return "\n".join(lines) + "\n"


def plot(rounds: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for arm, per_seed in rounds.items():
        for seed, rows in per_seed.items():
            ax.plot([r["round"] for r in rows], [r["on_policy_tau"] for r in rows], marker="o",
                    label=f"{arm} seed {seed}", color="C0" if arm == "opd" else "C1",
                    alpha=0.5 + 0.15 * seed)
    ax.set_xlabel("round (rolled out at its start)")
    ax.set_ylabel("on-policy tau of the rollouts")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "rounds.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sft", default="runs/demo", help="the SFT run directory (python -m "
                   "dpace_jax.demo)")
    p.add_argument("--workdir", default="runs/compare_opd")
    p.add_argument("--out", default="docs/opd")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--eval-samples", type=int, default=16)
    p.add_argument("--temperatures", default="0,1")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    command = "python bench/compare_opd.py " + " ".join(shlex.quote(a) for a in
                                                         (argv or sys.argv[1:]))
    import jax
    from absl import logging

    from dpace_jax.train import loop as trainer

    logging.set_verbosity(logging.WARNING)
    sft, workdir, out = Path(args.sft).absolute(), Path(args.workdir).absolute(), Path(args.out)
    if not (sft / "run_config.json").exists():
        raise SystemExit(f"error: {sft} is not a training run directory (run python -m "
                         "dpace_jax.demo first, or name one with --sft)")
    out.mkdir(parents=True, exist_ok=True)
    progress, t0 = not args.no_progress, time.perf_counter()
    temps = [float(t) for t in args.temperatures.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    acc = {f"{t:g}": {} for t in temps}
    rounds, tokens = {}, {}
    start = arm_config("opd", sft, workdir / "start", 0, progress)
    start.eval.drafter = str(sft)
    for t in temps:
        acc[f"{t:g}"]["sft (start)"] = {s: acceptance(evaluate(
            start, t, workdir / "start" / f"eval_T{t:g}.json", args.eval_samples, progress))
            for s in seeds}
    for arm in args.arms.split(","):
        for seed in seeds:
            run = workdir / arm / f"seed{seed}"
            config = arm_config(arm, sft, run, seed, progress)
            if not trainer.run(config)["finished"]:
                raise SystemExit(f"error: {run}: training stopped before its last step")
            for t in temps:
                report = evaluate(config, t, run / f"eval_T{t:g}.json", args.eval_samples,
                                  progress)
                acc[f"{t:g}"].setdefault(arm, {})[seed] = acceptance(report)
            if arm.startswith("opd"):
                rows = [json.loads(r) for r in (run / "rounds.jsonl").read_text().splitlines()]
                rounds.setdefault(arm, {})[seed] = rows
                tokens[arm] = rollout_tokens(run)
    results = {"tau": {t: {arm: stats.bootstrap_tau(per) for arm, per in arms.items()}
                       for t, arms in acc.items()},
               "paired": {t: {arm: stats.paired_differences(per, arms[BASELINE])
                              for arm, per in arms.items() if BASELINE in arms
                              and arm != BASELINE}
                          for t, arms in acc.items()},
               "rounds": rounds, "rollout_tokens": tokens, "seeds": seeds,
               "eval_samples": args.eval_samples}
    seconds = time.perf_counter() - t0
    device = f"{jax.devices()[0].platform}:{getattr(jax.devices()[0], 'device_kind', '')}"
    results.update(device=device, command=command, minutes=seconds / 60)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    report = markdown(results, command, device, seconds)
    (out / "results.md").write_text(report)
    if rounds:
        plot(rounds, out)
    print(report)


if __name__ == "__main__":
    main()
