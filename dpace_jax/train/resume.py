"""What a resumed run must share with the run that wrote its checkpoint, and the run's record.

The fingerprint holds every setting that changes the trained result: the schedule, the
objective, anchors, clipping, dtypes, the drafter's shape, the tokenized data and the target.
A resume with another value is refused in one line that names the setting, unless the run allows
it (`train.allow_changed`, for deliberate continuations); an allowed change is appended, with the
step it took effect, to WORKDIR/run_history.jsonl, which is never rewritten. Checkpoints written
before a key existed are compared on the keys they have.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from dpace_jax.drafters import hf as drafter_hf
from dpace_jax.io import storage

log = logging.getLogger(__name__)
HISTORY = "run_history.jsonl"


def target_identity(target_dir: Path) -> str:
    """A hash of the target's config.json and the names and sizes of its weight files."""
    h = hashlib.sha256((target_dir / "config.json").read_bytes())
    for f in sorted(target_dir.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


SAMPLES_PER_FILE, SAMPLE_BYTES = 16, 1 << 16


def target_content(target_dir: Path) -> str:
    """A hash of the target's weights themselves, so that a fine-tune of the same shape or a hub
    update of the target is not taken for the one a checkpoint was trained against: the hub
    snapshot's revision (a commit hash naming the content) when the target comes from the HF
    cache, and in any case SAMPLES_PER_FILE evenly spaced 64 KiB pieces of every weight file
    (reading the whole of a 60 GB target at every start would take minutes; a fine-tune
    changes essentially every piece)."""
    h = hashlib.sha256()
    parts = Path(target_dir).resolve().parts
    if len(parts) > 2 and parts[-2] == "snapshots":  # .../models--org--name/snapshots/<rev>
        h.update(f"revision:{parts[-1]}".encode())
    for f in sorted(target_dir.glob("*.safetensors")):
        size = f.stat().st_size
        with open(f, "rb") as fh:
            for k in range(SAMPLES_PER_FILE):
                fh.seek(max(size - SAMPLE_BYTES, 0) * k // max(SAMPLES_PER_FILE - 1, 1))
                h.update(fh.read(SAMPLE_BYTES))
    return h.hexdigest()[:16]


def drafter_fingerprint(dcfg) -> dict:
    """The drafter's exported config.json but its dtype. A drafter without a causal layer records
    is_causal=false, as runs did before z-lab's mask rule made it optional: the masks are the
    same, so those runs resume."""
    drafter = {k: v for k, v in drafter_hf.config_to_hf(dcfg).items() if k != "torch_dtype"}
    if "is_causal" not in drafter and not any(dcfg.layer_causal):
        drafter["is_causal"] = False
    return drafter


def run_fingerprint(s, mode, dcfg, data_fingerprint: str | None = None,
                    target_dir: Path | None = None) -> dict:
    """The settings a resumed run must keep (see the module doc), derived from the typed
    settings `s` (dpace_jax.train.settings: each section's fields but its SAME_RESULT ones), the
    run's mode, the drafter's config, the data's and the target's identities."""
    from dpace_jax.train.settings import fingerprint_of

    fingerprint = {**fingerprint_of(s.step), "total_steps": s.step.total_steps,
                   **fingerprint_of(s.loop), **fingerprint_of(s.data), "seed": s.seed,
                   "target_dtype": s.target_dtype, "block_size": dcfg.block_size,
                   "num_layers": dcfg.num_layers, "target_layer_ids": list(dcfg.target_layer_ids)}
    if dcfg.sliding_window or dcfg.is_causal:  # absent for the DFlash mask: older runs resume
        fingerprint.update(layer_types=list(dcfg.layer_types),
                           sliding_window=dcfg.sliding_window, is_causal=dcfg.is_causal)
    if s.mode != "sft":  # absent for supervised runs: older runs resume
        fingerprint["mode"] = s.mode
    fingerprint["drafter"] = drafter_fingerprint(dcfg)
    fingerprint.update(mode.fingerprint(s))
    if data_fingerprint is not None:
        fingerprint["data"] = data_fingerprint
    if target_dir is not None:
        fingerprint["target"] = target_identity(target_dir)
        fingerprint["target_content"] = target_content(target_dir)  # newer runs only
    return fingerprint


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


# The drafter's shape: its arrays in the checkpoint could not be restored with another one.
FIXED = ("drafter", "num_layers", "target_layer_ids", "block_size")


def _differences(changed: dict) -> list[str]:
    out = []
    for key, (old, new) in sorted(changed.items()):
        if isinstance(old, dict) and isinstance(new, dict):  # name the inner fields
            out += [f"{key}.{k}={_short(old.get(k))}, this run has {_short(new.get(k))}"
                    for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        else:
            out.append(f"{key}={_short(old)}, this run has {_short(new)}")
    return out


def changed_settings(stored: dict, current: dict, allowed, where: str) -> dict:
    """{key: [stored, current]} of the settings that changed, every one of them allowed; a
    change that is not allowed is a ValueError naming the setting and how to proceed."""
    changed = {k: [v, current.get(k)] for k, v in stored.items() if current.get(k) != v}
    fixed = {k: v for k, v in changed.items() if k in FIXED}
    if fixed:
        raise ValueError(f"{where} was written with another drafter: "
                         f"{'; '.join(_differences(fixed)[:3])}. Its arrays cannot take another "
                         "shape: use a new workdir (or start from its hf/ export with "
                         "drafter.init_from)")
    refused = {k: v for k, v in changed.items() if k not in {str(a) for a in allowed}}
    if refused:
        raise ValueError(
            f"{where} was written with other settings: {'; '.join(_differences(refused)[:3])}."
            f" Use a new workdir, or continue with the new values: "
            f"--config.train.allow_changed=\"{tuple(sorted(refused))}\"")
    return changed


def record_start(workdir, step: int, changed: dict) -> None:
    """Append this start (its step, the settings it changed) to WORKDIR/run_history.jsonl (on
    an object store: rewritten whole). A torn last line (a crash mid-append) is ended first, so
    that it does not merge with this record; readers skip it (`read_history`)."""
    path = workdir / HISTORY
    row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "start_step": int(step),
           "changed": changed}
    old = storage.read_bytes(path) if path.exists() else b""
    torn = bool(old) and not old.endswith(b"\n")
    storage.append_text(path, ("\n" if torn else "") + json.dumps(row, default=str) + "\n")


def read_history(workdir) -> list[dict]:
    """The records of WORKDIR/run_history.jsonl; a damaged line is skipped with a warning naming
    the file and line."""
    path, rows = workdir / HISTORY, []
    text = storage.read_text(path) if path.exists() else ""
    for i, line in enumerate(text.splitlines(), 1):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not an object")
            rows.append(row)
        except ValueError:
            if line.strip():
                log.warning("%s:%d: damaged record skipped (%r)", path, i, line[:60])
    return rows
