"""The SPD draft module (docs/spd.md, dpace_jax.infer.spd.pipeline): a few decoder layers that
predict the token after the pipeline's head from the states the in-flight tokens have reached.

Architecture: a DFlash drafter (`dpace_jax.drafters.dflash`, same `DrafterParams` / `DrafterConfig`)
whose block is the window of the n newest positions h-n+1..h (block_size = n stages) and whose
target features are the n stage boundaries: feature layer k (0-based) is stage k's last layer
(`spd.stage_layer_ids`), so boundary state b_{k+1} is that layer's output (b_n after the final
norm). fc [n*D, D] splits into n row blocks W_k [D, D]. A position j that has passed d stages
(its *depth*, 0..n) enters as

    u_j(d) = embed(token_j) + hidden_norm(sum_{k < d} b_{k+1}(j) @ W_k)        (d = 0: embedding)

the boundaries it has not reached contributing zero. Finished positions (depth n) are also the
context: hidden_norm(sum_{k < n} b_{k+1} @ W_k) projected to keys / values in every layer, as in
DFlash. The block sees the context slots before h-n+1 and itself (bidirectionally); the hidden
state of its last position (h) goes through the target's LM head: logits for h + 1.

Depths: in steady state position h - o has depth o (o = 0..n-1). After a flush the pipeline
refills; a steps later (a = 0..n-1, a = h - exited - 1) offsets o <= a have depth o and older
ones are finished (depth n). Training samples a per head: n - 1 (steady state) half of the time,
else uniform in 0..n-1.

Training: dpace_jax.train.spd (train.mode=spd; its forward here: `train_logits`).

Decoding hooks (spd.SpdDrafter): state = (context KVCache [Ld, B, S, G, E], acc [B, S, D]
fp32: per position the partial sum sum_{k < d} b_{k+1} @ W_k of the depth reached so far). Each
step the gathered stage inputs add their boundary to acc (stage 0 resets the head's row); a
finished token adds b_n and writes its context keys / values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dpace_jax.drafters import dflash
from dpace_jax.drafters.config import DrafterConfig
from dpace_jax.infer.rows import gather_rows, set_rows
from dpace_jax.infer.spd import pipeline as spd
from dpace_jax.nn import layers
from dpace_jax.targets import model as model_lib
from dpace_jax.targets.base import KVCache
from dpace_jax.targets.runner import write_at


def draft_config(target_cfg: model_lib.ModelConfig, num_stages: int,
                 num_layers: int = 2) -> DrafterConfig:
    """The draft module of a target split into num_stages stages."""
    return DrafterConfig.for_target(target_cfg, num_layers=num_layers, block_size=num_stages,
                                    mask_token_id=0,
                                    target_layer_ids=spd.stage_layer_ids(target_cfg, num_stages))


def check(cfg: DrafterConfig, target_cfg: model_lib.ModelConfig, source: str = "drafter") -> None:
    """ValueError unless cfg is the draft module of target_cfg split into block_size stages."""
    dflash.check_compatible(cfg, target_cfg, source=source)
    want = spd.stage_layer_ids(target_cfg, cfg.block_size)
    if tuple(cfg.target_layer_ids) != want:
        raise ValueError(f"{source}: an SPD draft module for {cfg.block_size} stages "
                         f"(drafter.block_size) needs target_layer_ids={list(want)} (the stage "
                         f"boundaries), got {list(cfg.target_layer_ids)}")


def _fc_blocks(params, cfg: DrafterConfig) -> jax.Array:
    """fc [n*D, D] -> W [n, D, D]."""
    return params.fc.reshape(cfg.block_size, cfg.hidden_size, cfg.hidden_size)


def partial_sums(params, cfg: DrafterConfig, features: jax.Array) -> jax.Array:
    """Boundary features [B, S, n*D] -> cum [n + 1, B, S, D] fp32:
    cum[d] = sum_{k<d} b_{k+1} W_k."""
    n, d = cfg.block_size, cfg.hidden_size
    b = features.reshape(*features.shape[:-1], n, d).astype(jnp.float32)
    terms = jnp.einsum("bskd,kde->kbse", b, _fc_blocks(params, cfg).astype(jnp.float32))
    return jnp.concatenate([jnp.zeros_like(terms[:1]), jnp.cumsum(terms, axis=0)], axis=0)


def _norm(params, cfg: DrafterConfig, acc):
    return layers.rms_norm(acc.astype(params.fc.dtype), params.hidden_norm, cfg.rms_norm_eps)


def block_depths(heads: jax.Array, flush_age: jax.Array, n: int):
    """Block positions [..., n] (h-n+1..h) and their depths: offset o = h - j has depth o when
    o <= flush_age, else n (finished)."""
    offsets = n - 1 - jnp.arange(n, dtype=jnp.int32)
    positions = heads[..., None] - offsets
    return positions, jnp.where(offsets <= flush_age[..., None], offsets, n)


def block_inputs(params, cfg: DrafterConfig, embed, tokens, cum, heads, flush_age):
    """Training block inputs [B, N, n, D] for heads [B, N] (>= n - 1) and flush ages [B, N]."""
    positions, depths = block_depths(heads, flush_age, cfg.block_size)
    rows = jnp.arange(tokens.shape[0])[:, None, None]
    part = cum[depths, rows, positions]  # [B, N, n, D]
    return jnp.take(embed, tokens[rows, positions], axis=0) + _norm(params, cfg, part)


def _context_kv(params, cfg: DrafterConfig, acc, positions):
    return dflash.context_kv(params, cfg, _norm(params, cfg, acc), positions)


def train_logits(params, cfg: DrafterConfig, target_params, features, tokens, heads, flush_age):
    """Draft logits [B, N, V] (fp32) for the token after each head, the target's boundary
    features [B, S, n*D] of the whole sequences tokens [B, S] given."""
    with jax.named_scope("spd_draft"):
        cum = partial_sums(params, cfg, features)
        seq = tokens.shape[1]
        positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), tokens.shape)
        ctx_k, ctx_v = _context_kv(params, cfg, cum[-1], positions)
        x = block_inputs(params, cfg, target_params.embed, tokens, cum, heads, flush_age)
        anchors = heads - (cfg.block_size - 1)
        hidden = dflash.block_forward(params, cfg, x.astype(params.fc.dtype), anchors, ctx_k,
                                      ctx_v)
        return model_lib.lm_head(target_params, hidden[:, :, -1])


# ---------------------------------------------------------------------------------------------
# decoding hooks (dpace_jax.infer.spd.pipeline.SpdDrafter)


def _init(params, cfg: DrafterConfig, target_params, prompts, boundary, size):
    batch, plen = prompts.shape
    features = jnp.concatenate(list(boundary), axis=-1)  # [B, P, n*D]
    acc = jnp.zeros((batch, size, cfg.hidden_size), jnp.float32)
    acc = acc.at[:, :plen].set(partial_sums(params, cfg, features)[-1])
    k, v = _context_kv(params, cfg, acc, jnp.broadcast_to(jnp.arange(size), (batch, size)))
    return KVCache(k.astype(params.fc.dtype), v.astype(params.fc.dtype)), acc


def _draft(params, cfg: DrafterConfig, target_params, state, view: spd.View):
    ctx, acc = state
    n = cfg.block_size
    w = _fc_blocks(params, cfg).astype(jnp.float32)
    acc = set_rows(acc, view.head, jnp.zeros_like(acc[:, 0]), jnp.ones_like(view.valid[0]))
    for s in range(1, n):
        add = view.states[s].astype(jnp.float32) @ w[s - 1]
        pos = view.head - s
        acc = set_rows(acc, pos, gather_rows(acc, pos) + add, view.valid[s])
    positions = view.head[:, None] - (n - 1 - jnp.arange(n))  # [B, n]
    part = jax.vmap(lambda a, p: a[p])(acc, positions)
    tokens = jax.vmap(lambda r, p: r[p])(view.seq, positions)
    x = jnp.take(target_params.embed, tokens, axis=0) + _norm(params, cfg, part)
    hidden = dflash.block_forward(params, cfg, x[:, None].astype(params.fc.dtype),
                                  positions[:, :1], ctx.k, ctx.v)
    return (ctx, acc), model_lib.lm_head(target_params, hidden[:, 0, -1])


def _complete(params, cfg: DrafterConfig, state, pos, final, valid):
    ctx, acc = state
    w_last = _fc_blocks(params, cfg)[-1].astype(jnp.float32)
    acc = set_rows(acc, pos, gather_rows(acc, pos) + final.astype(jnp.float32) @ w_last, valid)
    # k, v [Ld, B, 1, G, E]
    k, v = _context_kv(params, cfg, gather_rows(acc, pos)[:, None], pos[:, None])
    write = jax.vmap(write_at, in_axes=(0, 0, None))
    start = jnp.where(valid, pos, ctx.k.shape[2] - 1)  # invalid: the never-seen trash slot
    return KVCache(write(ctx.k, k, start), write(ctx.v, v, start)), acc


def spd_drafter(params, cfg: DrafterConfig, target_cfg: model_lib.ModelConfig | None = None):
    """The trained draft module as an spd.SpdDrafter (checked against the target when given)."""
    if target_cfg is not None:
        check(cfg, target_cfg)
    return spd.SpdDrafter(params, cfg, _init, _draft, _complete)
