"""DFlash vs DFlash 2 on the embedded demo, each trained with DFlash's CE and with D-PACE.

    python -m dpace_jax.demo --no-progress            # the demo's target and data, in runs/demo
    nice -n 19 python bench/compare_dflash2.py --demo runs/demo --workdir runs/compare_dflash2 \
        --out docs/dflash2 --no-progress

Every arm trains a drafter on the demo run's target and regenerated data with the demo's recipe
(configs/demo.py: 300 steps; DFlash 2 with configs/demo.py:cpu-dflash2's settings) and is
evaluated on held-out HumanEval prompts: all 164 at temperature 0, the first 64 at temperature 1.
The jobs, in order (each one cached under WORKDIR, so the same command after an interruption
does only what is missing, and OUT is rewritten after every job with what is finished):

1. the four arms {dflash, dflash2} x {ce, dpace} at the demo's steps, 3 training seeds, T = 0;
2. the DFlash 2 drafters of 1 with the selector switched off (eval.selector=False, T = 0): what
   the walk adds on the same weights;
3. the drafters of 1 at T = 1;
4. the four arms at 4x the demo's steps, 2 seeds, T = 0: whether the gaps grow as the drafters
   converge.

Per table: pooled tau with a 95% bootstrap interval over seeds and prompts, and paired per-seed
differences (bench/stats.py) of D-PACE against CE per architecture and of DFlash 2 against
DFlash per objective. Each DFlash 2 run's last logged top-K recall, selector accuracy and
fraction of blocks whose walk changed the draft are reported too. OUT gets results.json,
results.md and tau.png.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import stats
import tau as tau_lib

ARCHS = {"dflash": "cpu-dflash", "dflash2": "cpu-dflash2"}  # arch -> the demo recipe
LOSSES = {"ce": "dflash", "dpace": "dpace"}  # name -> train.loss
SELECTOR_METRICS = ("topk_recall", "selector_accuracy", "selector_ce", "walk_changed")


def arm_config(arch: str, loss: str, steps_factor: int, seed: int, demo: Path, run: Path,
               progress: bool):
    from dpace_jax.demo.config import get_config

    c = get_config(ARCHS[arch])
    c.workdir, c.seed, c.train.progress = str(run), seed, progress
    c.target.path = str(demo / "target")
    c.data.paths = (str(demo / "data" / "regenerated.jsonl"),)
    c.data.demo = c.data.regenerate = False
    c.train.loss = LOSSES[loss]
    c.train.max_steps *= steps_factor
    c.eval.drafter = str(run)
    return c


def last_metrics(run: Path) -> dict:
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines() if r.strip()]
    last = rows[-1]
    return {k: last[k] for k in ("step", "accuracy", *SELECTOR_METRICS) if k in last}


def plan(seeds: list[int], long_seeds: list[int], factor: int) -> list[dict]:
    """The jobs in the order they run (see the module doc)."""
    arms = [(a, loss) for a in ARCHS for loss in LOSSES]
    jobs = [dict(table="T=0", arch=a, loss=loss, factor=1, seed=s, t=0.0, n=164, selector=True)
            for s in seeds for a, loss in arms]
    jobs += [dict(table="T=0, selector off", arch="dflash2", loss=loss, factor=1, seed=s, t=0.0,
                  n=164, selector=False) for s in seeds for loss in LOSSES]
    jobs += [dict(table="T=1", arch=a, loss=loss, factor=1, seed=s, t=1.0, n=64, selector=True)
             for s in seeds for a, loss in arms]
    jobs += [dict(table=f"T=0, {factor}x steps", arch=a, loss=loss, factor=factor, seed=s, t=0.0,
                  n=164, selector=True) for s in long_seeds for a, loss in arms]
    return jobs


def arm_name(job: dict) -> str:
    return f"{job['arch']}-{job['loss']}"


def summarize(done: list[tuple[dict, list, dict]]) -> dict:
    """Per table: per arm the pooled tau (bootstrap interval) and the paired differences."""
    tables: dict[str, dict[str, dict[int, list]]] = {}
    train: dict[str, dict] = {}
    for job, acc, metrics in done:
        tables.setdefault(job["table"], {}).setdefault(arm_name(job), {})[job["seed"]] = acc
        train.setdefault(f"{arm_name(job)} x{job['factor']}", {})[job["seed"]] = metrics
    out = {}
    for table, arms in tables.items():
        pairs = [(f"{a}-dpace", f"{a}-ce") for a in ARCHS]
        pairs += [(f"dflash2-{loss}", f"dflash-{loss}") for loss in LOSSES]
        if "selector off" in table:
            pairs = [("dflash2-dpace", "dflash2-ce")]
        out[table] = {
            "tau": {arm: stats.bootstrap_tau(per) for arm, per in sorted(arms.items())},
            "paired": {f"{a} vs {b}": stats.paired_differences(arms[a], arms[b])
                       for a, b in pairs if a in arms and b in arms
                       and set(arms[a]) & set(arms[b])},
            "seeds": {arm: sorted(per) for arm, per in arms.items()},
        }
    return {"tables": out, "train": train}


def markdown(results: dict, command: str, device: str, minutes: float, pending: int) -> str:
    lines = [f"Device: {device}; {minutes:.0f} min of jobs this invocation; "
             f"{pending} jobs still pending; command: `{command}`", ""]
    for table, r in results["tables"].items():
        lines += [f"### {table}", "", "| drafter | seeds | tau (95% CI) |", "|---|---|---|"]
        for arm, t in r["tau"].items():
            seeds = ",".join(str(s) for s in r["seeds"][arm])
            lines.append(f"| {arm} | {seeds} | {t['mean']:.3f} ({t['lo']:.3f}-{t['hi']:.3f}) |")
        if r["paired"]:
            lines += ["", "| paired difference | mean | per seed |", "|---|---|---|"]
            for name, d in r["paired"].items():
                per = ", ".join(f"{v:+.1f}%" for v in d["per_seed_percent"].values())
                lines.append(f"| {name} | {d['mean']:+.3f} ({d['mean_percent']:+.1f}%) | {per} |")
        lines.append("")
    rows = [(arm, seed, m) for arm, per in results["train"].items() for seed, m in per.items()
            if "topk_recall" in m]
    if rows:
        lines += ["### DFlash 2 selector at the end of training (last logged step)", "",
                  "| run | seed | step | top-K recall | selector accuracy | walk changed |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {arm} | {seed} | {m['step']} | {m['topk_recall']:.3f} | "
                  f"{m['selector_accuracy']:.3f} | {100 * m['walk_changed']:.1f}% |"
                  for arm, seed, m in rows]
    return "\n".join(lines) + "\n"


def plot(results: dict, out: Path) -> None:
    """tau.png: per table, each arm's pooled tau with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = results["tables"]
    fig, axes = plt.subplots(1, len(tables), figsize=(3.4 * len(tables), 3.4), squeeze=False)
    for ax, (table, r) in zip(axes[0], tables.items(), strict=True):
        names = list(r["tau"])
        means = [r["tau"][a]["mean"] for a in names]
        err = [[m - r["tau"][a]["lo"] for a, m in zip(names, means, strict=True)],
               [r["tau"][a]["hi"] - m for a, m in zip(names, means, strict=True)]]
        colours = [f"C{list(ARCHS).index(a.split('-')[0])}" for a in names]
        ax.bar(range(len(names)), means, yerr=err, color=colours, capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        ax.set_title(table, fontsize=9)
        lo = min(r["tau"][a]["lo"] for a in names)
        ax.set_ylim(max(0.0, lo - 0.1), None)
    axes[0][0].set_ylabel("tau (HumanEval, held out)")
    fig.tight_layout()
    fig.savefig(out / "tau.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--demo", default="runs/demo", help="a finished demo run directory (python "
                   "-m dpace_jax.demo): its target/ and data/regenerated.jsonl")
    p.add_argument("--workdir", default="runs/compare_dflash2")
    p.add_argument("--out", default="docs/dflash2")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--long-seeds", default="0,1", help="seeds of the longer runs")
    p.add_argument("--long-factor", type=int, default=4, help="the longer runs' step multiple")
    p.add_argument("--max-jobs", type=int, default=0, help="stop after this many jobs (0: all)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    command = "python bench/compare_dflash2.py " + " ".join(shlex.quote(a) for a in
                                                             (argv or sys.argv[1:]))
    demo, workdir, out = (Path(args.demo).absolute(), Path(args.workdir).absolute(),
                          Path(args.out))
    if not (demo / "data" / "regenerated.jsonl").is_file() or not (demo / "target").is_dir():
        raise SystemExit(f"error: --demo {demo}: expected a finished demo run directory (its "
                         "target/ and data/regenerated.jsonl); run python -m dpace_jax.demo")
    import jax
    from absl import logging

    from dpace_jax.train import loop as trainer

    logging.set_verbosity(logging.WARNING)
    seeds = [int(s) for s in args.seeds.split(",")]
    long_seeds = [int(s) for s in args.long_seeds.split(",")]
    jobs = plan(seeds, long_seeds, args.long_factor)
    out.mkdir(parents=True, exist_ok=True)
    device = f"{jax.devices()[0].platform}:{getattr(jax.devices()[0], 'device_kind', '')}"
    t0, done, ran = time.perf_counter(), [], 0
    for i, job in enumerate(jobs):
        run = workdir / f"{arm_name(job)}-x{job['factor']}" / f"seed{job['seed']}"
        path = run / f"eval_T{job['t']:g}_n{job['n']}{'' if job['selector'] else '_unary'}.json"
        fresh = not path.exists()
        if fresh:
            if args.max_jobs and ran >= args.max_jobs:
                break
            config = arm_config(job["arch"], job["loss"], job["factor"], job["seed"], demo, run,
                                not args.no_progress)
            if not (run / "finished").exists():  # the trainer resumes an interrupted run
                if not trainer.run(config)["finished"]:
                    raise SystemExit(f"error: {run}: training stopped before its last step")
                (run / "finished").touch()
            tau_lib.evaluate(config, job["t"], path, job["n"], selector=job["selector"])
            ran += 1
        report = json.loads(path.read_text())
        done.append((job, tau_lib.acceptance(report), last_metrics(run)))
        results = summarize(done)
        minutes = (time.perf_counter() - t0) / 60
        results.update(device=device, command=command, jobs_done=len(done),
                       jobs_total=len(jobs))
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        (out / "results.md").write_text(markdown(results, command, device, minutes,
                                                 len(jobs) - len(done)))
        if fresh:
            print(f"[{i + 1}/{len(jobs)}] {job['table']}: {arm_name(job)} seed {job['seed']}: "
                  f"tau {report['tau']:.3f}", flush=True)
    if done:
        plot(summarize(done), out)
        print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
