"""dpace_jax.io.lock: one run per workdir; stale locks of dead processes are taken over."""

import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dpace_jax.io import lock as lock_lib
from dpace_jax.io import storage

ROOT = Path(__file__).resolve().parents[1]


def _record(path, **fields):
    rec = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": None, "boot_id": None,
           "started_at": time.time(), "heartbeat_at": time.time(), "command": "train.py x",
           "token": "t0"}
    rec.update(fields)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))
    return rec


@pytest.fixture
def sleeper():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield p
    p.kill()
    p.wait()


def test_acquire_writes_the_holder_record_and_release_removes_it(tmp_path):
    with lock_lib.WorkdirLock(tmp_path / "w", heartbeat_s=0) as lock:
        rec = json.loads((tmp_path / "w" / "run.lock").read_text())
        assert rec["host"] == socket.gethostname() and rec["pid"] == os.getpid()
        assert rec["command"] == shlex.join([sys.executable, *sys.argv]) and len(rec["token"]) == 32
        assert rec["pid_start"] == lock_lib.process_start_time(os.getpid())
        assert lock.record == rec
    assert sorted(os.listdir(tmp_path / "w")) == []


@pytest.mark.skipif(sys.platform != "linux", reason="/proc")
def test_process_start_time_tells_processes_apart(sleeper):
    mine = lock_lib.process_start_time(os.getpid())
    assert mine == lock_lib.process_start_time(os.getpid()) and mine.isdigit()
    # independent: ps reports the same start, in seconds since boot
    ticks = os.sysconf("SC_CLK_TCK")
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    etimes = int(subprocess.run(["ps", "-o", "etimes=", "-p", str(sleeper.pid)],
                                capture_output=True, text=True).stdout)
    started = int(lock_lib.process_start_time(sleeper.pid)) / ticks
    assert abs((uptime - started) - etimes) <= 2
    assert lock_lib.process_start_time(2 ** 22 + 7) is None


def test_a_live_holder_refuses_a_second_start_in_one_line(tmp_path, sleeper):
    path = tmp_path / "run.lock"
    _record(path, pid=sleeper.pid, pid_start=lock_lib.process_start_time(sleeper.pid),
            boot_id=lock_lib.boot_id(), command="python train.py --config.workdir=w")
    with pytest.raises(lock_lib.WorkdirLockError) as e:
        lock_lib.WorkdirLock(tmp_path).acquire()
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{tmp_path} is in use by another run: host {socket.gethostname()}, "
                          f"pid {sleeper.pid} (since ")
    assert "python train.py --config.workdir=w" in msg and f"delete {path}" in msg
    assert json.loads(path.read_text())["token"] == "t0"  # untouched


def test_a_dead_holder_is_taken_over_with_a_warning(tmp_path, caplog):
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                       capture_output=True, text=True)
    dead = int(p.stdout)
    _record(tmp_path / "run.lock", pid=dead)
    with lock_lib.WorkdirLock(tmp_path, heartbeat_s=0) as lock:
        assert lock.read()["pid"] == os.getpid()
    assert (f"{tmp_path / 'run.lock'}: taking over the lock of host {socket.gethostname()}, "
            f"pid {dead} (since ") in caplog.text
    assert f"process {dead} is not running" in caplog.text


@pytest.mark.skipif(sys.platform != "linux", reason="/proc")
def test_a_reused_pid_or_a_reboot_is_a_stale_lock(tmp_path, caplog):
    _record(tmp_path / "run.lock", pid_start="1")  # our pid, another process's start time
    with lock_lib.WorkdirLock(tmp_path, heartbeat_s=0):
        pass
    assert f"pid {os.getpid()} now belongs to another process" in caplog.text
    _record(tmp_path / "run.lock", boot_id="another-boot")
    with lock_lib.WorkdirLock(tmp_path, heartbeat_s=0):
        pass
    assert "this machine has restarted since" in caplog.text


def test_another_pid_namespace_on_this_host_is_judged_by_its_heartbeat(tmp_path, caplog):
    # another container with this host name: pid 2**22+7 is not ours to look up
    _record(tmp_path / "run.lock", pid=2 ** 22 + 7, pid_ns="pid:[1]")
    with pytest.raises(lock_lib.WorkdirLockError, match="is in use by another run"):
        lock_lib.WorkdirLock(tmp_path).acquire()
    _record(tmp_path / "run.lock", pid=2 ** 22 + 7, pid_ns="pid:[1]", heartbeat_at=0.0)
    with lock_lib.WorkdirLock(tmp_path, heartbeat_s=0):
        pass
    assert "no heartbeat for" in caplog.text


def test_other_hosts_are_judged_by_their_heartbeat(tmp_path, caplog):
    now = [1000.0]
    _record(tmp_path / "run.lock", host="other-host", pid=1, heartbeat_at=700.0)
    with pytest.raises(lock_lib.WorkdirLockError, match=r"host other-host, pid 1 .* last "
                                                        r"heartbeat 300 s ago"):
        lock_lib.WorkdirLock(tmp_path, stale_after_s=600, clock=lambda: now[0]).acquire()
    now[0] = 1301.0
    with lock_lib.WorkdirLock(tmp_path, stale_after_s=600, heartbeat_s=0, clock=lambda: now[0]):
        pass
    assert "taking over the lock of host other-host, pid 1" in caplog.text
    assert "no heartbeat for 601 s (> stale_after_s=600)" in caplog.text


@pytest.mark.parametrize("text", ['{"host": ', '[1]', '{"host": "h", "pid": "x", '
                                  '"heartbeat_at": 1, "started_at": 1}'])
def test_a_damaged_lock_is_refused(tmp_path, text):
    (tmp_path / "run.lock").write_text(text)
    with pytest.raises(lock_lib.WorkdirLockError, match=r"run.lock is damaged .*delete it"):
        lock_lib.WorkdirLock(tmp_path).acquire()


def test_release_never_removes_another_runs_lock(tmp_path, caplog):
    lock = lock_lib.WorkdirLock(tmp_path, heartbeat_s=0).acquire()
    _record(tmp_path / "run.lock", host="other-host", pid=77, token="theirs")
    lock.release()
    assert json.loads((tmp_path / "run.lock").read_text())["token"] == "theirs"
    assert "run.lock: not removed, it is held by host other-host, pid 77" in caplog.text


def test_the_heartbeat_refreshes_and_notices_a_takeover(tmp_path):
    lock = lock_lib.WorkdirLock(tmp_path, heartbeat_s=0.05).acquire()
    try:
        first = lock.read()["heartbeat_at"]
        deadline = time.time() + 10
        while lock.read()["heartbeat_at"] == first and time.time() < deadline:
            time.sleep(0.02)
        assert lock.read()["heartbeat_at"] > first and lock.read()["token"] == lock.record["token"]
        lock.check()
        _record(tmp_path / "run.lock", host="other-host", pid=5, token="theirs")
        while not lock.lost and time.time() < deadline:
            time.sleep(0.02)
        with pytest.raises(lock_lib.WorkdirLockError, match=r"taken over by host other-host, "
                                                            r"pid 5 .*stopping"):
            lock.check()
    finally:
        lock.release()
    assert json.loads((tmp_path / "run.lock").read_text())["token"] == "theirs"


def test_exactly_one_of_concurrent_starts_wins(tmp_path):
    code = ("import sys; from dpace_jax.io.lock import WorkdirLock, WorkdirLockError\n"
            "try:\n    lock = WorkdirLock(sys.argv[1], heartbeat_s=0).acquire()\n"
            "except WorkdirLockError:\n    sys.exit(3)\n"
            "sys.stdin.read(); lock.release()\n")  # held until the test closes stdin
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT,
                              stdin=subprocess.PIPE, text=True) for _ in range(4)]
    deadline = time.time() + 60
    while sum(p.poll() is not None for p in procs) < 3 and time.time() < deadline:
        time.sleep(0.05)
    holders = [p for p in procs if p.poll() is None]
    for p in procs:
        p.stdin.close()
    codes = sorted(p.wait(timeout=60) for p in procs)
    assert len(holders) == 1 and codes == [0, 3, 3, 3]
    assert not (tmp_path / "run.lock").exists()


def test_exactly_one_of_concurrent_takeovers_wins(tmp_path):
    _record(tmp_path / "run.lock", host="gone", pid=1, heartbeat_at=0.0)
    won, refused = [], []

    def start():
        try:
            won.append(lock_lib.WorkdirLock(tmp_path, heartbeat_s=0).acquire())
        except lock_lib.WorkdirLockError as e:
            refused.append(e)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 5
    assert json.loads((tmp_path / "run.lock").read_text())["token"] == won[0].record["token"]
    won[0].release()
    assert os.listdir(tmp_path) == []


def test_object_store_lock_is_create_if_absent_then_verified(caplog):
    with storage.fake_object_store("gs"):
        workdir = storage.resolve("gs://bucket/run")
        lock = lock_lib.WorkdirLock(workdir, heartbeat_s=0, settle_s=0).acquire()
        assert lock.read()["token"] == lock.record["token"]
        with pytest.raises(lock_lib.WorkdirLockError, match="gs://bucket/run is in use by "
                                                            "another run: this process"):
            lock_lib.WorkdirLock(workdir, settle_s=0).acquire()
        lock.heartbeat()
        lock.release()
        assert not (workdir / "run.lock").exists()
        storage.write_text(workdir / "run.lock", json.dumps(
            {"host": "gone", "pid": 1, "heartbeat_at": 0.0, "started_at": 0.0, "token": "x"}))
        with lock_lib.WorkdirLock(workdir, heartbeat_s=0, settle_s=0) as lock:
            assert lock.read()["pid"] == os.getpid()
    assert "gs://bucket/run/run.lock: taking over the lock of host gone, pid 1" in caplog.text


def test_only_process_0_locks_and_all_learn_the_outcome(tmp_path):
    shared = []
    main = lock_lib.acquire_on_main(tmp_path, is_main=True, share=lambda c: shared.append(c)
                                    or c, heartbeat_s=0)
    assert isinstance(main, lock_lib.WorkdirLock) and shared == [0]
    assert lock_lib.acquire_on_main(tmp_path, is_main=False, share=lambda c: 0) is None
    with pytest.raises(lock_lib.WorkdirLockError, match="in use by another run: this process"):
        lock_lib.acquire_on_main(tmp_path, is_main=True, share=lambda c: shared.append(c) or c)
    assert shared == [0, 1]  # process 0 took part in the broadcast before raising
    with pytest.raises(lock_lib.WorkdirLockError, match="process 0 could not lock the workdir"):
        lock_lib.acquire_on_main(tmp_path, is_main=False, share=lambda c: 1)
    main.release()


def test_without_hard_links_the_lock_is_created_exclusively(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")  # gcsfuse

    monkeypatch.setattr(lock_lib.os, "link", no_links)
    lock = lock_lib.WorkdirLock(tmp_path, heartbeat_s=0).acquire()
    assert lock.read()["token"] == lock.record["token"]
    with pytest.raises(lock_lib.WorkdirLockError, match="in use by another run: this process"):
        lock_lib.WorkdirLock(tmp_path).acquire()
    lock.release()
    assert os.listdir(tmp_path) == []
