"""dpace_jax.train.opd.teacher against float64 NumPy references: the verification-matched teacher
(T = 0 one-hot, T > 0 tempered + top-k / top-p), the total-variation loss (values, masks,
gradients: analytic and finite differences), its chunked from-hidden form, and how the T = 0
teacher's p = 1 enters the Bernoulli forward KL of the OPD loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpace_jax.train.opd import teacher as T

try:  # the OPD token losses; their module moved in the package refactor
    from dpace_jax.loss import opd as opd_loss_mod
except ImportError:  # pragma: no cover - the pre-refactor layout
    from dpace_jax import opd_loss as opd_loss_mod


# --------------------------------------------------------------------------------------------
# float64 NumPy references


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    mx = np.max(np.where(np.isfinite(x), x, -np.inf), axis=-1, keepdims=True)
    e = np.exp(x - mx)
    return x - mx - np.log(np.sum(e, axis=-1, keepdims=True))


def np_verify_teacher(logits, temperature, top_k=0, top_p=1.0, *, margin=None):
    """float64 log-probs of the verify teacher; with ``margin``, assert that no top-p decision is
    within ``margin`` of its threshold (so fp32 and fp64 keep the same support)."""
    x = np.asarray(logits, np.float64)
    v = x.shape[-1]
    if temperature == 0:
        best = np.argmax(x, axis=-1)
        return np.where(np.arange(v) == best[..., None], 0.0, -np.inf)
    x = x / temperature
    if top_k and top_k < v:
        kth = -np.sort(-x, axis=-1)[..., top_k - 1:top_k]
        x = np.where(x >= kth, x, -np.inf)
    if top_p < 1.0:
        order = np.argsort(-x, axis=-1, kind="stable")
        xs = np.take_along_axis(x, order, axis=-1)
        probs = np.exp(np_log_softmax(xs))
        before = np.cumsum(probs, axis=-1) - probs
        if margin is not None:
            finite = np.isfinite(xs)
            assert np.all(np.abs(before - top_p)[finite] > margin), "borderline top-p test data"
        keep = np.empty_like(before, dtype=bool)
        np.put_along_axis(keep, order, before < top_p, axis=-1)
        x = np.where(keep, x, -np.inf)
    return np_log_softmax(x)


def np_tv(teacher_logprobs, drafter_logits):
    p = np.exp(np.asarray(teacher_logprobs, np.float64))
    q = np.exp(np_log_softmax(drafter_logits))
    return 1.0 - np.sum(np.minimum(p, q), axis=-1)


def np_tv_grad(teacher_logprobs, drafter_logits):
    """d tv / d z per row: q_j (S - [q_j < p_j]), S = sum_{x: q_x < p_x} q_x."""
    p = np.exp(np.asarray(teacher_logprobs, np.float64))
    q = np.exp(np_log_softmax(drafter_logits))
    below = (q < p).astype(np.float64)
    s = np.sum(q * below, axis=-1, keepdims=True)
    return q * (s - below)


def np_masked_mean(values, mask):
    m = np.asarray(mask, bool)
    return float(np.sum(np.where(m, values, 0.0)) / max(m.sum(), 1)) if m.any() else 0.0


def rand_logits(seed, shape, scale=3.0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


# --------------------------------------------------------------------------------------------
# verify_teacher_logprobs


def test_greedy_teacher_is_one_hot_on_argmax_with_first_index_ties():
    logits = rand_logits(0, (2, 3, 4, 17))
    logits[0, 0, 0, 5] = logits[0, 0, 0, 9] = logits[0, 0, 0].max() + 1.0  # a tie: index 5 wins
    for top_k, top_p in ((0, 1.0), (3, 0.5)):  # the filter does not change the greedy teacher
        out = np.asarray(T.verify_teacher_logprobs(jnp.asarray(logits), 0.0, top_k, top_p))
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, np_verify_teacher(logits, 0))
        assert out[0, 0, 0, 5] == 0.0 and out[0, 0, 0, 9] == -np.inf
        np.testing.assert_array_equal(np.argmax(out, -1), np.argmax(logits, -1))
        assert np.all(np.sum(out == 0.0, axis=-1) == 1)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0),
                                                      (1.3, 5, 1.0), (0.8, 0, 0.8),
                                                      (0.6, 7, 0.9)])
def test_tempered_filtered_teacher_matches_numpy_and_filtered_log_probs(temperature, top_k, top_p):
    logits = rand_logits(1, (2, 3, 4, 23), scale=1.5)
    ref = np_verify_teacher(logits, temperature, top_k, top_p, margin=1e-4)
    out = np.asarray(T.verify_teacher_logprobs(jnp.asarray(logits), temperature, top_k, top_p))
    np.testing.assert_array_equal(np.isfinite(out), np.isfinite(ref))
    np.testing.assert_allclose(out[np.isfinite(ref)], ref[np.isfinite(ref)], rtol=1e-5, atol=2e-6)
    same = T.filtered_log_probs(jnp.asarray(logits), T.Sampling(temperature, top_k=top_k,
                                                                   top_p=top_p))
    np.testing.assert_array_equal(out, np.asarray(same))  # it is that function, reused


def test_teacher_token_logprobs_and_argument_checks():
    logits = rand_logits(2, (3, 4, 11))
    best = np.argmax(logits, -1)
    other = (best + 1) % 11
    lp = T.verify_teacher_token_logprobs(jnp.asarray(logits), jnp.asarray(best), 0.0)
    np.testing.assert_array_equal(np.asarray(lp), 0.0)
    lp = T.verify_teacher_token_logprobs(jnp.asarray(logits), jnp.asarray(other), 0.0)
    assert np.all(np.asarray(lp) == -np.inf)
    ref = np.take_along_axis(np_verify_teacher(logits, 0.9, 4), other[..., None], -1)[..., 0]
    lp = np.asarray(T.verify_teacher_token_logprobs(jnp.asarray(logits), jnp.asarray(other),
                                                    0.9, 4))
    np.testing.assert_array_equal(np.isfinite(lp), np.isfinite(ref))
    np.testing.assert_allclose(lp[np.isfinite(ref)], ref[np.isfinite(ref)], rtol=1e-5, atol=2e-6)
    with pytest.raises(ValueError, match="temperature"):
        T.verify_teacher_logprobs(jnp.asarray(logits), -0.5)
    with pytest.raises(ValueError, match="top_p"):
        T.verify_teacher_logprobs(jnp.asarray(logits), 1.0, top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        T.verify_teacher_logprobs(jnp.asarray(logits), 1.0, top_k=-1)
    with pytest.raises(ValueError, match="tokens"):
        T.verify_teacher_token_logprobs(jnp.asarray(logits), jnp.asarray(best[0]), 0.0)


# --------------------------------------------------------------------------------------------
# tv_loss


def _mask(seed, shape, p=0.7):
    m = np.random.default_rng(seed).random(shape) < p
    m.reshape(-1)[0] = True
    return m


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, 0, 1.0), (1.0, 0, 1.0),
                                                      (0.7, 6, 0.9)])
def test_tv_values_and_masked_mean_match_numpy(temperature, top_k, top_p):
    shape = (2, 3, 4, 19)
    target, drafter = rand_logits(3, shape), rand_logits(4, shape, scale=2.0)
    mask = _mask(5, shape[:-1])
    teacher_np = np_verify_teacher(target, temperature, top_k, top_p, margin=1e-4)
    teacher = T.verify_teacher_logprobs(jnp.asarray(target), temperature, top_k, top_p)
    tv, mean = T.tv_loss(teacher, jnp.asarray(drafter), jnp.asarray(mask))
    ref = np.where(mask, np_tv(teacher_np, drafter), 0.0)
    np.testing.assert_allclose(np.asarray(tv), ref, atol=2e-6)
    np.testing.assert_allclose(float(mean), np_masked_mean(ref, mask), atol=2e-6)
    # 1 - tv = sum_x min(p, q) = 1 - 0.5 sum |p - q|, and lies in [0, 1]
    p, q = np.exp(teacher_np), np.exp(np_log_softmax(drafter))
    np.testing.assert_allclose(ref, np.where(mask, 0.5 * np.abs(p - q).sum(-1), 0.0), atol=1e-12)
    assert np.all(np.asarray(tv) > -1e-6) and np.all(np.asarray(tv) < 1 + 1e-6)


def test_greedy_tv_is_one_minus_drafter_probability_of_the_argmax():
    shape = (2, 5, 13)
    target, drafter = rand_logits(6, shape), rand_logits(7, shape)
    teacher = T.verify_teacher_logprobs(jnp.asarray(target), 0.0)
    tv, _ = T.tv_loss(teacher, jnp.asarray(drafter), jnp.ones(shape[:-1], bool))
    q = np.exp(np_log_softmax(drafter))
    q_best = np.take_along_axis(q, np.argmax(target, -1)[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(tv), 1.0 - q_best, atol=2e-6)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, 0, 1.0), (1.0, 0, 1.0),
                                                      (0.8, 8, 0.9)])
def test_tv_gradient_matches_analytic_and_finite_differences(temperature, top_k, top_p):
    shape = (2, 3, 4, 17)
    target, drafter = rand_logits(8, shape), rand_logits(9, shape, scale=1.5)
    mask = _mask(10, shape[:-1])
    teacher_np = np_verify_teacher(target, temperature, top_k, top_p, margin=1e-4)
    teacher = T.verify_teacher_logprobs(jnp.asarray(target), temperature, top_k, top_p)

    grad = np.asarray(jax.jit(jax.grad(lambda z: T.tv_loss(teacher, z, mask)[1]))(
        jnp.asarray(drafter)))
    n = mask.sum()
    ref = np.where(mask[..., None], np_tv_grad(teacher_np, drafter), 0.0) / n
    np.testing.assert_allclose(grad, ref, atol=2e-7, rtol=2e-4)

    # the analytic formula against central differences of the float64 loss (no ties: p != q)
    p, q = np.exp(teacher_np), np.exp(np_log_softmax(drafter))
    assert np.min(np.abs(p - q)) > 1e-5
    z = drafter.astype(np.float64)
    h = 1e-7
    fd = np.zeros_like(z)
    for idx in np.ndindex(z.shape):
        zp, zm = z.copy(), z.copy()
        zp[idx] += h
        zm[idx] -= h
        fd[idx] = (np_tv(teacher_np, zp)[idx[:-1]] - np_tv(teacher_np, zm)[idx[:-1]]) / (2 * h)
    np.testing.assert_allclose(np_tv_grad(teacher_np, z), fd, atol=1e-7)


def test_tv_teacher_gets_no_gradient_and_masked_garbage_is_inert():
    shape = (3, 4, 9)
    target, drafter = rand_logits(11, shape), rand_logits(12, shape)
    mask = np.ones(shape[:-1], bool)
    mask[1, 2] = mask[2, 0] = False
    bad_t, bad_z = target.copy(), drafter.copy()
    bad_t[1, 2] = np.nan
    bad_z[1, 2] = np.inf
    bad_z[2, 0, 3] = np.nan
    teacher = T.verify_teacher_logprobs(jnp.asarray(target), 0.5, 4)
    bad_teacher = jnp.asarray(np.where(np.isnan(bad_t), np.nan, np.asarray(teacher)))

    def f(t, z):
        return T.tv_loss(t, z, jnp.asarray(mask))[1]

    g_t, g_z = jax.jit(jax.grad(f, argnums=(0, 1)))(bad_teacher, jnp.asarray(bad_z))
    assert np.all(np.asarray(g_t) == 0.0)
    assert np.all(np.isfinite(np.asarray(g_z)))
    assert np.all(np.asarray(g_z)[~mask] == 0.0)
    clean = jax.jit(jax.grad(f, argnums=(0, 1)))(teacher, jnp.asarray(drafter))[1]
    np.testing.assert_allclose(np.asarray(g_z)[mask], np.asarray(clean)[mask], atol=1e-7)
    tv, mean = T.tv_loss(bad_teacher, jnp.asarray(bad_z), jnp.asarray(mask))
    assert np.all(np.asarray(tv)[~mask] == 0.0) and np.isfinite(float(mean))
    assert float(T.tv_loss(teacher, jnp.asarray(drafter), jnp.zeros(shape[:-1], bool))[1]) == 0.0
    with pytest.raises(ValueError, match="mask"):
        T.tv_loss(teacher, jnp.asarray(drafter), jnp.ones(shape[:-2], bool))


# --------------------------------------------------------------------------------------------
# tv_loss_from_hidden


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, 0, 1.0), (0.7, 10, 0.9)])
def test_chunked_tv_equals_unchunked(temperature, top_k, top_p):
    b, n, k, d, v = 2, 3, 4, 8, 41
    rng = np.random.default_rng(13)
    h = jnp.asarray(rng.normal(size=(b, n, k, d)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(b, n, k, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)) * 0.7, jnp.float32)
    mask = jnp.asarray(_mask(14, (b, n, k)))

    def full(h, g, w):
        teacher = T.verify_teacher_logprobs(jnp.einsum("bnkd,dv->bnkv", g, w), temperature,
                                            top_k, top_p)
        return T.tv_loss(teacher, jnp.einsum("bnkd,dv->bnkv", h, w), mask)

    (mean_ref, tv_ref), (gh_ref, gw_ref) = jax.jit(jax.value_and_grad(
        lambda h, w: full(h, g, w)[::-1], argnums=(0, 1), has_aux=True))(h, w)
    for chunk in (5, 24):  # 24 rows in all: 5 chunks with one padding row, and a single chunk
        def chunked(h, g, w, chunk=chunk):
            tv, mean = T.tv_loss_from_hidden(h, g, w, mask, temperature, top_k, top_p, chunk)
            return mean, tv

        (mean, tv), (gh, gg, gw) = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1, 2),
                                                              has_aux=True))(h, g, w)
        np.testing.assert_allclose(np.asarray(tv), np.asarray(tv_ref), atol=2e-6)
        np.testing.assert_allclose(float(mean), float(mean_ref), atol=2e-6)
        np.testing.assert_allclose(np.asarray(gh), np.asarray(gh_ref), atol=1e-6)
        np.testing.assert_allclose(np.asarray(gw), np.asarray(gw_ref), atol=1e-6)
        assert np.all(np.asarray(gg) == 0.0)  # the teacher branch is a constant


def test_chunked_tv_against_numpy_with_separate_target_head():
    b, n, k, d, v = 1, 2, 3, 6, 15
    rng = np.random.default_rng(15)
    h, g = rng.normal(size=(b, n, k, d)), rng.normal(size=(b, n, k, d))
    w, wt = rng.normal(size=(d, v)), rng.normal(size=(d, v))
    mask = _mask(16, (b, n, k))
    tv, mean = T.tv_loss_from_hidden(*(jnp.asarray(x, jnp.float32) for x in (h, g, w)),
                                     jnp.asarray(mask), 0.0, chunk_size=4,
                                     target_head=jnp.asarray(wt, jnp.float32))
    ref = np.where(mask, np_tv(np_verify_teacher(g @ wt, 0), h @ w), 0.0)
    np.testing.assert_allclose(np.asarray(tv), ref, atol=2e-6)
    np.testing.assert_allclose(float(mean), np_masked_mean(ref, mask), atol=2e-6)
    with pytest.raises(ValueError, match="chunk_size"):
        T.tv_loss_from_hidden(jnp.asarray(h), jnp.asarray(g), jnp.asarray(w), jnp.asarray(mask),
                              0.0, chunk_size=0)
    with pytest.raises(ValueError, match="target_hidden"):
        T.tv_loss_from_hidden(jnp.asarray(h), jnp.asarray(g[:, :1]), jnp.asarray(w),
                              jnp.asarray(mask), 0.0)


# --------------------------------------------------------------------------------------------
# the T = 0 teacher in the OPD loss's streams


def test_greedy_teacher_in_bernoulli_forward_kl_is_cross_entropy_up_to_eps():
    lq = np.linspace(-9.9, -1e-3, 25).astype(np.float32)
    logp = np.zeros_like(lq)  # p = 1: the verify teacher's log-prob of the greedy token
    val = np.asarray(jax.jit(opd_loss_mod.bernoulli_forward_kl)(jnp.asarray(lq),
                                                                jnp.asarray(logp)))
    eps = float(np.finfo(np.float32).eps)
    q = np.exp(lq.astype(np.float64))
    p = 1.0 - eps
    ref = p * (np.log(p) - lq) + (1 - p) * (np.log(eps) - np.log1p(-q))  # lp clipped at log(1-eps)
    np.testing.assert_allclose(val, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(val, -lq, atol=2e-5)  # = -log q up to O(eps * 16)
    grad_fn = jax.jit(jax.vmap(jax.grad(opd_loss_mod.bernoulli_forward_kl)))
    grad = np.asarray(grad_fn(jnp.asarray(lq), jnp.asarray(logp)))
    np.testing.assert_allclose(grad, -p + (1 - p) * q / (1 - q), rtol=1e-5)
    # below the log-prob floor (-10) the drafter gets no gradient
    low = grad_fn(jnp.asarray([-12.0], jnp.float32), jnp.zeros((1,), jnp.float32))
    assert float(low[0]) == 0.0


def test_greedy_teacher_makes_the_k3_rejected_stream_inert():
    # a rejected draft is not the argmax: its T = 0 verify log-prob is -inf, so the k3 term
    # saturates at the loss clamp and passes no gradient (tv_loss is the usable form there)
    lq = jnp.asarray([-0.1, -2.0, -8.0], jnp.float32)
    lp = jnp.full((3,), -jnp.inf)
    k3 = np.asarray(opd_loss_mod.k3_reverse_kl(lq, lp))
    np.testing.assert_allclose(k3, np.exp(-20.0) + 19.0, rtol=1e-6)
    g = jax.grad(lambda x: jnp.sum(jnp.clip(opd_loss_mod.k3_reverse_kl(x, lp), -10, 10)))(lq)
    assert np.all(np.asarray(g) == 0.0)
