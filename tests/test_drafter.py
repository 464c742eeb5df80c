"""The drafter's two modes agree, and its attention mask holds (gradients)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from drafter_fixtures import CFG, TARGET, S, random_like

from dpace_jax.drafters.dflash import (
    DrafterConfig,
    block_forward,
    block_inputs,
    check_compatible,
    context_kv,
    default_target_layer_ids,
    draft_logits,
    extend_cache,
    init_drafter_params,
    project_context,
    train_forward,
)
from dpace_jax.targets import model

jax.config.update("jax_enable_x64", False)


@pytest.fixture(scope="module")
def setup():
    target_params = random_like(model.init_params, TARGET, 0, 0.5)
    params = random_like(init_drafter_params, CFG, 1, 0.15)
    rng = np.random.default_rng(2)
    features = jnp.asarray(rng.standard_normal((2, S, CFG.feature_size)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 96, (2, S)), jnp.int32)
    return target_params, params, features, tokens


def test_config_defaults_and_validation():
    assert default_target_layer_ids(36, 5) == (1, 9, 17, 25, 33)
    assert default_target_layer_ids(36, 3) == (1, 17, 33)
    assert default_target_layer_ids(36, 1) == (18,)
    assert CFG.target_layer_ids == (1, 3) and CFG.feature_size == 128
    assert CFG.hidden_size == 64 and CFG.num_target_layers == 6
    from dpace_jax.drafters.config import SHARED_FIELDS  # the widths it takes from its target

    assert all(getattr(CFG, f) == getattr(TARGET, f) for f in SHARED_FIELDS)
    assert CFG.arch == "dflash" and CFG.family_cfg is None  # no target-family fields
    assert CFG.num_layers == 2 and CFG.qk_norm and CFG.hidden_size == 64
    hash(CFG)
    with pytest.raises(ValueError, match="target_layer_ids"):
        default_target_layer_ids(2, 3)
    with pytest.raises(ValueError, match="mask_token_id"):
        DrafterConfig.for_target(TARGET, num_layers=2, block_size=4, mask_token_id=97)
    with pytest.raises(ValueError, match="block_size"):
        DrafterConfig.for_target(TARGET, num_layers=2, block_size=1, mask_token_id=5)
    with pytest.raises(ValueError, match="target_layer_ids"):
        DrafterConfig.for_target(TARGET, num_layers=2, block_size=4, mask_token_id=5,
                                 target_layer_ids=(1, 6))
    assert CFG.layer_types == ("full_attention",) * 2 and CFG.layer_windows == (0, 0)
    assert SLIDING.layer_windows == (5, 0) and SLIDING.layer_causal == (True, True)
    # a window without sliding layers has no effect and is stored as 0
    assert dataclasses.replace(CFG, sliding_window=7) == CFG
    for change, match in [(dict(layer_types=("full_attention",)), "layer_types has 1 entries"),
                          (dict(layer_types=("full_attention", "chunked")), "'chunked'"),
                          (dict(layer_types=("sliding_attention",) * 2), "sliding_window=0"),
                          (dict(sliding_window=-2), "sliding_window=-2")]:
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(CFG, **change)


def test_check_compatible():
    import dataclasses

    check_compatible(CFG, TARGET)
    for change, field in [({"hidden_size": 32, "head_dim": 8}, "hidden_size"),
                          ({"vocab_size": 200}, "vocab_size"),
                          ({"num_layers": 8}, "num_target_layers")]:
        other = dataclasses.replace(TARGET, **change)
        with pytest.raises(ValueError, match=field):
            check_compatible(CFG, other, source="ckpt")


def test_shapes_and_inputs(setup):
    target_params, params, features, tokens = setup
    assert params.fc.shape == (128, 64) and params.layers.q.shape == (2, 64, 4, 16)
    assert params.layers.k_norm.shape == (2, 16)
    x = block_inputs(target_params.embed, jnp.array([[3, 5]]), CFG)
    assert x.shape == (1, 2, 4, 64)
    np.testing.assert_array_equal(x[0, 1, 0], target_params.embed[5])
    np.testing.assert_array_equal(x[0, 0, 2], target_params.embed[96])
    c = project_context(params, CFG, features)
    k, v = context_kv(params, CFG, c, jnp.broadcast_to(jnp.arange(S), (2, S)))
    assert k.shape == v.shape == (2, 2, S, 2, 16)
    with pytest.raises(ValueError, match="width"):
        project_context(params, CFG, features[..., :64])


ANCHORS = jnp.array([[0, 3, 7, 20], [5, 11, 12, 0]])  # row 1: unsorted + a padding anchor


SLIDING = dataclasses.replace(CFG, layer_types=("sliding_attention", "full_attention"),
                              sliding_window=5, is_causal=True)


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [CFG, SLIDING], ids=["full", "sliding"])
def test_packed_training_equals_decoding(setup, cfg):
    """Each packed block equals the same block drafted alone against a cache of its context."""
    target_params, params, features, tokens = setup
    hidden = jax.jit(train_forward, static_argnums=1)(params, cfg, target_params, features,
                                                      tokens, ANCHORS)
    packed = np.asarray(model.lm_head(target_params, hidden))
    assert packed.shape == (2, 4, 4, 97)
    garbage = 3.0 * jax.random.normal(jax.random.PRNGKey(9), (S, CFG.feature_size))
    ext = jax.jit(extend_cache, static_argnums=1)
    draft = jax.jit(draft_logits, static_argnums=1)
    for b in range(2):
        for n in range(ANCHORS.shape[1]):
            a = int(ANCHORS[b, n])
            # the context is the features of positions < a; the rows at and past the anchor
            # hold garbage (stale cache rows) that the block must not see
            context = jnp.where(jnp.arange(S)[:, None] < a, features[b], garbage)[None]
            cache = ext(params, cfg, model.KVCache.zeros(cfg, 1, S, jnp.float32), context,
                        jnp.array([0]))
            logits = draft(params, cfg, target_params, cache, tokens[b:b + 1, a], jnp.array([a]))
            assert logits.shape == (1, 4, 97) and logits.dtype == jnp.float32
            np.testing.assert_allclose(logits[0], packed[b, n], atol=2e-5, rtol=1e-5)
    # the blocks genuinely differ, so the comparison above is not vacuous
    assert np.abs(packed[0, 1] - packed[0, 2]).max() > 1e-2


@pytest.mark.slow
def test_extend_cache_in_pieces(setup):
    """Writing the context in chunks at per-sequence starts equals one write."""
    _, params, features, _ = setup
    ext = jax.jit(extend_cache, static_argnums=1)
    whole = ext(params, CFG, model.KVCache.zeros(CFG, 2, S, jnp.float32), features,
                         jnp.array([0, 0]))
    cache = model.KVCache.zeros(CFG, 2, S, jnp.float32)
    cache = ext(params, CFG, cache, features[:, :10], jnp.array([0, 0]))
    cache = ext(params, CFG, cache, features[:, 10:], jnp.array([10, 10]))
    np.testing.assert_allclose(cache.k, whole.k, atol=1e-6)
    np.testing.assert_allclose(cache.v, whole.v, atol=1e-6)
    # ragged starts: sequence 1 written 3 rows later lands 3 rows later
    shifted = ext(params, CFG, model.KVCache.zeros(CFG, 2, S + 3, jnp.float32),
                           features[:, :8], jnp.array([0, 3]))
    c = project_context(params, CFG, features[1:, :8])
    k, _ = context_kv(params, CFG, c, jnp.arange(3, 11)[None])
    np.testing.assert_allclose(shifted.k[:, 1, 3:11], k[:, 0], atol=1e-6)


@pytest.mark.slow
def test_mask_gradients(setup):
    """One block's output depends on context before its anchor only, and on no other block."""
    target_params, params, features, tokens = setup
    weights = jax.random.normal(jax.random.PRNGKey(3), (4, 64))

    def per_block_loss(feats):  # [B, N]: one scalar per block
        h = train_forward(params, CFG, target_params, feats, tokens, ANCHORS)
        return jnp.sum(h * weights, axis=(-2, -1))

    jac = np.abs(np.asarray(jax.jit(jax.jacrev(per_block_loss))(features))).sum(-1)
    for b in range(2):  # jac [B, N, B', S]
        for n in range(ANCHORS.shape[1]):
            a = int(ANCHORS[b, n])
            g = jac[b, n]
            assert np.all(g[1 - b] == 0)
            assert np.all(g[b, a:] == 0), (b, n, g[b, a:])
            assert np.all(g[b, :a] > 0), (b, n, g[b, :a])

    c = project_context(params, CFG, features)
    ck, cv = context_kv(params, CFG, c, jnp.broadcast_to(jnp.arange(S), (2, S)))
    x = block_inputs(target_params.embed, jnp.take_along_axis(tokens, ANCHORS, 1), CFG)

    def per_block_x(x):
        return jnp.sum(block_forward(params, CFG, x, ANCHORS, ck, cv) * weights, axis=(-2, -1))

    jac = np.abs(np.asarray(jax.jit(jax.jacrev(per_block_x))(x))).sum(-1)  # [B, N, B', N', K]
    for b in range(2):
        for n in range(ANCHORS.shape[1]):
            g = jac[b, n].copy()
            assert np.all(g[b, n] > 0)
            g[b, n] = 0
            assert np.all(g == 0), (b, n)


@pytest.mark.slow
def test_remat_bf16_and_jit(setup):
    target_params, params, features, tokens = setup
    f = jax.jit(train_forward, static_argnums=1, static_argnames="remat")
    ref = f(params, CFG, target_params, features, tokens, ANCHORS)
    out = f(params, CFG, target_params, features, tokens, ANCHORS, remat=True)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    t16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), target_params)
    h16 = f(p16, CFG, t16, features.astype(jnp.bfloat16), tokens, ANCHORS)
    assert h16.dtype == jnp.bfloat16
    err = np.abs(np.asarray(h16, np.float32) - np.asarray(ref)).max()
    assert err < 0.1 * np.abs(np.asarray(ref)).max()
