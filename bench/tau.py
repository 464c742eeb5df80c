"""Acceptance lengths of a drafter on held-out HumanEval prompts, for the method comparisons.

evaluate.py's speculative decoding (the same length-sorted batches, keys and seed, so the same
acceptance lengths) without its autoregressive run and timing, which tau does not need and which
cost several times the speculative decoding itself. Each evaluation is cached as JSON: a
comparison interrupted and run again evaluates only what is missing.
"""

from __future__ import annotations

import json
from pathlib import Path

import stats


def evaluate(config, temperature: float, path: Path, samples: int, *,
             selector: bool = True) -> dict:
    """{"drafter", "temperature", "samples": [{"id", "acceptance_lengths", "output_ids"}], "tau"}
    of config's drafter (eval.drafter, else the workdir) on the first `samples` HumanEval prompts
    at `temperature`, cached at `path`. `selector=False`: a DFlash 2 drafter drafts its unary
    argmax (eval.selector)."""
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
    _, tokenizer, gen, loaded, spec = gen_lib.open_target(
        target_path(config), ev.drafter or config.workdir,
        parse_dtype(config.target.dtype, "target.dtype"), max_new_tokens=int(ev.max_new_tokens),
        batch_size=int(ev.batch_size), sampling=evaluation.sampling_config(ev), selector=selector)
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
    report = {"drafter": loaded.source, "temperature": temperature, "selector": selector,
              "samples": rows, "tau": stats.mean_acceptance(r["acceptance_lengths"] for r in rows)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report) + "\n")
    tmp.replace(path)  # a cached file is always whole
    return report


def acceptance(report: dict) -> list[list[int]]:
    """Per prompt, the acceptance lengths of a report of `evaluate` or of evaluate.py."""
    samples = report["samples"] if "samples" in report else (
        report["benchmarks"]["humaneval"]["samples"])
    return [s["acceptance_lengths"] for s in samples]
