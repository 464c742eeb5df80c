"""Evaluate a drafter: acceptance length tau and speedup over autoregressive decoding.

    python evaluate.py --config configs/tiny.py --config.workdir=/tmp/tiny --output results.json
    python evaluate.py --config configs/qwen3_8b.py --config.eval.drafter=z-lab/Qwen3-8B-DFlash \
        --benchmarks=humaneval,gsm8k=data/gsm8k_test.jsonl,mt-bench=data/mt_bench.jsonl

The drafter is `--config.eval.drafter` (a DFlash HF directory or a run directory), else the run in
`--config.workdir` (its latest checkpoint, else its hf/ export). Benchmarks: NAME or NAME=FILE, with
NAME in humaneval, gsm8k, math500, mbpp, mt-bench, alpaca.
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Python config file exposing get_config().", lock_config=True
)
_OUTPUT = flags.DEFINE_string("output", None, "Write the results (JSON) to this file.")
_BENCHMARKS = flags.DEFINE_list(
    "benchmarks", None, "Benchmarks (NAME or NAME=FILE) instead of config.eval.benchmarks.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from dpace_jax.demo.prepare import prepare
    from dpace_jax.infer import evaluation

    logging.set_verbosity(logging.WARNING)  # keep Orbax's restore chatter out of the report

    try:
        report = evaluation.evaluate(prepare(_CONFIG.value, build=False),
                                     benchmarks=_BENCHMARKS.value,
                                     output=_OUTPUT.value, progress=_PROGRESS.value)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    print(evaluation.format_report(report))
    if _OUTPUT.value:
        print(f"results: {_OUTPUT.value}")


if __name__ == "__main__":
    from dpace_jax.config import parse_flags

    app.run(main, flags_parser=parse_flags)
