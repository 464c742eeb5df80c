"""Evaluate a drafter: acceptance length tau and speedup over autoregressive decoding.

    python evaluate.py --config configs/tiny.py --config.workdir=/tmp/tiny --output results.json
    python evaluate.py --config configs/qwen3_8b.py --config.eval.drafter=z-lab/Qwen3-8B-DFlash \
        --benchmarks=humaneval,gsm8k=data/gsm8k_test.jsonl,mt-bench=data/mt_bench.jsonl

The drafter is `--config.eval.drafter` (a DFlash HF directory or a run directory), else the run in
`--config.workdir` (its latest checkpoint, else its hf/ export). Benchmarks: NAME or NAME=FILE, with
NAME in humaneval, gsm8k, math500, mbpp, mt-bench, alpaca.
"""

import os

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
        _check_output(_OUTPUT.value)  # before minutes of decoding, not after
        _hub_inputs(_CONFIG.value)
        report = evaluation.evaluate(prepare(_CONFIG.value, build=False),
                                     benchmarks=_BENCHMARKS.value,
                                     output=_OUTPUT.value, progress=_PROGRESS.value)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    print(evaluation.format_report(report))
    if _OUTPUT.value:
        print(f"results: {_OUTPUT.value}")
    _log_to_run(_CONFIG.value, report)


def _check_output(output: str | None) -> None:
    """--output must name a file that can be written (its directory exists or can be made)."""
    if not output:
        return
    from pathlib import Path

    out = Path(output).expanduser()
    if out.is_dir():
        raise ValueError(f"--output={output!r} is a directory; name the results file")
    parent = next((p for p in [out.parent, *out.parent.parents] if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ValueError(f"--output={output!r}: {parent or out.parent} is not a writable "
                         "directory")


def _log_to_run(config, report: dict) -> None:
    """A run directory's evaluation in its TensorBoard logs (dpace_jax.train.metrics)."""
    if config.logging.tensorboard:
        from dpace_jax.train import eval_log

        eval_log.log_evaluation(str(config.eval.drafter or config.workdir), report)


def _hub_inputs(config) -> None:
    """config.offline, the hub notices, and a hub id as eval.drafter (fetched through the HF
    cache like a target: its config.json and safetensors), before anything is loaded."""
    from dpace_jax.io import hub
    from dpace_jax.targets import hf as convert

    if config.offline:
        hub.go_offline()
    hub.announce([("target.path", str(config.target.path)),
                  ("eval.drafter", str(config.eval.drafter))], offline=convert.hub_offline())
    if hub.looks_like_hub_id(str(config.eval.drafter)):
        config.eval.drafter = str(convert.resolve_checkpoint(str(config.eval.drafter)))


if __name__ == "__main__":
    from dpace_jax.config import parse_flags

    app.run(main, flags_parser=parse_flags)
