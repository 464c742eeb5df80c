"""The run's metrics: WORKDIR/metrics.jsonl, TensorBoard event files, Weights & Biases.

A days-long run is watched in TensorBoard or W&B, not by reading a JSON file on the run's disk.
`MetricsLog` writes every row three ways, from process 0 only (`is_main`):
- `metrics.jsonl`, as before: on resume the file is repaired first (rows past the restored step
  dropped, and so is a damaged row, reported with its file and line), then rows are appended;
- TensorBoard event files under `WORKDIR/tensorboard/`, one new file per start, written without
  TensorFlow: TFRecord framing around `Event` protobufs encoded by hand (a few fields). Every
  number is a scalar; a per-position list `name` becomes `name/pos_k` (k: the block position,
  the list index). OPD rounds go to `opd/<field>`, evaluations to `eval/<name>/tau`;
- W&B (`wandb`: keyword arguments of `wandb.init`) when installed; asked for but missing, a
  one-line error naming the field (`check_wandb`: call it on every process at start). The W&B
  run id is kept in WORKDIR/wandb_run_id, so that a resume continues the same W&B run; W&B only
  takes increasing steps, so the steps it already holds (a killed run's steps past its last
  checkpoint) are not sent again.

No step twice in TensorBoard (a step written in two event files shows either value): at start,
the events at steps >= the resumed step are cut from the older files (they came after the
checkpoint); the new file opens with `SessionLog.START` at the resumed step (TensorBoard's own
purge, for a reader that had loaded the old events), then the kept metrics.jsonl row of the
resumed step is written again.

On an object store (no append) metrics.jsonl and the current event file are held in memory and
rewritten whole at most every `flush_every_s` seconds and at `close`; past 4 MB an event file is
closed for a new one, so that no rewrite grows without bound.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import struct
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from dpace_jax.io import storage

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"
SEGMENT_BYTES = 4 << 20

# ------------------------------------------------------------------ CRC-32C and TFRecords

def _crc_entry(c: int) -> int:
    for _ in range(8):
        c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli, reflected
    return c


_TABLE = [_crc_entry(i) for i in range(256)]


def crc32c(data: bytes) -> int:
    crc, table = 0xFFFFFFFF, _TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """One TFRecord: uint64 length, masked CRC of the length, data, masked CRC of the data."""
    length = struct.pack("<Q", len(data))
    return (length + struct.pack("<I", masked_crc(length)) + data
            + struct.pack("<I", masked_crc(data)))


def read_records(blob: bytes) -> tuple[list[bytes], int | None]:
    """(the whole records of an event file, the offset where a truncated or damaged record
    starts, None when there is none). The data CRCs are not checked (records are kept
    byte-for-byte; a reader checks them)."""
    records, at = [], 0
    while at < len(blob):
        head = blob[at:at + 12]
        if len(head) < 12 or struct.unpack("<I", head[8:])[0] != masked_crc(head[:8]):
            return records, at
        (length,) = struct.unpack("<Q", head[:8])
        if at + 12 + length + 4 > len(blob):
            return records, at
        records.append(blob[at + 12:at + 12 + length])
        at += 16 + length
    return records, None


# ------------------------------------------------------------------ Event protobufs by hand

def _varint(n: int) -> bytes:
    n, out = n & ((1 << 64) - 1), bytearray()  # int64: two's complement
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def _field(number: int, wire: int, payload: bytes) -> bytes:
    key = _varint(number << 3 | wire)
    return key + (_varint(len(payload)) + payload if wire == 2 else payload)


def encode_event(wall_time: float, step: int, *, file_version: str | None = None,
                 scalars: Mapping[str, float] | None = None,
                 session_start: bool = False) -> bytes:
    """Event{wall_time=1 double, step=2 int64, file_version=3, summary=5 Summary{value=1
    Value{tag=1, simple_value=2 float}}, session_log=7 SessionLog{status=1: START=1}}
    (tensorboard/compat/proto/event.proto; 6 is the deprecated log_message)."""
    out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(int(step)))
    if file_version is not None:
        out += _field(3, 2, file_version.encode())
    if scalars:
        values = b"".join(_field(1, 2, _field(1, 2, tag.encode()) + _field(2, 5, _f32(value)))
                          for tag, value in scalars.items())
        out += _field(5, 2, values)
    if session_start:
        out += _field(7, 2, _field(1, 0, _varint(1)))
    return out


def _f32(value: float) -> bytes:
    try:
        return struct.pack("<f", value)
    except OverflowError:  # finite, beyond float32: what float32 makes of it
        return struct.pack("<f", math.copysign(math.inf, value))


def event_fields(event: bytes) -> dict[int, int | bytes]:
    """{field number: value} of an encoded Event's top-level fields (the last of a repeated
    one): varints as ints (int64 two's complement undone), the others as their bytes."""
    out: dict[int, int | bytes] = {}
    at = 0
    while at < len(event):
        key, at = _read_varint(event, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _read_varint(event, at)
            out[number] = value - (1 << 64) if value >> 63 else value
            continue
        if wire == 2:
            size, at = _read_varint(event, at)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
        else:
            raise ValueError(f"protobuf wire type {wire}")
        out[number], at = event[at:at + size], at + size
    return out


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if not byte & 0x80:
            return value, at


def scalars_of(row: Mapping[str, Any], prefix: str = "", skip: tuple = ("step",)) -> dict:
    """{tag: float} of a metrics row: numbers (bools as 0/1) as they are, per-position lists
    as `name/pos_k`; other values (strings, nested objects) are left out."""
    out = {}
    for name, value in row.items():
        if name in skip:
            continue
        if isinstance(value, bool | int | float):
            out[f"{prefix}{name}"] = float(value)
        elif isinstance(value, list | tuple):
            for k, v in enumerate(value):
                if isinstance(v, bool | int | float):
                    out[f"{prefix}{name}/pos_{k}"] = float(v)
    return out


# -------------------------------------------------------------------------- the writers

def repair_jsonl(path: storage.AnyPath, resume_step: int) -> list[str]:
    """Rewrite `path` keeping the rows up to `resume_step`; a damaged row (not a JSON object
    with an integer step) is dropped with a warning naming the file and line. The kept lines."""
    kept = []
    if path.exists():
        text = storage.read_bytes(path).decode("utf-8", errors="replace")
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                step = row["step"] if isinstance(row, dict) else None
            except (json.JSONDecodeError, KeyError):
                step = None
            if not isinstance(step, int):
                log.warning("%s:%d: damaged metrics row dropped (%r)", path, i, line[:60])
            elif step <= resume_step:
                kept.append(line)
    storage.write_text(path, "".join(k + "\n" for k in kept))
    return kept


class _Appender:
    """Appends bytes to one file: locally at once; on an object store buffered and rewritten
    whole at most every `flush_every_s` seconds (and at `flush`)."""

    def __init__(self, path: storage.AnyPath, flush_every_s: float,
                 clock: Callable[[], float], initial: bytes = b"", written: bool = True):
        self.path, self.flush_every_s, self.clock = path, flush_every_s, clock
        self.remote = storage.is_object_store(path)
        self.buffer, self.dirty, self.last_flush = bytearray(initial), not written, clock()

    def append(self, data: bytes) -> None:
        if not self.remote:
            try:
                with open(self.path, "ab") as f:
                    f.write(data)
            except OSError as e:  # a full disk: name the file (the buffered write's error won't)
                raise OSError(f"{self.path}: cannot append ({e.strerror or e}); the rows and "
                              "checkpoints written before are intact") from e
            return
        self.buffer += data
        self.dirty = True
        if self.clock() - self.last_flush >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        if self.remote and self.dirty:
            storage.write_bytes(self.path, bytes(self.buffer))
            self.dirty, self.last_flush = False, self.clock()


class EventWriter:
    """This start's TensorBoard event file(s) in `directory` (see the module doc)."""

    def __init__(self, directory: storage.AnyPath, resume_step: int, *,
                 flush_every_s: float = 30.0, clock: Callable[[], float] = time.time):
        self.directory, self.clock, self.flush_every_s = directory, clock, flush_every_s
        storage.mkdir(directory)
        cut_event_files(directory, resume_step)
        # readers take the files in name order: this start's sorts after all older ones
        older = [int(n.split(".")[3]) for n in storage.listdir(directory)
                 if n.startswith("events.out.tfevents.") and n.split(".")[3].isdigit()]
        stamp = max([int(clock()), *(t + 1 for t in older)])
        self.stem = f"events.out.tfevents.{stamp:010d}.{socket.gethostname()}.{os.getpid()}"
        self.segment, self.file = 0, None
        self._open()
        if resume_step > 0:
            self.file.append(tfrecord(encode_event(clock(), resume_step, session_start=True)))

    def _open(self) -> None:
        path = self.directory / f"{self.stem}.{self.segment:04d}"
        header = tfrecord(encode_event(self.clock(), 0, file_version="brain.Event:2"))
        if storage.is_object_store(path):
            self.file = _Appender(path, self.flush_every_s, self.clock, header, written=False)
        else:
            storage.write_bytes(path, header)
            self.file = _Appender(path, self.flush_every_s, self.clock)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if not values:
            return
        self.file.append(tfrecord(encode_event(self.clock(), step, scalars=values)))
        if self.file.remote and len(self.file.buffer) > SEGMENT_BYTES and not self.file.dirty:
            self.segment += 1
            self._open()


def cut_event_files(directory: storage.AnyPath, resume_step: int) -> None:
    """Remove from the event files in `directory` the events at steps >= `resume_step` (and a
    damaged tail, with a warning); a file left with no data is deleted."""
    for name in storage.listdir(directory):
        if "tfevents" not in name:
            continue
        path = directory / name
        records, damaged = read_records(storage.read_bytes(path))
        if damaged is not None:
            log.warning("%s: damaged event record at byte %d and after dropped", path, damaged)
        kept = [r for r in records if event_fields(r).get(2, 0) < resume_step]
        if len(kept) == len(records) and damaged is None:
            continue
        if not any(5 in f or 7 in f for f in map(event_fields, kept)):  # no data left
            storage.remove(path)
        else:
            storage.write_bytes(path, b"".join(tfrecord(r) for r in kept))


def check_wandb(settings: Mapping[str, Any] | None, field: str = "wandb") -> None:
    """A one-line error when W&B is asked for (`settings` non-empty) but not importable."""
    if not settings:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ValueError(f"{field} is set but the wandb package is not installed: "
                         f"pip install wandb, or unset {field}") from None


class MetricsLog:
    """See the module doc. `write(row)` per logged step (row["step"]: the completed step),
    `log_round(row)` per OPD round, `log_eval(step, name, tau)`, then `close()`."""

    def __init__(self, workdir: storage.AnyPath, resume_step: int, *, tensorboard: bool = True,
                 wandb: Mapping[str, Any] | None = None, wandb_field: str = "wandb",
                 is_main: bool = True, flush_every_s: float = 30.0,
                 clock: Callable[[], float] = time.time):
        self.is_main = is_main
        self.events: EventWriter | None = None
        self.wandb_run: Any = None
        self._wandb_from = 0
        if not is_main:
            return
        check_wandb(wandb, wandb_field)
        path = workdir / "metrics.jsonl"
        kept = repair_jsonl(path, resume_step)
        initial = "".join(k + "\n" for k in kept).encode() if storage.is_object_store(path) else b""
        self.jsonl = _Appender(path, flush_every_s, clock, initial)
        if tensorboard:
            self.events = EventWriter(workdir / TENSORBOARD_DIR, resume_step,
                                      flush_every_s=flush_every_s, clock=clock)
            last = json.loads(kept[-1]) if kept else {}
            if resume_step > 0 and last.get("step") == resume_step:
                self.events.scalars(resume_step, scalars_of(last))
        if wandb:
            self.wandb_run = _init_wandb(dict(wandb), workdir)
            self._wandb_from = max(int(getattr(self.wandb_run, "step", 0) or 0), 0)

    def _emit(self, step: int, values: dict) -> None:
        if self.events is not None:
            self.events.scalars(step, values)
        if self.wandb_run is not None and step >= self._wandb_from and values:
            self.wandb_run.log(values, step=step)

    def write(self, row: Mapping[str, Any]) -> None:
        """One training row: a metrics.jsonl line, its scalars to TensorBoard and W&B."""
        if self.is_main:
            self.jsonl.append((json.dumps(row) + "\n").encode())
            self._emit(int(row["step"]), scalars_of(row))

    def log_round(self, row: Mapping[str, Any]) -> None:
        """An OPD round's row (rounds.jsonl's): its numbers as `opd/<field>` at row["step"]."""
        if self.is_main:
            self._emit(int(row["step"]), scalars_of(row, prefix="opd/", skip=("step", "round")))

    def log_eval(self, step: int, name: str, tau: float) -> None:
        """An evaluation's mean acceptance length tau as `eval/<name>/tau`."""
        if self.is_main:
            self._emit(int(step), {f"eval/{name}/tau": float(tau)})

    def flush(self) -> None:
        if self.is_main:
            self.jsonl.flush()
            if self.events is not None:
                self.events.file.flush()

    def close(self, exit_code: int = 0, preempted: bool = False) -> None:
        """Flush everything; finish the W&B run with `exit_code` (`preempted`: marked as
        preempting, so W&B shows it as resumable rather than failed)."""
        if not self.is_main:
            return
        self.flush()
        if self.wandb_run is not None:
            if preempted and hasattr(self.wandb_run, "mark_preempting"):
                self.wandb_run.mark_preempting()
            self.wandb_run.finish(exit_code=exit_code)
            self.wandb_run = None


def _init_wandb(settings: dict, workdir: storage.AnyPath) -> Any:
    """wandb.init with the run id kept in WORKDIR/wandb_run_id (resume="allow")."""
    import wandb

    id_path = workdir / WANDB_ID_FILE
    run_id = storage.read_text(id_path).strip() if id_path.exists() else ""
    if not run_id:
        run_id = uuid.uuid4().hex[:12]
        storage.write_text(id_path, run_id + "\n")
    kwargs: dict[str, Any] = {"id": run_id, "resume": "allow"}
    if not storage.is_object_store(workdir):
        kwargs["dir"] = os.fspath(workdir)
    return wandb.init(**{**kwargs, **settings})
