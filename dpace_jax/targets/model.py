"""The frozen target as pure functions over `TargetParams`, for any family of the registry
(dpace_jax.targets.FAMILIES): the embedding, the family's layers through the one layer loop
(dpace_jax.targets.runner), its final norm and the LM head (or the tied embedding).

Three forwards: `features` (training: the feature layers only), `forward` (the whole model, no
cache) and `forward_cached` (decoding). The cache (`init_cache`) is a `KVCache(k, v)` with k, v
[L, B, S, G, E], S fixed (the drafter uses the same type for its context), or a family's own (a
Qwen3.5 target's `HybridCache`). The cache holds no length: the caller says where each
sequence's new tokens go (`start` [B]); a query at absolute position p sees cache slots 0..p.
Rolling back is therefore just writing the next block at an earlier `start`; slots past the live
length hold stale entries that no query can see until they are overwritten. Callers must keep
start + T <= S (XLA clamps out-of-range updates). A recurrent layer cannot roll back by
position: it commits per `keep`, or returns its block pending for `commit`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dpace_jax.targets import family as family_of
from dpace_jax.targets.base import KVCache, TargetParams  # noqa: F401  (the target's types)
from dpace_jax.targets.config import ModelConfig, freeze_scaling  # noqa: F401 (re-exported)
from dpace_jax.targets.runner import ATTENTION, context, run_layers

TRAIN_ATTENTION = ("einsum", "cudnn")  # the cache-free attentions meant for training


class Output(NamedTuple):
    logits: jax.Array | None  # [B, T, V] fp32
    features: jax.Array | None  # [B, T, n * D] in the compute dtype
    cache: object | None  # forward_cached only
    hidden: jax.Array | None  # [B, T, D] after the final norm


def _check(cfg: ModelConfig, feature_layers, attention: str) -> None:
    if attention not in ATTENTION:
        raise ValueError(f"attention={attention!r}; choose one of {sorted(ATTENTION)}")
    bad = [j for j in feature_layers if not 0 <= j < cfg.num_layers]
    if bad:
        raise ValueError(f"feature_layers {bad} outside the target's {cfg.num_layers} layers")
    cfg.family.check(cfg)
    cfg.family.check_attention(cfg, attention)


def _features(fam, cfg: ModelConfig, outs, ids, final_norm) -> jax.Array:
    """Concatenate the features of layer ids `ids` from their decoder-layer outputs: HF's
    `output_hidden_states[j + 1]`, which for the last layer is the state after the final norm
    (docs/design.md §2)."""
    last = cfg.num_layers - 1
    return jnp.concatenate(
        [fam.norm(x, final_norm, cfg.rms_norm_eps) if j == last else x
         for j, x in zip(ids, outs, strict=True)], axis=-1)


def _positions(tokens, start):
    start = jnp.zeros((tokens.shape[0],), jnp.int32) if start is None else start
    return start[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]


def features(params: TargetParams, cfg: ModelConfig, tokens: jax.Array,
             feature_layers: tuple[int, ...], *, attention: str = "einsum") -> jax.Array:
    """The training forward: target features [B, T, n * D] of layers `feature_layers` (any
    order, repeats allowed) for tokens [B, T] at positions 0..T-1, running only the units up to
    the one holding the deepest feature layer."""
    _check(cfg, feature_layers, attention)
    if not feature_layers:
        raise ValueError("features: feature_layers is empty")
    fam = cfg.family
    with jax.named_scope("target_features"):
        ctx = context(fam, cfg, _positions(tokens, None), implementation=attention,
                      feature_layers=feature_layers)
        stop = max(feature_layers) // fam.layers_per_unit(cfg) + 1
        x = jnp.take(params.embed, tokens, axis=0)
        _, outs, _ = run_layers(fam, cfg, params.layers, x, ctx, stop=stop,
                                feature_layers=feature_layers)
        return _features(fam, cfg, list(outs), feature_layers, params.final_norm)


def _finish(fam, params, cfg, x, outs, feature_layers, logits: bool, cache) -> Output:
    features_ = None
    if feature_layers:
        features_ = _features(fam, cfg, list(outs), feature_layers, params.final_norm)
    hidden = fam.norm(x, params.final_norm, cfg.rms_norm_eps)
    return Output(lm_head(params, hidden) if logits else None, features_, cache, hidden)


def forward(params: TargetParams, cfg: ModelConfig, tokens: jax.Array, *,
            feature_layers: tuple[int, ...] = (), logits: bool = True,
            attention: str = "einsum") -> Output:
    """The whole target over tokens [B, T] at positions 0..T-1, causal, no cache: logits (when
    `logits`), the features of `feature_layers` (docs/design.md §2) and the final hidden state.

    `attention`: "einsum" (ours), "cudnn" (jax.nn.dot_product_attention's fused kernel; NVIDIA
    GPUs, bf16 or fp16 params) or "dot_product" (its XLA implementation; tests)."""
    _check(cfg, feature_layers, attention)
    fam = cfg.family
    with jax.named_scope("target_forward"):
        ctx = context(fam, cfg, _positions(tokens, None), implementation=attention,
                      feature_layers=feature_layers)
        x = jnp.take(params.embed, tokens, axis=0)
        x, outs, _ = run_layers(fam, cfg, params.layers, x, ctx, feature_layers=feature_layers)
        return _finish(fam, params, cfg, x, outs, feature_layers, logits, None)


def forward_cached(params: TargetParams, cfg: ModelConfig, tokens: jax.Array, cache,
                   start: jax.Array, *, feature_layers: tuple[int, ...] = (),
                   logits: bool = True, keep: jax.Array | None = None,
                   visible: int | None = None) -> Output:
    """Decoding: sequence b's tokens [B, T] sit at positions start[b]..start[b]+T-1, are written
    into the cache there, and attend to cache slots up to their own position (slots past the
    live length are stale and never seen, so writing at an earlier start rolls back).

    `visible` (static): a bound on start, so that only the first `visible` cache slots are read
    (None: all of them; 0: none, a prefill). It must be >= max(start): slots past it are not
    seen at all.

    A recurrent layer (Qwen3.5) cannot roll back by position: with `keep` [B] it commits the
    first keep[b] tokens (a prefill's prompt lengths), without it it returns the block pending,
    for `commit` once the accepted length is known. Other families ignore `keep`."""
    _check(cfg, feature_layers, "einsum")
    fam = cfg.family
    with jax.named_scope("target_cached"):
        start = start.astype(jnp.int32)
        ctx = context(fam, cfg, _positions(tokens, start), start=start, keep=keep,
                      feature_layers=feature_layers, visible=visible)
        x = jnp.take(params.embed, tokens, axis=0)
        x, outs, cache = run_layers(fam, cfg, params.layers, x, ctx, cache,
                                    feature_layers=feature_layers)
        return _finish(fam, params, cfg, x, outs, feature_layers, logits, cache)


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=jnp.bfloat16):
    """An empty decoding cache of `length` slots (the family's: a KVCache, or Qwen3.5's
    HybridCache)."""
    return cfg.family.init_cache(cfg, batch, length, dtype)


def commit(cfg: ModelConfig, cache, keep: jax.Array):
    """After a verification (forward_cached without keep): keep the first keep[b] tokens of the
    block in the cache (a KV cache needs nothing: the next block's start rolls it back)."""
    return cfg.family.commit(cache, cfg, keep)


def lm_head_matrix(params: TargetParams) -> jax.Array:
    """The output projection [D, V] (embed.T when embeddings are tied)."""
    return params.lm_head if params.lm_head is not None else params.embed.T


def lm_head(params: TargetParams, hidden: jax.Array) -> jax.Array:
    """hidden [..., D] -> fp32 logits [..., V]."""
    w = lm_head_matrix(params)
    return jnp.einsum("...d,dv->...v", hidden.astype(w.dtype), w,
                      preferred_element_type=jnp.float32)


def schema(cfg: ModelConfig):
    """The parameter schema of cfg's family (dpace_jax.nn.schema.Schema)."""
    return family_of(cfg.arch).schema()


def shardings(cfg: ModelConfig, tree, mesh):
    """NamedShardings of a target parameter tree (or its abstract shapes) on `mesh`, by the
    family schema's rules (dpace_jax.sharding)."""
    from dpace_jax.sharding import param_shardings

    return param_shardings(tree, mesh, schema(cfg).rules(cfg))


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32,
                scale: float = 0.02) -> TargetParams:
    """Random parameters (tests, benchmarks and the demo target): normal(0, scale) matrices, unit
    norms (zero-centered ones: zeros)."""
    return schema(cfg).init(cfg, key, dtype, scale)
