"""The frozen target: a Qwen3 / Llama-3.1 / Qwen3-MoE / gpt-oss causal LM as pure functions over
`TargetParams` (dpace_jax.params: embed, stacked decoder layers run with `lax.scan`, final_norm,
lm_head or tied; a Qwen3-MoE target's feed-forwards: dpace_jax.moe; gpt-oss: dpace_jax.gpt_oss).

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

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from dpace_jax import gpt_oss, layers, moe
from dpace_jax.params import TARGET_SCHEMA, LayerParams, TargetParams

SUPPORTED_ARCHITECTURES = {"Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama",
                           "Qwen3MoeForCausalLM": "qwen3_moe", "GptOssForCausalLM": "gpt_oss"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qk_norm: bool = True
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # hashable form of the HF dict
    max_position_embeddings: int = 40960
    arch: str = "qwen3"
    # Qwen3-MoE (arch "qwen3_moe", dpace_jax.moe); unused by the dense architectures
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    moe_dispatch: str = "sorted"  # "dense" (the reference) or "sorted"; not an HF field
    # gpt-oss (arch "gpt_oss", dpace_jax.gpt_oss; also num_experts..moe_intermediate_size)
    sliding_window: int = 0
    layer_types: tuple[str, ...] = ()
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> ModelConfig:
        """Build from an HF config.json dict; unsupported architectures raise ValueError."""
        archs = hf.get("architectures") or []
        known = [SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES]
        arch = known[0] if known else None
        if arch is None and not archs:
            arch = {"qwen3": "qwen3", "llama": "llama", "qwen3_moe": "qwen3_moe",
                    "gpt_oss": "gpt_oss"}.get(hf.get("model_type"))
        if arch is None:
            raise ValueError(
                f"{source}: unsupported architecture {archs or hf.get('model_type')!r}; "
                f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            heads = int(hf["num_attention_heads"])
            hidden = int(hf["hidden_size"])
            scaling = hf.get("rope_scaling")
            theta = hf.get("rope_theta")
            if theta is None and isinstance(hf.get("rope_parameters"), dict):
                theta = hf["rope_parameters"].get("rope_theta")
                rope_type = hf["rope_parameters"].get("rope_type", "default")
                if scaling is None and rope_type != "default":
                    scaling = hf["rope_parameters"]
            return cls(
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(hf.get("head_dim") or hidden // heads),
                rope_theta=float(theta if theta is not None else 10000.0),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                qk_norm=arch in ("qwen3", "qwen3_moe"),
                rope_scaling=freeze_scaling(scaling),
                max_position_embeddings=int(hf.get("max_position_embeddings", 40960)),
                arch=arch,
                **(moe.hf_fields(hf, int(hf["num_hidden_layers"]), source)
                   if arch == "qwen3_moe" else {}),
                **(gpt_oss.hf_fields(hf, int(hf["num_hidden_layers"]), source)
                   if arch == "gpt_oss" else {}),
            )
        except KeyError as e:
            raise ValueError(f"{source}: missing field {e.args[0]!r}") from None

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """The layer ids with experts (Qwen3-MoE); () for a dense model."""
        return moe.sparse_layers(self)

    @property
    def dense_mlp_layers(self) -> tuple[int, ...]:
        """A Qwen3-MoE model's layer ids without experts (its dense MLP stack); () otherwise."""
        sparse = self.moe_layers
        return (tuple(i for i in range(self.num_layers) if i not in sparse)
                if self.arch == "qwen3_moe" else ())

    @property
    def scaling_dict(self) -> dict | None:
        return dict(self.rope_scaling) if self.rope_scaling else None


def freeze_scaling(scaling: dict | None) -> tuple | None:
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    keys = ("rope_type", "factor", "low_freq_factor", "high_freq_factor",
            "original_max_position_embeddings", "beta_fast", "beta_slow", "truncate",
            "attention_factor", "mscale", "mscale_all_dim")
    frozen = {"rope_type": kind, **{k: scaling[k] for k in keys[1:] if k in scaling}}
    return tuple(sorted(frozen.items()))


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
            cache) -> Output:
    features = None
    if feature_layers:
        features = _features([per_layer[j] for j in feature_layers], feature_layers,
                             params.final_norm, cfg)
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


def forward_cached(params: TargetParams, cfg: ModelConfig, tokens: jax.Array, cache: KVCache,
                   start: jax.Array, *, feature_layers: tuple[int, ...] = (),
                   logits: bool = True) -> Output:
    """Decoding: sequence b's tokens [B, T] sit at positions start[b]..start[b]+T-1, are written
    into the cache there, and attend to cache slots up to their own position (slots past the
    live length are stale and never seen, so writing at an earlier start rolls back)."""
    _check(cfg, feature_layers, "einsum")
    with jax.named_scope("target_cached"):
        start = start.astype(jnp.int32)
        x, positions, cos, sin = _embed_and_rope(params, cfg, tokens, start)
        slots = jnp.arange(cache.k.shape[2], dtype=jnp.int32)
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
    norms (dpace_jax.params)."""
    return TARGET_SCHEMA.init(cfg, key, dtype, scale)
