"""dpace_jax.loss against an independent float64 NumPy loop re-derivation of docs/design.md §5."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpace_jax import loss as L

ALPHAS = [0.0, 0.3, 0.5, 1.0]
GAMMAS = [None, 4.0, 7.0]


# ---------------------------------------------------------------------------------------------
# the float64 reference, written with explicit loops straight from the formulas


def ref_weights(q, m, alpha, variant):
    q = np.asarray(q, np.float64)
    m = np.asarray(m, bool)
    w = np.zeros(q.shape, np.float64)
    k_len = q.shape[-1]
    for idx in np.ndindex(q.shape[:-1]):
        s = [((1 - alpha) * q[idx + (j,)] + alpha) if m[idx + (j,)] else 1.0
             for j in range(k_len)]
        for k in range(k_len):
            p_k = math.prod(s[: k + 1])
            cont = 0.0  # sum_{j>=k} m_j P_j
            for j in range(k, k_len):
                if m[idx + (j,)]:
                    cont += math.prod(s[: j + 1])
            if variant == "dpace":
                w[idx + (k,)] = cont
            elif variant == "dpace-cumulative-confidence-only":
                w[idx + (k,)] = p_k
            else:
                w[idx + (k,)] = sum(math.prod(s[k + 1: j + 1])
                                    for j in range(k, k_len) if m[idx + (j,)])
    return w


def ref_ce(logits, targets, mask):
    x = np.asarray(logits, np.float64)
    ce = np.zeros(x.shape[:-1])
    q = np.ones(x.shape[:-1])
    correct = np.zeros(x.shape[:-1], bool)
    for idx in np.ndindex(x.shape[:-1]):
        if not mask[idx]:
            continue
        row = x[idx]
        lse = row.max() + math.log(sum(math.exp(v - row.max()) for v in row))
        ce[idx] = lse - row[targets[idx]]
        q[idx] = math.exp(-ce[idx])
        correct[idx] = int(np.argmax(row)) == int(targets[idx])
    return ce, q, correct


def ref_loss(name, logits, targets, mask, alpha=0.5, gamma=None):
    ce, q, _ = ref_ce(logits, targets, mask)
    m = np.asarray(mask, bool)
    k_len = ce.shape[-1]
    if name == "dflash":
        w = np.array([math.exp(-(k - 1) / gamma) if gamma is not None else 1.0
                      for k in range(k_len)])
        w = np.broadcast_to(w, ce.shape)
        den = (m * w).sum()
        return ((m * w * ce).sum() / den if den > 0 else 0.0), w
    w = ref_weights(q, m, alpha, name)
    return (m * w * ce).sum() / ce.shape[0], w


def make_inputs(seed=0, b=2, n=3, k=6, v=11, scale=2.0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(b, n, k, v)) * scale
    targets = rng.integers(0, v, size=(b, n, k))
    mask = rng.random((b, n, k)) < 0.7
    mask[..., 0] = False  # anchors
    mask[0, 0] = False  # a fully masked block
    mask[-1, -1, 1:] = True  # a full block
    targets = np.where(mask, targets, -100)  # masked targets are garbage
    return (jnp.asarray(logits, dtype), jnp.asarray(targets, jnp.int32), jnp.asarray(mask),
            logits, targets, mask)


# ---------------------------------------------------------------------------------------------
# weights


@pytest.mark.parametrize("variant", L.DPACE_VARIANTS)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_weights_match_reference(variant, alpha):
    rng = np.random.default_rng(1)
    q = rng.random((3, 4, 7))
    m = rng.random((3, 4, 7)) < 0.6
    w = L.dpace_weights(jnp.asarray(q, jnp.float32), jnp.asarray(m), alpha=alpha, variant=variant)
    assert w.dtype == jnp.float32 and w.shape == q.shape
    np.testing.assert_allclose(np.asarray(w), ref_weights(q, m, alpha, variant), atol=1e-6,
                               rtol=1e-6)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_all_q_one_gives_remaining_token_count(alpha):
    rng = np.random.default_rng(2)
    m = rng.random((5, 8)) < 0.5
    w = L.dpace_weights(jnp.ones((5, 8)), jnp.asarray(m), alpha=alpha)
    expect = np.flip(np.cumsum(np.flip(m, -1), -1), -1)
    np.testing.assert_allclose(np.asarray(w), expect, atol=1e-6)
    # continuation value: P_k = 1 too, so the same count
    w = L.dpace_weights(jnp.ones((5, 8)), jnp.asarray(m), alpha=alpha,
                        variant="dpace-continuation-value-only")
    np.testing.assert_allclose(np.asarray(w), expect, atol=1e-6)


@pytest.mark.parametrize("variant", ["dpace", "dpace-cumulative-confidence-only"])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_weights_non_increasing_without_mask(variant, alpha):
    q = jax.random.uniform(jax.random.PRNGKey(0), (50, 16))
    w = np.asarray(L.dpace_weights(q, jnp.ones((50, 16), bool), alpha=alpha, variant=variant))
    assert np.all(np.diff(w, axis=-1) <= 1e-7)


def test_weights_stable_under_underflow():
    # 64 positions of q = 1e-30 with alpha = 0: P_k underflows to 0 in fp32 after two positions.
    q = jnp.full((2, 64), 1e-30)
    m = jnp.ones((2, 64), bool).at[1, ::3].set(False)
    for variant in L.DPACE_VARIANTS:
        w = np.asarray(L.dpace_weights(q, m, alpha=0.0, variant=variant))
        assert np.all(np.isfinite(w)), variant
        np.testing.assert_allclose(w, ref_weights(np.asarray(q), np.asarray(m), 0.0, variant),
                                   atol=1e-6, rtol=1e-5)
    # exact zeros: continuation value is 1 at unmasked positions (the j = k term) and 0 elsewhere
    w = L.dpace_weights(jnp.zeros((2, 64)), m, alpha=0.0, variant="dpace-continuation-value-only")
    np.testing.assert_array_equal(np.asarray(w), np.asarray(m, np.float32))


def test_weights_carry_no_gradient():
    q = jnp.array([[0.3, 0.7, 0.9]])
    g = jax.grad(lambda q: L.dpace_weights(q, jnp.ones_like(q, bool)).sum())(q)
    assert np.all(np.asarray(g) == 0)


# ---------------------------------------------------------------------------------------------
# losses


@pytest.mark.parametrize("variant", L.DPACE_VARIANTS)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_dpace_loss_matches_reference(variant, alpha):
    logits, targets, mask, np_logits, np_targets, np_mask = make_inputs(seed=3)
    loss, aux = L.dpace_loss(logits, targets, mask, alpha=alpha, variant=variant)
    expect, w = ref_loss(variant, np_logits, np_targets, np_mask, alpha=alpha)
    np.testing.assert_allclose(float(loss), expect, atol=1e-6, rtol=1e-6)
    # aux against the reference
    ce, q, correct = ref_ce(np_logits, np_targets, np_mask)
    n = np_mask.sum()
    per_pos = np.maximum(np_mask.sum((0, 1)), 1)
    np.testing.assert_allclose(float(aux["accuracy"]), correct.sum() / n, atol=1e-6)
    np.testing.assert_allclose(float(aux["ce"]), (ce * np_mask).sum() / n, atol=1e-6)
    assert float(aux["num_tokens"]) == n
    np.testing.assert_allclose(np.asarray(aux["weight_per_position"]),
                               (w * np_mask).sum((0, 1)) / per_pos, atol=1e-6)
    np.testing.assert_allclose(np.asarray(aux["q_per_position"]),
                               (q * np_mask).sum((0, 1)) / per_pos, atol=1e-6)
    assert aux["weight_per_position"][0] == 0 and aux["q_per_position"][0] == 0  # anchor: none
    blocks = [(np_mask[i, j] * np.cumprod(np.where(np_mask[i, j], q[i, j], 1.0))).sum()
              for i in range(q.shape[0]) for j in range(q.shape[1]) if np_mask[i, j].any()]
    np.testing.assert_allclose(float(aux["expected_accept_length"]), np.mean(blocks), atol=1e-6)


@pytest.mark.parametrize("gamma", GAMMAS)
def test_dflash_loss_matches_reference(gamma):
    logits, targets, mask, np_logits, np_targets, np_mask = make_inputs(seed=4)
    loss, aux = L.dflash_loss(logits, targets, mask, gamma=gamma)
    expect, w = ref_loss("dflash", np_logits, np_targets, np_mask, gamma=gamma)
    np.testing.assert_allclose(float(loss), expect, atol=1e-6, rtol=1e-6)
    per_pos = np.maximum(np_mask.sum((0, 1)), 1)
    np.testing.assert_allclose(np.asarray(aux["weight_per_position"]),
                               (w * np_mask).sum((0, 1)) / per_pos, atol=1e-6)


def test_objective_dispatch():
    logits, targets, mask, *_ = make_inputs(seed=5)
    assert L.LOSS_NAMES == ("dflash", "dpace", "dpace-cumulative-confidence-only",
                            "dpace-continuation-value-only")
    for name in L.LOSS_NAMES:
        got, _ = L.objective(name, logits, targets, mask, alpha=0.3, gamma=4.0)
        if name == "dflash":
            want, _ = L.dflash_loss(logits, targets, mask, gamma=4.0)
        else:
            want, _ = L.dpace_loss(logits, targets, mask, alpha=0.3, variant=name)
        assert float(got) == float(want)


@pytest.mark.parametrize("name", L.LOSS_NAMES)
def test_gradient_holds_weights_constant(name):
    logits, targets, mask, np_logits, np_targets, np_mask = make_inputs(seed=6)
    grad = jax.grad(lambda x: L.objective(name, x, targets, mask, alpha=0.4, gamma=5.0)[0])(logits)
    # d ce / d logits = softmax - onehot(target); weights held constant
    _, w = ref_loss(name, np_logits, np_targets, np_mask, alpha=0.4, gamma=5.0)
    x = np_logits - np_logits.max(-1, keepdims=True)
    softmax = np.exp(x) / np.exp(x).sum(-1, keepdims=True)
    onehot = np.eye(np_logits.shape[-1])[np.where(np_mask, np_targets, 0)]
    scale = np_mask * w
    scale = scale / (scale.sum() if name == "dflash" else np_logits.shape[0])
    np.testing.assert_allclose(np.asarray(grad), scale[..., None] * (softmax - onehot), atol=1e-6)


@pytest.mark.slow
def test_jit_and_vmap():
    stacks = [make_inputs(seed=s)[:3] for s in range(3)]
    logits, targets, mask = (jnp.stack(x) for x in zip(*stacks, strict=True))
    for name in L.LOSS_NAMES:
        fn = jax.jit(lambda x, t, m, name=name: L.objective(name, x, t, m, alpha=0.5, gamma=7.0))
        losses, aux = jax.vmap(fn)(logits, targets, mask)
        assert aux["weight_per_position"].shape == (3, logits.shape[3])
        for i in range(3):
            want, want_aux = L.objective(name, logits[i], targets[i], mask[i], gamma=7.0)
            np.testing.assert_allclose(float(losses[i]), float(want), rtol=1e-6)
            np.testing.assert_allclose(np.asarray(aux["accuracy"][i]),
                                       np.asarray(want_aux["accuracy"]))
    # alpha itself may be traced (vmapped)
    x, t, m = stacks[0]
    alphas = jnp.array([0.0, 0.5, 1.0])
    losses = jax.vmap(lambda a: L.dpace_loss(x, t, m, alpha=a)[0])(alphas)
    for a, got in zip(alphas.tolist(), np.asarray(losses), strict=True):
        np.testing.assert_allclose(got, float(L.dpace_loss(x, t, m, alpha=a)[0]), rtol=1e-6)


@pytest.mark.parametrize("name", L.LOSS_NAMES)
def test_fully_masked_batch(name):
    logits, targets, _, *_ = make_inputs(seed=7)
    mask = jnp.zeros(targets.shape, bool)

    def f(x):
        return L.objective(name, x, targets, mask, gamma=7.0)

    (loss, aux), grad = jax.value_and_grad(f, has_aux=True)(logits)
    assert float(loss) == 0.0
    assert np.all(np.asarray(grad) == 0)
    for v in jax.tree_util.tree_leaves(aux):
        assert np.all(np.isfinite(np.asarray(v)))


@pytest.mark.slow
@pytest.mark.parametrize("name", L.LOSS_NAMES)
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_underflowing_q_and_extreme_logits(name, alpha):
    # targets far below the argmax: q = exp(-ce) underflows to 0 in fp32 (ce ~ 1e4).
    logits, targets, mask, *_ = make_inputs(seed=8, k=12)
    logits = logits.at[..., 0].set(1e4)
    targets = jnp.where(mask, jnp.clip(targets, 1, None), targets)
    (loss, aux), grad = jax.value_and_grad(
        lambda x: L.objective(name, x, targets, mask, alpha=alpha, gamma=7.0), has_aux=True)(logits)
    expect, _ = ref_loss(name, np.asarray(logits), np.asarray(targets), np.asarray(mask),
                         alpha=alpha, gamma=7.0)
    np.testing.assert_allclose(float(loss), expect, rtol=1e-5)  # (0 for alpha = 0: P_k = 0)
    assert np.all(np.isfinite(np.asarray(grad)))
    for v in jax.tree_util.tree_leaves(aux):
        assert np.all(np.isfinite(np.asarray(v)))


@pytest.mark.parametrize("name", L.LOSS_NAMES)
def test_bf16_logits(name):
    logits, targets, mask, *_ = make_inputs(seed=9, scale=8.0)
    lb = logits.astype(jnp.bfloat16)
    (loss, _), grad = jax.value_and_grad(
        lambda x: L.objective(name, x, targets, mask, gamma=7.0), has_aux=True)(lb)
    assert loss.dtype == jnp.float32 and grad.dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(grad.astype(jnp.float32))))
    # CE is computed in fp32: identical to the fp32 loss of the bf16-rounded logits
    want, _ = L.objective(name, lb.astype(jnp.float32), targets, mask, gamma=7.0)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)


def test_errors_name_the_argument():
    logits, targets, mask, *_ = make_inputs(seed=10)
    with pytest.raises(ValueError, match="alpha"):
        L.dpace_loss(logits, targets, mask, alpha=1.5)
    with pytest.raises(ValueError, match="alpha"):
        L.dpace_weights(jnp.ones((2, 3)), jnp.ones((2, 3)), alpha=-0.1)
    with pytest.raises(ValueError, match="variant"):
        L.dpace_loss(logits, targets, mask, variant="pace")
    with pytest.raises(ValueError, match="variant"):
        L.dpace_weights(jnp.ones((2, 3)), jnp.ones((2, 3)), variant="dflash")
    with pytest.raises(ValueError, match="logits"):
        L.dpace_loss(logits[0], targets, mask)
    with pytest.raises(ValueError, match="targets"):
        L.dflash_loss(logits, targets[:, :, 1:], mask)
    with pytest.raises(ValueError, match="targets"):
        L.dflash_loss(logits, targets.astype(jnp.float32), mask)
    with pytest.raises(ValueError, match="mask"):
        L.dpace_loss(logits, targets, mask[:1])
    with pytest.raises(ValueError, match="mask"):
        L.dpace_weights(jnp.ones((2, 3)), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="gamma"):
        L.dflash_loss(logits, targets, mask, gamma="seven")
    for gamma in (0.0, -1.0):  # no decay is spelled None, nothing else
        with pytest.raises(ValueError, match="gamma must be None .no decay. or a number > 0"):
            L.dflash_loss(logits, targets, mask, gamma=gamma)
    with pytest.raises(ValueError, match="dflash, dpace, dpace-cumulative"):
        L.objective("ce", logits, targets, mask)
