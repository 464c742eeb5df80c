"""evaluate.py's results on a training run directory, as TensorBoard scalars next to the run's
training metrics (dpace_jax.train.metrics writes those)."""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Mapping
from typing import Any

from dpace_jax.io import storage
from dpace_jax.train.metrics import (
    TENSORBOARD_DIR,
    encode_event,
    event_fields,
    read_records,
    tfrecord,
)


def log_evaluation(run_dir: str | os.PathLike, report: Mapping[str, Any]) -> storage.AnyPath | None:
    """evaluate.py's report on a training run directory as scalars eval/<benchmark>/tau at the
    step of the checkpoint evaluated (its hf/ export: the run's last step), in a file of their
    own under RUN/tensorboard/eval (a run of its own in TensorBoard; the training's event files,
    which a live run rewrites, are not touched). An evaluation of a step evaluated before
    replaces it (TensorBoard would show either value). None when `run_dir` is not a run."""
    run = storage.resolve(run_dir, "eval.drafter")
    if not (run / "run_config.json").exists():
        return None
    found = re.search(r" step (\d+)$", str(report.get("drafter", "")))
    step = int(found.group(1)) if found else int(
        json.loads(storage.read_text(run / "run_config.json")).get("total_steps", 0))
    directory = run / TENSORBOARD_DIR / "eval"
    storage.mkdir(directory)
    for name in storage.listdir(directory):
        records = read_records(storage.read_bytes(directory / name))[0]
        kept = [r for r in records if 3 in event_fields(r) or event_fields(r).get(2) != step]
        if len(kept) < len(records):
            storage.write_bytes(directory / name, b"".join(map(tfrecord, kept)))
    now = time.time()
    scalars = {f"eval/{name}/tau": float(r["tau"]) for name, r in report["benchmarks"].items()}
    path = directory / (f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}."
                        f"{os.getpid()}.{time.time_ns() % 10**9:09d}")  # one file per evaluation
    storage.write_bytes(path, tfrecord(encode_event(now, 0, file_version="brain.Event:2"))
                        + tfrecord(encode_event(now, step, scalars=scalars)))
    return path
