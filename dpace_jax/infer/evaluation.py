"""Evaluation behind evaluate.py: a target and a drafter, named benchmarks, tau and speedup.

`evaluate(config)` loads the target (HF directory or hub id; evaluate.py resolves the demo's
targets first) and a drafter (`eval.drafter`: a DFlash HF directory, or a run directory: its latest
Orbax checkpoint, else its `hf/` export; "" = the run's WORKDIR), checks that they fit each other
before anything is decoded, and runs every benchmark twice on the same prompts (chat template,
thinking disabled): with the speculative decoder and with plain autoregressive decoding (block
size 1, same loop). mt-bench's second turn is asked after each decoder's own first answer.

Timing: prompts are sorted by length and batched (`eval.batch_size` rows, short batches filled up
with copies) into right-padded widths rounded up to BUCKET tokens, so few shapes compile. Each
shape is run once untimed before it is timed (compile time excluded), every call ends in
`block_until_ready`, and the prefill (timed as the same decode with max_new_tokens=1) is
subtracted: tokens/s counts the tokens generated after the first one, per second of decode loop.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from dpace_jax.config import parse_dtype, target_path
from dpace_jax.data import prompt_sets as bench_lib
from dpace_jax.infer import decode
from dpace_jax.infer import generation as gen_lib
from dpace_jax.infer.sampling import Sampling


def sampling_config(ev) -> Sampling:
    """The config.eval sampling fields as one Sampling (a bad value names its field)."""
    try:
        return Sampling(float(ev.temperature), str(ev.rule), int(ev.top_k), float(ev.top_p))
    except ValueError as e:
        raise ValueError(f"eval.{e}") from None


length_batches = gen_lib.length_batches  # (moved; bench scripts use it from here)


# ----------------------------------------------------------------------------- benchmarks


def run_benchmark(gen: gen_lib.Generator, tokenizer, bench: bench_lib.Benchmark, drafters: dict, *,
                  seed: int = 0, bar=None) -> dict:
    """Decode every turn of every sample with each drafter of `drafters` ({"spec": Drafter,
    "ar": Drafter}); -> {name: {"samples": [...], "seconds", "tokens"}}."""
    runs = {}
    for name, drafter in drafters.items():
        answers = {i: [] for i in range(len(bench.samples))}
        rows, seconds, tokens = [], 0.0, 0
        for turn in range(max(len(s.turns) for s in bench.samples)):
            todo = [i for i, s in enumerate(bench.samples) if len(s.turns) > turn]
            prompts = [gen_lib.render_prompt(tokenizer, bench_lib.conversation(bench.samples[i],
                                                                       answers[i]))
                       for i in todo]
            for batch_no, group in enumerate(length_batches([len(p) for p in prompts],
                                                            gen.batch_size)):
                key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), turn),
                                         batch_no)
                gens, secs = gen.generate(drafter, [prompts[j] for j in group], key,
                                          name=name, timed=True)
                seconds += secs
                for j, g in zip(group, gens, strict=True):
                    i = todo[j]
                    answers[i].append(gen_lib.answer_text(tokenizer, g.output_ids, gen.stop_ids))
                    tokens += len(g.output_ids) - 1
                    rows.append({"id": bench.samples[i].id, "turn": turn, "index": i,
                                 "prompt_ids": prompts[j], "output_ids": g.output_ids,
                                 "acceptance_lengths": g.acceptance_lengths})
                if bar is not None:
                    bar.update(len(group))
        rows.sort(key=lambda r: (r["index"], r["turn"]))
        runs[name] = {"samples": rows, "seconds": seconds, "tokens": tokens}
    return runs


def summarize(runs: dict, block_size: int, check_lossless: bool) -> dict:
    """The per-benchmark result: tau, histogram, tokens/s, speedup, samples."""
    spec, ar = runs["spec"], runs["ar"]
    lengths = [n for r in spec["samples"] for n in r["acceptance_lengths"]]
    hist = np.bincount(np.asarray(lengths, np.int64), minlength=block_size + 1)
    spec_tps = spec["tokens"] / spec["seconds"] if spec["seconds"] > 0 else float("nan")
    ar_tps = ar["tokens"] / ar["seconds"] if ar["seconds"] > 0 else float("nan")
    samples, mismatches = [], 0
    for s, a in zip(spec["samples"], ar["samples"], strict=True):
        same = s["output_ids"] == a["output_ids"]
        mismatches += not same
        samples.append({"id": s["id"], "turn": s["turn"], "prompt_ids": s["prompt_ids"],
                        "output_ids": s["output_ids"], "acceptance_lengths":
                        s["acceptance_lengths"], "ar_output_ids": a["output_ids"],
                        "matches_ar": same})
    return {
        "tau": decode.mean_acceptance([lengths]),
        "histogram": hist[: block_size + 1].tolist(),
        "spec_tokens_per_s": spec_tps, "ar_tokens_per_s": ar_tps,
        "speedup": spec_tps / ar_tps if ar_tps > 0 else float("nan"),
        "num_steps": len(lengths), "spec_tokens": spec["tokens"], "ar_tokens": ar["tokens"],
        "spec_seconds": spec["seconds"], "ar_seconds": ar["seconds"],
        "mismatches": mismatches if check_lossless else None,
        "samples": samples,
    }


def evaluate(config, *, benchmarks: Sequence[str] | None = None, output: str | None = None,
             progress: bool = True) -> dict:
    """Run the benchmarks of `config.eval` (or `benchmarks`); write `output` (JSON) if given."""
    ev = config.eval
    specs = list(benchmarks) if benchmarks else list(ev.benchmarks)
    for spec in specs:
        bench_lib.parse_spec(spec)  # unknown names fail before anything is loaded
    if int(ev.batch_size) < 1 or int(ev.max_new_tokens) < 1:
        raise ValueError(f"eval.batch_size={ev.batch_size} and eval.max_new_tokens="
                         f"{ev.max_new_tokens} must be >= 1")
    drafter_path = ev.drafter or config.workdir
    if not drafter_path:
        raise ValueError("no drafter: set --config.eval.drafter (a DFlash HF directory or a run "
                         "directory) or --config.workdir")
    target_dir, tokenizer, gen, loaded, spec = gen_lib.open_target(
        target_path(config), drafter_path, parse_dtype(config.target.dtype, "target.dtype"),
        max_new_tokens=int(ev.max_new_tokens), batch_size=int(ev.batch_size),
        sampling=sampling_config(ev), selector=bool(ev.get("selector", True)))
    drafters = {"spec": spec, "ar": decode.autoregressive()}
    num = int(ev.num_samples) if int(ev.num_samples) > 0 else None
    loaded_benches = [bench_lib.load_benchmark(s, num) for s in specs]

    from tqdm import tqdm

    total = 2 * sum(len(s.turns) for b in loaded_benches for s in b.samples)
    bar = tqdm(total=total, desc="evaluate", unit="turn", disable=not progress)
    results = {}
    for bench in loaded_benches:
        bar.set_postfix(benchmark=bench.name)
        runs = run_benchmark(gen, tokenizer, bench, drafters, seed=int(config.seed), bar=bar)
        results[bench.name] = {**summarize(runs, loaded.config.block_size,
                                           check_lossless=gen.sampling.greedy),
                               "source": bench.source}
    bar.close()
    device = jax.devices()[0]
    report = {
        "benchmarks": results,
        "target": str(target_dir), "drafter": loaded.source,
        "block_size": loaded.config.block_size, "drafter_arch": loaded.config.arch,
        "selector": bool(ev.get("selector", True)) if loaded.config.arch == "dflash2" else None,
        "temperature": gen.sampling.temperature,
        "rule": gen.sampling.rule, "top_k": gen.sampling.top_k, "top_p": gen.sampling.top_p,
        "max_new_tokens": gen.max_new_tokens, "batch_size": gen.batch_size,
        "device": f"{device.platform}:{getattr(device, 'device_kind', '')}",
        "num_devices": jax.device_count(), "jax_version": jax.__version__,
        "config": config.to_dict(),
    }
    if output:
        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    return report


def format_report(report: dict) -> str:
    """A short table per benchmark."""
    arch = report.get("drafter_arch", "dflash")
    if report.get("selector") is not None:
        arch += " selector " + ("on" if report["selector"] else "off (unary argmax)")
    lines = [f"target {report['target']}  drafter {report['drafter']}  ({arch}, "
             f"block {report['block_size']}, T={report['temperature']}, {report['device']})"]
    for name, r in report["benchmarks"].items():
        hist = " ".join(f"{k}:{n}" for k, n in enumerate(r["histogram"]) if k and n)
        check = "" if r["mismatches"] is None else f"  spec!=AR: {r['mismatches']}"
        lines.append(f"{name:10s} tau {r['tau']:.3f}  spec {r['spec_tokens_per_s']:.1f} tok/s  "
                     f"AR {r['ar_tokens_per_s']:.1f} tok/s  speedup {r['speedup']:.2f}x{check}")
        lines.append(f"{'':10s} acceptance lengths {hist}")
    return "\n".join(lines)
