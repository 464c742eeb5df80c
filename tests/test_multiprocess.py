"""train.py launched as two processes (jax.distributed over gloo on CPU, 2 devices each) trains
exactly like one process with the same 4 devices: each process feeds its own batch shard."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dpace_jax.demo import data as demo_data
from dpace_jax.demo import target as demo_target

pytestmark = pytest.mark.slow  # subprocesses or long compiles: `-m "not slow"` skips them

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(workdir, target, data, *extra):
    return [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/tiny.py"),
            f"--config.workdir={workdir}", f"--config.target.path={target}",
            f"--config.data.paths=('{data}',)", "--config.train.max_steps=3",
            "--config.train.log_every=1", "--config.train.progress=False", *extra]


def _env(devices):
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices),
                JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")


def _losses(workdir):
    rows = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(r)["loss"] for r in rows]


@pytest.mark.skipif(sys.platform != "linux", reason="gloo CPU collectives")
def test_two_processes_match_one(tmp_path):
    target = demo_target.build_random_target(tmp_path / "target")
    data = demo_data.write_demo_conversations(tmp_path / "demo.jsonl", num_samples=64)

    single = tmp_path / "single"
    out = subprocess.run(_cmd(single, target, data), env=_env(4), capture_output=True,
                         text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]

    multi = tmp_path / "multi"
    port = _free_port()
    procs = [subprocess.Popen(
        _cmd(multi, target, data, f"--config.coordinator_address=127.0.0.1:{port}",
             "--config.num_processes=2", f"--config.process_id={i}"),
        env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        for i in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert "drafter (DFlash HF format)" in results[0][0]

    np.testing.assert_allclose(_losses(multi), _losses(single), rtol=1e-5)
    from safetensors.numpy import load_file

    a = load_file(str(single / "hf" / "model.safetensors"))
    b = load_file(str(multi / "hf" / "model.safetensors"))
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=k)
