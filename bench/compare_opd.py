"""On-policy post-training vs continued SFT on the embedded demo, from the same SFT drafter.

    python -m dpace_jax.demo                     # the SFT drafter, in runs/demo
    nice -n 19 python bench/compare_opd.py --sft runs/demo --workdir runs/compare_opd \
        --out docs/opd --seeds 0,1,2 --eval-samples 164,64

Every arm continues the SFT drafter for the same number of optimizer steps at the same batch size
(so the same number of training target forwards) and learning-rate schedule (configs/demo_opd.py).
The arms (ARMS; `--arms` picks some): continued SFT on the SFT run's regenerated data (uniform
anchors), and train.mode=opd on rounds of the drafter's own rollouts with one teacher
(opd.teacher), rejected-draft stream (opd.rejected_stream) and objective (train.loss) each; the
rollouts are the on-policy arms' extra compute (reported). Every drafter, and the SFT drafter
itself, is evaluated on held-out HumanEval prompts at temperature 0 and 1 (the first N of them:
`--eval-samples` per temperature); per arm: pooled tau with a 95% bootstrap interval over seeds and
prompts, and the paired per-seed difference against `sft-dpace` (bench/stats.py). OUT gets
results.json, results.md and rounds.png (per round of each on-policy arm: the rollouts' tau and the
drafter's accuracy on the realized tokens it trains on).

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

# arm -> config overrides on configs/demo_opd.py ("train.mode": "sft" means continued SFT)
ARMS = {
    "sft-dpace": {"train.mode": "sft", "train.loss": "dpace"},
    "sft-dflash": {"train.mode": "sft", "train.loss": "dflash"},
    # the public recipe: T = 1 softmax teacher, every rejected draft after the first rejection
    "opd-softmax": {"opd.teacher": "softmax", "opd.rejected_stream": "suffix"},
    "opd-softmax-first": {"opd.teacher": "softmax", "opd.rejected_stream": "first"},
    "opd-verify": {"opd.teacher": "verify", "opd.rejected_stream": "suffix"},
    # the verify teacher without the rejected stream (inert at T = 0 but in the denominator)
    "opd-verify-norej": {"opd.teacher": "verify", "opd.rejected_stream": "first",
                         "opd.rejected_weight": 0.0},
    "opd-softmax-dpace": {"opd.teacher": "softmax", "opd.rejected_stream": "suffix",
                          "opd.dpace_weights": True},
    "opd-verify-dpace": {"opd.teacher": "verify", "opd.rejected_stream": "suffix",
                         "opd.dpace_weights": True},
    # TV covers the realized positions (the first rejection's included): stream "first"
    "tv-verify": {"train.loss": "tv", "opd.teacher": "verify", "opd.rejected_stream": "first"},
    "tv-softmax": {"train.loss": "tv", "opd.teacher": "softmax", "opd.rejected_stream": "first"},
    # the public code's TV (its Qwen3-8B script): T = 1 softmax teacher, per block
    "tv-softmax-block": {"train.loss": "tv", "opd.teacher": "softmax",
                         "opd.rejected_stream": "first", "opd.tv_reduce": "block"},
}
DEFAULT_ARMS = "sft-dpace,opd-softmax,opd-verify,tv-verify"
BASELINE = "sft-dpace"
ROOT = Path(__file__).resolve().parents[1]


def arm_config(arm: str, sft: Path, workdir: Path, seed: int, progress: bool):
    if arm not in ARMS:
        raise SystemExit(f"error: --arms: unknown arm {arm!r}; expected some of {sorted(ARMS)}")
    c = runpy.run_path(str(ROOT / "configs" / "demo_opd.py"))["get_config"](str(sft))
    c.workdir, c.seed, c.train.progress = str(workdir), seed, progress
    c.train.log_every = 1  # every step's accuracy: the per-round curves
    steps = c.opd.rounds * c.opd.epochs_per_round * (c.opd.prompts_per_round // c.train.batch_size)
    for field, value in ARMS[arm].items():
        section, name = field.split(".")
        c[section][name] = value
    if c.train.mode == "sft":
        c.train.max_steps = steps
        c.train.num_anchors = 32  # the SFT run's
        c.data.paths = (str(sft / "data" / "regenerated.jsonl"),)
    return c


def evaluate(config, temperature: float, path: Path, samples: int) -> dict:
    """The acceptance lengths of config's drafter on the first `samples` HumanEval prompts at
    `temperature` (cached at `path`): evaluate.py's decoding (same batches, keys and seed, so the
    same acceptance lengths), without its autoregressive run and timing, which tau does not need
    and which cost several times the speculative decoding itself."""
    import jax

    from dpace_jax.config import parse_dtype, target_path
    from dpace_jax.data import prompt_sets as bench_lib
    from dpace_jax.infer import evaluation
    from dpace_jax.infer import generation as gen_lib

    if path.exists():
        return json.loads(path.read_text())
    config = config.copy_and_resolve_references()
    config.eval.temperature = temperature
    ev = config.eval
    sampling = evaluation.sampling_config(ev)
    _, tokenizer, gen, loaded, spec = gen_lib.open_target(
        target_path(config), ev.drafter or config.workdir,
        parse_dtype(config.target.dtype, "target.dtype"), max_new_tokens=int(ev.max_new_tokens),
        batch_size=int(ev.batch_size), sampling=sampling)
    bench = bench_lib.load_benchmark("humaneval", samples)
    prompts = [gen_lib.render_prompt(tokenizer, bench_lib.conversation(s, []))
               for s in bench.samples]
    rows = [None] * len(prompts)
    for batch_no, group in enumerate(evaluation.length_batches([len(p) for p in prompts],
                                                               gen.batch_size)):
        # evaluation.run_benchmark's key for turn 0 of this batch
        key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), 0),
                                 batch_no)
        gens, _ = gen.generate(spec, [prompts[j] for j in group], key)
        for j, g in zip(group, gens, strict=True):
            rows[j] = {"id": bench.samples[j].id, "acceptance_lengths": g.acceptance_lengths,
                       "output_ids": g.output_ids}
    report = {"drafter": loaded.source, "temperature": temperature, "samples": rows,
              "tau": stats.mean_acceptance(r["acceptance_lengths"] for r in rows)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report) + "\n")
    return report


def acceptance(report: dict) -> list[list[int]]:
    samples = report["samples"] if "samples" in report else (
        report["benchmarks"]["humaneval"]["samples"])  # evaluate.py's report
    return [s["acceptance_lengths"] for s in samples]


def rollout_tokens(workdir: Path) -> int:
    rounds = workdir / "rounds.jsonl"
    if not rounds.exists():
        return 0
    return sum(json.loads(line)["tokens"] for line in rounds.read_text().splitlines())


def round_rows(run: Path, steps_per_round: int) -> list[dict]:
    """rounds.jsonl of an on-policy run, each row with the mean over its round's steps of the
    drafter's accuracy on the realized tokens (`accuracy`), its probability of them (`q_real`)
    and the teacher's (`p_real`), as metrics.jsonl logged them (each before its step's update)."""
    rows = [json.loads(r) for r in (run / "rounds.jsonl").read_text().splitlines() if r.strip()]
    steps = [json.loads(m) for m in (run / "metrics.jsonl").read_text().splitlines() if m.strip()]
    for row in rows:
        first = row["round"] * steps_per_round
        inside = [m for m in steps if first < m.get("step", -1) <= first + steps_per_round]
        for key in ("accuracy", "q_real", "p_real"):
            values = [m[key] for m in inside if key in m]
            row[key] = sum(values) / len(values) if values else None
    return rows


def markdown(results: dict, command: str, device: str, seconds: float) -> str:
    lines = [f"Device: {device}; {seconds / 60:.1f} min; command: `{command}`", ""]
    for t, per_arm in results["tau"].items():
        n = results["eval_samples"][t]
        lines += [f"### T = {t} ({n} HumanEval prompts)", "",
                  f"| drafter | tau (95% CI) | vs {BASELINE}, paired per seed |", "|---|---|---|"]
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


def seed_alpha(index: int, count: int) -> float:
    """Line opacity of the index-th of `count` seeds: spread over [0.35, 1] for any count (the
    seed value itself is no index: 0.5 + 0.15 * seed left [0, 1] from seed 4 on)."""
    return 1.0 if count <= 1 else 0.35 + 0.65 * index / (count - 1)


def plot(rounds: dict, out: Path) -> None:
    """rounds.png: per round of each on-policy arm (one colour per arm, one line per seed), the
    rollouts' tau and the drafter's accuracy on the realized tokens of its training batches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for colour, (arm, per_seed) in enumerate(rounds.items()):
        for i, (_, rows) in enumerate(sorted(per_seed.items())):
            alpha = seed_alpha(i, len(per_seed))
            label = arm if i == 0 else None
            x = [r["round"] for r in rows]
            axes[0].plot(x, [r["on_policy_tau"] for r in rows], marker="o", color=f"C{colour}",
                         alpha=alpha, label=label)
            acc = [(r["round"], r["accuracy"]) for r in rows if r.get("accuracy") is not None]
            axes[1].plot([a for a, _ in acc], [b for _, b in acc], marker="o",
                         color=f"C{colour}", alpha=alpha, label=label)
    axes[0].set_ylabel("tau of the round's rollouts (drafter at its start)")
    axes[1].set_ylabel("accuracy on realized tokens (training batches)")
    for ax in axes:
        ax.set_xlabel("round")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "rounds.png", dpi=120)
    plt.close(fig)


def parse_samples(text: str, temps: list[float]) -> dict[str, int]:
    counts = [int(n) for n in text.split(",")]
    if len(counts) == 1:
        counts *= len(temps)
    if len(counts) != len(temps) or min(counts) < 1:
        raise SystemExit(f"error: --eval-samples={text!r}: one count >= 1, or one per temperature "
                         f"({len(temps)})")
    return {f"{t:g}": n for t, n in zip(temps, counts, strict=True)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sft", default="runs/demo", help="the SFT run directory (python -m "
                   "dpace_jax.demo)")
    p.add_argument("--workdir", default="runs/compare_opd")
    p.add_argument("--out", default="docs/opd")
    p.add_argument("--arms", default=DEFAULT_ARMS, help=f"some of {', '.join(ARMS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--eval-samples", default="164,64", help="HumanEval prompts (the first N) per "
                   "temperature, or one count for all")
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
    temps = [float(t) for t in args.temperatures.split(",")]
    samples = parse_samples(args.eval_samples, temps)
    arms = args.arms.split(",")
    for arm in arms:
        if arm not in ARMS:
            raise SystemExit(f"error: --arms: unknown arm {arm!r}; expected some of {list(ARMS)}")
    out.mkdir(parents=True, exist_ok=True)
    progress, t0 = not args.no_progress, time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    acc = {f"{t:g}": {} for t in temps}
    rounds, tokens = {}, {}

    def eval_path(run: Path, t: float) -> Path:
        return run / f"eval_T{t:g}_n{samples[f'{t:g}']}.json"

    start = arm_config(BASELINE, sft, workdir / "start", 0, progress)
    start.eval.drafter = str(sft)
    for t in temps:
        report = evaluate(start, t, eval_path(workdir / "start", t), samples[f"{t:g}"])
        acc[f"{t:g}"]["sft (start)"] = {s: acceptance(report) for s in seeds}
    for arm in arms:
        for seed in seeds:
            run = workdir / arm / f"seed{seed}"
            config = arm_config(arm, sft, run, seed, progress)
            # a run with every evaluation cached finished its training: no resume needed (which
            # would also refuse runs whose fingerprint a later version of the code spells
            # differently)
            evaluated = all(eval_path(run, t).exists() for t in temps)
            if not evaluated and not trainer.run(config)["finished"]:
                raise SystemExit(f"error: {run}: training stopped before its last step")
            for t in temps:
                report = evaluate(config, t, eval_path(run, t), samples[f"{t:g}"])
                acc[f"{t:g}"].setdefault(arm, {})[seed] = acceptance(report)
            if config.train.mode == "opd":
                o = config.opd
                per_round = o.epochs_per_round * (o.prompts_per_round // config.train.batch_size)
                rounds.setdefault(arm, {})[seed] = round_rows(run, per_round)
                tokens[arm] = rollout_tokens(run)
    results = {"tau": {t: {arm: stats.bootstrap_tau(per) for arm, per in arms_.items()}
                       for t, arms_ in acc.items()},
               "paired": {t: {arm: stats.paired_differences(per, arms_[BASELINE])
                              for arm, per in arms_.items() if BASELINE in arms_
                              and arm != BASELINE}
                          for t, arms_ in acc.items()},
               "rounds": rounds, "rollout_tokens": tokens, "seeds": seeds,
               "eval_samples": samples, "arms": {a: ARMS[a] for a in arms}}
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
