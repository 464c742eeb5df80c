"""The frozen target: a Qwen3 / Llama-3.1 / Qwen3-MoE / gpt-oss / Qwen3.5 causal LM as pure
functions over `TargetParams` (dpace_jax.nn.params: embed, stacked decoder layers run with
`lax.scan`, final_norm, lm_head or tied; a Qwen3-MoE target's feed-forwards:
dpace_jax.targets.qwen3_moe; gpt-oss: dpace_jax.targets.gpt_oss.layers; the Qwen3.5 hybrids:
dpace_jax.targets.qwen3_5.layers and dpace_jax.targets.qwen3_5.decoder, whose cache is a
`hybrid.HybridCache` made by `init_cache` and advanced after verification by `commit`).

Three forwards: `features` (training: the feature layers only), `forward` (the whole model, no
cache) and `forward_cached` (decoding). KV cache: `KVCache(k, v)` with k, v [L, B, S, G, E], S
fixed (the drafter uses the same type for its context). The cache holds no length: the caller
says where each sequence's new tokens go (`start` [B]); a query at absolute position p sees cache
slots 0..p. Rolling back is therefore just writing the next block at an earlier `start`; slots
past the live length hold stale entries that no query can see until they are overwritten.
Callers must keep start + T <= S (XLA clamps out-of-range updates). gpt-oss's sliding-window
layers use the same full-length cache, with the window in their mask.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dpace_jax.nn import layers
from dpace_jax.nn.params import LayerParams, TargetParams
from dpace_jax.nn.schema import TARGET_SCHEMA
from dpace_jax.targets import qwen3_moe as moe
from dpace_jax.targets.config import ModelConfig, freeze_scaling  # noqa: F401 (re-exported)
from dpace_jax.targets.gpt_oss import layers as gpt_oss
from dpace_jax.targets.qwen3_5 import decoder as hybrid
from dpace_jax.targets.qwen3_5 import layers as qwen3_5


class KVCache(NamedTuple):
    k: jax.Array  # [L, B, S, G, E]
    v: jax.Array  # [L, B, S, G, E]

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, length: int, dtype=jnp.bfloat16) -> KVCache:
        shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


class Output(NamedTuple):
    logits: jax.Array | None  # [B, T, V] fp32
    features: jax.Array | None  # [B, T, n * D] in the compute dtype
    cache: KVCache | None  # forward_cached only
    hidden: jax.Array | None  # [B, T, D] after the final norm


# The cache-free forwards' `attention` -> layers.causal_attention's implementation.
ATTENTION = {
    "einsum": None,  # our einsum attention (layers.attention_logits / masked_softmax)
    "cudnn": "cudnn",  # jax.nn.dot_product_attention's fused cuDNN kernel (NVIDIA, bf16/fp16)
    "dot_product": "xla",  # jax.nn.dot_product_attention's XLA implementation (tests)
}
TRAIN_ATTENTION = ("einsum", "cudnn")  # the choices meant for training


def write_at(buf: jax.Array, update: jax.Array, start: jax.Array) -> jax.Array:
    """Per sequence b, write update [B, T, ...] into buf [B, S, ...] at rows start[b] + 0..T-1."""

    def one(b, u, s):
        return jax.lax.dynamic_update_slice_in_dim(b, u.astype(b.dtype), s, axis=0)

    return jax.vmap(one)(buf, update, start)


def decoder_layer(x, p: LayerParams, cos, sin, cfg: ModelConfig, attend, mlp=None):
    """One pre-norm decoder layer on x [..., T, D] (the target's and the drafter's). `attend(q, k,
    v)` returns (attention output [..., T, H, E], extra) given this layer's queries [..., T, H, E]
    and new keys / values [..., T, G, E]; extra is passed back (e.g. an updated cache). `mlp`: the
    feed-forward h -> out when it is not p's SwiGLU MLP (a Qwen3-MoE layer, moe.layer_mlp)."""
    h = layers.rms_norm(x, p.attn_norm, cfg.rms_norm_eps)
    q = layers.apply_rope(layers.project_q(h, p, cfg.rms_norm_eps), cos, sin)
    k, v = layers.project_kv(h, p, cfg.rms_norm_eps)
    k = layers.apply_rope(k, cos, sin)
    attn, extra = attend(q, k, v)
    x = x + layers.output_projection(attn, p)
    h = layers.rms_norm(x, p.mlp_norm, cfg.rms_norm_eps)
    return x + (layers.mlp(h, p) if mlp is None else mlp(h)), extra


def _layer(params: TargetParams, cfg: ModelConfig, i, p, x, cos, sin, attend):
    """Decoder layer i (traced) of the target, p its LayerParams slice."""
    if cfg.arch == "gpt_oss":
        return gpt_oss.decoder_layer(x, p, moe._slice(params.oss, i), cos, sin, cfg, attend,
                                     gpt_oss.sliding_flags(cfg)[i])
    return decoder_layer(x, p, cos, sin, cfg, attend, moe.layer_mlp(params, cfg, i))


def _norm(cfg: ModelConfig):
    if cfg.hybrid:
        return qwen3_5.rms_norm
    return gpt_oss.rms_norm if cfg.arch == "gpt_oss" else layers.rms_norm


def _einsum_attention(q, keys, values, mask):
    probs = layers.masked_softmax(layers.attention_logits(q, keys), mask)
    return layers.attention_output(probs, values)


def _check(cfg: ModelConfig, feature_layers, attention: str) -> None:
    if attention not in ATTENTION:
        raise ValueError(f"attention={attention!r}; choose one of {sorted(ATTENTION)}")
    bad = [j for j in feature_layers if not 0 <= j < cfg.num_layers]
    if bad:
        raise ValueError(f"feature_layers {bad} outside the target's {cfg.num_layers} layers")
    moe.check(cfg)
    gpt_oss.check(cfg)
    hybrid.check(cfg)
    if cfg.arch == "gpt_oss" and attention != "einsum":
        raise ValueError(f"attention={attention!r}: a gpt-oss target (attention sinks) needs "
                         "attention='einsum'")


def _layer_ids(cfg: ModelConfig) -> jax.Array:
    return jnp.arange(cfg.num_layers, dtype=jnp.int32)


def _embed_and_rope(params: TargetParams, cfg: ModelConfig, tokens, start):
    """Embeddings [B, T, D], positions [B, T] and their RoPE cos, sin [B, T, E]."""
    positions = start[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    inv_freq = layers.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.scaling_dict)
    cos, sin = layers.rope_cos_sin(positions, inv_freq)
    factor = layers.rope_attention_factor(cfg.scaling_dict)
    if factor != 1.0:  # YaRN
        cos, sin = cos * factor, sin * factor
    return jnp.take(params.embed, tokens, axis=0), positions, cos, sin


def _causal(positions, attention: str, cfg: ModelConfig):
    """attend(q, k, v) of the cache-free forwards: query t sees keys 0..t (gpt-oss: attend(q, k,
    v, sinks, sliding), within the window when sliding)."""
    mask = (positions[:, :, None] >= positions[:, None, :])[:, None, None]  # [B, 1, 1, T, T]

    def attend(q, k, v, sinks=None, sliding=None):
        if sinks is not None:
            window = gpt_oss.visible(positions, positions, sliding, cfg.sliding_window)
            return gpt_oss.attention(q, k, v, window, sinks), None
        if ATTENTION[attention] is None:
            return _einsum_attention(q, k, v, mask), None
        return layers.causal_attention(q, k, v, ATTENTION[attention]), None

    return attend


def _features(layer_outputs, ids, final_norm, cfg: ModelConfig) -> jax.Array:
    """Concatenate the features of layer ids `ids` from their decoder-layer outputs: HF's
    `output_hidden_states[j + 1]`, which for the last layer is the state after the final norm
    (docs/design.md §2)."""
    last = cfg.num_layers - 1
    return jnp.concatenate(
        [_norm(cfg)(x, final_norm, cfg.rms_norm_eps) if j == last else x
         for j, x in zip(ids, layer_outputs, strict=True)], axis=-1)


def _finish(params: TargetParams, cfg: ModelConfig, x, per_layer, feature_layers, logits: bool,
            cache, stacked: bool = True) -> Output:
    """per_layer: every layer's output [L, ...] (stacked), or those of feature_layers in order."""
    features = None
    if feature_layers:
        outs = [per_layer[j] for j in feature_layers] if stacked else list(per_layer)
        features = _features(outs, feature_layers, params.final_norm, cfg)
    hidden = _norm(cfg)(x, params.final_norm, cfg.rms_norm_eps)
    return Output(lm_head(params, hidden) if logits else None, features, cache, hidden)


def features(params: TargetParams, cfg: ModelConfig, tokens: jax.Array,
             feature_layers: tuple[int, ...], *, attention: str = "einsum") -> jax.Array:
    """The training forward: target features [B, T, n * D] of layers `feature_layers` (any
    order, repeats allowed) for tokens [B, T] at positions 0..T-1, running only the layers up to
    the deepest one. A scan over layer indices reads each layer's weights in place (no copy of a
    slice of the stack) and writes its output into a buffer [U + 1, B, T, D] with a slot per
    distinct id and a last, trash slot."""
    _check(cfg, feature_layers, attention)
    if not feature_layers:
        raise ValueError("features: feature_layers is empty")
    if cfg.hybrid:
        with jax.named_scope("target_features"):
            x, positions, cos, sin = _hybrid_inputs(params, cfg, tokens, None)
            attend = _causal(positions, attention, cfg)
            _, outs, _ = hybrid.run(params, cfg, x, cos, sin, feature_layers=feature_layers,
                                    only_features=True,
                                    attend=lambda q, k, v, ck, cv: (attend(q, k, v)[0], (ck, cv)))
            return _features(list(outs), feature_layers, params.final_norm, cfg)
    with jax.named_scope("target_features"):
        x, positions, cos, sin = _embed_and_rope(params, cfg, tokens,
                                                 jnp.zeros((tokens.shape[0],), jnp.int32))
        attend = _causal(positions, attention, cfg)
        distinct = sorted(set(feature_layers))
        slot_of = [len(distinct)] * (distinct[-1] + 1)
        for slot, j in enumerate(distinct):
            slot_of[j] = slot
        slots = jnp.asarray(slot_of, jnp.int32)
        buf = jnp.zeros((len(distinct) + 1, *x.shape), x.dtype)

        def step(carry, i):
            x, buf = carry
            p = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False),
                             params.layers)
            x, _ = _layer(params, cfg, i, p, x, cos, sin, attend)
            return (x, jax.lax.dynamic_update_index_in_dim(buf, x, slots[i], axis=0)), None

        (_, buf), _ = jax.lax.scan(step, (x, buf), jnp.arange(len(slot_of), dtype=jnp.int32))
        outs = [buf[distinct.index(j)] for j in feature_layers]
        return _features(outs, feature_layers, params.final_norm, cfg)


def forward(params: TargetParams, cfg: ModelConfig, tokens: jax.Array, *,
            feature_layers: tuple[int, ...] = (), logits: bool = True,
            attention: str = "einsum") -> Output:
    """The whole target over tokens [B, T] at positions 0..T-1, causal, no cache: logits (when
    `logits`), the features of `feature_layers` (docs/design.md §2) and the final hidden state.

    `attention`: "einsum" (ours), "cudnn" (jax.nn.dot_product_attention's fused kernel; NVIDIA
    GPUs, bf16 or fp16 params) or "dot_product" (its XLA implementation; tests)."""
    _check(cfg, feature_layers, attention)
    if cfg.hybrid:
        with jax.named_scope("target_forward"):
            x, positions, cos, sin = _hybrid_inputs(params, cfg, tokens, None)
            attend = _causal(positions, attention, cfg)
            x, outs, _ = hybrid.run(params, cfg, x, cos, sin, feature_layers=feature_layers,
                                    attend=lambda q, k, v, ck, cv: (attend(q, k, v)[0], (ck, cv)))
            return _finish(params, cfg, x, outs, feature_layers, logits, None, stacked=False)
    with jax.named_scope("target_forward"):
        x, positions, cos, sin = _embed_and_rope(params, cfg, tokens,
                                                 jnp.zeros((tokens.shape[0],), jnp.int32))
        attend = _causal(positions, attention, cfg)

        def step(x, inputs):
            p, i = inputs
            x, _ = _layer(params, cfg, i, p, x, cos, sin, attend)
            return x, (x if feature_layers else None)

        x, per_layer = jax.lax.scan(step, x, (params.layers, _layer_ids(cfg)))
        return _finish(params, cfg, x, per_layer, feature_layers, logits, None)


def forward_cached(params: TargetParams, cfg: ModelConfig, tokens: jax.Array, cache,
                   start: jax.Array, *, feature_layers: tuple[int, ...] = (),
                   logits: bool = True, keep: jax.Array | None = None) -> Output:
    """Decoding: sequence b's tokens [B, T] sit at positions start[b]..start[b]+T-1, are written
    into the cache there, and attend to cache slots up to their own position (slots past the
    live length are stale and never seen, so writing at an earlier start rolls back).

    A Qwen3.5 target's recurrent layers cannot roll back by position: with `keep` [B] they commit
    the first keep[b] tokens (a prefill's prompt lengths), without it they return the block
    pending, for `commit` once the accepted length is known (dpace_jax.targets.qwen3_5.decoder).
    Other targets ignore `keep`."""
    _check(cfg, feature_layers, "einsum")
    with jax.named_scope("target_cached"):
        start = start.astype(jnp.int32)
        slots = jnp.arange(cache.k.shape[2], dtype=jnp.int32)
        if cfg.hybrid:
            x, positions, cos, sin = _hybrid_inputs(params, cfg, tokens, start)
            mask = (slots[None, None, :] <= positions[:, :, None])[:, None, None]

            def attend(q, k, v, ck, cv):
                ck2, cv2 = write_at(ck, k, start), write_at(cv, v, start)
                return _einsum_attention(q, ck2, cv2, mask), (ck2, cv2)

            x, outs, new = hybrid.run(params, cfg, x, cos, sin, attend=attend, cache=cache,
                                      keep=keep, feature_layers=feature_layers)
            return _finish(params, cfg, x, outs, feature_layers, logits, new, stacked=False)
        x, positions, cos, sin = _embed_and_rope(params, cfg, tokens, start)
        mask = (slots[None, None, :] <= positions[:, :, None])[:, None, None]  # [B,1,1,T,S]

        def step(x, inputs):
            p, i, ck, cv = inputs

            def attend(q, k, v, sinks=None, sliding=None):
                ck2, cv2 = write_at(ck, k, start), write_at(cv, v, start)
                if sinks is not None:
                    window = gpt_oss.visible(positions, slots[None], sliding, cfg.sliding_window)
                    return gpt_oss.attention(q, ck2, cv2, window, sinks), (ck2, cv2)
                return _einsum_attention(q, ck2, cv2, mask), (ck2, cv2)

            x, (ck2, cv2) = _layer(params, cfg, i, p, x, cos, sin, attend)
            return x, (x if feature_layers else None, ck2, cv2)

        x, (per_layer, ks, vs) = jax.lax.scan(step, x, (params.layers, _layer_ids(cfg), cache.k,
                                                             cache.v))
        return _finish(params, cfg, x, per_layer, feature_layers, logits, KVCache(ks, vs))


def _hybrid_inputs(params: TargetParams, cfg: ModelConfig, tokens, start):
    """A Qwen3.5 target's embeddings, positions and the cos, sin of its rotary dimensions."""
    start = jnp.zeros((tokens.shape[0],), jnp.int32) if start is None else start
    positions = start[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    cos, sin = hybrid.rope(cfg, positions)
    return jnp.take(params.embed, tokens, axis=0), positions, cos, sin


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=jnp.bfloat16):
    """An empty decoding cache of `length` slots: a KVCache, or a Qwen3.5 target's HybridCache."""
    if cfg.hybrid:
        return hybrid.HybridCache.zeros(cfg, batch, length, dtype)
    return KVCache.zeros(cfg, batch, length, dtype)


def commit(cfg: ModelConfig, cache, keep: jax.Array):
    """After a verification (forward_cached without keep): keep the first keep[b] tokens of the
    block in the cache. A KV cache needs nothing (the next block's start rolls it back); a Qwen3.5
    target's recurrent layers advance by exactly those tokens
    (dpace_jax.targets.qwen3_5.decoder.commit)."""
    return hybrid.commit(cache, keep) if cfg.hybrid else cache


def lm_head_matrix(params: TargetParams) -> jax.Array:
    """The output projection [D, V] (embed.T when embeddings are tied)."""
    return params.lm_head if params.lm_head is not None else params.embed.T


def lm_head(params: TargetParams, hidden: jax.Array) -> jax.Array:
    """hidden [..., D] -> fp32 logits [..., V]."""
    w = lm_head_matrix(params)
    return jnp.einsum("...d,dv->...v", hidden.astype(w.dtype), w,
                      preferred_element_type=jnp.float32)


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32,
                scale: float = 0.02) -> TargetParams:
    """Random parameters (tests, benchmarks and the demo target): normal(0, scale) matrices, unit
    norms (dpace_jax.nn.params)."""
    return TARGET_SCHEMA.init(cfg, key, dtype, scale)
