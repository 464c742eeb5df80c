"""One run per work directory: `WORKDIR/run.lock`, held for the run's life.

Two runs on one workdir (a scheduler's retry while the old copy still lives) would rewrite each
other's metrics.jsonl, save the same steps, and Orbax's start-up clean-up of temporary
directories would delete the other run's save in flight. `WorkdirLock` refuses the second start
in one line that names the holder.

The lock file holds a JSON record: host, pid, the process's start time (Linux: field 22 of
/proc/PID/stat, so that a reused pid is not taken for the holder) and the kernel's boot id,
started_at, heartbeat_at (refreshed by a thread every `heartbeat_s`), the command line and a
random token that identifies this acquisition (release removes the file only when the token is
still ours). A lock left by a dead process is taken over with a one-line warning naming it:
- same host (and boot): the pid is not running, or runs another process (start time differs);
- same host, another boot id: the machine restarted since;
- another host: its heartbeat is older than `stale_after_s` (the hosts' clocks must agree to
  well within that; a live holder refreshes it every `heartbeat_s`).

Creation is atomic locally: the record is written to a temporary file, then hard-linked to
`run.lock` (link fails when the name exists; it is atomic on NFS too, unlike O_EXCL on old
clients), so a reader never sees a half-written record. Object stores have no create-if-absent
through etils/fsspec: there the record is written if no lock is present, then read back after
`settle_s` to check that no other start overwrote it. That is best effort: two starts within
`settle_s` of each other can both proceed. A takeover renames the stale file aside first
(locally), so that of two starts taking over at once only one wins.

Multi-process runs: process 0 holds the lock (`acquire_on_main`), the others learn its outcome
through the trainer's broadcast (jax.experimental.multihost_utils.broadcast_one_to_all).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable

from dpace_jax.io import storage

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"


class WorkdirLockError(RuntimeError):
    """The workdir is held by another run (or the lock cannot be read); one line."""


def process_start_time(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (Linux), None elsewhere or
    when the process does not exist."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # the command name may hold spaces or ")"
    return fields[19] if len(fields) > 19 else None  # field 22 of the whole line


def boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


def pid_namespace() -> str | None:
    """This process's pid namespace (Linux), e.g. "pid:[4026531836]": two containers on one host
    can share a host name but not their pids."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return False
    return True


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def describe(record: dict) -> str:
    """`host H, pid P (since T)` of a lock record."""
    return (f"host {record.get('host', '?')}, pid {record.get('pid', '?')} "
            f"(since {_when(float(record.get('started_at', 0)))})")


class WorkdirLock:
    """`with WorkdirLock(workdir): ...` or `acquire()` / `release()`; see the module doc."""

    def __init__(self, workdir: storage.AnyPath | str, *, heartbeat_s: float = 60.0,
                 stale_after_s: float = 600.0, settle_s: float = 2.0,
                 clock: Callable[[], float] = time.time):
        self.workdir = workdir if not isinstance(workdir, str) else storage.resolve(workdir)
        self.path = self.workdir / LOCK_NAME
        self.heartbeat_s, self.stale_after_s, self.settle_s = heartbeat_s, stale_after_s, settle_s
        self.clock = clock
        self.record: dict | None = None  # ours, while held
        self.lost: str | None = None  # set by the heartbeat when another run took the lock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------------------- record
    def _new_record(self) -> dict:
        now = self.clock()
        return {"host": socket.gethostname(), "pid": os.getpid(),
                "pid_start": process_start_time(os.getpid()), "boot_id": boot_id(),
                "pid_ns": pid_namespace(),
                "started_at": now, "heartbeat_at": now,
                "command": shlex.join([sys.executable, *sys.argv]), "token": uuid.uuid4().hex}

    def read(self) -> dict | None:
        """The current lock record, None when there is no lock; a damaged one is {}."""
        try:
            text = storage.read_text(self.path)
        except FileNotFoundError:
            return None
        try:
            record = json.loads(text)
            float(record["heartbeat_at"]), float(record["started_at"])
            if not (isinstance(record["host"], str) and isinstance(record["pid"], int)):
                return {}
        except (ValueError, TypeError, KeyError):  # JSONDecodeError is a ValueError
            return {}
        return record

    def stale_reason(self, record: dict) -> str | None:
        """Why `record`'s holder is gone (a phrase), or None when it may be alive."""
        age = self.clock() - float(record["heartbeat_at"])
        same_host = record["host"] == socket.gethostname()
        if same_host and record.get("boot_id") and boot_id() and record["boot_id"] != boot_id():
            return "this machine has restarted since"
        ns, here = record.get("pid_ns"), pid_namespace()
        if not same_host or (ns and here and ns != here):  # its pid cannot be looked up here
            if age > self.stale_after_s:
                return f"no heartbeat for {age:.0f} s (> stale_after_s={self.stale_after_s:g})"
            return None
        pid = record["pid"]
        if pid <= 0 or not pid_alive(pid):
            return f"process {pid} is not running"
        start = process_start_time(pid)
        if record.get("pid_start") and start and start != record["pid_start"]:
            return f"pid {pid} now belongs to another process"
        return None

    def _refusal(self, record: dict) -> WorkdirLockError:
        ours = record.get("pid") == os.getpid() and record.get("host") == socket.gethostname()
        holder = "this process" if ours else describe(record)
        age = self.clock() - float(record.get("heartbeat_at", 0))
        return WorkdirLockError(
            f"{self.workdir} is in use by another run: {holder}, last heartbeat {age:.0f} s ago"
            f", command: {str(record.get('command', '?'))[:200]}. Stop that run (or wait for it)"
            f"; if it is gone for good, delete {self.path}")

    # ------------------------------------------------------------------------- acquire
    def acquire(self) -> WorkdirLock:
        """Hold the lock (taking over a stale one with a warning) or raise WorkdirLockError."""
        storage.mkdir(self.workdir)
        record = self._new_record()
        for _ in range(5):  # retries only when a concurrent start changed the lock meanwhile
            if self._create(record):
                self.record = record
                self._start_heartbeat()
                return self
            current = self.read()
            if current is None:
                continue
            if not current:
                raise WorkdirLockError(f"{self.path} is damaged (not a lock record): delete it "
                                       "if no run is using the workdir")
            reason = self.stale_reason(current)
            if reason is None:
                raise self._refusal(current)
            log.warning("%s: taking over the lock of %s: %s", self.path, describe(current),
                        reason)
            if not self._remove_stale(current):
                continue
        raise WorkdirLockError(f"{self.path}: could not acquire the lock (other starts keep "
                               "changing it); retry")

    def _create(self, record: dict) -> bool:
        """Create the lock file holding `record` if there is none; True when it is ours."""
        data = json.dumps(record, indent=1).encode()
        if storage.is_object_store(self.path):
            if self.path.exists():
                return False
            storage.write_bytes(self.path, data)
            time.sleep(self.settle_s)  # a start racing ours has written by now
            return (self.read() or {}).get("token") == record["token"]
        tmp = self.path.with_name(f".{LOCK_NAME}.{record['token']}.tmp")
        storage.write_bytes(tmp, data)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links (e.g. gcsfuse): O_EXCL, then the record
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _remove_stale(self, stale: dict) -> bool:
        """Remove the lock judged stale, unless it changed meanwhile; True when removed."""
        if storage.is_object_store(self.path):
            if (self.read() or {}).get("token") != stale.get("token"):
                return False
            storage.remove(self.path)
            return True
        aside = self.path.with_name(f".{LOCK_NAME}.stale.{uuid.uuid4().hex}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            moved = json.loads(aside.read_text())
        except (OSError, ValueError):
            moved = {}
        if moved.get("token") != stale.get("token"):  # another start's fresh lock:
            try:  # put it back
                os.link(aside, self.path)
            except FileExistsError:
                pass
            except OSError:  # no hard links: a rename (could replace a lock made meanwhile)
                if not self.path.exists():
                    os.rename(aside, self.path)
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    # ------------------------------------------------------------------------- heartbeat
    def _start_heartbeat(self) -> None:
        if self.heartbeat_s <= 0:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat",
                                        daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.heartbeat()
            except OSError as e:  # storage hiccup: try again at the next beat
                log.warning("%s: heartbeat not written (%s)", self.path, e)
            if self.lost:
                return

    def heartbeat(self) -> None:
        """Refresh heartbeat_at (the thread calls this); notes in `lost` a takeover."""
        if self.record is None:
            return
        current = self.read()
        if (current or {}).get("token") != self.record["token"]:
            self.lost = (f"{self.path}: the lock was taken over by "
                         f"{describe(current) if current else 'nobody (deleted)'}")
            log.error("%s", self.lost)
            return
        self.record = {**self.record, "heartbeat_at": self.clock()}
        storage.write_bytes(self.path, json.dumps(self.record, indent=1).encode())

    def check(self) -> None:
        """Raise WorkdirLockError when the lock was lost (another run took it over)."""
        if self.lost:
            raise WorkdirLockError(f"{self.lost}; stopping so that two runs do not share "
                                   f"{self.workdir}")

    # --------------------------------------------------------------------------- release
    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours (never another's)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self.record is None:
            return
        token, self.record = self.record["token"], None
        current = self.read()
        if current is None:
            return
        if current.get("token") != token:
            log.warning("%s: not removed, it is held by %s", self.path, describe(current))
            return
        storage.remove(self.path)

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def acquire_on_main(workdir: storage.AnyPath | str, *, is_main: bool,
                    share: Callable[[int], int] | None = None,
                    **kwargs) -> WorkdirLock | None:
    """Multi-process runs: process 0 acquires the lock, every process learns the outcome.

    `share(code)` must return process 0's `code` on every process (the trainer passes
    `lambda c: int(multihost_utils.broadcast_one_to_all(np.int32(c)))`; None in a single
    process). Every process calls this at the same point; all raise WorkdirLockError when
    process 0 could not acquire (process 0 with the holder's description). Returns the lock on
    process 0, None elsewhere."""
    lock, error = None, None
    if is_main:
        try:
            lock = WorkdirLock(workdir, **kwargs).acquire()
        except WorkdirLockError as e:
            error = e
    code = int(error is not None)
    if share is not None:
        code = int(share(code))
    if error is not None:
        raise error
    if code:
        raise WorkdirLockError(f"{workdir}: process 0 could not lock the workdir (its error "
                               "names the holder)")
    return lock
