"""Training the SPD draft module (train.mode=spd; the module and its decoding hooks:
dpace_jax.infer.spd.draft): heads h drawn like DFlash anchors among positions with a loss token at
h + 1, each with a flush age (the steady state's, n - 1, half of the time, else uniform); the
target's boundary states of the whole sequence from one frozen forward; loss = mean over heads of
KL(p || q), p the target's next-token distribution at h, q the draft module's."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dpace_jax.infer.spd import draft as draft_lib
from dpace_jax.targets import model as model_lib
from dpace_jax.train import anchors as anchor_lib
from dpace_jax.train import sft
from dpace_jax.train.modes import Mode

STEADY_FRACTION = 0.5  # of training heads at the steady-state depths (a = n - 1)


def kl_loss(draft_logits, target_logits, keep):
    """Mean over kept rows of KL(softmax(target) || softmax(draft)); logits [B, N, V]."""
    logp = jax.nn.log_softmax(target_logits.astype(jnp.float32), axis=-1)
    logq = jax.nn.log_softmax(draft_logits.astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)
    count = jnp.maximum(jnp.sum(keep), 1)
    return jnp.sum(jnp.where(keep, kl, 0.0)) / count, kl


def sample_heads(key, loss_mask, num_heads: int, n: int):
    """Heads [B, N] (sorted; positions h >= n - 1 with a loss token at h + 1), keep [B, N] and
    flush ages [B, N]."""
    k_heads, k_steady, k_age = jax.random.split(key, 3)
    seq = loss_mask.shape[1]
    nxt = jnp.concatenate([loss_mask[:, 1:], jnp.zeros_like(loss_mask[:, :1])], axis=1)
    eligible = (nxt > 0) & (jnp.arange(seq) >= n - 1)[None, :]
    heads, keep = anchor_lib.sample_anchors(k_heads, eligible, min(num_heads, seq), 1)
    steady = jax.random.uniform(k_steady, heads.shape) < STEADY_FRACTION
    age = jnp.where(steady, n - 1, jax.random.randint(k_age, heads.shape, 0, n))
    return jnp.where(keep, heads, n - 1), keep, age.astype(jnp.int32)


def loss_fn(drafter_params, target_params, batch, key, *, target_cfg, drafter_cfg, cfg,
            step=None):
    """KL(target || draft) at sampled heads of {input_ids, loss_mask} [B, S]."""
    tokens, loss_mask = batch["input_ids"], batch["loss_mask"]
    n = drafter_cfg.block_size
    heads, keep, age = sample_heads(key, loss_mask, cfg.num_anchors, n)
    features = model_lib.features(target_params, target_cfg, tokens,
                                  drafter_cfg.target_layer_ids, attention=cfg.target_attention)
    features = jax.lax.stop_gradient(features).astype(cfg.compute_dtype)
    final = jnp.take_along_axis(features[..., -target_cfg.hidden_size:], heads[..., None], axis=1)
    target_logits = jax.lax.stop_gradient(model_lib.lm_head(target_params, final))
    params = jax.tree.map(lambda x: x.astype(cfg.compute_dtype), drafter_params)
    draft = draft_lib.train_logits(params, drafter_cfg, target_params, features, tokens, heads, age)
    loss, _ = kl_loss(draft, target_logits, keep)
    agree = (jnp.argmax(draft, -1) == jnp.argmax(target_logits, -1)) & keep
    count = jnp.maximum(jnp.sum(keep), 1)
    return loss, {"accuracy": jnp.sum(agree) / count, "num_blocks": jnp.sum(keep)}


class PipelineDraft(Mode):
    """The data and batches of supervised training; the objective and drafter of SPD."""

    name = "spd"
    objectives = {"kl": loss_fn}
    default_objective = "kl"

    def check_drafter(self, dcfg, target_cfg) -> None:
        if dcfg.arch != "dflash":
            raise ValueError(f"drafter.arch={dcfg.arch!r}: the SPD draft module is a DFlash-style "
                             "module over the stage boundaries (drafter.arch=dflash)")
        draft_lib.check(dcfg, target_cfg, source="drafter config")

    load_data = sft.MODE.load_data
    batches = sft.MODE.batches


MODE = PipelineDraft()
