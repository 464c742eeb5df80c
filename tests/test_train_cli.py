"""train.py end to end on the tiny config: the contract run, resume after exit, bad input."""

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

# subprocesses: `-m "not slow"` skips them; one worker builds the contract run for both users
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("train_cli")]

ROOT = Path(__file__).resolve().parents[1]


def _train(workdir, *overrides, check=True):
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/tiny.py"),
           f"--config.workdir={workdir}", "--config.train.progress=False", *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    if check:
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def contract_run(tmp_path_factory):
    """The outside contract: `train.py --config configs/tiny.py --config.workdir=DIR`."""
    workdir = tmp_path_factory.mktemp("tiny")
    out = _train(workdir, "--config.train.max_steps=4", "--config.train.log_every=1",
                 "--config.train.save_every=2")
    return workdir, out


def _metrics(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("tokens_per_s")
    return rows


def test_contract_run_builds_target_and_exports(contract_run):
    workdir, out = contract_run
    assert "drafter (DFlash HF format)" in out.stdout
    assert (workdir / "target" / "config.json").exists()
    assert (workdir / "target" / "tokenizer.json").exists()
    hf = json.loads((workdir / "hf" / "config.json").read_text())
    assert hf["architectures"] == ["DFlashDraftModel"] and hf["block_size"] == 8
    assert [r["step"] for r in _metrics(workdir)] == [1, 2, 3, 4]
    row = _metrics(workdir)[-1]
    assert len(row["weight_per_position"]) == 8 and len(row["q_per_position"]) == 8


def _faulty(workdir, fault, *overrides, kill_after=None):
    """tests/fault_train.py (train.py that kills itself at `fault`), or train.py killed from
    outside `kill_after` seconds after its start; returns the exit code."""
    cmd = [sys.executable, str(ROOT / "tests" / "fault_train.py"), "--config",
           str(ROOT / "configs/tiny.py"), f"--config.workdir={workdir}",
           "--config.train.progress=False", *overrides]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, JAX_PLATFORMS="cpu", FAULT=fault))
    try:
        _, err = proc.communicate(timeout=kill_after or 600)
    except subprocess.TimeoutExpired:
        proc.kill()  # SIGKILL
        _, err = proc.communicate()
    assert proc.returncode in (0, -signal.SIGKILL), err[-3000:]
    return proc.returncode


def test_kill_9_anywhere_then_restart_equals_an_uninterrupted_run(contract_run, tmp_path):
    """kill -9 inside a checkpoint save (data written, step not committed), inside the deletion
    of an old step (half of it gone), and at a random moment; each restart resumes, and the end
    is bitwise the uninterrupted run: metrics rows 1..4 once each, the same exported drafter."""
    straight, _ = contract_run
    seed = int(os.environ.get("FAULT_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    shared = ["--config.train.max_steps=4", "--config.train.log_every=1",
              "--config.train.save_every=1", "--config.train.keep_checkpoints=1",
              f"--config.target.path={straight / 'target'}",
              f"--config.data.paths=('{straight / 'data' / 'demo.jsonl'}',)"]
    save_at = rng.randint(1, 4)
    why = f"FAULT_SEED={seed} (kill in save {save_at})"
    assert _faulty(tmp_path, f"save:{save_at}", *shared) == -signal.SIGKILL, why
    assert not (tmp_path / "hf").exists(), why
    # the first deletion of an old step in this process (with keep 1: at the second save)
    assert _faulty(tmp_path, "delete:1", *shared) == -signal.SIGKILL, why
    _faulty(tmp_path, "", *shared, kill_after=rng.uniform(1.0, 12.0))  # may also finish
    _train(tmp_path, *shared)
    assert _metrics(tmp_path) == _metrics(straight), why
    a = load_file(str(straight / "hf" / "model.safetensors"))
    b = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"{k}; {why}")
    # The run directory now holds a dpace checkpoint: another loss must not resume from it.
    out = _train(tmp_path, *shared, "--config.train.loss=dflash", check=False)
    assert out.returncode != 0 and "loss=\"dpace\", this run has \"dflash\"" in out.stderr
    assert "a new workdir" in out.stderr and "Traceback" not in out.stderr


def test_config_typo_and_missing_data_are_clear_errors(tmp_path):
    out = _train(tmp_path, "--config.train.lrr=1", check=False)
    assert out.returncode != 0 and "lrr" in out.stderr and 'Did you mean "lr"' in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1  # one line, no traceback
    out = _train(tmp_path / "neg", "--config.train.batch_size=-4", check=False)
    assert out.stderr.strip() == "error: train.batch_size=-4 must be >= 1"
    assert not (tmp_path / "neg").exists()  # refused before anything was built
    out = _train(tmp_path, f"--config.data.paths=('{tmp_path / 'nope.jsonl'}',)", check=False)
    assert out.returncode != 0 and "nope.jsonl" in out.stderr
    out = _train(tmp_path, "--config.train.attention=splash", check=False)
    assert out.returncode != 0 and "train.attention='splash'" in out.stderr
    out = _train(tmp_path, "--config.train.target_attention=cudnn", check=False)
    assert out.returncode != 0 and "train.target_attention=cudnn needs an NVIDIA GPU" in out.stderr


def test_a_dflash2_drafter_trains_exports_and_reimports(contract_run, tmp_path):
    """drafter.arch=dflash2 through train.py: the selector's metrics are logged, the export is a
    DFlash2DraftModel that re-imports to the checkpoint's weights bit for bit. (evaluate.py's
    decoding of a trained DFlash 2 export, lossless and step by step as z-lab's reference:
    tests/test_trained_crosscheck.py.)"""
    import jax

    from dpace_jax.infer import generation

    contract, _ = contract_run
    _train(tmp_path, f"--config.target.path={contract / 'target'}", "--config.train.max_steps=4",
           "--config.train.log_every=1", "--config.drafter.arch=dflash2",
           "--config.drafter.selector_rank=16", "--config.drafter.selector_top_k=8",
           "--config.train.selector_warmup_ratio=0.25")
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf["architectures"] == ["DFlash2DraftModel"]
    assert hf["dflash_config"]["selector_top_k"] == 8 and hf["dflash_config"]["block_size"] == 8
    rows = _metrics(tmp_path)
    assert [r["selector_alpha"] for r in rows] == [0, 1, 1, 1]  # warm-up: the first step only
    assert all(0 <= r[k] <= 1 for r in rows for k in ("topk_recall", "selector_accuracy",
                                                      "walk_changed"))
    checkpoint = generation.load_drafter(tmp_path)
    exported = generation.load_drafter(tmp_path / "hf")
    assert checkpoint.config == exported.config and exported.config.arch == "dflash2"
    for a, b in zip(jax.tree.leaves(checkpoint.params), jax.tree.leaves(exported.params),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
