"""The drafter's block attention: the grouped and flash paths equal the dense one, with gradients,
and the flash path never reads the context tiles that no block of a group can see."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpace_jax.drafters import block_attention as ba
from dpace_jax.drafters.dflash import DrafterConfig, init_drafter_params, train_forward
from dpace_jax.targets import model

pytestmark = pytest.mark.slow  # subprocesses or long compiles: `-m "not slow"` skips them

TARGET = model.ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=4,
                           num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=10000.0)
CFG = DrafterConfig.for_target(TARGET, num_layers=2, block_size=4, mask_token_id=96,
                               target_layer_ids=(0, 2))
B, N, K, H, G, E, S = 2, 5, 4, 4, 2, 8, 37
# Ragged, unsorted in the second row, with a padding anchor 0 (sees no context) and one past
# the context (sees all of it).
ANCHORS = jnp.asarray([[0, 3, 7, 20, 33], [9, 2, 1, 40, 0]], jnp.int32)


def _inputs(dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), dtype)

    return (normal(B, N, K, H, E), normal(B, N, K, G, E), normal(B, N, K, G, E),
            normal(B, S, G, E), normal(B, S, G, E))


def _reference(q, kb, vb, ck, cv, anchors, window=0, causal=False):
    """Brute force in float64 NumPy, one query row at a time: block position k of the block at
    anchor a (absolute position a + k) takes a softmax over the context slots p < a (and, with a
    window W > 0, p > a + k - W) followed by its block's positions (0..k when causal; with a
    window only those j with |k - j| < W)."""
    q, kb, vb, ck, cv = (np.asarray(t, np.float64) for t in (q, kb, vb, ck, cv))
    out = np.zeros(q.shape)
    r = H // G
    for b in range(B):
        for n in range(N):
            a = int(anchors[b, n])
            for k in range(K):
                lo = max(a + k - window + 1, 0) if window > 0 else 0
                ctx = list(range(lo, min(a, S)))
                own = [j for j in range(k + 1 if causal else K)
                       if window <= 0 or abs(k - j) < window]
                keys = np.concatenate([ck[b, ctx], kb[b, n, own]])
                vals = np.concatenate([cv[b, ctx], vb[b, n, own]])
                for h in range(H):
                    s = keys[:, h // r] @ q[b, n, k, h] / np.sqrt(E)
                    p = np.exp(s - s.max())
                    out[b, n, k, h] = (p / p.sum()) @ vals[:, h // r]
    return out


def _loss(f):
    w = jnp.asarray(np.random.default_rng(1).normal(size=(B, N, K, H, E)), jnp.float32)
    return lambda *a: jnp.sum(jnp.sin(f(*a, ANCHORS).astype(jnp.float32)) * w)


# (implementation, group, tile, window, causal): the DFlash mask, its causal-block variant and
# sliding windows wider than, narrower than and as wide as the block (1: no context at all).
CASES = [("dense", 0, 0, 0, False), ("dense", 2, 0, 0, False), ("flash", 2, 8, 0, False),
         ("flash", 1, 5, 0, False), ("flash", 5, 64, 0, False), ("flash", 3, 37, 0, False),
         ("dense", 0, 0, 0, True), ("flash", 2, 8, 0, True), ("dense", 0, 0, 6, True),
         ("flash", 2, 4, 6, True), ("flash", 1, 5, 3, True), ("flash", 5, 64, 1, True),
         ("flash", 3, 8, 13, True)]


@pytest.mark.parametrize("impl,group,tile,window,causal", CASES)
def test_matches_brute_force_and_dense_gradients(impl, group, tile, window, causal):
    args = _inputs()

    def f(*a):
        return ba.attend(*a, window=window, causal=causal, implementation=impl, group=group,
                         tile=tile or 1024)

    def dense(*a):
        return ba.dense(*a, window=window, causal=causal)

    out = jax.jit(f)(*args, ANCHORS)
    np.testing.assert_allclose(out, _reference(*args, np.asarray(ANCHORS), window, causal),
                               atol=2e-6)
    g_dense = jax.grad(_loss(dense), argnums=(0, 1, 2, 3, 4))(*args)
    g = jax.jit(jax.grad(_loss(f), argnums=(0, 1, 2, 3, 4)))(*args)
    for a, b, name in zip(g, g_dense, ("q", "kb", "vb", "ck", "cv"), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-6, err_msg=name)


def test_flash_bf16_close_to_dense():
    args = _inputs(jnp.bfloat16)
    out = ba.flash(*args, ANCHORS, group=2, tile=16)
    assert out.dtype == jnp.bfloat16
    ref = ba.dense(*(t.astype(jnp.float32) for t in args), ANCHORS)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2)
    grads = jax.grad(_loss(lambda *a: ba.flash(*a, group=2, tile=16)), argnums=(0, 3))(*args)
    refs = jax.grad(_loss(ba.dense), argnums=(0, 3))(*(t.astype(jnp.float32) for t in args))
    for a, b in zip(grads, refs, strict=True):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=6e-2)


def test_flash_skips_tiles_no_block_can_see():
    """Context past the last tile a group needs is NaN: the flash path never reads it (output
    and gradients finite), while the dense path multiplies it by zero probabilities."""
    q, kb, vb, ck, cv = _inputs()
    anchors = jnp.asarray([[1, 2, 3, 5, 6], [0, 4, 6, 7, 2]], jnp.int32)  # all < 8 = one tile
    ck = ck.at[:, 8:].set(jnp.nan)
    cv = cv.at[:, 8:].set(jnp.nan)

    def f(*a):
        return ba.flash(*a, anchors, group=2, tile=8)

    out = f(q, kb, vb, ck, cv)
    assert bool(jnp.all(jnp.isfinite(out)))
    grads = jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2, 3, 4))(q, kb, vb, ck, cv)
    assert all(bool(jnp.all(jnp.isfinite(g[:, :8] if i >= 3 else g)))
               for i, g in enumerate(grads))
    assert bool(jnp.all(grads[3][:, 8:] == 0))  # never-visited tiles get exactly zero gradient
    np.testing.assert_allclose(out, ba.dense(q, kb, vb, ck[:, :8], cv[:, :8], anchors),
                               atol=2e-6)
    assert not bool(jnp.all(jnp.isfinite(ba.dense(q, kb, vb, ck, cv, anchors))))


def test_flash_skips_tiles_before_the_window():
    """With a sliding window, the context before every row's window is NaN: the flash path
    starts its tile loop after it (finite output and gradients) and equals the dense path on the
    same context with those slots zeroed."""
    q, kb, vb, ck, cv = _inputs()
    anchors = jnp.asarray([[20, 22, 25, 30, 31], [21, 24, 26, 28, 32]], jnp.int32)
    window, tile = 4, 8  # the lowest first visible slot is 20 - 4 + 1 = 17: tiles from 16
    nan_ck, nan_cv = ck.at[:, :16].set(jnp.nan), cv.at[:, :16].set(jnp.nan)

    def f(*a):
        return ba.flash(*a, anchors, group=2, tile=tile, window=window, causal=True)

    out = f(q, kb, vb, nan_ck, nan_cv)
    ref = ba.dense(q, kb, vb, ck.at[:, :16].set(0), cv.at[:, :16].set(0), anchors,
                   window=window, causal=True)
    np.testing.assert_allclose(out, ref, atol=2e-6)
    grads = jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 3, 4))(q, kb, vb, nan_ck,
                                                                       nan_cv)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    assert bool(jnp.all(grads[1][:, :16] == 0)) and bool(jnp.any(grads[1][:, 17:] != 0))


def test_window_and_causal_may_be_traced_per_layer():
    """One scan over layers with a window and a causal flag per layer (as the drafter runs
    them) gives each layer's own result."""
    args = _inputs()
    windows = jnp.asarray([0, 5, 0], jnp.int32)
    causals = jnp.asarray([False, True, True])

    def run(impl):
        def one(_, wc):
            return None, ba.attend(*args, ANCHORS, window=wc[0], causal=wc[1],
                                   implementation=impl, group=2, tile=8)
        return jax.lax.scan(one, None, (windows, causals))[1]

    ref = [_reference(*args, np.asarray(ANCHORS), w, c) for w, c in ((0, False), (5, True),
                                                                      (0, True))]
    for impl in ("dense", "flash"):
        np.testing.assert_allclose(jax.jit(run, static_argnums=0)(impl), np.stack(ref),
                                   atol=2e-6)


def test_unknown_implementation_and_bad_sizes():
    args = _inputs()
    with pytest.raises(ValueError, match="'splash'.*dense.*flash"):
        ba.attend(*args, ANCHORS, implementation="splash")
    with pytest.raises(ValueError, match="tile >= 1"):
        ba.flash(*args, ANCHORS, group=2, tile=0)


def test_train_forward_paths_match_dense():
    """The whole drafter (2 layers, N=5 blocks), with gradients in the
    parameters and the target features."""
    target = model.init_params(TARGET, jax.random.PRNGKey(0), scale=0.3)
    params = init_drafter_params(CFG, jax.random.PRNGKey(1), scale=0.3)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 96, (2, 24)), jnp.int32)
    features = jnp.asarray(rng.normal(size=(2, 24, CFG.feature_size)), jnp.float32)
    anchors = jnp.asarray([[0, 3, 7, 12, 20], [1, 2, 9, 15, 0]], jnp.int32)

    def loss(p, f, impl, c, remat):
        h = train_forward(p, CFG, target, f, tokens, anchors, attention=impl,
                          attention_group=c, attention_tile=8, remat=remat)
        return jnp.sum(jnp.sin(h)), h

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True),
                   static_argnums=(2, 3, 4))
    (l0, h0), g0 = grad(params, features, "dense", 0, False)
    # groups of 2 (padded) and of 5; the flash VJP inside the rematerialized layer scan
    for attention, group, remat in [("dense", 2, False), ("flash", 0, False), ("flash", 2, True)]:
        (l1, h1), g1 = grad(params, features, attention, group, remat)
        np.testing.assert_allclose(h1, h0, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(l1, l0, rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5), g1, g0)
