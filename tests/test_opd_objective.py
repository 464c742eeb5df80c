"""The on-policy objectives of a replay batch (dpace_jax.train.opd.objective) against float64
NumPy: Draft-OPD's loss under each teacher (softmax / verify) and rejected stream (first / suffix),
with and without D-PACE weights, and the total variation (greedy verify teacher, tempered and
softmax teachers from the target's hidden states; per position and per block): values, and
gradients with respect to the drafter's hidden states (analytic through the OPD reference's
log-prob gradients, central finite differences of the NumPy TV)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_opd_loss import EPS32, ref_opd
from test_opd_teacher import np_log_softmax, np_verify_teacher

from dpace_jax.config import default_config
from dpace_jax.train.opd import objective as O
from dpace_jax.train.settings import OpdConfig

B, N, K, D, V, S = 2, 3, 5, 6, 11, 16


def opd_settings(**fields):
    return dataclasses.replace(OpdConfig.from_config(default_config().opd, False), **fields)


def make_batch(seed=0):
    """A replay batch with ragged realized prefixes, a first rejected draft in most blocks, a
    suffix after it, and verify log-probs that are 0 or the floor (greedy) or anything."""
    rng = np.random.default_rng(seed)
    anchors = np.sort(rng.choice(S - 2, (B, N)), axis=-1).astype(np.int32)
    keep = np.ones((B, N), bool)
    keep[1, 2] = False
    length = rng.integers(1, K, (B, N))  # realized offsets 1..length
    pos = np.arange(K)
    real_mask = (pos >= 1) & (pos <= length[..., None]) & (anchors[..., None] + pos < S)
    rej_mask = (rng.random((B, N)) < 0.8) & (length < K - 1)
    rej_offset = np.where(rej_mask, length, 1).astype(np.int32)
    sfx_mask = rej_mask[..., None] & (pos > rej_offset[..., None])
    f = np.float32
    return {
        "input_ids": rng.integers(0, V, (B, S)).astype(np.int32), "anchors": anchors,
        "keep": keep, "real_mask": real_mask,
        "logp_real": np.minimum(rng.normal(-1.0, 1.0, (B, N, K)), -0.01).astype(f),
        "vlogp_real": np.where(rng.random((B, N, K)) < 0.7, 0.0, -1e9).astype(f),
        "rej_token": rng.integers(0, V, (B, N)).astype(np.int32), "rej_offset": rej_offset,
        "logp_rej": rng.normal(-3.0, 1.0, (B, N)).astype(f),
        "vlogp_rej": np.where(rng.random((B, N)) < 0.3, -0.5, -1e9).astype(f),
        "rej_mask": rej_mask, "sfx_token": rng.integers(0, V, (B, N, K)).astype(np.int32),
        "logp_sfx": rng.normal(-2.5, 1.0, (B, N, K)).astype(f),
        "vlogp_sfx": np.where(rng.random((B, N, K)) < 0.4, -0.2, -1e9).astype(f),
        "sfx_mask": sfx_mask,
    }


def hidden_head(seed=1):
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 1, (B, N, K, D)).astype(np.float32),
            rng.normal(0, 0.8, (D, V)).astype(np.float32))


def labels_of(batch):
    pos = np.minimum(batch["anchors"][..., None] + np.arange(K), S - 1)
    return np.take_along_axis(batch["input_ids"], pos.reshape(B, -1), 1).reshape(B, N, K)


def ref_opd_objective(batch, hidden, head, opd):
    """float64: (loss, d loss / d hidden) from the logits hidden @ head and ref_opd."""
    z = np.asarray(hidden, np.float64) @ np.asarray(head, np.float64)
    logq = np_log_softmax(z)
    q = np.exp(logq)
    keep = batch["keep"]
    verify = opd.teacher == "verify"
    labels = labels_of(batch)
    real = batch["real_mask"] & keep[..., None]
    lq_real = np.take_along_axis(logq, labels[..., None], -1)[..., 0]
    cols = np.arange(K)
    first = (cols == batch["rej_offset"][..., None]) & (batch["rej_mask"] & keep)[..., None]
    sfx = batch["sfx_mask"] & keep[..., None] & (opd.rejected_stream == "suffix")
    rej_tok = np.where(cols == batch["rej_offset"][..., None], batch["rej_token"][..., None],
                       batch["sfx_token"])
    lp_rej = np.where(cols == batch["rej_offset"][..., None],
                      batch["vlogp_rej" if verify else "logp_rej"][..., None],
                      batch["vlogp_sfx" if verify else "logp_sfx"])
    lq_rej = np.take_along_axis(logq, rej_tok[..., None], -1)[..., 0]
    loss, g_real, g_rej, _ = ref_opd(
        lq_real, batch["vlogp_real" if verify else "logp_real"], real, lq_rej, lp_rej,
        np.broadcast_to(cols, first.shape), first | sfx, decay=opd.decay,
        rej_weight=opd.rejected_weight, alpha=0.5 if opd.dpace_weights else None, eps=EPS32)
    # d log q_y / d z = onehot(y) - q; d z / d hidden = head^T
    dz = (g_real[..., None] * (np.eye(V)[labels] - q)
          + g_rej.reshape(first.shape)[..., None] * (np.eye(V)[rej_tok] - q))
    return loss, dz @ np.asarray(head, np.float64).T


OPD_CASES = [dict(teacher=t, rejected_stream=r, dpace_weights=w)
             for t in ("softmax", "verify") for r in ("first", "suffix") for w in (False, True)]


@pytest.mark.parametrize("fields", OPD_CASES, ids=lambda f: "-".join(str(v) for v in f.values()))
def test_opd_objective_matches_numpy(fields):
    batch, (hidden, head) = make_batch(), hidden_head()
    opd = opd_settings(decay=0.7, rejected_weight=1.5, **fields)
    want, want_grad = ref_opd_objective(batch, hidden, head, opd)

    def f(h):
        return O.opd_objective(h, jnp.asarray(head), jax.tree.map(jnp.asarray, batch), opd=opd,
                               alpha=0.5, chunk_size=7)

    (loss, aux), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(hidden))
    np.testing.assert_allclose(float(loss), want, rtol=2e-5)
    # D-PACE weights hold q (fp32 in both): only the realized stream's weights differ by rounding
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=2e-3, atol=2e-6)
    assert np.abs(want_grad).max() > 1e-3
    n_sfx = int((batch["sfx_mask"] & batch["keep"][..., None]).sum())
    assert int(aux["n_suffix"]) == (n_sfx if fields["rejected_stream"] == "suffix" else 0)
    assert n_sfx >= 3


def ref_tv(batch, hidden, head, teacher_logp, how):
    """float64 TV objective value (teacher_logp [B, N, K, V] of each block position)."""
    z = np.asarray(hidden, np.float64) @ np.asarray(head, np.float64)
    q = np.exp(np_log_softmax(z))
    m = batch["real_mask"] & batch["keep"][..., None]
    tv = 1.0 - np.minimum(np.exp(teacher_logp), q).sum(-1)
    if how == "position":
        return float(tv[m].mean())
    losses = []
    for idx in np.ndindex(m.shape[:-1]):
        ks = np.nonzero(m[idx])[0]
        if len(ks):
            run = np.cumprod(np.clip(1.0 - tv[idx][ks], 0.0, 1.0))
            losses.append(1.0 - run.sum() / len(ks))
    return float(np.mean(losses))


def fd_grad(fun, x, h=1e-5):
    g = np.zeros_like(x, np.float64)
    for idx in np.ndindex(x.shape):
        up, dn = x.astype(np.float64), x.astype(np.float64)
        up[idx] += h
        dn[idx] -= h
        g[idx] = (fun(up) - fun(dn)) / (2 * h)
    return g


@pytest.mark.parametrize("teacher,temperature,how", [
    ("verify", 0.0, "position"), ("verify", 0.0, "block"), ("verify", 0.7, "position"),
    ("softmax", 0.0, "block")])
def test_tv_objective_matches_numpy(teacher, temperature, how):
    batch, (hidden, head) = make_batch(2), hidden_head(3)
    opd = opd_settings(teacher=teacher, temperature=temperature, tv_reduce=how)
    target_hidden = np.random.default_rng(4).normal(0, 1, hidden.shape).astype(np.float32)
    if O.needs_target_hidden("tv", opd):
        t = temperature if teacher == "verify" else 1.0
        teacher_logp = np_verify_teacher(target_hidden.astype(np.float64) @ head, t)
        given = jnp.asarray(target_hidden)
    else:  # the greedy verify teacher: one-hot on the realized token, no target needed
        teacher_logp = np.where(np.eye(V, dtype=bool)[labels_of(batch)], 0.0, -np.inf)
        given = None

    def f(h):
        return O.tv_objective(h, jnp.asarray(head), given, jax.tree.map(jnp.asarray, batch),
                              opd=opd, chunk_size=7)

    (loss, aux), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(hidden))
    want = ref_tv(batch, hidden, head, teacher_logp, how)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    want_grad = fd_grad(lambda h: ref_tv(batch, h, head, teacher_logp, how), hidden)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-3, atol=1e-6)
    assert np.abs(want_grad).max() > 1e-3
    np.testing.assert_allclose(float(aux["tv"]),
                               ref_tv(batch, hidden, head, teacher_logp, "position"), rtol=1e-5)


def test_tv_block_loss_by_hand():
    # one block with tv (0.5, 0.2) over 2 positions: 1 - (0.5 + 0.5 * 0.8) / 2 = 0.55; another
    # with tv 1.2 (clipped to acceptance 0): loss 1; an empty block is left out of the mean
    tv = jnp.array([[0.0, 0.5, 0.2], [0.0, 1.2, 0.0], [0.0, 0.3, 0.3]])
    mask = jnp.array([[0, 1, 1], [0, 1, 0], [0, 0, 0]])
    np.testing.assert_allclose(float(O.tv_block_loss(tv, mask)), (0.55 + 1.0) / 2, rtol=1e-6)
