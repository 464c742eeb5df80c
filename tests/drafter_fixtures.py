"""A small target/drafter configuration and NumPy-drawn random parameters shared by the drafter
tests."""

import jax
import jax.numpy as jnp
import numpy as np

from dpace_jax.drafters.dflash import DrafterConfig
from dpace_jax.targets import model

TARGET = model.ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=6,
                           num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0)
CFG = DrafterConfig.for_target(TARGET, num_layers=2, block_size=4, mask_token_id=96)
S = 24
NORMS = ("attn_norm", "mlp_norm", "q_norm", "k_norm", "hidden_norm", "final_norm")


def random_like(init, cfg, seed, scale):
    """Random params with init's layout, drawn with NumPy (fast); norm weights 1 + noise so
    that every weight matters."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        return jnp.asarray(1 + 0.2 * noise if path[-1].name in NORMS else scale * noise)

    shapes = jax.eval_shape(lambda k: init(cfg, k), jax.random.PRNGKey(0))
    return jax.tree_util.tree_map_with_path(fill, shapes)
