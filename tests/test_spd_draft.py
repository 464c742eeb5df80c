"""The SPD draft module (dpace_jax.infer.spd.draft): its inputs and loss against float64 NumPy, its
decoding hooks against its training forward, and a tiny train.mode=spd run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import spd_fixtures as F

from dpace_jax import sharding as shard_lib
from dpace_jax.config import default_config
from dpace_jax.drafters import dflash
from dpace_jax.infer.spd import draft as spd_draft
from dpace_jax.infer.spd import pipeline as spd
from dpace_jax.targets import model
from dpace_jax.train import spd as spd_training
from dpace_jax.train import step as step_lib

SEQ = 24


def setup(n, seed=0):
    target = F.random_target(F.CFG, 1)
    dcfg = spd_draft.draft_config(F.CFG, n, num_layers=2)
    params = dflash.init_drafter_params(dcfg, jax.random.PRNGKey(seed), scale=0.1)
    tokens = np.random.RandomState(seed).randint(0, F.CFG.vocab_size, (2, SEQ)).astype(np.int32)
    features = model.features(target, F.CFG, jnp.asarray(tokens), dcfg.target_layer_ids)
    return target, dcfg, params, tokens, features


def np_rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


@pytest.mark.parametrize("n", [2, 4])
def test_block_inputs_match_numpy(n):
    """u_j(d) = embed(token_j) + hidden_norm(sum_{k<d} b_{k+1}(j) W_k), depth d = offset when
    offset <= flush age, else n; from loops in float64."""
    target, dcfg, params, tokens, features = setup(n)
    heads = np.array([[n - 1, 10, 17], [SEQ - 2, n + 3, 12]], np.int32)
    ages = np.array([[n - 1, 0, 1 % n], [n - 1, n - 2 if n > 1 else 0, 0]], np.int32)
    cum = spd_draft.partial_sums(params, dcfg, features)
    got = np.asarray(spd_draft.block_inputs(params, dcfg, target.embed, jnp.asarray(tokens), cum,
                                            jnp.asarray(heads), jnp.asarray(ages)))
    d = F.CFG.hidden_size
    feats, fc = np.asarray(features, np.float64), np.asarray(params.fc, np.float64)
    emb, norm = np.asarray(target.embed, np.float64), np.asarray(params.hidden_norm, np.float64)
    for b in range(2):
        for m in range(3):
            for k in range(n):
                offset = n - 1 - k
                j = heads[b, m] - offset
                depth = offset if offset <= ages[b, m] else n
                part = sum((feats[b, j, i * d:(i + 1) * d] @ fc[i * d:(i + 1) * d]
                            for i in range(depth)), np.zeros(d))
                want = emb[tokens[b, j]] + np_rms(part, norm, dcfg.rms_norm_eps)
                np.testing.assert_allclose(got[b, m, k], want, rtol=2e-4, atol=2e-5)


def test_kl_loss_matches_numpy():
    rs = np.random.RandomState(3)
    draft, target = rs.standard_normal((2, 2, 5, 11)) * 2
    keep = rs.rand(2, 5) < 0.6
    loss, _ = spd_training.kl_loss(jnp.asarray(draft), jnp.asarray(target), jnp.asarray(keep))

    def logsm(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = logsm(target), logsm(draft)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    np.testing.assert_allclose(float(loss), kl[keep].mean(), rtol=1e-5)


@pytest.mark.parametrize("n,age", [(2, 1), (4, 0), (4, 3)])  # steady state, right after a flush
def test_decoding_hooks_equal_the_training_forward(n, age):
    """The pipeline's view a steps after a flush at r = h - a (finished positions < r from the
    prefill; position r + t entering at step t, the stage inputs b_s(r + t - s) gathered): the
    draft logits at h equal the training forward's with flush age a."""
    target, dcfg, params, tokens, features = setup(n)
    h, size = 15, SEQ + 4
    r = h - age
    d = F.CFG.hidden_size
    want = spd_draft.train_logits(params, dcfg, target, features, jnp.asarray(tokens),
                                  jnp.full((2, 1), h), jnp.full((2, 1), age))[:, 0]
    boundary = jnp.stack([features[:, :r, s * d:(s + 1) * d] for s in range(n)])
    drafter = spd_draft.spd_drafter(params, dcfg, F.CFG)
    state = drafter.init(params, dcfg, target, jnp.asarray(tokens[:, :r]), boundary, size)
    seq = jnp.zeros((2, size), jnp.int32).at[:, :SEQ].set(tokens)
    for t in range(age + 1):
        head = r + t
        states = [jnp.take(target.embed, tokens[:, head], axis=0)]
        states += [features[:, head - s, (s - 1) * d:s * d] for s in range(1, n)]
        valid = jnp.asarray([[s <= t] * 2 for s in range(n)])
        view = spd.View(seq, jnp.full((2,), head), jnp.full((2,), r - 1), jnp.stack(states),
                        valid)
        state, got = drafter.draft(params, dcfg, target, state, view)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # a train-step compilation (~15 s cold)
def test_a_tiny_spd_training_lowers_the_loss():
    """train_step with the SPD objective (train.mode=spd) on a learnable stream: the KL falls and
    the draft module comes to agree with the target's argmax."""
    from train_fixtures import batches

    target = F.random_target(F.CFG, 1, scale=0.2)
    dcfg = spd_draft.draft_config(F.CFG, 2, num_layers=1)
    c = default_config()
    c.train.loss, c.train.num_anchors, c.train.lr = "kl", 16, 1e-2
    c.train.compute_dtype, c.train.warmup_ratio = "float32", 0.05
    step_cfg = step_lib.StepConfig.from_config(c, 60)
    opt = step_lib.make_optimizer(step_cfg)
    state = step_lib.init_state(dflash.init_drafter_params(dcfg, jax.random.PRNGKey(0)), opt, 0)
    mesh = shard_lib.make_mesh((1, 1, 1), jax.devices()[:1])
    shardings = step_lib.state_shardings(state, mesh, dcfg)
    rep = shard_lib.replicated(mesh)
    step = step_lib.make_train_step(F.CFG, dcfg, step_cfg, opt, mesh, shardings,
                                    jax.tree.map(lambda _: rep, target),
                                    objective=spd_training.loss_fn)
    data = batches()
    losses, accs = [], []
    for _ in range(60):
        state, m = step(state, target, next(data))
        losses.append(float(m["loss"]))
        accs.append(float(m["accuracy"]))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])  # measured: 1.01 -> 0.35
    assert np.mean(accs[-5:]) > np.mean(accs[:5]) + 0.1  # measured: 0.01 -> 0.23


def test_a_config_that_is_not_the_stage_boundaries_is_refused():
    dcfg = dflash.DrafterConfig.for_target(F.CFG, num_layers=1, block_size=2, mask_token_id=0,
                                           target_layer_ids=(0, 2))
    with pytest.raises(ValueError, match=r"target_layer_ids=\[1, 3\]"):
        spd_draft.check(dcfg, F.CFG)


@pytest.mark.slow
def test_train_py_trains_and_exports_a_draft_module(tmp_path):
    """train.py with train.mode=spd on the tiny config (a 3-layer random target: 3 stages):
    trains, logs, exports a module that loads back for SPD; a config whose feature layers are
    not the stage boundaries is refused naming the field."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from dpace_jax.infer import generation
    from dpace_jax.targets import hf as convert

    root = Path(__file__).resolve().parents[1]

    def train(*overrides):
        cmd = [sys.executable, str(root / "train.py"), "--config", str(root / "configs/tiny.py"),
               f"--config.workdir={tmp_path}", "--config.train.progress=False",
               "--config.train.mode=spd", "--config.drafter.block_size=3",
               "--config.drafter.mask_token_id=0", "--config.train.max_steps=3",
               "--config.train.log_every=1", *overrides]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root,
                              env=dict(os.environ, JAX_PLATFORMS="cpu"))

    out = train("--config.drafter.target_layer_ids=(0,1,2)")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and 0 <= r["accuracy"] <= 1 for r in rows)
    module = generation.load_drafter(tmp_path / "hf")
    spd_draft.spd_drafter(module.params, module.config,
                          convert.load_config(tmp_path / "target"))  # fits the target
    bad = train("--config.drafter.target_layer_ids=(0,1,1)",
                f"--config.workdir={tmp_path / 'other'}",
                f"--config.target.path={tmp_path / 'target'}")
    assert bad.returncode != 0 and "target_layer_ids=[0, 1, 2]" in bad.stderr + bad.stdout
