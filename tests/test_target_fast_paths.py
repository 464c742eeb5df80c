"""The target's training-time fast paths: the early-stopped feature forward and the fused
(jax.nn.dot_product_attention) attention option."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpace_jax.nn import layers
from dpace_jax.targets.model import (
    ATTENTION,
    TRAIN_ATTENTION,
    KVCache,
    ModelConfig,
    features,
    forward,
    forward_cached,
    init_params,
)

CFG = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=4,
                  num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0)
STATIC = ("cfg", "feature_layers", "logits", "attention")
jit_forward = jax.jit(forward, static_argnames=STATIC)
jit_features = jax.jit(features, static_argnums=(1, 3), static_argnames=("attention",))
on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")


def _params(dtype=jnp.float32, seed=0):
    return init_params(CFG, jax.random.key(seed), dtype, scale=0.08)


def _tokens(batch=2, length=24, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, (batch, length)))


@pytest.mark.slow
@pytest.mark.parametrize("ids", [(0, 2), (1,), (2, 0, 2), (3,)])
def test_early_stopped_features_equal_full_forward(ids):
    params, tokens = _params(), _tokens()
    full = jit_forward(params, CFG, tokens, feature_layers=ids)  # all layers run
    fast = jit_features(params, CFG, tokens, ids)
    assert fast.shape == (2, 24, len(ids) * CFG.hidden_size)
    np.testing.assert_array_equal(np.asarray(fast), np.asarray(full.features))
    assert full.hidden.shape == (2, 24, CFG.hidden_size) and full.logits.shape == (2, 24, 97)
    plain = jit_forward(params, CFG, tokens)
    np.testing.assert_array_equal(np.asarray(plain.logits), np.asarray(full.logits))


@pytest.mark.slow
def test_early_stop_skips_the_layers_after_the_last_feature_layer():
    params = _params()
    poisoned = dataclasses.replace(
        params, layers=jax.tree.map(lambda a: a.at[2:].set(jnp.nan), params.layers))
    tokens = _tokens()
    fast = jit_features(poisoned, CFG, tokens, (1, 0))
    assert np.isfinite(np.asarray(fast)).all()
    np.testing.assert_array_equal(np.asarray(fast),
                                  np.asarray(jit_features(params, CFG, tokens, (1, 0))))
    full = jit_forward(poisoned, CFG, tokens, feature_layers=(1, 0))
    assert np.isnan(np.asarray(full.logits)).all()
    assert np.isnan(np.asarray(jit_features(poisoned, CFG, tokens, (2,)))).all()


def _scans(fn, *args):
    return [e for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns if e.primitive.name == "scan"]


@pytest.mark.slow
@pytest.mark.parametrize("ids", [(1, 0), (2,)])
def test_early_stop_program_scans_only_the_needed_layers(ids):
    """One scan of max(ids) + 1 steps that takes the whole stacked weights (not a sliced copy)
    and stacks no per-layer outputs; the full forward scans all L layers."""
    params, tokens = _params(), _tokens()
    [scan] = _scans(lambda p, x: features(p, CFG, x, ids), params, tokens)
    assert scan.params["length"] == max(ids) + 1
    consts = scan.invars[:scan.params["num_consts"]]
    assert (CFG.num_layers, CFG.hidden_size, CFG.intermediate_size) in [v.aval.shape
                                                                        for v in consts]
    assert len(scan.outvars) == scan.params["num_carry"]  # no stacked per-layer ys
    [full] = _scans(lambda p, x: forward(p, CFG, x, feature_layers=ids), params, tokens)
    assert full.params["length"] == CFG.num_layers


def test_no_feature_layers_and_cached_forward_keep_hidden():
    params, tokens = _params(), _tokens()
    out = jit_forward(params, CFG, tokens, logits=False)
    assert out.hidden is not None and out.features is None
    cache = KVCache.zeros(CFG, 2, 32, jnp.float32)
    cached = forward_cached(params, CFG, tokens, cache, jnp.zeros((2,), jnp.int32),
                            feature_layers=(1,), logits=False)
    assert cached.hidden is not None and cached.cache is not None and cached.logits is None


@pytest.mark.slow
def test_causal_attention_matches_einsum_path():
    b, t, h, g, e = 2, 13, 4, 2, 16
    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(kq, (b, t, h, e))
    k = jax.random.normal(kk, (b, t, g, e))
    v = jax.random.normal(kv, (b, t, g, e))
    mask = (jnp.arange(t)[:, None] >= jnp.arange(t)[None, :])[None, None, None]
    ours = layers.attention_output(
        layers.masked_softmax(layers.attention_logits(q, k), mask), v)
    fused = layers.causal_attention(q, k, v, implementation=None)
    assert fused.shape == ours.shape == (b, t, h, e)
    np.testing.assert_allclose(np.asarray(fused), np.asarray(ours), atol=1e-5, rtol=0)
    # a swapped head grouping (h -> (r, g) instead of (g, r)) would not match
    swapped = k[:, :, ::-1]
    assert not np.allclose(np.asarray(layers.causal_attention(q, swapped, v)), np.asarray(ours),
                           atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("logits", [True, False])
def test_forward_with_dot_product_attention_matches_einsum(logits):
    params, tokens = _params(), _tokens()
    ref = jit_forward(params, CFG, tokens, feature_layers=(1, 3), logits=logits)
    out = jit_forward(params, CFG, tokens, feature_layers=(1, 3), logits=logits,
                      attention="dot_product")
    np.testing.assert_allclose(np.asarray(out.features), np.asarray(ref.features), atol=1e-5,
                               rtol=0)
    if logits:
        np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref.logits), atol=1e-5,
                                   rtol=0)
        assert np.abs(np.asarray(ref.logits)).max() > 0.1


@on_gpu
def test_cudnn_attention_matches_einsum_in_bf16():
    params, tokens = _params(jnp.bfloat16), _tokens(batch=2, length=128)
    ref = jit_forward(params, CFG, tokens, feature_layers=(1, 3))
    out = jit_forward(params, CFG, tokens, feature_layers=(1, 3), attention="cudnn")
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref.logits), atol=2e-2, rtol=0)
    np.testing.assert_allclose(np.asarray(out.features, np.float32),
                               np.asarray(ref.features, np.float32), atol=2e-2, rtol=2e-2)
    fast = jit_features(params, CFG, tokens, (1, 3), attention="cudnn")
    np.testing.assert_allclose(np.asarray(fast, np.float32),
                               np.asarray(ref.features, np.float32), atol=2e-2, rtol=2e-2)


def test_attention_option_errors():
    assert set(TRAIN_ATTENTION) <= set(ATTENTION)
    params, tokens = _params(), _tokens()
    with pytest.raises(ValueError, match=r"choose one of \['cudnn', 'dot_product', 'einsum'\]"):
        forward(params, CFG, tokens, attention="flash")
    with pytest.raises(ValueError, match=r"choose one of \['cudnn', 'dot_product', 'einsum'\]"):
        features(params, CFG, tokens, (1,), attention="xla")
    with pytest.raises(ValueError, match="bf16 or fp16"):
        forward(params, CFG, tokens, attention="cudnn")
    with pytest.raises(ValueError, match="bf16 or fp16"):
        layers.causal_attention(jnp.zeros((1, 4, 4, 16)), jnp.zeros((1, 4, 2, 16)),
                                jnp.zeros((1, 4, 2, 16)), implementation="cudnn")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="needs an NVIDIA GPU.*attention='einsum'"):
            forward(_params(jnp.bfloat16), CFG, tokens, attention="cudnn")


def test_feature_layer_ids_out_of_range():
    with pytest.raises(ValueError, match=r"feature_layers \[4\] outside"):
        features(_params(), CFG, _tokens(), (1, 4))
    with pytest.raises(ValueError, match=r"feature_layers \[4\] outside"):
        forward(_params(), CFG, _tokens(), feature_layers=(4,))
