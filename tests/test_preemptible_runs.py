"""train.py on preemptible capacity (issue 26), end to end on the tiny config: SIGTERM saves at
the next step boundary and exits 143 with one line, in one process and in a 2-process run (JAX's
preemption notice; the 2-process run, jax.distributed over gloo, trains like one process with
the same 4 devices); the resumed run ends bitwise equal to an uninterrupted one; a second start on
a live run's workdir is refused in one line naming the holder; a kill -9 leaves a stale lock that
the next start takes over."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("preemptible")]

ROOT = Path(__file__).resolve().parents[1]
PREEMPTED = re.compile(r"preempted \((SIGTERM|preemption notice)\) at step (\d+): checkpoint "
                       r"saved at step \2; run the same command to resume")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from dpace_jax.demo import data as demo_data
    from dpace_jax.demo import target as demo_target

    root = tmp_path_factory.mktemp("preemptible")
    target = demo_target.build_random_target(root / "target")
    data = demo_data.write_demo_conversations(root / "demo.jsonl", num_samples=64)
    return [f"--config.target.path={target}", f"--config.data.paths=('{data}',)",
            "--config.train.log_every=1", "--config.train.save_every=1000",
            "--config.train.progress=False"]


def _env(devices=1, **extra):
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices),
                JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", **extra)


def _cmd(workdir, *args, script="train.py"):
    return [sys.executable, str(ROOT / script), "--config", str(ROOT / "configs/tiny.py"),
            f"--config.workdir={workdir}", *args]


def _run(workdir, *args, env=None):
    out = subprocess.run(_cmd(workdir, *args), capture_output=True, text=True, timeout=600,
                         cwd=ROOT, env=env or _env())
    return out


def _own_lines(err: str) -> list[str]:
    """stderr without absl's and gloo's log lines."""
    return [line for line in err.splitlines()
            if line.strip() and not re.match(r"^[IWE]\d{4} |^\[Gloo\]", line)]


def _metrics(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def _same_drafter(a, b):
    x, y = load_file(str(a / "hf" / "model.safetensors")), load_file(str(b / "hf" /
                                                                          "model.safetensors"))
    assert x.keys() == y.keys()
    for k in x:
        np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _wait_for(path: Path, text: str, proc, timeout=300):
    end = time.time() + timeout
    while time.time() < end:
        if path.exists() and text in path.read_text():
            return
        assert proc.poll() is None, path.read_text()[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {path} after {timeout} s")


def test_sigterm_saves_exits_143_and_the_resume_equals_an_uninterrupted_run(inputs, tmp_path):
    steps = ["--config.train.max_steps=10"]
    straight = tmp_path / "straight"
    assert _run(straight, *inputs, *steps).returncode == 0

    cut, gate, err_file = tmp_path / "cut", tmp_path / "gate", tmp_path / "a.err"
    with open(err_file, "w") as err:
        first = subprocess.Popen(_cmd(cut, *inputs, *steps, script="tests/fault_train.py"),
                                 cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err,
                                 env=_env(FAULT="pause:4", FAULT_GATE=str(gate)))
    try:
        _wait_for(err_file, "paused at step 4", first)
        second = _run(cut, *inputs, *steps)  # a scheduler's retry while the first one lives
        assert second.returncode == 1
        [line] = _own_lines(second.stderr)
        assert line.startswith(f"error: {cut} is in use by another run: host ")
        assert f"pid {first.pid} (since " in line and "delete" in line and "run.lock" in line
        first.send_signal(signal.SIGTERM)
        gate.touch()
        assert first.wait(timeout=300) == 143
    finally:
        first.kill()
    lines = _own_lines(err_file.read_text())
    assert lines[-1] == ("preempted (SIGTERM) at step 4: checkpoint saved at step 4; run the "
                         "same command to resume"), lines
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["4"]
    assert not (cut / "run.lock").exists() and not (cut / "hf").exists()

    # kill -9 (no grace period at all): the lock stays behind, the next start takes it over
    with open(err_file, "w") as err:
        victim = subprocess.Popen(_cmd(cut, *inputs, *steps, script="tests/fault_train.py"),
                                  cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err,
                                  env=_env(FAULT="pause:6", FAULT_GATE=str(gate) + "x"))
    try:
        _wait_for(err_file, "paused at step 6", victim)
    finally:
        victim.kill()
    victim.wait()
    assert (cut / "run.lock").exists()
    resumed = _run(cut, *inputs, *steps)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"taking over the lock of host {os.uname().nodename}, pid {victim.pid}" in \
        resumed.stderr and f"process {victim.pid} is not running" in resumed.stderr
    history = [json.loads(r) for r in (cut / "run_history.jsonl").read_text().splitlines()]
    assert [h["start_step"] for h in history] == [0, 4, 4]  # the killed start saved nothing
    assert _metrics(cut) == _metrics(straight)
    _same_drafter(straight, cut)
    events = list((cut / "tensorboard").iterdir())
    assert len(events) >= 2  # one event file per start that logged


def _two_processes(workdir, inputs, *args, fault=""):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(
        _cmd(workdir, *inputs, *args, f"--config.coordinator_address=127.0.0.1:{port}",
             "--config.num_processes=2", f"--config.process_id={i}",
             script="tests/fault_train.py"),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=_env(2, FAULT=fault, FAULT_PROCESS="1")) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    return [p.returncode for p in procs], [err for _, err in outs], outs[0][0]


@pytest.mark.skipif(sys.platform != "linux", reason="gloo CPU collectives")
def test_two_processes_agree_on_the_preemption_step_and_resume_exactly(inputs, tmp_path):
    """The uninterrupted pair (2 devices each, each process feeding its own batch shard) trains
    like one process with the same 4 devices; SIGTERM reaches process 1 only; JAX's preemption
    service makes both save the same step and stop; the resumed pair ends bitwise equal to the
    uninterrupted pair."""
    steps = ["--config.train.max_steps=8"]
    codes, errs, out = _two_processes(tmp_path / "straight", inputs, *steps)
    assert codes == [0, 0], errs[0][-3000:]
    assert "drafter (DFlash HF format)" in out  # process 0 exported
    single = _run(tmp_path / "single", *inputs, *steps, env=_env(4))
    assert single.returncode == 0, single.stderr[-3000:]
    losses = [[r["loss"] for r in _metrics(tmp_path / w)] for w in ("straight", "single")]
    np.testing.assert_allclose(*losses, rtol=1e-5)
    a, b = (load_file(str(tmp_path / w / "hf" / "model.safetensors")) for w in ("straight",
                                                                                 "single"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=k)

    codes, errs, _ = _two_processes(tmp_path / "cut", inputs, *steps, fault="sigterm:3")
    assert codes == [143, 143], errs[0][-3000:] + errs[1][-3000:]
    found = [PREEMPTED.fullmatch(_own_lines(e)[-1]) for e in errs]
    assert all(found) and found[0].group(1) == "preemption notice", errs[0][-2000:]
    step = int(found[0].group(2))
    assert int(found[1].group(2)) == step and 3 <= step < 8
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == [str(step)]
    assert not (tmp_path / "cut" / "run.lock").exists()
    codes, errs, _ = _two_processes(tmp_path / "cut", inputs, *steps)
    assert codes == [0, 0], errs[0][-3000:]
    assert _metrics(tmp_path / "cut") == _metrics(tmp_path / "straight")
    _same_drafter(tmp_path / "straight", tmp_path / "cut")
