"""Block-chunked drafter attention (attention_chunk > 0) equals the dense path, with gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpace_jax import model
from dpace_jax.drafter import DrafterConfig, init_drafter_params, train_forward

TARGET = model.ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=4,
                           num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=10000.0)
CFG = DrafterConfig.for_target(TARGET, num_layers=2, block_size=4, mask_token_id=96,
                               target_layer_ids=(0, 2))


@pytest.mark.parametrize("chunk", [2])  # N=5: padded to 6
def test_chunked_attention_matches_dense(chunk):
    target = model.init_params(TARGET, jax.random.PRNGKey(0), scale=0.3)
    params = init_drafter_params(CFG, jax.random.PRNGKey(1), scale=0.3)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 96, (2, 24)), jnp.int32)
    features = jnp.asarray(rng.normal(size=(2, 24, CFG.feature_size)), jnp.float32)
    anchors = jnp.asarray([[0, 3, 7, 12, 20], [1, 2, 9, 15, 0]], jnp.int32)  # N=5, ragged

    def loss(p, f, c):
        h = train_forward(p, CFG, target, f, tokens, anchors, attention_chunk=c)
        return jnp.sum(jnp.sin(h)), h

    (l0, h0), g0 = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, features, 0)
    (l1, h1), g1 = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True),
                           static_argnums=2)(params, features, chunk)
    np.testing.assert_allclose(h1, h0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5), g1, g0)
