"""The on-policy objectives of a replay batch, for `train.step.make_train_step` (train.loss in
train.mode=opd: `opd`, Draft-OPD's token streams; `tv`, the total variation to the teacher).

A replay batch (`dpace_jax.train.opd.replay.replay_batch`) holds whole sequences (prompt + rollout
response) and, per row, the blocks at the rollout's boundaries with what supervises them: the
realized tokens (labels are the sequence's own tokens) with the target's recorded log-probs, the
first rejected draft of each block and the drafts after it (the rejected suffix). The drafter runs
the DFlash training forward on those blocks (same features and mask as supervised training); its
log-probs of the supervised tokens, taken from the LM head in chunks, enter
`dpace_jax.loss.opd.opd_loss`, or its full distributions enter `teacher.tv_loss_from_hidden`.

A DFlash 2 drafter's logits are its unary scores (output multiplier and softcap applied), and its
family's own term joins the loss: the selector's cross-entropy over the unary top-Z at the
realized positions (the rollout's own tokens are the target's, so the gold), uniformly weighted
over them; the rejected streams do not supervise the selector.

The teacher (opd.teacher, docs/opd.md): `softmax`, the target's temperature-1 distribution (the
public Draft-OPD recipe, whatever the rollout's temperature), or `verify`, the distribution the
rollout's verification accepted against: one-hot on the target's greedy token at opd.temperature
0, the tempered distribution above it (the rollout records both, decode.Records). The rejected
stream (opd.rejected_stream): `first`, the first rejected draft of a block, or `suffix`, every
draft after the first rejection too (the public code's default; their teachers condition on the
rejected drafts before them, as the rollout's verify forward did).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dpace_jax.drafters import dflash as drafter_lib
from dpace_jax.drafters import drafter_family
from dpace_jax.loss import chunked as chunked_loss
from dpace_jax.loss import opd as opd_loss
from dpace_jax.targets import model as model_lib
from dpace_jax.train import anchors as anchor_lib
from dpace_jax.train.opd import teacher as teacher_lib
from dpace_jax.train.step import StepConfig, drafter_hidden, logit_transform

BATCH_KEYS = ("input_ids", "anchors", "keep", "real_mask", "logp_real", "vlogp_real",
              "rej_token", "rej_offset", "logp_rej", "vlogp_rej", "rej_mask", "sfx_token",
              "logp_sfx", "vlogp_sfx", "sfx_mask")


def needs_extra(opd) -> bool:
    """Whether the settings read the rollout rows' EXTRA_FIELDS (replay.replay_batch)."""
    return opd.teacher == "verify" or opd.rejected_stream == "suffix"


def needs_target_hidden(loss: str, opd) -> bool:
    """TV needs the teacher's whole distribution, which the rollout does not record; the greedy
    verify teacher is one-hot on the realized token and needs none."""
    return loss == "tv" and not (opd.teacher == "verify" and opd.temperature == 0)


def _masked_mean(x, m):
    m = m.astype(jnp.float32)
    return jnp.sum(jnp.where(m > 0, x, 0.0)) / jnp.maximum(jnp.sum(m), 1.0)


def _forward(drafter_params, target_params, batch, *, target_cfg, drafter_cfg, cfg: StepConfig,
             with_target: bool):
    """(drafter hidden [B, N, K, D], head [D, V], the target's final hidden state that verified
    each block position [B, N, K, D] or None). The target's is its state at the position before
    (anchor + k - 1), from one full forward that also gives the drafter's features."""
    tokens, anchors = batch["input_ids"], batch["anchors"]
    if not with_target:
        hidden, head = drafter_hidden(drafter_params, target_params, tokens, anchors,
                                      target_cfg=target_cfg, drafter_cfg=drafter_cfg, cfg=cfg)
        return hidden, head, None
    # as step.drafter_hidden, but running every target layer for the final hidden state
    out = model_lib.forward(target_params, target_cfg, tokens, logits=False,
                            feature_layers=tuple(drafter_cfg.target_layer_ids),
                            attention=cfg.target_attention)
    features = jax.lax.stop_gradient(out.features).astype(cfg.compute_dtype)
    compute_params = jax.tree.map(lambda x: x.astype(cfg.compute_dtype), drafter_params)
    hidden = drafter_lib.train_forward(
        compute_params, drafter_cfg, target_params, features, tokens, anchors, remat=cfg.remat,
        attention=cfg.attention, attention_group=cfg.attention_group,
        attention_tile=cfg.attention_tile)
    head = jax.lax.stop_gradient(model_lib.lm_head_matrix(target_params)).astype(cfg.compute_dtype)
    k = jnp.arange(drafter_cfg.block_size)
    where = jnp.clip(anchors[..., None] + k - 1, 0, tokens.shape[1] - 1)  # [B, N, K]
    b, n, kk = where.shape
    picked = jnp.take_along_axis(out.hidden, where.reshape(b, n * kk)[..., None], axis=1)
    target = jax.lax.stop_gradient(picked.reshape(b, n, kk, -1)).astype(cfg.compute_dtype)
    return hidden, head, target


def opd_objective(hidden, head, batch: dict, *, opd, alpha: float, chunk_size: int,
                  family_terms=None):
    """Draft-OPD's loss (dpace_jax.loss.opd.opd_loss) of a replay batch from the drafter's hidden
    states [B, N, K, D] and head [D, V], under opd.teacher / opd.rejected_stream; D-PACE weights
    (alpha) on the realized stream with opd.dpace_weights. `family_terms` (see `_family_terms`)
    adds the drafter family's own terms on the realized stream."""
    keep = batch["keep"]
    k_block = hidden.shape[2]
    labels, _ = anchor_lib.block_labels(batch["input_ids"], jnp.ones_like(batch["input_ids"]),
                                        batch["anchors"], keep, k_block)
    verify = opd.teacher == "verify"
    real_mask = batch["real_mask"] & keep[..., None]
    lp_real = batch["vlogp_real" if verify else "logp_real"]
    # The first rejected draft (column rej_offset) and the suffix (columns after it) never share
    # a column, so one [B, N, K] array holds the whole rejected stream, its offset the column.
    at_first = jnp.arange(k_block) == batch["rej_offset"][..., None]
    first = at_first & (batch["rej_mask"] & keep)[..., None]
    sfx = batch["sfx_mask"] & keep[..., None] & (opd.rejected_stream == "suffix")
    rej_mask = first | sfx
    rej_token = jnp.where(at_first, batch["rej_token"][..., None], batch["sfx_token"])
    lp_rej = jnp.where(at_first, batch["vlogp_rej" if verify else "logp_rej"][..., None],
                       batch["vlogp_sfx" if verify else "logp_sfx"])
    offsets = jnp.broadcast_to(jnp.arange(k_block, dtype=jnp.int32), rej_mask.shape)
    transform, top_k = family_terms.transform_and_top_k if family_terms else (None, 0)
    with jax.named_scope("lm_head_loss"):
        ce_real, correct, *top = chunked_loss.token_stats_from_hidden(
            hidden, head, labels, real_mask, chunk_size=chunk_size, transform=transform,
            top_k=top_k)
        ce_rej, *_ = chunked_loss.token_stats_from_hidden(
            hidden, head, rej_token, rej_mask, chunk_size=chunk_size, transform=transform)
        loss, aux = opd_loss.opd_loss(
            -ce_real, lp_real, real_mask, -ce_rej, lp_rej, offsets, rej_mask, decay=opd.decay,
            rej_weight=opd.rejected_weight, dpace_alpha=alpha if opd.dpace_weights else None)
    aux = dict(aux)
    if family_terms:
        loss, aux = family_terms.add(loss, aux, labels, real_mask, *top)
    aux["accuracy"] = _masked_mean(correct, real_mask)
    aux["q_real"] = _masked_mean(jnp.exp(-ce_real), real_mask)  # the drafter's p of them
    aux["p_real"] = _masked_mean(jnp.exp(jnp.minimum(lp_real, 0.0)), real_mask)  # the teacher's
    aux["n_suffix"] = jnp.sum(sfx)
    aux["num_blocks"] = jnp.sum(keep)
    return loss, aux


def tv_block_loss(tv, mask):
    """Draft-OPD's block-level TV ("end-to-end"): per block with n supervised positions (a
    prefix of offsets), 1 - (sum over k of prod_{i <= k} (1 - tv_i)) / n, i.e. one minus its
    expected accepted length over n; the mean over blocks with n > 0. tv, mask [..., N, K]."""
    m = mask != 0
    keep = jnp.where(m, jnp.clip(1.0 - tv, 0.0, 1.0), 1.0)
    run = jnp.where(m, jnp.cumprod(keep, axis=-1), 0.0)
    n = jnp.sum(m, axis=-1)
    per_block = 1.0 - jnp.sum(run, axis=-1) / jnp.maximum(n, 1)
    return _masked_mean(per_block, n > 0)


def tv_objective(hidden, head, target_hidden, batch: dict, *, opd, chunk_size: int,
                 family_terms=None):
    """The total variation between the teacher and the drafter at each realized position of the
    replay blocks (offsets 1..emitted: the accepted drafts' positions and the first rejection's),
    averaged per position (opd.tv_reduce=position) or per block (block). With the greedy verify
    teacher it is 1 - q(realized token) and target_hidden may be None."""
    keep = batch["keep"]
    k_block = hidden.shape[2]
    labels, _ = anchor_lib.block_labels(batch["input_ids"], jnp.ones_like(batch["input_ids"]),
                                        batch["anchors"], keep, k_block)
    real_mask = batch["real_mask"] & keep[..., None]
    transform, top_k = family_terms.transform_and_top_k if family_terms else (None, 0)
    with jax.named_scope("lm_head_loss"):
        ce_real, correct, *top = chunked_loss.token_stats_from_hidden(
            hidden, head, labels, real_mask, chunk_size=chunk_size, transform=transform,
            top_k=top_k)
        if target_hidden is None:  # one-hot teacher on the realized (= greedy) token
            tv = jnp.where(real_mask, -jnp.expm1(-ce_real), 0.0)
        else:
            temperature = opd.temperature if opd.teacher == "verify" else 1.0
            tv, _ = teacher_lib.tv_loss_from_hidden(hidden, target_hidden, head, real_mask,
                                                    temperature, chunk_size=chunk_size,
                                                    drafter_transform=transform)
        if opd.tv_reduce == "block":
            loss = tv_block_loss(tv, real_mask)
        else:
            loss = _masked_mean(tv, real_mask)
    aux = {"tv": jax.lax.stop_gradient(_masked_mean(tv, real_mask)),
           "accuracy": _masked_mean(correct, real_mask),
           "q_real": _masked_mean(jnp.exp(-ce_real), real_mask),
           "n_realized": jnp.sum(real_mask), "num_blocks": jnp.sum(keep)}
    if family_terms:
        loss, aux = family_terms.add(loss, aux, labels, real_mask, *top)
    return loss, aux


class _FamilyTerms:
    """What a drafter family adds to the on-policy objectives (DFlash 2: the transform of its
    unary logits, and its selector term over the realized stream's top-Z, uniform weights over
    the realized positions); None for families without (DFlash)."""

    def __init__(self, drafter_params, drafter_cfg, hidden, cfg: StepConfig, step):
        self.family = drafter_family(drafter_cfg.arch)
        self.transform_and_top_k = (logit_transform(drafter_cfg),
                                    self.family.train_top_k(drafter_cfg))
        self._args = (drafter_params, drafter_cfg, hidden, cfg, step)

    def add(self, loss, aux, labels, mask, top_scores, top_ids):
        drafter_params, drafter_cfg, hidden, cfg, step = self._args
        params = jax.tree.map(lambda x: x.astype(cfg.compute_dtype), drafter_params)
        ones = jnp.ones(mask.shape, jnp.float32)
        term, extra = self.family.train_terms(
            params, drafter_cfg, hidden, labels, mask, top_scores, top_ids, ones,
            jnp.sum((mask != 0).astype(jnp.float32)), step, cfg)
        return loss + term, {**aux, **extra}


def _family_terms(drafter_params, drafter_cfg, hidden, cfg: StepConfig, step):
    terms = _FamilyTerms(drafter_params, drafter_cfg, hidden, cfg, step)
    return terms if terms.transform_and_top_k != (None, 0) else None


def opd_loss_fn(drafter_params, target_params, batch: dict[str, jax.Array], key: jax.Array, *,
                target_cfg: model_lib.ModelConfig, drafter_cfg: drafter_lib.DrafterConfig,
                cfg: StepConfig, opd, step=None):
    """Loss and aux metrics of one replay batch (keys BATCH_KEYS) under the opd.* settings
    `opd` (dpace_jax.train.settings.OpdConfig); `key` is unused (the anchors are the
    rollout's)."""
    del key
    hidden, head, _ = _forward(drafter_params, target_params, batch, target_cfg=target_cfg,
                               drafter_cfg=drafter_cfg, cfg=cfg, with_target=False)
    return opd_objective(hidden, head, batch, opd=opd, alpha=cfg.alpha,
                         chunk_size=cfg.loss_chunk_size,
                         family_terms=_family_terms(drafter_params, drafter_cfg, hidden, cfg,
                                                    step))


def tv_loss_fn(drafter_params, target_params, batch: dict[str, jax.Array], key: jax.Array, *,
               target_cfg: model_lib.ModelConfig, drafter_cfg: drafter_lib.DrafterConfig,
               cfg: StepConfig, opd, step=None):
    """train.loss=tv: as opd_loss_fn, with tv_objective."""
    del key
    hidden, head, target = _forward(drafter_params, target_params, batch, target_cfg=target_cfg,
                                    drafter_cfg=drafter_cfg, cfg=cfg,
                                    with_target=needs_target_hidden("tv", opd))
    return tv_objective(hidden, head, target, batch, opd=opd, chunk_size=cfg.loss_chunk_size,
                        family_terms=_family_terms(drafter_params, drafter_cfg, hidden, cfg,
                                                   step))
