"""dpace_jax.loss.opd against an independent float64 NumPy loop re-derivation of the Draft-OPD
objective (docs/design.md §9): values, analytic gradients (themselves checked by central finite
differences), the clamps, the D-PACE variant, masking, batch axes and argument checks."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpace_jax.loss import opd as O

EPS32 = float(np.finfo(np.float32).eps)
EPS64 = float(np.finfo(np.float64).eps)


# ---------------------------------------------------------------------------------------------
# the float64 reference, explicit loops straight from the formulas


def ref_dpace_weights(lq, m, alpha):
    """w_k = sum_{j>=k, m_j} prod_{i<=j} s_i, s_i = (1-alpha) q_i + alpha (1 where masked)."""
    k_len = len(lq)
    s = [((1 - alpha) * math.exp(lq[j]) + alpha) if m[j] else 1.0 for j in range(k_len)]
    return [sum(math.prod(s[: j + 1]) for j in range(k, k_len) if m[j]) for k in range(k_len)]


def ref_opd(lq_real, lp_real, real_mask, lq_rej, lp_rej, rej_offset, rej_mask, *, decay=0.8,
            rej_weight=1.0, clamp=10.0, min_logprob=-10.0, alpha=None, eps=EPS32):
    """-> (loss, dloss/dlq_real, dloss/dlq_rej, aux) in float64. The rejected arrays are
    [..., N] (one per block) or [..., N, J] (J per block)."""
    k_len = np.shape(lq_real)[-1]
    lq_real, lp_real = np.reshape(lq_real, (-1, k_len)), np.reshape(lp_real, (-1, k_len))
    m = np.reshape(real_mask, (-1, k_len)).astype(bool)
    blocks = m.shape[0]
    lq_rej, lp_rej = np.reshape(lq_rej, (blocks, -1)), np.reshape(lp_rej, (blocks, -1))
    off = np.reshape(rej_offset, (blocks, -1))
    r = np.reshape(rej_mask, (blocks, -1)).astype(bool)
    hi = math.log1p(-eps)
    g_real, g_rej = np.zeros(m.shape), np.zeros(r.shape)
    real_sum = rej_sum = real_w = rej_w = 0.0
    for b in range(m.shape[0]):
        w = [1.0] * k_len if alpha is None else ref_dpace_weights(lq_real[b], m[b], alpha)
        for k in range(k_len):
            if not m[b, k]:
                continue
            raw = float(lq_real[b, k])
            lq = min(max(raw, min_logprob), hi)
            lp = min(max(float(lp_real[b, k]), min_logprob), hi)
            p, q = math.exp(lp), math.exp(lq)
            loss = p * (lp - lq) + (1 - p) * (math.log1p(-p) - math.log1p(-q))
            grad = (-p + (1 - p) * q / (1 - q)) if min_logprob < raw < hi else 0.0
            if abs(loss) > clamp:
                loss, grad = math.copysign(clamp, loss), 0.0
            real_sum += w[k] * loss
            real_w += w[k]
            g_real[b, k] = w[k] * grad
        for j in np.nonzero(r[b])[0]:
            d_raw = float(lp_rej[b, j]) - float(lq_rej[b, j])
            d = min(max(d_raw, -20.0), 20.0)
            loss = math.exp(d) - d - 1
            grad = -(math.exp(d) - 1) if abs(d_raw) < 20 else 0.0
            if abs(loss) > clamp:
                loss, grad = math.copysign(clamp, loss), 0.0
            v = decay ** max(int(off[b, j]) - 1, 0)
            rej_sum += v * loss
            rej_w += v
            g_rej[b, j] = rej_weight * v * grad
    den = real_w + rej_weight * rej_w
    loss = (real_sum + rej_weight * rej_sum) / den if den > 0 else 0.0
    scale = 1.0 / den if den > 0 else 0.0
    aux = {"realized_sum": real_sum, "rejected_sum": rej_sum, "denominator": den,
           "n_realized": float(m.sum()), "n_rejected": float(r.sum()),
           "realized_weight": real_w, "rejected_weight": rej_w}
    return (loss, (g_real * scale).reshape(np.shape(real_mask)),
            (g_rej * scale).reshape(np.shape(rej_mask)), aux)


def ref_log_softmax(logits):
    x = np.asarray(logits, np.float64)
    out = np.zeros(x.shape)
    for idx in np.ndindex(x.shape[:-1]):
        row = x[idx]
        out[idx] = row - (row.max() + math.log(sum(math.exp(v - row.max()) for v in row)))
    return out


# ---------------------------------------------------------------------------------------------
# inputs


def make_inputs(seed=0, lead=(), n=6, k=6, extremes=True, garbage=True):
    """Ragged realized masks (a prefix 1..L per block, sometimes position 0 too), rejected tokens
    in ~70% of blocks, and (extremes) entries that hit every clip; masked entries hold NaN/-inf."""
    rng = np.random.default_rng(seed)
    bl = lead + (n,)
    lq_real = np.minimum(rng.normal(-2.0, 1.5, bl + (k,)), -0.05)
    lp_real = np.minimum(rng.normal(-1.5, 1.5, bl + (k,)), -0.01)
    length = rng.integers(0, k, bl)
    pos = np.arange(k)
    real_mask = (pos >= 1) & (pos <= length[..., None])
    real_mask[..., 0] |= rng.random(bl) < 0.2  # callers never set it, but it must work
    rej_mask = rng.random(bl) < 0.7
    rej_offset = rng.integers(1, k, bl)
    lq_rej = rng.normal(-2.5, 1.2, bl)
    lp_rej = rng.normal(-2.0, 1.2, bl)
    if extremes:
        fr, fq = lq_real.reshape(-1, k), lp_real.reshape(-1, k)  # views
        mr = real_mask.reshape(-1, k)
        cases = [(-25.0, -1.0),   # drafter below the floor: no gradient
                 (-1.0, -30.0),   # target below the floor
                 (-1e-9, -5.0),   # q -> 1, p small: loss > clamp
                 (0.0, -0.5),     # q = 1 exactly: ceiling
                 (-3.0, -1e-12),  # p -> 1
                 (-12.0, -1e-3)]  # both clips at once
        for i, (a, b) in enumerate(cases):
            fr[i % fr.shape[0], 1 + i % (k - 1)] = a
            fq[i % fr.shape[0], 1 + i % (k - 1)] = b
            mr[i % fr.shape[0], 1 + i % (k - 1)] = True
        gq, gp, gm = lq_rej.reshape(-1), lp_rej.reshape(-1), rej_mask.reshape(-1)
        for i, (a, b) in enumerate([(-15.0, -1.0), (-1.0, -15.0), (-30.0, 0.0), (-1e-9, -40.0)]):
            j = (3 * i + 1) % gq.shape[0]
            gq[j], gp[j], gm[j] = a, b, True
    if garbage:
        lq_real = np.where(real_mask, lq_real, np.nan)
        lp_real = np.where(real_mask, lp_real, -np.inf)
        lq_rej = np.where(rej_mask, lq_rej, -np.inf)
        lp_rej = np.where(rej_mask, lp_rej, np.nan)
    return lq_real, lp_real, real_mask, lq_rej, lp_rej, rej_offset, rej_mask


def to_jax(args, dtype):
    lq_real, lp_real, real_mask, lq_rej, lp_rej, rej_offset, rej_mask = args
    return (jnp.asarray(lq_real, dtype), jnp.asarray(lp_real, dtype), jnp.asarray(real_mask),
            jnp.asarray(lq_rej, dtype), jnp.asarray(lp_rej, dtype),
            jnp.asarray(rej_offset, jnp.int32), jnp.asarray(rej_mask))


@functools.partial(jax.jit, static_argnames=("dpace",))
def _value_and_grads(args, params, dpace):
    def f(lq_real, lq_rej):
        a = list(args)
        a[0], a[3] = lq_real, lq_rej
        return O.opd_loss(*a, **params)

    (loss, aux), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(args[0], args[3])
    return loss, aux, *grads


def loss_and_grads(args, **kw):
    """jit(value_and_grad) w.r.t. logq_real and logq_rej -> (loss, aux, g_real, g_rej). The float
    arguments travel traced (so one compile serves every setting of a shape and dtype, and traced
    arguments are exercised); only "D-PACE on or off" is static."""
    dpace = kw.get("dpace_alpha") is not None
    params = dict(decay=0.8, rej_weight=1.0, clamp=10.0, min_logprob=-10.0)
    params.update(kw)
    if not dpace:
        params.pop("dpace_alpha", None)
    return _value_and_grads(tuple(args), params, dpace)


KWS = [dict(), dict(decay=0.5, rej_weight=2.5), dict(decay=1.0, rej_weight=0.0),
       dict(clamp=3.0, min_logprob=-6.0), dict(dpace_alpha=0.5), dict(dpace_alpha=0.0),
       dict(dpace_alpha=1.0, decay=0.9)]


def ref_kw(kw):
    kw = dict(kw)
    if "dpace_alpha" in kw:
        kw["alpha"] = kw.pop("dpace_alpha")
    return kw


# ---------------------------------------------------------------------------------------------
# values and gradients


@pytest.mark.parametrize("kw", KWS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_matches_reference_x64(kw):
    args = make_inputs(seed=1, n=12)
    loss_r, g_real_r, g_rej_r, aux_r = ref_opd(*args, eps=EPS64, **ref_kw(kw))
    with jax.enable_x64(True):
        loss, aux, g_real, g_rej = loss_and_grads(to_jax(args, jnp.float64), **kw)
        assert loss.dtype == jnp.float64
    # the D-PACE weights are computed in fp32 (dpace_jax.loss), hence the looser tolerance
    tol = 1e-6 if "dpace_alpha" in kw else 1e-12
    np.testing.assert_allclose(float(loss), loss_r, rtol=tol)
    np.testing.assert_allclose(np.asarray(g_real), g_real_r, rtol=tol, atol=1e-14)
    np.testing.assert_allclose(np.asarray(g_rej), g_rej_r, rtol=tol, atol=1e-14)
    for name, value in aux_r.items():
        np.testing.assert_allclose(float(aux[name]), value, rtol=tol, err_msg=name)
    assert float(aux["realized_clamped"]) > 0 and float(aux["rejected_clamped"]) > 0
    # the cases are not trivial: gradient in both streams, some clipped to exactly zero
    mask = args[2]
    assert np.count_nonzero(g_real_r[mask]) > 5 and np.count_nonzero(g_real_r[mask] == 0) >= 3
    if kw.get("rej_weight", 1.0) > 0:
        assert np.count_nonzero(g_rej_r[args[6]]) > 3 and np.count_nonzero(g_rej_r[args[6]] == 0)


@pytest.mark.parametrize("kw", KWS[:2] + KWS[4:5], ids=["default", "decay", "dpace"])
def test_fp32_matches_reference(kw):
    args = make_inputs(seed=2, lead=(2,), n=5, k=7)
    loss_r, g_real_r, g_rej_r, _ = ref_opd(*args, eps=EPS32, **ref_kw(kw))
    loss, _, g_real, g_rej = loss_and_grads(to_jax(args, jnp.float32), **kw)
    assert loss.dtype == jnp.float32 and g_real.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), loss_r, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(g_real), g_real_r, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g_rej), g_rej_r, rtol=2e-4, atol=1e-6)


def test_bf16_inputs_computed_in_fp32():
    args = make_inputs(seed=3, extremes=False)
    loss = loss_and_grads(to_jax(args, jnp.bfloat16))[0]
    assert loss.dtype == jnp.float32
    rounded = [np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64) if i in (0, 1, 3, 4) else a
               for i, a in enumerate(args)]
    np.testing.assert_allclose(float(loss), ref_opd(*rounded)[0], rtol=1e-5)


@pytest.mark.parametrize("alpha", [None, 0.5])
def test_reference_gradient_matches_finite_differences(alpha):
    """The analytic reference gradient is itself right: central differences of the reference."""
    args = make_inputs(seed=4, extremes=True, garbage=False)
    _, g_real, g_rej, _ = ref_opd(*args, eps=EPS64, alpha=alpha)
    h = 1e-6
    for arr, grad, mask in ((args[0], g_real, args[2]), (args[3], g_rej, args[6])):
        slot = 0 if arr is args[0] else 3
        if alpha is not None and slot == 0:
            continue  # the D-PACE weights move with q under a finite step; the loss holds them
        for idx in zip(*np.nonzero(mask), strict=True):
            if arr[idx] > -1e-5:
                continue  # within a step of the log(1 - eps) ceiling: not differentiable there
            up, dn = arr.copy(), arr.copy()
            up[idx] += h
            dn[idx] -= h
            a_up, a_dn = list(args), list(args)
            a_up[slot], a_dn[slot] = up, dn
            fd = (ref_opd(*a_up, eps=EPS64, alpha=alpha)[0]
                  - ref_opd(*a_dn, eps=EPS64, alpha=alpha)[0]) / (2 * h)
            np.testing.assert_allclose(grad[idx], fd, rtol=1e-5, atol=1e-8, err_msg=str(idx))


def test_hand_computed_values():
    ln = math.log
    # one block: realized p = 0.5, q = 0.25 at k = 1; rejected at j = 3, p = 0.5, q = 0.25
    l_real = 0.5 * ln(2) + 0.5 * ln(2 / 3)
    k3 = 2 - ln(2) - 1
    args = (jnp.array([[0.0, ln(0.25), 0.0]]), jnp.array([[0.0, ln(0.5), 0.0]]),
            jnp.array([[False, True, False]]), jnp.array([ln(0.25)]), jnp.array([ln(0.5)]),
            jnp.array([3]), jnp.array([True]))
    loss, aux, _, _ = loss_and_grads(args, decay=0.5, rej_weight=2.0)
    v = 0.5 ** 2
    expect = (l_real + 2.0 * v * k3) / (1.0 + 2.0 * v)
    np.testing.assert_allclose(float(loss), expect, rtol=1e-6)
    np.testing.assert_allclose(float(aux["rejected_sum"]), v * k3, rtol=1e-6)
    np.testing.assert_allclose(float(aux["denominator"]), 1.5, rtol=1e-6)
    loss = loss_and_grads(args, rej_weight=0.0)[0]
    np.testing.assert_allclose(float(loss), l_real, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# masking, batching, D-PACE reduction


def test_all_masked_gives_zero_loss_and_finite_zero_grads():
    args = list(make_inputs(seed=8))
    args[2] = np.zeros_like(args[2])
    args[6] = np.zeros_like(args[6])
    for kw in (dict(), dict(dpace_alpha=0.5)):
        loss, aux, g_real, g_rej = loss_and_grads(to_jax(args, jnp.float32), **kw)
        assert float(loss) == 0.0 and float(aux["denominator"]) == 0.0
        assert np.all(np.asarray(g_real) == 0) and np.all(np.asarray(g_rej) == 0)
    # only rejected tokens, with rej_weight 0: the denominator is 0 as well
    args = list(make_inputs(seed=8))
    args[2] = np.zeros_like(args[2])
    loss, aux, g_real, g_rej = loss_and_grads(to_jax(args, jnp.float32), rej_weight=0.0)
    assert float(loss) == 0.0 and np.all(np.isfinite(np.asarray(g_rej)))
    assert float(aux["n_rejected"]) > 0


def test_masked_garbage_is_ignored():
    clean = make_inputs(seed=9, garbage=False)
    dirty = make_inputs(seed=9, garbage=True)
    a = loss_and_grads(to_jax(clean, jnp.float32), dpace_alpha=0.3)
    b = loss_and_grads(to_jax(dirty, jnp.float32), dpace_alpha=0.3)
    assert np.isfinite(float(b[0]))
    np.testing.assert_array_equal(float(a[0]), float(b[0]))
    for x, y in ((a[2], b[2]), (a[3], b[3])):
        assert np.all(np.isfinite(np.asarray(y)))
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_nonfinite_unmasked_logprobs_are_clipped():
    # q = 0 on a realized token and on a rejected one: finite loss (the clamps), zero gradient
    lq_real = jnp.array([[0.0, -jnp.inf, -1.0]])
    lp_real = jnp.array([[0.0, -0.1, -1.0]])
    mask = jnp.array([[False, True, True]])
    args = (lq_real, lp_real, mask, jnp.array([-jnp.inf]), jnp.array([-0.5]), jnp.array([2]),
            jnp.array([True]))
    loss, aux, g_real, g_rej = loss_and_grads(args)
    assert np.isfinite(float(loss))
    assert float(g_real[0, 1]) == 0.0 and float(g_real[0, 2]) != 0.0 and float(g_rej[0]) == 0.0
    assert float(aux["rejected_clamped"]) == 1.0


def test_leading_axes_jit_and_vmap():
    args = make_inputs(seed=10, lead=(2, 3), n=4, k=5)
    ja = to_jax(args, jnp.float32)
    flat = [ja[i].reshape(24, 5) if i in (0, 1, 2) else ja[i].reshape(24) for i in range(7)]
    kw = dict(dpace_alpha=0.5, decay=0.6)
    loss, aux = jax.jit(lambda *a: O.opd_loss(*a, **kw))(*ja)
    loss_f, aux_f = jax.jit(lambda *a: O.opd_loss(*a, **kw))(*flat)
    np.testing.assert_allclose(float(loss), float(loss_f), rtol=1e-6)
    np.testing.assert_allclose(float(loss), ref_opd(*args, **ref_kw(kw))[0], rtol=2e-5)
    for name in ("realized_sum", "rejected_sum", "denominator", "n_realized", "n_rejected"):
        np.testing.assert_allclose(float(aux[name]), float(aux_f[name]), rtol=1e-6)
    # vmap over the first axis: one loss per leading index
    per = jax.jit(jax.vmap(lambda *a: O.opd_loss(*a, **kw)[0]))(*ja)
    assert per.shape == (2,)
    for i in range(2):
        sub = [a[i] for a in args]
        np.testing.assert_allclose(float(per[i]), ref_opd(*sub, **ref_kw(kw))[0], rtol=2e-5)


def test_dpace_equal_weights_reduce_to_plain_mean():
    # alpha = 1 gives w_k = number of realized positions at or after k; with one realized
    # position per block every weight is 1 and the objective is the paper's.
    args = list(make_inputs(seed=11, n=8, k=6, extremes=False, garbage=False))
    rng = np.random.default_rng(11)
    one = np.zeros_like(args[2])
    one[np.arange(8), rng.integers(1, 6, 8)] = True
    args[2] = one
    ja = to_jax(args, jnp.float32)
    plain = loss_and_grads(ja)
    dpace = loss_and_grads(ja, dpace_alpha=1.0)
    np.testing.assert_allclose(float(dpace[0]), float(plain[0]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(dpace[2]), np.asarray(plain[2]), rtol=1e-6)
    np.testing.assert_allclose(float(dpace[1]["realized_weight"]), 8.0, rtol=1e-6)
    # with full blocks the weights differ (K-1, ..., 1) and so does the loss
    args[2] = np.broadcast_to(np.arange(6) >= 1, args[2].shape).copy()
    ja = to_jax(args, jnp.float32)
    plain, dpace = loss_and_grads(ja), loss_and_grads(ja, dpace_alpha=1.0)
    np.testing.assert_allclose(float(dpace[1]["realized_weight"]), 8 * 15, rtol=1e-6)
    assert abs(float(dpace[0]) - float(plain[0])) > 1e-4


# ---------------------------------------------------------------------------------------------
# argument checks


def test_errors_name_the_argument():
    args = list(make_inputs(seed=12, extremes=False))  # NumPy: the checks need no device work
    args[5] = args[5].astype(np.int32)
    bad = [(dict(decay=0.0), "decay"), (dict(decay=1.5), "decay"), (dict(decay="x"), "decay"),
           (dict(rej_weight=-1.0), "rej_weight"), (dict(clamp=0.0), "clamp"),
           (dict(clamp=-2.0), "clamp"), (dict(min_logprob=0.0), "min_logprob"),
           (dict(dpace_alpha=1.5), "dpace_alpha"), (dict(dpace_alpha=-0.1), "dpace_alpha"),
           (dict(dpace_alpha="a"), "dpace_alpha")]
    for kw, name in bad:
        with pytest.raises(ValueError, match=name):
            O.opd_loss(*args, **kw)
    for i, name in enumerate(["logp_real", "real_mask"], start=1):
        a = list(args)
        a[i] = a[i][:, :-1]
        with pytest.raises(ValueError, match=name):
            O.opd_loss(*a)
    for i, name in zip((3, 4, 5, 6), ("logq_rej", "logp_rej", "rej_offset", "rej_mask"),
                       strict=True):
        a = list(args)
        a[i] = a[i][:-1]
        with pytest.raises(ValueError, match=name):
            O.opd_loss(*a)
    a = list(args)
    a[5] = a[5].astype(np.float32)
    with pytest.raises(ValueError, match="rej_offset"):
        O.opd_loss(*a)
    with pytest.raises(ValueError, match="logq_real"):
        O.opd_loss(args[0][0], args[1][0], args[2][0], *args[3:])
    x = np.zeros((2, 3, 5), np.float32)
    ti, ri = np.zeros((2, 3), np.int32), np.zeros((2,), np.int32)
    with pytest.raises(ValueError, match="logits"):
        O.gather_logprobs(x[0], ti[0], ri[0], ri[0])
    with pytest.raises(ValueError, match="realized_tokens"):
        O.gather_logprobs(x, ti[:, :2], ri, ri)
    with pytest.raises(ValueError, match="rejected_tokens"):
        O.gather_logprobs(x, ti, ri[:1], ri)
    with pytest.raises(ValueError, match="rej_offset"):
        O.gather_logprobs(x, ti, ri, ri.astype(np.float32))
