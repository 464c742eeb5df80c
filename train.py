"""Train a DFlash drafter with D-PACE (or DFlash's decayed CE) against a frozen target.

    python train.py --config configs/qwen3_4b.py --config.workdir=runs/qwen3_4b
    python train.py --config configs/tiny.py --config.workdir=/tmp/tiny --config.train.loss=dflash
"""

import logging as std_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Python config file exposing get_config().", lock_config=True
)
flags.mark_flags_as_required(["config"])


def _quiet_closed_loop_reports(hook):
    """After a failed asynchronous save, TensorStore's remaining write callbacks find Orbax's
    event loop closed and report that as an unraisable exception, once per write; the failure
    itself is said in one line by the trainer, so these reports are dropped."""

    def unraisablehook(report):
        if not (isinstance(report.exc_value, RuntimeError)
                and str(report.exc_value) == "Event loop is closed"):
            hook(report)

    return unraisablehook


class _QuietOrbaxErrors(std_logging.Filter):
    """Orbax's errors of a failed background save (with tracebacks, once per thread), and the
    other writes of that save that asyncio reports as never retrieved: the trainer raises the
    failure again as one line naming the step."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno < std_logging.ERROR or not (
            "/orbax/" in record.pathname or record.name == "asyncio")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from dpace_jax.demo.prepare import prepare
    from dpace_jax.io.lock import WorkdirLockError
    from dpace_jax.train import loop as trainer
    from dpace_jax.train import preemption

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
        logging.get_absl_logger().addFilter(_QuietOrbaxErrors())
        std_logging.getLogger("asyncio").addFilter(_QuietOrbaxErrors())
        sys.unraisablehook = _quiet_closed_loop_reports(sys.unraisablehook)

    try:
        trainer.check_config(_CONFIG.value)  # before the demo step builds anything
        summary = trainer.run(prepare(_CONFIG.value))
    except preemption.Preempted as e:  # a SystemExit with status 143 (130 for Ctrl-C)
        print(e, file=sys.stderr)
        raise
    except (ValueError, FileNotFoundError, FloatingPointError, WorkdirLockError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    load = summary["data"]["load"]
    used = summary["data"].get("tokenize") or summary["data"]["prompts"]  # train.mode=opd: prompts
    if load["skipped"] or used["skipped"]:
        first = f"; first: {load['skipped_examples'][0]}" if load["skipped_examples"] else ""
        kind = "samples" if "samples" in used else "prompts"
        print(f"data: {used[kind]} {kind}; skipped rows {load['skipped']}, skipped "
              f"conversations {used['skipped']}{first}")
    final = summary["final_metrics"]
    if final.get("skipped_steps"):
        print(f"warning: {int(final['skipped_steps'])} steps had a non-finite loss or gradients "
              "and were skipped (train.nan_policy=skip-step)")
    if final:
        print(f"step {final['step']}: loss {final['loss']:.4f}  accuracy {final['accuracy']:.3f}")
    if summary["mode"] == "opd":
        from dpace_jax.io import storage
        from dpace_jax.train.opd.rounds import read_rounds

        workdir = storage.resolve(_CONFIG.value.workdir)
        taus = [row.get("on_policy_tau") for row in read_rounds(workdir / "rounds.jsonl")]
        if taus:
            print("on-policy tau per round: " + ", ".join(
                f"{t:.2f}" if isinstance(t, float | int) else "?" for t in taus))
    if not summary["finished"]:
        print("stopped before the last step; run the same command again to resume")
    elif summary["hf_dir"]:
        print(f"drafter (DFlash HF format): {summary['hf_dir']}")


if __name__ == "__main__":
    from dpace_jax.config import parse_flags

    app.run(main, flags_parser=parse_flags)
