"""dpace_jax.loss.opd, continued from tests/test_opd_loss.py (its float64 reference): log-probs
gathered from drafter logits (values and logit gradients against NumPy), and the rejected stream
with several drafts per block ([..., N, J], the rejected suffix)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_opd_loss import EPS64, loss_and_grads, make_inputs, ref_log_softmax, ref_opd, to_jax

from dpace_jax.loss import opd as O

# ---------------------------------------------------------------------------------------------
# through the logits


def test_gather_logprobs_and_logit_gradients_x64():
    rng = np.random.default_rng(5)
    n, k, v = 4, 5, 9
    logits = rng.normal(size=(n, k, v)) * 3.0
    real_tok = rng.integers(0, v, (n, k))
    rej_tok = rng.integers(0, v, n)
    off = rng.integers(1, k, n)
    _, lp_real, real_mask, _, lp_rej, _, rej_mask = make_inputs(seed=6, n=n, k=k, extremes=False)
    real_tok_in = np.where(real_mask, real_tok, -100)  # padding ids at masked positions
    ls = ref_log_softmax(logits)
    lq_real_r = np.take_along_axis(ls, real_tok[..., None], -1)[..., 0]
    lq_rej_r = np.array([ls[b, off[b], rej_tok[b]] for b in range(n)])
    _, g_real, g_rej, _ = ref_opd(lq_real_r, lp_real, real_mask, lq_rej_r, lp_rej, off, rej_mask,
                                  eps=EPS64, alpha=0.5, decay=0.7)
    # chain rule: d log_softmax(x)_t / dx = onehot(t) - softmax(x)
    g_logits = np.zeros(logits.shape)
    for b in range(n):
        for kk in range(k):
            sm = np.exp(ls[b, kk])
            g_logits[b, kk] += g_real[b, kk] * (np.eye(v)[real_tok[b, kk]] - sm)
        g_logits[b, off[b]] += g_rej[b] * (np.eye(v)[rej_tok[b]] - np.exp(ls[b, off[b]]))

    with jax.enable_x64(True):
        toks = (jnp.asarray(real_tok_in), jnp.asarray(rej_tok), jnp.asarray(off))
        rest = (jnp.asarray(lp_real), jnp.asarray(real_mask), jnp.asarray(lp_rej),
                jnp.asarray(off), jnp.asarray(rej_mask))

        @functools.partial(jax.jit, static_argnames=("alpha",))
        def f(x, alpha):
            a, b = O.gather_logprobs(x, *toks)
            loss = O.opd_loss(a, rest[0], rest[1], b, *rest[2:], decay=0.7, dpace_alpha=alpha)[0]
            return loss, (a, b)

        x = jnp.asarray(logits)
        grad = jax.jit(jax.grad(f, has_aux=True), static_argnames=("alpha",))
        g, (lq_real, lq_rej) = grad(x, alpha=0.5)
        np.testing.assert_allclose(np.asarray(lq_real)[real_mask], lq_real_r[real_mask],
                                   rtol=1e-12)
        np.testing.assert_allclose(np.asarray(lq_rej), lq_rej_r, rtol=1e-12)
        np.testing.assert_allclose(np.asarray(g), g_logits, rtol=1e-6, atol=1e-10)
        # central differences of the jax function itself, D-PACE off (its weights would move
        # with q under a finite step, while the loss holds them constant)
        g_plain = np.asarray(grad(x, alpha=None)[0])
        assert np.count_nonzero(np.abs(g_plain) > 1e-6) > 20
        h = 1e-6
        for idx in [tuple(int(i) for i in rng.integers(0, (n, k, v))) for _ in range(12)]:
            e = np.zeros(logits.shape)
            e[idx] = h
            fd = (float(f(x + e, None)[0]) - float(f(x - e, None)[0])) / (2 * h)
            np.testing.assert_allclose(g_plain[idx], fd, rtol=1e-5, atol=1e-9, err_msg=str(idx))


def test_gather_logprobs_fp32_bf16_and_padding():
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(2, 3, 4, 10)) * 4.0
    real_tok = rng.integers(0, 10, (2, 3, 4))
    real_tok[0, 0] = -100  # padding ids: finite, never NaN
    rej_tok = np.array([[1, -100, 9], [0, 3, 200]])
    off = np.array([[1, 3, 0], [2, 3, 1]])
    ls = ref_log_softmax(logits)
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 0.0)):
        x = jnp.asarray(logits, dtype)
        lq_real, lq_rej = O.gather_logprobs(x, jnp.asarray(real_tok), jnp.asarray(rej_tok),
                                            jnp.asarray(off))
        assert lq_real.dtype == jnp.float32 and lq_real.shape == (2, 3, 4)
        assert lq_rej.shape == (2, 3) and np.all(np.isfinite(np.asarray(lq_rej)))
        if dtype == jnp.bfloat16:  # the softmax of the rounded logits, in fp32
            ls = ref_log_softmax(np.asarray(x, np.float64))
            tol = 1e-5
        ok = real_tok >= 0
        np.testing.assert_allclose(np.asarray(lq_real)[ok],
                                   np.take_along_axis(ls, np.maximum(real_tok, 0)[..., None],
                                                      -1)[..., 0][ok], rtol=tol, atol=tol)
        np.testing.assert_allclose(float(lq_rej[0, 0]), ls[0, 0, 1, 1], rtol=tol, atol=tol)
        np.testing.assert_allclose(float(lq_rej[1, 1]), ls[1, 1, 3, 3], rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------
# several rejected drafts per block


def test_several_rejected_drafts_per_block_x64():
    """Rejected arrays [..., N, J] (every draft after the first rejection, each at its own
    offset) against the reference, with gradients; J = 1 equals the [..., N] form."""
    args = make_inputs(seed=12, n=5, k=6)
    rng = np.random.default_rng(12)
    lq_rej = np.minimum(rng.normal(-2.5, 2.0, (5, 4)), -1e-3)
    lp_rej = rng.normal(-3.0, 3.0, (5, 4))
    off = np.tile(np.arange(2, 6), (5, 1))
    rej = rng.random((5, 4)) < 0.6
    many = (*args[:3], lq_rej, lp_rej, off, rej)
    loss_r, g_real_r, g_rej_r, aux_r = ref_opd(*many, eps=EPS64, decay=0.7, rej_weight=2.0)
    with jax.enable_x64(True):
        loss, aux, g_real, g_rej = loss_and_grads(to_jax(many, jnp.float64), decay=0.7,
                                                  rej_weight=2.0)
        one = [a[..., None] if i >= 3 else a for i, a in enumerate(to_jax(args, jnp.float64))]
        np.testing.assert_allclose(float(loss_and_grads(one)[0]),
                                   float(loss_and_grads(to_jax(args, jnp.float64))[0]),
                                   rtol=1e-12)
    np.testing.assert_allclose(float(loss), loss_r, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(g_real), g_real_r, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.asarray(g_rej), g_rej_r, rtol=1e-12, atol=1e-14)
    assert float(aux["n_rejected"]) == rej.sum() == aux_r["n_rejected"] and rej.sum() > 8
    assert np.count_nonzero(g_rej_r) > 5
    with pytest.raises(ValueError, match=r"logq_rej has shape \(5, 4, 2\), expected \(5,\) or"):
        O.opd_loss(*args[:3], lq_rej[..., None].repeat(2, -1), *many[4:])
    with pytest.raises(ValueError, match=r"rej_offset has shape \(5,\), expected \(5, 4\)"):
        O.opd_loss(*args[:3], lq_rej, lp_rej, args[5], rej)
