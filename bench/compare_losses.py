"""D-PACE vs DFlash on the embedded demo: same target, data, seed and step budget per loss.

    python bench/compare_losses.py --size cpu-dflash --workdir runs/compare --out docs/compare_cpu
    python bench/compare_losses.py --size gpu --workdir runs/compare_gpu --out docs/compare_gpu
    python bench/compare_losses.py ... --losses dflash,dpace --seed 1   # another training seed
    python bench/compare_losses.py ... --losses dflash,dpace --seeds 0,1,2   # with statistics

Trains one drafter per objective (dflash with gamma, dpace with alpha, and the two D-PACE
ablations), evaluates each on held-out HumanEval prompts at temperature 0 and 1 (DFlash's
match-the-target-sample rule), and writes to OUT: `results.md` (tau, acceptance histogram, final
per-position training accuracy; with --seeds, per objective the pooled tau over seeds with a 95%
bootstrap interval over seeds and prompts and the paired per-seed difference against dflash, from
bench/stats.py), `results.json`, `weights.png` (mean D-PACE weight per block
position over training: the paper's weight-dynamics figure) and `histograms.png`.

Every stage is cached under WORKDIR: the same command after an interruption (e.g. a device's
per-call time limit) resumes the training in progress and evaluates only what is missing.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/stats.py
import stats  # noqa: E402

from dpace_jax.demo.config import RECIPES  # noqa: E402

LOSSES = ("dflash", "dpace", "dpace-cumulative-confidence-only", "dpace-continuation-value-only")


def read_metrics(workdir: Path) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def train_and_evaluate(base_config, loss: str, workdir: Path, target: Path, data: Path,
                       temperatures, progress: bool, seed: int) -> dict:
    from dpace_jax.infer import evaluation
    from dpace_jax.train import loop as trainer

    config = base_config.copy_and_resolve_references()
    config.seed = seed  # the drafter's init, anchor sampling and data order; not the target's
    config.workdir = str(workdir)
    config.target.path = str(target)
    config.data.paths = (str(data),)
    config.data.regenerate = False
    config.data.demo = False
    config.train.loss = loss
    config.train.progress = progress
    summary = trainer.run(config)  # resumes, or only re-exports a finished run
    if not summary["finished"]:
        raise RuntimeError(f"{workdir}: training stopped before its last step")
    metrics = read_metrics(workdir)
    evals = {}
    for t in temperatures:
        config.eval.temperature = float(t)
        path = workdir / f"eval_T{t:g}.json"
        report = cached_eval(path, config) or evaluation.evaluate(config, progress=progress,
                                                                  output=str(path))
        evals[f"{t:g}"] = report["benchmarks"]["humaneval"]
    return {"train": metrics[-1], "metrics": metrics, "eval": evals}


def cached_eval(path: Path, config) -> dict | None:
    """The evaluation report at `path` if it was made with this very config (the finished,
    deterministic training of these settings), else None: a re-run after an interruption
    evaluates only what is missing."""
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    same = json.loads(json.dumps(config.to_dict(), default=str)) == report.get("config")
    return report if same else None


def markdown(results: dict, config, command: str, device: str, seconds: float, seed: int) -> str:
    k = config.drafter.block_size
    temps = list(next(iter(results.values()))["eval"])
    lines = [
        "# D-PACE vs DFlash on the embedded demo target",
        "",
        f"Command: `{command}`  ",
        f"Device: {device}; date {time.strftime('%Y-%m-%d')}; wall time {seconds / 60:.1f} min "
        "(this invocation: stages cached by an earlier one are not counted).  ",
        f"Target `{config.target.path}`, drafter {config.drafter.num_layers} layers, block {k}, "
        f"{config.train.max_steps} steps of batch {config.train.batch_size} "
        f"({config.train.num_anchors} anchors), lr {config.train.lr}, training seed {seed}; "
        f"dflash gamma {config.train.gamma}, dpace alpha {config.train.alpha}.  ",
        f"Evaluation: {config.eval.num_samples} held-out HumanEval prompts, up to "
        f"{config.eval.max_new_tokens} new tokens, temperatures {', '.join(temps)} "
        "(T>0: DFlash's match-the-target-sample rule).",
        "",
        "| loss | " + " | ".join(f"tau T={t}" for t in temps)
        + f" | acceptance lengths T={temps[0]} (1..{k}) | train acc per position 1..{k - 1} |",
        "|---|" + "---|" * len(temps) + "---|---|",
    ]
    for loss, r in results.items():
        taus = " | ".join(f"{r['eval'][t]['tau']:.3f}" for t in temps)
        hist = " ".join(str(n) for n in r["eval"][temps[0]]["histogram"][1:])
        acc = r["train"].get("accuracy_per_position", [])[1:]
        lines.append(f"| {loss} | {taus} | {hist} | {' '.join(f'{a:.2f}' for a in acc)} |")
    base = results.get("dflash")
    if base and "dpace" in results:
        lines.append("")
        for t in temps:
            gain = results["dpace"]["eval"][t]["tau"] / base["eval"][t]["tau"] - 1
            lines.append(f"D-PACE vs DFlash at T={t}: {100 * gain:+.1f}% tau.")
    return "\n".join(lines) + "\n"


def seed_statistics(per_seed: dict, base: str = "dflash") -> dict:
    """{T: {"tau": {loss: bootstrap_tau}, "paired": {loss: paired_differences vs base}}} from
    {seed: {loss: {"eval": {T: HumanEval report with its samples}}}}."""
    acc: dict = {}
    for seed, results in per_seed.items():
        for loss, r in results.items():
            for t, e in r["eval"].items():
                acc.setdefault(t, {}).setdefault(loss, {})[seed] = [
                    s["acceptance_lengths"] for s in e["samples"]]
    return {t: {"tau": {loss: stats.bootstrap_tau(v) for loss, v in losses.items()},
                "paired": {loss: stats.paired_differences(v, losses[base])
                           for loss, v in losses.items() if base in losses and loss != base}}
            for t, losses in acc.items()}


def markdown_statistics(st: dict, seeds) -> str:
    lines = [f"## Over training seeds {', '.join(str(s) for s in seeds)}", "",
             "Pooled tau with a 95% bootstrap interval (seeds, then prompts within a seed), and "
             "the paired per-seed difference against dflash.", ""]
    for t, r in st.items():
        lines += [f"T={t}:", "", "| loss | tau (95% CI) | vs dflash (per seed) |", "|---|---|---|"]
        for loss, b in r["tau"].items():
            d = r["paired"].get(loss)
            diff = "" if d is None else f"{d['mean_percent']:+.1f}% (" + ", ".join(
                f"{v:+.1f}%" for v in d["per_seed_percent"].values()) + ")"
            lines.append(f"| {loss} | {b['mean']:.3f} ({b['lo']:.3f}-{b['hi']:.3f}) | {diff} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, out: Path, block_size: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The paper's weight-dynamics figure, for the objectives with data-dependent weights.
    weighted = [loss for loss in ("dpace", "dpace-cumulative-confidence-only")
                if results.get(loss, {}).get("metrics")]
    if weighted:
        fig, axes = plt.subplots(1, len(weighted), figsize=(6 * len(weighted), 4.5),
                                 squeeze=False)
        for ax, loss in zip(axes[0], weighted, strict=True):
            rows = results[loss]["metrics"]
            steps = [r["step"] for r in rows]
            for k in range(1, block_size):
                ax.plot(steps, [r["weight_per_position"][k] for r in rows], label=f"k={k}")
            ax.set_title(f"{loss}: mean weight per block position")
            ax.set_xlabel("step")
            ax.set_ylabel("mean weight")
        axes[0][0].legend(ncol=2, fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "weights.png", dpi=110)
        plt.close(fig)

    temps = list(next(iter(results.values()))["eval"])
    fig, axes = plt.subplots(1, len(temps), figsize=(6 * len(temps), 4.5), squeeze=False)
    width = 0.8 / len(results)
    for ax, t in zip(axes[0], temps, strict=True):
        for i, (loss, r) in enumerate(results.items()):
            hist = r["eval"][t]["histogram"][1:]
            total = max(sum(hist), 1)
            xs = [j + 1 + (i - len(results) / 2) * width for j in range(len(hist))]
            ax.bar(xs, [h / total for h in hist], width=width, label=loss)
        ax.set_title(f"acceptance length per verify step, T={t}")
        ax.set_xlabel("accepted tokens + 1")
        ax.set_ylabel("fraction of steps")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "histograms.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="cpu", choices=RECIPES,
                   help="the demo recipe (dpace_jax/demo/config.py): cpu and gpu train DFlash 2 "
                        "drafters, cpu-dflash DFlash drafters")
    p.add_argument("--workdir", default="runs/compare")
    p.add_argument("--out", default="docs/compare_cpu")
    p.add_argument("--losses", default=",".join(LOSSES))
    p.add_argument("--steps", type=int, default=0, help="training steps (0: the demo config's)")
    p.add_argument("--eval-samples", type=int, default=0, help="HumanEval prompts (0: config's)")
    p.add_argument("--temperatures", default="0,1")
    p.add_argument("--seed", type=int, default=None,
                   help="training seed (drafter init, anchors, data order); the target and the "
                        "data stay those of the config's seed. Default: the config's seed")
    p.add_argument("--seeds", default="",
                   help="comma-separated training seeds: train and evaluate each, and report "
                        "the statistics over them (instead of --seed)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.seeds and args.seed is not None:
        p.error("--seed and --seeds: give one of them")
    command = "python bench/compare_losses.py " + " ".join(shlex.quote(a) for a in
                                                            (argv or sys.argv[1:]))

    import jax
    from absl import logging

    from dpace_jax.demo.config import get_config
    from dpace_jax.demo.prepare import prepare
    from dpace_jax.targets import hf as convert
    from dpace_jax.train import sft
    from dpace_jax.train.settings import Settings

    logging.set_verbosity(logging.WARNING)
    base = get_config(args.size)
    if args.steps:
        base.train.max_steps = args.steps
    if args.eval_samples:
        base.eval.num_samples = args.eval_samples
    workdir, out = Path(args.workdir).absolute(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    # Shared stages: the target and the regenerated data, built once.
    shared = base.copy_and_resolve_references()
    shared.workdir = str(workdir)
    shared.train.progress = not args.no_progress
    target = Path(prepare(shared).target.path)
    tokenizer = convert.load_tokenizer(target)
    sft.load_training_data(Settings.from_config(shared), workdir, target, tokenizer,
                           base.drafter.block_size)
    data = workdir / "data" / "regenerated.jsonl"

    temperatures = [float(t) for t in args.temperatures.split(",")]
    seeds = ([int(x) for x in args.seeds.split(",")] if args.seeds
             else [base.seed if args.seed is None else args.seed])
    per_seed = {}
    for seed in seeds:
        runs = workdir if seed == base.seed else workdir / f"seed{seed}"
        per_seed[seed] = {loss: train_and_evaluate(base, loss, runs / loss, target, data,
                                                   temperatures, not args.no_progress, seed)
                          for loss in args.losses.split(",")}
    results, seed = per_seed[seeds[0]], seeds[0]
    seconds = time.perf_counter() - t0
    device = f"{jax.devices()[0].platform}:{getattr(jax.devices()[0], 'device_kind', '')}"
    report = markdown(results, base, command, device, seconds, seed)
    summary = {loss: {"train": r["train"], "eval": {t: {k: v for k, v in e.items()
                                                         if k != "samples"}
                                                     for t, e in r["eval"].items()}}
               for loss, r in results.items()}
    if len(seeds) > 1:
        st = seed_statistics(per_seed)
        report += "\n" + markdown_statistics(st, seeds)
        summary = {"device": device, "seeds": seeds, "statistics": st,
                   "per_seed": {s: {loss: {"train": r["train"], "eval": {
                       t: {k: v for k, v in e.items() if k != "samples"}
                       for t, e in r["eval"].items()}} for loss, r in res.items()}
                                for s, res in per_seed.items()}}
    (out / "results.md").write_text(report)
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    plot(results, out, base.drafter.block_size)
    print(report)


if __name__ == "__main__":
    main()
