"""Damaged state, changed settings and bad input: never a silent wrong drafter, always a clear
answer (checkpoint checksums and fallback, the non-finite policy, the resume fingerprint, damaged
metrics rows, file permissions)."""

from __future__ import annotations

import dataclasses
import json
import os
import runpy
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from drafter_fixtures import CFG

from dpace_jax import sharding as shard_lib
from dpace_jax.demo.prepare import prepare
from dpace_jax.drafters import hf as drafter_hf
from dpace_jax.drafters.dflash import init_drafter_params
from dpace_jax.infer import generation
from dpace_jax.train import checkpoint as ckpt_lib
from dpace_jax.train import loop as trainer
from dpace_jax.train import metrics
from dpace_jax.train import step as step_lib

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- checkpoints


def _state(seed):
    k = jax.random.PRNGKey(seed)
    return {"params": {"fc": jax.random.normal(k, (64, 32)), "norm": jnp.ones((32,), jnp.bfloat16)},
            "step": jnp.asarray(seed, jnp.int32)}


def _abstract(state):
    mesh = shard_lib.make_mesh((1, 1, 1), jax.devices()[:1])
    return ckpt_lib.abstract_like(state, jax.tree.map(lambda _: shard_lib.replicated(mesh),
                                                      state))


def _two_steps(path):
    ckpt = ckpt_lib.Checkpointer(path, keep=3)
    for step in (1, 2):
        ckpt.save(step, _state(step), {"data": step})
    ckpt.close()


def _flip_bytes(step_dir, every_file=False):
    files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and "/d/" in str(f)]
    for f in files if every_file else [max(files, key=lambda f: f.stat().st_size)]:
        raw = bytearray(f.read_bytes())
        raw[len(raw) // 2: len(raw) // 2 + 16] = os.urandom(16)
        f.write_bytes(bytes(raw))


DAMAGE = {
    "random bytes in an array file": _flip_bytes,
    "emptied step directory": lambda d: [shutil.rmtree(p) if p.is_dir() else p.unlink()
                                         for p in list(d.iterdir())],
    "state without meta (killed while deleting)": lambda d: shutil.rmtree(d / "meta"),
    "garbled meta": lambda d: [f.write_text("{not json") for f in (d / "meta").rglob("*")
                               if f.is_file()],
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_is_moved_aside_and_the_older_one_restores(tmp_path, damage):
    _two_steps(tmp_path / "checkpoints")
    DAMAGE[damage](tmp_path / "checkpoints" / "2")
    strict = ckpt_lib.Checkpointer(tmp_path / "checkpoints")
    with pytest.raises(ckpt_lib.CheckpointError, match=r"checkpoints/2: .*strict_resume"):
        strict.restore_latest(_abstract(_state(0)), strict=True)
    strict.close()
    ckpt = ckpt_lib.Checkpointer(tmp_path / "checkpoints")
    step, state, meta = ckpt.restore_latest(_abstract(_state(0)))
    ckpt.close()
    assert step == 1 and meta["data"] == 1
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 state, _state(1))
    [moved] = list((tmp_path / "checkpoints-unusable").iterdir())
    assert moved.name.startswith("2-") and not (tmp_path / "checkpoints" / "2").exists()


def test_a_step_without_orbax_metadata_still_restores_verified(tmp_path):
    """Orbax's _METADATA is not needed to read the arrays back; the checksums vouch for them."""
    _two_steps(tmp_path / "checkpoints")
    (tmp_path / "checkpoints" / "2" / "state" / "_METADATA").unlink()
    ckpt = ckpt_lib.Checkpointer(tmp_path / "checkpoints")
    step, state, _ = ckpt.restore_latest(_abstract(_state(0)), strict=True)
    ckpt.close()
    assert step == 2
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 state, _state(2))


def test_checksum_catches_a_changed_value(tmp_path):
    """A damaged value that still decodes is caught by the checksum, not restored."""
    ckpt = ckpt_lib.Checkpointer(tmp_path / "c", keep=3)
    ckpt.save(1, _state(1), {"data": 1})
    ckpt.close()
    meta_file = next(f for f in (tmp_path / "c" / "1" / "meta").rglob("*") if f.is_file())
    meta = json.loads(meta_file.read_text())
    meta["checksums"]["['params']['fc']"] ^= 1  # as if the array's bytes had changed
    meta_file.write_text(json.dumps(meta))
    ckpt = ckpt_lib.Checkpointer(tmp_path / "c")
    with pytest.raises(ckpt_lib.CheckpointError, match=r"c/1: checksum mismatch in "
                                                       r"\[\"\['params'\]\['fc'\]\"\]"):
        ckpt.restore(1, _abstract(_state(0)))
    ckpt.close()


# ----------------------------------------------------------------------------- small pieces


def test_damaged_metrics_rows_are_reported_and_dropped(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": 1.0}) for s in (10, 20, 30)]
    path.write_text(rows[0] + "\n" + '{"step": 2' + "\n" + rows[1] + "\n\x00\x01garbage\n"
                    + rows[2] + "\n")
    metrics.repair_jsonl(path, resume_step=20)
    assert [json.loads(r)["step"] for r in path.read_text().splitlines()] == [10, 20]
    assert f"{path}:2: damaged metrics row dropped" in caplog.text
    assert f"{path}:4: damaged metrics row dropped" in caplog.text


def test_export_refuses_non_finite_parameters(tmp_path):
    params = init_drafter_params(CFG, jax.random.PRNGKey(0))
    bad = dataclasses.replace(params, layers=dataclasses.replace(
        params.layers, q=params.layers.q.at[1, 0, 0, 0].set(jnp.nan)))
    with pytest.raises(ValueError, match=r"refusing to export .* 1 tensor\(s\) hold NaN or inf "
                                         r"\(layers.1.self_attn.q_proj.weight\)"):
        drafter_hf.export_drafter(bad, CFG, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_exports_are_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        out = drafter_hf.export_drafter(init_drafter_params(CFG, jax.random.PRNGKey(0)), CFG,
                                        tmp_path / "hf")
    finally:
        os.umask(old)
    assert {oct(f.stat().st_mode & 0o777) for f in out.iterdir()} == {"0o644"}


# ----------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny run config whose target and data are built once (configs/tiny.py, smaller)."""
    root = tmp_path_factory.mktemp("robust")
    c = runpy.run_path(str(ROOT / "configs" / "tiny.py"))["get_config"]()
    c.workdir = str(root / "base")
    c.data.demo_samples, c.train.max_steps, c.train.batch_size = 64, 8, 4
    c.train.num_anchors, c.train.save_every, c.train.log_every = 8, 2, 2
    c.train.progress = False
    prepare(c)
    return root, c


def _run(tiny, name, **fields):
    root, base = tiny
    c = base.copy_and_resolve_references()
    c.workdir = str(root / name)
    for key, value in fields.items():
        section, field = key.split("__")
        setattr(c[section], field, value)
    return trainer.run(c), root / name


@pytest.mark.slow
@pytest.mark.xdist_group("robustness_runs")
def test_resume_refuses_changed_settings_unless_allowed(tiny):
    _run(tiny, "changed", train__stop_at=4)
    with pytest.raises(ValueError, match=r"written with other settings: warmup_ratio=0.04, this "
                                         r"run has 0.2\. Use a new workdir.*allow_changed="):
        _run(tiny, "changed", train__warmup_ratio=0.2)
    with pytest.raises(ValueError, match=r"another drafter: .*drafter.num_hidden_layers=2, this "
                                         r"run has 3.*cannot take another shape"):
        _run(tiny, "changed", drafter__num_layers=3, drafter__target_layer_ids=(0, 1))
    summary, workdir = _run(tiny, "changed", train__warmup_ratio=0.2,
                            train__allow_changed=("warmup_ratio",))
    assert summary["finished"]
    history = [json.loads(r) for r in (workdir / "run_history.jsonl").read_text().splitlines()]
    assert history[0]["start_step"] == 0 and history[0]["changed"] == {}
    assert history[-1]["start_step"] == 4
    assert history[-1]["changed"] == {"warmup_ratio": [0.04, 0.2]}
    first = json.loads((workdir / "run_config.json").read_text())
    assert first["config"]["train"]["warmup_ratio"] == 0.04  # the first start's record stays


@pytest.mark.slow
@pytest.mark.xdist_group("robustness_runs")
def test_non_finite_steps_stop_the_run_or_are_skipped(tiny, monkeypatch):
    real = step_lib.make_train_step

    def poisoned_at_step_5(*args, **kwargs):
        step = real(*args, **kwargs)

        def run(state, target, batch):
            if int(state.step) == 4:  # the 5th step sees a NaN target
                target = dataclasses.replace(target, embed=target.embed * jnp.nan)
            return step(state, target, batch)

        return run

    monkeypatch.setattr(step_lib, "make_train_step", poisoned_at_step_5)
    with pytest.raises(FloatingPointError, match=r"step 5 are not finite .*nothing after "
                                                 r"step 4 was saved"):
        _run(tiny, "nan_stop")
    assert sorted(p.name for p in (tiny[0] / "nan_stop" / "checkpoints").iterdir()) == ["2", "4"]
    summary, workdir = _run(tiny, "nan_skip", train__nan_policy="skip-step")
    assert summary["finished"] and summary["final_metrics"]["skipped_steps"] == 1
    tensors = drafter_hf.import_drafter(workdir / "hf")[0]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tensors))


@pytest.mark.slow
@pytest.mark.xdist_group("robustness_runs")
def test_resume_past_a_damaged_checkpoint_equals_an_uninterrupted_run(tiny, capsys):
    straight, _ = _run(tiny, "straight")
    _run(tiny, "damaged", train__stop_at=6)
    _flip_bytes(tiny[0] / "damaged" / "checkpoints" / "6", every_file=True)
    # evaluate.py's loader skips the damaged step (and leaves it where it is)
    assert generation.load_drafter(tiny[0] / "damaged").source.endswith("checkpoints step 4")
    assert "checkpoints/6: cannot restore" in capsys.readouterr().err
    summary, workdir = _run(tiny, "damaged")
    assert summary["finished"]
    assert list((workdir / "checkpoints-unusable").iterdir())[0].name.startswith("6-")
    a = drafter_hf.import_drafter(tiny[0] / "straight" / "hf")[0]
    b = drafter_hf.import_drafter(workdir / "hf")[0]
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
