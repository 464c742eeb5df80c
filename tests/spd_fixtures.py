"""Scripted SPD drafters and tiny targets shared by tests/test_spd*.py (and their subprocesses).

`oracle_drafter` drafts the target's own greedy token (a full causal forward of the whole target
over the sequence so far, in-flight tokens included), except at the positions marked in `wrong`,
where it drafts another token, and wherever the pipeline's view of the in-flight states is not
the one documented (`view_is_right`): rejections happen exactly at `wrong`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dpace_jax.infer.spd import pipeline as spd
from dpace_jax.targets import model
from dpace_jax.targets.model import ModelConfig

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=4,
                  num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=10000.0)
_SHAPE = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4,
              num_kv_heads=2, head_dim=8, rope_theta=10000.0)
# the other families SPD runs (a stage holds whole units of their layer loop): experts in every
# layer; Qwen3.5's linear / full attention periods of 2 (2 stages: one period each)
TARGETS = {
    "dense": CFG,
    "qwen3_moe": ModelConfig.make(**_SHAPE, arch="qwen3_moe", num_experts=4,
                                  num_experts_per_tok=2, moe_intermediate_size=16),
    "qwen3_5": ModelConfig.make(**_SHAPE, arch="qwen3_5", partial_rotary_factor=0.5,
                                layer_types=("linear_attention", "full_attention") * 2,
                                linear_num_key_heads=2, linear_num_value_heads=4,
                                linear_key_head_dim=8, linear_value_head_dim=8,
                                linear_conv_kernel_dim=3),
}


def random_target(cfg: ModelConfig, seed: int, scale: float = 0.3):
    """Random target parameters from NumPy (norms 1, matrices normal(0, scale))."""
    rs = np.random.RandomState(seed)

    def fill(path, leaf):
        if str(path[-1].name).endswith("norm"):
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.asarray(scale * rs.standard_normal(leaf.shape), leaf.dtype)

    shapes = jax.eval_shape(lambda k: model.init_params(cfg, k), jax.random.PRNGKey(0))
    return jax.tree_util.tree_map_with_path(fill, shapes)


def _no_init(params, config, target_params, prompts, boundary, size):
    return ()


def _no_complete(params, config, state, pos, final, valid):
    return state


def _target_at_head(params, config, view):
    """The target's logits [B, V] after the head, from a full forward over view.seq."""
    logits = model.forward(params["target"], config, view.seq).logits  # [B, S, V]
    return jax.vmap(lambda row, h: row[h])(logits, view.head)


def view_is_right(params, config, view) -> jax.Array:
    """[B] whether the pipeline's view is what the module docstring of dpace_jax.infer.spd.pipeline
    says: states[s] = boundary state b_s of position head - s (s = 0: its embedding), valid exactly
    for s <= head - exited - 1 (the live in-flight tokens), from a full forward over view.seq."""
    n = view.states.shape[0]
    ids = spd.stage_layer_ids(config, n)
    feats = model.features(params["target"], config, view.seq, ids)  # [B, S, n*D]
    d = config.hidden_size
    rows = jnp.arange(view.seq.shape[0])
    ok = jnp.ones(view.head.shape, bool)
    for s in range(n):
        pos = view.head - s
        want = (jnp.take(params["target"].embed, view.seq[rows, pos], axis=0) if s == 0
                else feats[rows, pos, (s - 1) * d:s * d])
        live = (s <= view.head - view.exited - 1) if s else jnp.ones_like(ok)
        close = jnp.all(jnp.abs(view.states[s] - want) <= 1e-3 * (1 + jnp.abs(want)), axis=-1)
        ok &= (view.valid[s] == live) & (close | ~live)
    return ok


def _oracle_draft(params, config, target_params, state, view):
    at_head = _target_at_head(params, config, view)
    wrong = jax.vmap(lambda row, h: row[h + 1])(params["wrong"], view.head)
    wrong |= ~view_is_right(params, config, view)  # a wrong view shows up as a rejection
    best = jnp.argmax(at_head, axis=-1)
    other = jax.nn.one_hot((best + 1) % config.vocab_size, config.vocab_size) * 1e4
    return state, jnp.where(wrong[:, None], other, at_head)


def oracle_drafter(target_params, cfg: ModelConfig, wrong: np.ndarray) -> spd.SpdDrafter:
    """wrong [B, S] bool: draft a token other than the target's greedy one at these positions."""
    return spd.SpdDrafter({"target": target_params, "wrong": jnp.asarray(wrong, bool)}, cfg,
                          _no_init, _oracle_draft, _no_complete)


def _tilted_draft(params, config, target_params, state, view):
    return state, _target_at_head(params, config, view) + params["tilt"]


def tilted_drafter(target_params, cfg: ModelConfig, tilt: np.ndarray) -> spd.SpdDrafter:
    """The target's own logits plus a fixed tilt [V]: q differs from p, so both the acceptance
    and the residual branch of speculative sampling are exercised."""
    params = {"target": target_params, "tilt": jnp.asarray(tilt, jnp.float32)}
    return spd.SpdDrafter(params, cfg, _no_init, _tilted_draft, _no_complete)
