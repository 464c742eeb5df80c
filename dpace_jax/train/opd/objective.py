"""The on-policy (Draft-OPD) objective of a replay batch, for `train.step.make_train_step`.

A replay batch (`dpace_jax.train.opd.replay.replay_batch`) holds whole sequences (prompt + rollout
response) and, per row, the blocks at the rollout's boundaries with what supervises them: the
realized tokens (labels are the sequence's own tokens) with the target's recorded log-probs, and at
most one rejected draft token per block. The drafter runs the DFlash training forward on those
blocks (same features and mask as supervised training); its log-probs of the realized and rejected
tokens, taken from the LM head in chunks, enter `dpace_jax.loss.opd.opd_loss`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dpace_jax.drafters import dflash as drafter_lib
from dpace_jax.loss import chunked as chunked_loss
from dpace_jax.loss import opd as opd_loss
from dpace_jax.targets import model as model_lib
from dpace_jax.train import anchors as anchor_lib
from dpace_jax.train.step import StepConfig, drafter_hidden

BATCH_KEYS = ("input_ids", "anchors", "keep", "real_mask", "logp_real", "rej_token",
              "rej_offset", "logp_rej", "rej_mask")


def opd_loss_fn(drafter_params, target_params, batch: dict[str, jax.Array], key: jax.Array, *,
                target_cfg: model_lib.ModelConfig, drafter_cfg: drafter_lib.DrafterConfig,
                cfg: StepConfig, opd):
    """Loss and aux metrics of one replay batch (keys BATCH_KEYS) under the opd.* settings
    `opd` (dpace_jax.train.settings.OpdConfig); `key` is unused (the anchors are the
    rollout's)."""
    del key
    tokens, anchors, keep = batch["input_ids"], batch["anchors"], batch["keep"]
    k_block = drafter_cfg.block_size
    hidden, head = drafter_hidden(drafter_params, target_params, tokens, anchors,
                                  target_cfg=target_cfg, drafter_cfg=drafter_cfg, cfg=cfg)
    labels, _ = anchor_lib.block_labels(tokens, jnp.ones_like(tokens), anchors, keep, k_block)
    real_mask = batch["real_mask"] & keep[..., None]
    rej_mask = batch["rej_mask"] & keep
    at_offset = jnp.arange(k_block) == batch["rej_offset"][..., None]  # [B, N, K]
    rejected = jnp.where(at_offset, batch["rej_token"][..., None], 0)
    with jax.named_scope("lm_head_loss"):
        ce_real, correct = chunked_loss.token_stats_from_hidden(
            hidden, head, labels, real_mask, chunk_size=cfg.loss_chunk_size)
        ce_rej, _ = chunked_loss.token_stats_from_hidden(
            hidden, head, rejected, at_offset & rej_mask[..., None],
            chunk_size=cfg.loss_chunk_size)
        logq_rej = -jnp.sum(jnp.where(at_offset, ce_rej, 0.0), axis=-1)
        loss, aux = opd_loss.opd_loss(
            -ce_real, batch["logp_real"], real_mask, logq_rej, batch["logp_rej"],
            batch["rej_offset"], rej_mask, decay=opd.decay, rej_weight=opd.rejected_weight,
            dpace_alpha=cfg.alpha if opd.dpace_weights else None)
    m = real_mask.astype(jnp.float32)
    aux = dict(aux)
    aux["accuracy"] = jnp.sum(correct * m) / jnp.maximum(jnp.sum(m), 1.0)
    aux["num_blocks"] = jnp.sum(keep)
    return loss, aux
