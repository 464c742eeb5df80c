"""The DFlash drafter: N Qwen3-style decoder layers over a block of K positions, conditioned on the
frozen target's hidden features, using the target's embedding and LM head.

Parameters: `DrafterParams` (fc [X, D] with X = n * D, hidden_norm, the stacked decoder layers
(dpace_jax.nn.layers.LAYER, the Qwen3 layer), final_norm), declared once in DRAFTER. Shape
letters: docs/design.md §1; the masks: §3.

Context: target features [B, S, X] (the features of the target layers `target_layer_ids`,
concatenated) -> fc -> hidden_norm = c [B, S, D]. Every drafter layer (`nn.layers.decoder_layer`)
projects the same c to keys/values (k_norm, RoPE at the context positions) and puts them before
the keys and values of the block; queries come from the block only.

A block at anchor a holds [token a, MASK, ..., MASK] at absolute positions a..a+K-1. It sees the
context slots s < a and all K positions of its own block (bidirectional), never another block.
Per layer (`layer_types`): a "sliding_attention" layer sees only the context slots s with
a + k - sliding_window < s < a from block position k, and block positions 0..k (causal);
`is_causal` (z-lab's rule, DrafterConfig) overrides that: True makes every layer causal inside the
block, False none; a sliding layer also masks the block positions j with |k - j| >= window.

Two modes share the weights:
  training  `train_forward`: all N blocks of a sequence at once, context = the whole sequence.
  decoding  `extend_cache` + `draft_logits`: one block per sequence against a cached context
            (the target's `KVCache` type, k/v [L, B, S, G, E]; slots at or past the anchor are
            never seen, so rolling back is just writing the next features at an earlier
            `start`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dpace_jax.drafters import block_attention, register
from dpace_jax.drafters.config import (  # noqa: F401  (the drafter's public names)
    LAYER_TYPES,
    DrafterConfig,
    check_compatible,
    default_target_layer_ids,
    warn_if_last_layer,
)
from dpace_jax.drafters.family import DrafterFamily
from dpace_jax.nn import layers
from dpace_jax.nn.layers import LAYER, LayerParams, decoder_layer
from dpace_jax.nn.schema import ArrayInfo, Schema, normal_names, split_keys, table_params
from dpace_jax.targets.base import KVCache, TargetParams
from dpace_jax.targets.model import lm_head
from dpace_jax.targets.runner import write_at

DRAFTER = {
    "fc": ArrayInfo(("X", "D"), ("features", "embed"), "normal", "fc.weight", "t"),
    "hidden_norm": ArrayInfo(("D",), (None,), "ones", "hidden_norm.weight", "same"),
    "final_norm": ArrayInfo(("D",), (None,), "ones", "norm.weight", "same"),
}
LAYER_PREFIX = "layers.{i}."


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DrafterParams:
    fc: jax.Array  # [n * D, D]
    hidden_norm: jax.Array  # [D]
    layers: LayerParams
    final_norm: jax.Array  # [D]


def dims(cfg: DrafterConfig) -> dict[str, int]:
    return {**layers.dims(cfg), "X": cfg.feature_size}


def params(cfg: DrafterConfig):
    """DRAFTER and the decoder layers; keys: one for the layers, then one per top matrix."""
    top = normal_names(DRAFTER)
    split = ("split", 1 + len(top))
    top_keys = {n: (split + (1 + j,),) for j, n in enumerate(top)}
    layer_keys = split_keys(normal_names(LAYER), ((*split, 0),))
    return (table_params(DRAFTER, (), "", None, top_keys)
            + table_params(LAYER, ("layers",), LAYER_PREFIX, tuple(range(cfg.num_layers)),
                           layer_keys))


SCHEMA = Schema("drafter", params, dims, {(): DrafterParams, ("layers",): LayerParams})


class DFlash(DrafterFamily):
    schema = SCHEMA


FAMILY = register(DFlash())


def _family(cfg: DrafterConfig) -> DrafterFamily:
    from dpace_jax.drafters import drafter_family

    return drafter_family(cfg.arch)


def init_drafter_params(cfg: DrafterConfig, key: jax.Array, dtype=jnp.float32,
                        scale: float = 0.02):
    """Random parameters of cfg's family: normal(0, scale) matrices, unit norms (its schema)."""
    return _family(cfg).schema.init(cfg, key, dtype, scale)


def head_logits(target_params: TargetParams, hidden: jax.Array, cfg: DrafterConfig) -> jax.Array:
    """The draft logits of hidden [..., D]: the target's LM head, then the family's transform
    (DFlash 2: times output_multiplier, softcapped) -> fp32 [..., V]."""
    logits = lm_head(target_params, hidden)
    multiplier, softcap = _family(cfg).logit_transform(cfg)
    return transform_logits(logits, multiplier, softcap)


def transform_logits(logits: jax.Array, multiplier: float, softcap: float | None) -> jax.Array:
    """multiplier * logits, then softcap * tanh(. / softcap) when softcap (static values)."""
    if multiplier != 1.0:
        logits = logits * multiplier
    if softcap:
        logits = softcap * jnp.tanh(logits / softcap)
    return logits


def _inv_freq(cfg: DrafterConfig) -> jax.Array:
    return layers.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.scaling_dict)


def project_context(params: DrafterParams, cfg: DrafterConfig, features: jax.Array) -> jax.Array:
    """Target features [B, S, X] -> context hidden c [B, S, D] (fc, then hidden_norm)."""
    if features.shape[-1] != cfg.feature_size:
        raise ValueError(f"target features have width {features.shape[-1]}, expected "
                         f"{cfg.feature_size} = {cfg.num_features} layers x {cfg.hidden_size}")
    c = jnp.einsum("...x,xd->...d", features.astype(params.fc.dtype), params.fc)
    return layers.rms_norm(c, params.hidden_norm, cfg.rms_norm_eps)


def _layer_context_kv(p, cfg: DrafterConfig, c, cos, sin):
    k, v = layers.project_kv(c, p, cfg.rms_norm_eps)
    return layers.apply_rope(k, cos, sin), v


def context_kv(params: DrafterParams, cfg: DrafterConfig, c: jax.Array,
               positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Every layer's keys/values of the context: c [B, S, D] at positions [B, S] ->
    k, v [L, B, S, G, E] (k_norm and RoPE applied to k)."""
    cos, sin = layers.rope_cos_sin(positions, _inv_freq(cfg))
    return jax.vmap(lambda p: _layer_context_kv(p, cfg, c, cos, sin))(params.layers)


def _drafter_layer(x, p, cfg: DrafterConfig, cos, sin, ck, cv, anchors, mask, attention: dict):
    """One drafter layer (the target's decoder layer) on block hidden x [B, N, K, D], its block
    attention reading this layer's context ck/cv with mask = (window, causal) (scalars, see
    block_attention); `attention` holds the remaining options of `block_attention.attend`."""
    window, causal = mask

    def attend(q, kb, vb):
        return block_attention.attend(q, kb, vb, ck.astype(x.dtype), cv.astype(x.dtype),
                                      anchors, window=window, causal=causal, **attention), None

    return decoder_layer(x, p, cos, sin, cfg, attend, around=_family(cfg).around(p, cfg))[0]


def _run_blocks(params, cfg: DrafterConfig, x, anchors, context, remat: bool,
                attention: dict | None = None):
    """Scan the layers. `context` is ("kv", k, v) with per-layer k/v [L, B, S, G, E], or
    ("c", c, positions) to project the context inside each layer step."""
    attention = attention or {}
    x = x.astype(params.fc.dtype)
    anchors = anchors.astype(jnp.int32)
    positions = anchors[:, :, None] + jnp.arange(cfg.block_size, dtype=jnp.int32)
    cos, sin = layers.rope_cos_sin(positions, _inv_freq(cfg))  # [B, N, K, E]
    masks = (jnp.asarray(cfg.layer_windows, jnp.int32), jnp.asarray(cfg.layer_causal, bool))

    if context[0] == "kv":
        _, ctx_k, ctx_v = context

        def step(x, inputs):
            p, ck, cv, mask = inputs
            return _drafter_layer(x, p, cfg, cos, sin, ck, cv, anchors, mask, attention), None

        xs = (params.layers, ctx_k, ctx_v, masks)
    else:
        _, c, ctx_pos = context
        ccos, csin = layers.rope_cos_sin(ctx_pos, _inv_freq(cfg))

        def step(x, inputs):
            p, mask = inputs
            ck, cv = _layer_context_kv(p, cfg, c, ccos, csin)
            return _drafter_layer(x, p, cfg, cos, sin, ck, cv, anchors, mask, attention), None

        xs = (params.layers, masks)
    if remat:
        step = jax.checkpoint(step)
    x, _ = jax.lax.scan(step, x, xs)
    return layers.rms_norm(x, params.final_norm, cfg.rms_norm_eps)


def _check_block(x, cfg: DrafterConfig):
    if x.shape[-2] != cfg.block_size or x.shape[-1] != cfg.hidden_size:
        raise ValueError(f"block input has shape {x.shape}, expected [B, N, "
                         f"{cfg.block_size}, {cfg.hidden_size}]")


def block_forward(params: DrafterParams, cfg: DrafterConfig, x: jax.Array, anchors: jax.Array,
                  ctx_k: jax.Array, ctx_v: jax.Array) -> jax.Array:
    """Blocks x [B, N, K, D] at anchors [B, N] against context k/v [L, B, S, G, E] ->
    hidden [B, N, K, D] after the final norm. Block n of sequence b sees context slots
    s < anchors[b, n] (within each sliding layer's window) and its own K positions (at absolute
    positions anchor + k)."""
    _check_block(x, cfg)
    return _run_blocks(params, cfg, x, anchors, ("kv", ctx_k, ctx_v), remat=False)


def block_inputs(embed: jax.Array, anchor_tokens: jax.Array, cfg: DrafterConfig) -> jax.Array:
    """Embeddings [..., K, D] of the blocks [token, MASK, ..., MASK] for anchor_tokens [...]."""
    first = jnp.take(embed, anchor_tokens, axis=0)[..., None, :]
    mask = jnp.broadcast_to(embed[cfg.mask_token_id],
                            (*anchor_tokens.shape, cfg.block_size - 1, embed.shape[-1]))
    x = jnp.concatenate([first, mask], axis=-2)
    scale = _family(cfg).embedding_scale(cfg)
    return x if scale == 1.0 else x * jnp.asarray(scale, x.dtype)


def extend_cache(params: DrafterParams, cfg: DrafterConfig, cache: KVCache, features: jax.Array,
                 start: jax.Array) -> KVCache:
    """Write the context k/v of target features [B, T, X] at positions start[b]..start[b]+T-1.
    Rows past the live length stay stale; draft_logits masks them by s < anchor. Callers keep
    start + T <= S (XLA clamps out-of-range writes)."""
    t = features.shape[1]
    start = start.astype(jnp.int32)
    positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    k, v = context_kv(params, cfg, project_context(params, cfg, features), positions)
    write = jax.vmap(write_at, in_axes=(0, 0, None))
    return KVCache(write(cache.k, k, start), write(cache.v, v, start))


def draft_hidden(params: DrafterParams, cfg: DrafterConfig, target_params: TargetParams,
                 cache: KVCache, anchor_tokens: jax.Array, anchors: jax.Array) -> jax.Array:
    """Decoding: one block [anchor_tokens[b], MASK...] per sequence at positions anchors[b]..
    anchors[b]+K-1 against the cached context (slots < anchors[b]) -> its final hidden states
    [B, K, D]. Position 0 is the given token; positions 1..K-1 are the draft."""
    with jax.named_scope("draft"):
        x = block_inputs(target_params.embed, anchor_tokens[:, None], cfg)
        return block_forward(params, cfg, x, anchors[:, None], cache.k, cache.v)[:, 0]


def draft_logits(params: DrafterParams, cfg: DrafterConfig, target_params: TargetParams,
                 cache: KVCache, anchor_tokens: jax.Array, anchors: jax.Array) -> jax.Array:
    """`draft_hidden`'s draft logits [B, K, V] (fp32; DFlash 2: its unary scores)."""
    hidden = draft_hidden(params, cfg, target_params, cache, anchor_tokens, anchors)
    return head_logits(target_params, hidden, cfg)


def train_forward(params: DrafterParams, cfg: DrafterConfig, target_params: TargetParams,
                  features: jax.Array,
                  tokens: jax.Array, anchors: jax.Array, *, remat: bool = False,
                  attention: str = "dense", attention_group: int = 0,
                  attention_tile: int = block_attention.DEFAULT_FLASH_TILE) -> jax.Array:
    """Training: target features [B, S, X] and tokens [B, S] of whole sequences, N blocks per
    sequence at anchors [B, N] (any order; padding anchors give blocks whose output the loss
    ignores) -> hidden [B, N, K, D] after the final norm. `remat` recomputes each layer in the
    backward pass instead of storing its activations. `attention` ("dense" or "flash"),
    `attention_group` (blocks per group; 0: all at once for dense, 64 for flash) and
    `attention_tile` (context columns per flash step) choose how the blocks attend: the same
    result, different memory and speed (see dpace_jax.drafters.block_attention)."""
    b, s = tokens.shape
    with jax.named_scope("drafter"):
        c = project_context(params, cfg, features)
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        anchors = anchors.astype(jnp.int32)
        anchor_tokens = jnp.take_along_axis(tokens, anchors, axis=1)
        x = block_inputs(target_params.embed, anchor_tokens, cfg)
        _check_block(x, cfg)
        options = {"implementation": attention, "group": attention_group, "tile": attention_tile}
        return _run_blocks(params, cfg, x, anchors, ("c", c, positions), remat=remat,
                           attention=options)
