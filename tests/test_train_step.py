"""The jitted train step: learning, gradient flow, and 1-device vs 8-device-mesh agreement."""

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_fixtures import batches, tiny_setup

from dpace_jax import sharding as shard_lib
from dpace_jax.config import default_config
from dpace_jax.targets import model as model_lib
from dpace_jax.train import step as step_lib

pytestmark = pytest.mark.slow  # subprocesses or long compiles: `-m "not slow"` skips them

ROOT = Path(__file__).resolve().parent.parent


def _trainer(loss, steps, mesh=None, drafter_overrides=None, **step_overrides):
    tcfg, dcfg, target, drafter, step_cfg = tiny_setup(loss=loss, steps=steps)
    dcfg = dataclasses.replace(dcfg, **(drafter_overrides or {}))
    step_cfg = dataclasses.replace(step_cfg, **step_overrides)
    mesh = mesh or shard_lib.make_mesh((1, 1, 1), jax.devices()[:1])
    opt = step_lib.make_optimizer(step_cfg)
    state = step_lib.init_state(drafter, opt, seed=0)
    s_shard = step_lib.state_shardings(state, mesh, dcfg)
    t_shard = model_lib.shardings(tcfg, target, mesh)
    state = jax.device_put(state, s_shard)
    target = jax.device_put(target, t_shard)
    step = step_lib.make_train_step(tcfg, dcfg, step_cfg, opt, mesh, s_shard, t_shard)
    return state, target, step


@pytest.mark.parametrize("loss", ["dflash", "dpace"])
def test_loss_decreases(loss):
    steps = 200
    state, target, step = _trainer(loss, steps)
    data = batches(seed=1)
    history = []
    for _ in range(steps):
        state, metrics = step(state, target, next(data))
        history.append((float(metrics["loss"]), float(metrics["ce"]), float(metrics["accuracy"])))
    history = np.array(history)
    first, last = history[:10].mean(0), history[-10:].mean(0)
    assert np.all(np.isfinite(history))
    # The D-PACE loss value grows with q (its weights do), so learning shows in the CE.
    assert last[1] < 0.6 * first[1], (first, last)
    assert last[2] > first[2] + 0.4, (first, last)
    if loss == "dflash":
        assert last[0] < 0.6 * first[0]


def test_only_drafter_params_change_and_step_counts():
    state, target, step = _trainer("dpace", 10)
    target_before = jax.tree.map(np.asarray, target)
    params_before = jax.tree.map(np.asarray, state.params)
    data = batches()
    state, metrics = step(state, target, next(data))
    assert int(state.step) == 1 and float(metrics["lr"]) == 0.0  # warmup starts at 0
    state, metrics = step(state, target, next(data))
    assert int(state.step) == 2 and float(metrics["lr"]) > 0
    state, metrics = step(state, target, next(data))
    assert step._cache_size() == 1  # compiled once: no recompilation after the first step
    assert float(metrics["grad_norm"]) > 0
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)),
                           params_before, state.params)
    assert all(jax.tree.leaves(changed)), changed
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)),
                 target_before, target)
    # A step whose loss is not finite is counted but not applied (train.nan_policy).
    before = jax.tree.map(np.asarray, state)
    poisoned = dataclasses.replace(target, embed=target.embed.at[:].set(jnp.nan))
    state, metrics = step(state, poisoned, next(data))
    assert not bool(metrics["finite"]) and not np.isfinite(float(metrics["loss"]))
    assert int(state.step) == 4 and step._cache_size() == 1
    jax.tree.map(np.testing.assert_array_equal,
                 jax.tree.map(np.asarray, (state.params, state.opt_state)),
                 (before.params, before.opt_state))


def test_one_device_and_2x2x2_mesh_agree():
    script = textwrap.dedent("""
        import jax, numpy as np
        jax.config.update("jax_default_matmul_precision", "highest")
        from train_fixtures import batches
        from test_train_step import _trainer
        from dpace_jax import sharding as shard_lib
        assert len(jax.devices()) == 8
        results = []
        # The flash drafter attention (groups of 3 blocks, tiles of 8 columns) on the 2x2x2
        # mesh must give the same training as the dense path on one device.
        flash = dict(attention="flash", attention_group=3, attention_tile=8)
        for mesh, options in ((shard_lib.make_mesh((1, 1, 1), jax.devices()[:1]), {}),
                              (shard_lib.make_mesh((2, 2, 2)), {}),
                              (shard_lib.make_mesh((2, 2, 2)), flash)):
            state, target, step = _trainer("dpace", 10, mesh, **options)
            data = batches(seed=2, batch=4)
            losses = []
            for _ in range(3):
                state, m = step(state, target, next(data))
                losses.append(float(m["loss"]))
            results.append((losses, jax.tree.map(np.asarray, state.params)))
            if mesh.size == 8:
                q = state.params.layers.q
                spec = tuple(q.sharding.spec)
                assert spec[1] == "fsdp" and spec[2] == "tensor", spec
        (l1, p1), *others = results
        for l8, p8 in others:
            np.testing.assert_allclose(l1, l8, rtol=1e-5, atol=1e-6)
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                         p1, p8)
        print("MESH-OK", l1)
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu",  # this checkout's package and the test fixtures
               PYTHONPATH=os.pathsep.join(str(p) for p in (ROOT, Path(__file__).parent)))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "MESH-OK" in out.stdout


def test_step_config_comes_from_the_run_config_and_names_bad_fields():
    c = default_config()
    base = step_lib.StepConfig.from_config(c, 100)
    assert c.train.loss == "" and base.loss == "dpace"  # "": the supervised default
    assert (base.alpha, base.gamma, base.lr, base.total_steps) == (
        c.train.alpha, c.train.gamma, c.train.lr, 100)
    assert (base.loss_chunk_size, base.attention_tile) == (c.train.loss_chunk_size,
                                                           c.train.attention_tile)
    c.train.gamma = 0.0
    assert step_lib.StepConfig.from_config(c, 100).gamma is None  # 0: no decay
    cases = [(dict(attention="splash"), "train.attention='splash'"),
             (dict(attention="flash", attention_tile=0), "train.attention_tile=0"),
             (dict(target_attention="flash"), "train.target_attention='flash'.*cudnn"),
             (dict(alpha=1.5), "train.alpha=1.5"), (dict(gamma=-1.0), "train.gamma=-1.0"),
             (dict(num_anchors=0), "train.num_anchors=0"), (dict(lr=0.0), "train.lr=0.0"),
             (dict(warmup_ratio=1.0), "train.warmup_ratio=1.0")]
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(base, **change)


def test_sliding_window_drafter_trains_the_same_dense_and_flash():
    """A drafter whose layer slides (window 6, anchors >= 24) trains to the same losses and
    parameters with the dense and the flash block attention (the mask itself is checked against
    brute force in test_block_attention and test_drafter_hf)."""
    sliding = dict(layer_types=("sliding_attention",), sliding_window=6)
    runs = {}
    for name, overrides, options in (
            ("dense", sliding, {}),
            ("flash", sliding, dict(attention="flash", attention_group=3, attention_tile=8))):
        state, target, step = _trainer("dpace", 10, drafter_overrides=overrides, **options)
        data = batches(seed=3)
        losses = []
        for _ in range(4):
            state, metrics = step(state, target, next(data))
            losses.append(float(metrics["loss"]))
        runs[name] = (np.array(losses), jax.tree.map(np.asarray, state.params))
    np.testing.assert_allclose(runs["flash"][0], runs["dense"][0], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 runs["flash"][1], runs["dense"][1])
