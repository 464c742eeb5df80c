"""The whole pipeline on the embedded demo: build the target, regenerate the data, train a
DFlash 2 drafter with D-PACE, evaluate it on HumanEval, print a summary.

    python -m dpace_jax.demo [--workdir runs/demo] [--size cpu|gpu|cpu-dflash|...] [--loss dpace]

Every stage is cached in the work directory and an interrupted run continues where it stopped;
the stages are train.py and evaluate.py with `--config configs/demo.py`.
"""

from __future__ import annotations

import argparse
import time

from absl import logging

from dpace_jax.demo.config import RECIPES


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m dpace_jax.demo", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default=None, help="run directory (default: the recipe's, "
                   "runs/demo for cpu and gpu, runs/demo-<recipe> for the others)")
    p.add_argument("--size", default="cpu", choices=RECIPES,
                   help="demo recipe: its target size (cpu, gpu; a DFlash 2 drafter), the "
                        "Qwen3.5 hybrid target, a DFlash drafter (cpu-dflash), or the cpu recipe "
                        "under its own name (cpu-dflash2)")
    p.add_argument("--loss", default="dpace", help="training objective (dpace, dflash, ...)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)

    from dpace_jax.demo.config import get_config
    from dpace_jax.demo.prepare import prepare
    from dpace_jax.infer import evaluation
    from dpace_jax.train import loop as trainer

    logging.set_verbosity(logging.WARNING)
    config = get_config(args.size)
    config.workdir = args.workdir = args.workdir or config.workdir
    config.train.loss = args.loss
    config.train.progress = not args.no_progress

    t0 = time.perf_counter()
    try:
        train = trainer.run(prepare(config))
        t_train = time.perf_counter() - t0
        report = evaluation.evaluate(config, output=f"{args.workdir}/results.json",
                                     progress=not args.no_progress)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}") from None
    t_eval = time.perf_counter() - t0 - t_train

    final = train["final_metrics"]
    bench = report["benchmarks"]["humaneval"]
    hist = " ".join(f"{k}:{n}" for k, n in enumerate(bench["histogram"]) if k and n)
    print("\n=== dpace-jax demo ===")
    print(f"target       {train['target_dir']}")
    tok = train["data"]["tokenize"]
    print(f"data         {tok['samples']} regenerated conversations, {tok['loss_tokens']} "
          "answer tokens")
    if final:
        print(f"training     {train['steps']} steps of {config.train.loss}: loss "
              f"{final['loss']:.3f}, token accuracy {final['accuracy']:.3f}")
        if "topk_recall" in final:
            print(f"selector     top-{config.drafter.selector_top_k} recall "
                  f"{final['topk_recall']:.3f}, walk accuracy {final['selector_accuracy']:.3f}, "
                  f"walk != unary argmax in {100 * final['walk_changed']:.1f}% of blocks")
    print(f"drafter      {train['hf_dir']} (DFlash HF format)")
    print(f"HumanEval    {len(bench['samples'])} prompts, block size {report['block_size']}, "
          f"greedy; speculative output == autoregressive: {bench['mismatches'] == 0}")
    print(f"tau          {bench['tau']:.2f}   (acceptance lengths {hist})")
    print(f"speed        {bench['spec_tokens_per_s']:.0f} tok/s speculative vs "
          f"{bench['ar_tokens_per_s']:.0f} tok/s autoregressive: {bench['speedup']:.2f}x")
    print(f"time         {t_train:.0f} s build + train, {t_eval:.0f} s evaluation; "
          f"results in {args.workdir}/results.json")


if __name__ == "__main__":
    main()
