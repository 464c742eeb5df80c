"""The jitted D-PACE / DFlash train step over a (data, fsdp, tensor) mesh.

One step: frozen target forward (features at `target_layer_ids`, no gradient) -> anchors sampled
from the step's PRNG key -> drafter forward over all packed blocks -> loss from the final hidden
states and the target's LM head, computed in chunks -> AdamW (fp32 master weights, compute in
`compute_dtype`) with global-norm clipping and a warmup-cosine schedule.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from dpace_jax import loss as loss_lib
from dpace_jax import sharding as shard_lib
from dpace_jax.config import parse_dtype
from dpace_jax.drafters import block_attention, drafter_family
from dpace_jax.drafters import dflash as drafter_lib
from dpace_jax.loss import chunked as chunked_loss
from dpace_jax.targets import model as model_lib
from dpace_jax.train import anchors as anchor_lib

NAN_POLICIES = ("stop", "skip-step")
SELECTOR_WEIGHTS = ("base", "uniform")
DEFAULT_LOSS = "dpace"  # train.loss "" in supervised training (the modes: dpace_jax.train.modes)


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar
    params: Any  # drafter params, fp32 master copy
    opt_state: Any
    rng: jax.Array  # uint32[2] base key; step keys are fold_in(rng, step)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What the compiled step depends on: the `train.*` fields of the run config (whose defaults
    are the only ones; build with `from_config`) and the schedule's length. Checked on creation,
    each error naming its config field; the objective's name is checked by the run's mode
    (dpace_jax.train.modes). `SAME_RESULT`: the fields that change speed or memory only (left
    out of the resume fingerprint)."""

    loss: str
    alpha: float
    gamma: float | None  # None: no decay (train.gamma = 0)
    num_anchors: int
    lr: float
    warmup_ratio: float
    total_steps: int
    grad_clip: float
    compute_dtype: Any
    loss_chunk_size: int
    remat: bool  # recompute drafter layers in the backward pass (less memory)
    attention: str  # drafter block attention: dense | flash
    attention_group: int  # blocks per group (dense: 0 = all at once; flash: 0 = 64)
    attention_tile: int  # flash: context columns per step
    target_attention: str  # target forward attention: einsum | cudnn (GPU)
    nan_policy: str  # a step with non-finite loss or gradients: not applied; "stop" | "skip-step"
    # DFlash 2's selector term (docs/dflash2.md): its weight alpha, zero for the first
    # warmup_ratio of the steps, then ramped linearly over ramp_ratio; its position weights
    # ("base": the objective's own, "uniform": 1); stop_gradient detaches the unary scores and
    # hidden states inside it.
    selector_loss_alpha: float = 1.0
    selector_warmup_ratio: float = 0.0
    selector_ramp_ratio: float = 0.0
    selector_weights: str = "base"
    selector_stop_gradient: bool = False

    SAME_RESULT = ("total_steps", "loss_chunk_size", "remat", "attention", "attention_group",
                   "attention_tile", "target_attention", "nan_policy")

    @classmethod
    def from_config(cls, config, total_steps: int, loss: str | None = None) -> StepConfig:
        """The step settings of a run config (`config.train`) for a schedule of total_steps;
        `loss` replaces train.loss ("": the supervised default, DEFAULT_LOSS)."""
        t = config.train
        return cls(
            loss=str(loss or t.loss or DEFAULT_LOSS), alpha=float(t.alpha),
            gamma=float(t.gamma) if t.gamma else None,
            num_anchors=int(t.num_anchors), lr=float(t.lr), warmup_ratio=float(t.warmup_ratio),
            total_steps=int(total_steps), grad_clip=float(t.grad_clip),
            compute_dtype=parse_dtype(t.compute_dtype, "train.compute_dtype"),
            loss_chunk_size=int(t.loss_chunk_size), remat=bool(t.remat),
            attention=str(t.attention), attention_group=int(t.attention_group),
            attention_tile=int(t.attention_tile), target_attention=str(t.target_attention),
            nan_policy=str(t.nan_policy), selector_loss_alpha=float(t.selector_loss_alpha),
            selector_warmup_ratio=float(t.selector_warmup_ratio),
            selector_ramp_ratio=float(t.selector_ramp_ratio),
            selector_weights=str(t.selector_weights),
            selector_stop_gradient=bool(t.selector_stop_gradient))

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"train.alpha={self.alpha} must lie in [0, 1]")
        if self.gamma is not None and not self.gamma > 0:
            raise ValueError(f"train.gamma={self.gamma} must be > 0 (0: no decay)")
        if self.num_anchors < 1 or self.loss_chunk_size < 1:
            raise ValueError(f"train.num_anchors={self.num_anchors} and train.loss_chunk_size="
                             f"{self.loss_chunk_size} must be >= 1")
        if not self.lr > 0 or not 0 <= self.warmup_ratio < 1 or not self.grad_clip > 0:
            raise ValueError(f"train.lr={self.lr} and train.grad_clip={self.grad_clip} must be "
                             f"> 0, train.warmup_ratio={self.warmup_ratio} in [0, 1)")
        if self.total_steps < 1:
            raise ValueError(f"total steps must be >= 1, got {self.total_steps}")
        if self.nan_policy not in NAN_POLICIES:
            raise ValueError(f"train.nan_policy={self.nan_policy!r}; expected one of "
                             f"{NAN_POLICIES}")
        if self.attention not in block_attention.IMPLEMENTATIONS:
            raise ValueError(f"train.attention={self.attention!r}; expected one of "
                             f"{block_attention.IMPLEMENTATIONS}")
        if self.attention_group < 0 or self.attention_tile < 1:
            raise ValueError(f"train.attention_group={self.attention_group} must be >= 0 and "
                             f"train.attention_tile={self.attention_tile} >= 1")
        if self.selector_loss_alpha < 0 or not (
                0 <= self.selector_warmup_ratio <= 1 and 0 <= self.selector_ramp_ratio <= 1):
            raise ValueError(f"train.selector_loss_alpha={self.selector_loss_alpha} must be >= 0, "
                             f"train.selector_warmup_ratio={self.selector_warmup_ratio} and "
                             f"train.selector_ramp_ratio={self.selector_ramp_ratio} in [0, 1]")
        if self.selector_weights not in SELECTOR_WEIGHTS:
            raise ValueError(f"train.selector_weights={self.selector_weights!r}; expected one of "
                             f"{SELECTOR_WEIGHTS}")
        if self.target_attention not in model_lib.TRAIN_ATTENTION:
            raise ValueError(f"train.target_attention={self.target_attention!r}; expected one "
                             f"of {model_lib.TRAIN_ATTENTION}")


def learning_rate_schedule(cfg: StepConfig) -> optax.Schedule:
    warmup = max(1, round(cfg.warmup_ratio * cfg.total_steps))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(cfg.total_steps, warmup + 1), end_value=0.0,
    )


def make_optimizer(cfg: StepConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(learning_rate_schedule(cfg), b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0),
    )


def init_state(params, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.PRNGKey(seed),
    )


def drafter_hidden(drafter_params, target_params, tokens, anchors, *,
                   target_cfg: model_lib.ModelConfig, drafter_cfg: drafter_lib.DrafterConfig,
                   cfg: StepConfig):
    """Frozen target features of tokens [B, S] -> the drafter's hidden states [B, N, K, D] of the
    blocks at anchors [B, N], and the target's LM head [D, V] (no gradient), in compute dtype."""
    features = model_lib.features(target_params, target_cfg, tokens,
                                  drafter_cfg.target_layer_ids, attention=cfg.target_attention)
    features = jax.lax.stop_gradient(features).astype(cfg.compute_dtype)
    compute_params = jax.tree.map(lambda x: x.astype(cfg.compute_dtype), drafter_params)
    hidden = drafter_lib.train_forward(
        compute_params, drafter_cfg, target_params, features, tokens, anchors, remat=cfg.remat,
        attention=cfg.attention, attention_group=cfg.attention_group,
        attention_tile=cfg.attention_tile,
    )
    head = jax.lax.stop_gradient(model_lib.lm_head_matrix(target_params))
    return hidden, head.astype(cfg.compute_dtype)


def loss_fn(
    drafter_params,
    target_params,
    batch: dict[str, jax.Array],
    key: jax.Array,
    *,
    target_cfg: model_lib.ModelConfig,
    drafter_cfg: drafter_lib.DrafterConfig,
    cfg: StepConfig,
    step=None,
):
    """Loss and aux metrics of one batch {input_ids [B, S], loss_mask [B, S]}: the objective on
    the drafter's logits (DFlash 2: its unary scores) plus its family's own terms (DFlash 2's
    selector cross-entropy) at optimizer step `step`."""
    tokens, loss_mask = batch["input_ids"], batch["loss_mask"]
    anchors, keep = anchor_lib.sample_anchors(
        key, loss_mask, cfg.num_anchors, drafter_cfg.block_size
    )
    hidden, head = drafter_hidden(drafter_params, target_params, tokens, anchors,
                                  target_cfg=target_cfg, drafter_cfg=drafter_cfg, cfg=cfg)
    labels, mask = anchor_lib.block_labels(
        tokens, loss_mask, anchors, keep, drafter_cfg.block_size
    )
    family = drafter_family(drafter_cfg.arch)
    top_k = family.train_top_k(drafter_cfg)
    with jax.named_scope("lm_head_loss"):
        stats = chunked_loss.token_stats_from_hidden(
            hidden, head, labels, mask, chunk_size=cfg.loss_chunk_size,
            transform=logit_transform(drafter_cfg), top_k=top_k)
        loss, aux, (weights, den) = loss_lib.loss_and_weights(
            cfg.loss, stats[0], stats[1], mask, alpha=cfg.alpha, gamma=cfg.gamma)
    aux = dict(aux)
    if top_k:
        with jax.named_scope("family_terms"):
            params = jax.tree.map(lambda x: x.astype(cfg.compute_dtype), drafter_params)
            extra, extra_aux = family.train_terms(
                params, drafter_cfg, hidden, labels, mask, stats[2], stats[3], weights, den,
                step, cfg)
        loss = loss + extra
        aux.update(extra_aux)
    aux["num_blocks"] = jnp.sum(keep)
    return loss, aux


def logit_transform(drafter_cfg):
    """The drafter family's map of the head's logits (None: the identity)."""
    multiplier, softcap = drafter_family(drafter_cfg.arch).logit_transform(drafter_cfg)
    if multiplier == 1.0 and not softcap:
        return None
    return lambda logits: drafter_lib.transform_logits(logits, multiplier, softcap)


def _global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def make_train_step(
    target_cfg: model_lib.ModelConfig,
    drafter_cfg: drafter_lib.DrafterConfig,
    cfg: StepConfig,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    state_shardings,
    target_shardings,
    objective: Callable = loss_fn,
    batch_keys: tuple[str, ...] = ("input_ids", "loss_mask"),
):
    """A jitted `step(state, target_params, batch) -> (state, metrics)`; the state is donated.
    `objective` (default `loss_fn`; on-policy: `opd_step.opd_loss_fn`) gives the loss of a batch
    {batch_keys: arrays whose leading axis is the batch}."""
    schedule = learning_rate_schedule(cfg)
    grad_fn = jax.value_and_grad(
        lambda p, t, b, k, s: objective(p, t, b, k, target_cfg=target_cfg,
                                        drafter_cfg=drafter_cfg, cfg=cfg, step=s),
        has_aux=True,
    )

    def step(state: TrainState, target_params, batch):
        key = jax.random.fold_in(state.rng, state.step)
        (loss, aux), grads = grad_fn(state.params, target_params, batch, key, state.step)
        grad_norm = _global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        with jax.named_scope("optimizer"):
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        # A non-finite step is not applied (the trainer stops or skips it: cfg.nan_policy).
        params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                         (params, opt_state), (state.params, state.opt_state))
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step),
                   "finite": finite, **aux}
        new_state = TrainState(state.step + 1, params, opt_state, state.rng)
        return new_state, metrics

    batch_sharding = shard_lib.batch_sharding(mesh)
    return jax.jit(
        step,
        in_shardings=(state_shardings, target_shardings,
                      dict.fromkeys(batch_keys, batch_sharding)),
        out_shardings=(state_shardings, shard_lib.replicated(mesh)),
        donate_argnums=(0,),
    )


def state_shardings(state: TrainState, mesh: Mesh, drafter_cfg) -> TrainState:
    """Drafter params and both Adam moments sharded fsdp-style (by the drafter family schema's
    rules); step and rng replicated."""
    from dpace_jax.drafters import drafter_family

    rules = drafter_family(drafter_cfg.arch).schema.rules(drafter_cfg)
    rep = shard_lib.replicated(mesh)
    return TrainState(
        step=rep,
        params=shard_lib.param_shardings(state.params, mesh, rules),
        opt_state=shard_lib.param_shardings(state.opt_state, mesh, rules),
        rng=rep,
    )
