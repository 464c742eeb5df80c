"""The frozen target: a Qwen3 / Llama-3.1 causal LM as pure functions over a parameter pytree.

Parameters (layers stacked on a leading L axis, run with `lax.scan`):

  embed [V, D]   layers {see dpace_jax.layers, each with a leading L}   final_norm [D]
  lm_head [D, V] (absent when the embeddings are tied: the head is embed.T)

KV cache: `KVCache(k, v)` with k, v [L, B, S, G, E], S fixed. The cache holds no length: the caller
says where each sequence's new tokens go (`start` [B]); a query at absolute position p sees cache
slots 0..p. Rolling back is therefore just writing the next block at an earlier `start`; slots
past the live length hold stale entries that no query can see until they are overwritten.
Callers must keep start + T <= S (XLA clamps out-of-range updates).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from dpace_jax import layers

SUPPORTED_ARCHITECTURES = {"Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama"}


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

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> ModelConfig:
        """Build from an HF config.json dict; unsupported architectures raise ValueError."""
        archs = hf.get("architectures") or []
        known = [SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES]
        arch = known[0] if known else None
        if arch is None and not archs:
            arch = {"qwen3": "qwen3", "llama": "llama"}.get(hf.get("model_type"))
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
                qk_norm=arch == "qwen3",
                rope_scaling=freeze_scaling(scaling),
                max_position_embeddings=int(hf.get("max_position_embeddings", 40960)),
                arch=arch,
            )
        except KeyError as e:
            raise ValueError(f"{source}: missing field {e.args[0]!r}") from None

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
            "original_max_position_embeddings")
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
    features: jax.Array | None  # [B, T, len(feature_layers) * D] in the compute dtype
    cache: KVCache | None
    # [B, T, D] after the final norm; None from the early-stopped forward (no cache,
    # logits=False, feature_layers given), which stops after the last feature layer
    hidden: jax.Array | None


# forward's `attention` choices -> layers.causal_attention's implementation ("xla": our einsum).
ATTENTION = {"xla": None, "cudnn": "cudnn", "dot_product_xla": "xla"}
TRAIN_ATTENTION = ("xla", "cudnn")  # the choices meant for training (the rest is for tests)


def write_at(buf: jax.Array, update: jax.Array, start: jax.Array) -> jax.Array:
    """Per sequence b, write update [B, T, ...] into buf [B, S, ...] at rows start[b] + 0..T-1."""

    def one(b, u, s):
        return jax.lax.dynamic_update_slice_in_dim(b, u.astype(b.dtype), s, axis=0)

    return jax.vmap(one)(buf, update, start)


def decoder_layer(x, p, cos, sin, cfg: ModelConfig, attend):
    """One pre-norm decoder layer. `attend(q, k, v)` returns (attention output [B, T, H, E],
    new_kv) given this layer's queries [B, T, H, E] and new k, v [B, T, G, E]."""
    h = layers.rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
    q = layers.apply_rope(layers.project_q(h, p, cfg.rms_norm_eps), cos, sin)
    k, v = layers.project_kv(h, p, cfg.rms_norm_eps)
    k = layers.apply_rope(k, cos, sin)
    attn, new_kv = attend(q, k, v)
    x = x + layers.output_projection(attn, p)
    h = layers.rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
    return x + layers.mlp(h, p), new_kv


def _einsum_attention(q, keys, values, mask):
    probs = layers.masked_softmax(layers.attention_logits(q, keys), mask)
    return layers.attention_output(probs, values)


def _early_stopped_features(stacked, x, cos, sin, cfg: ModelConfig, attend, ids):
    """Outputs of decoder layers `ids` running only layers 0..max(ids): a scan over layer
    indices reads each layer's weights in place (no copy of a slice of the stack) and writes its
    output into a buffer [U + 1, B, T, D] with a slot per distinct id and a last, trash slot."""
    distinct = sorted(set(ids))
    slot_of = [len(distinct)] * (distinct[-1] + 1)
    for slot, j in enumerate(distinct):
        slot_of[j] = slot
    slots = jnp.asarray(slot_of, jnp.int32)
    buf = jnp.zeros((len(distinct) + 1, *x.shape), x.dtype)

    def step(carry, i):
        x, buf = carry
        p = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), stacked)
        x, _ = decoder_layer(x, p, cos, sin, cfg, attend)
        buf = jax.lax.dynamic_update_index_in_dim(buf, x, slots[i], axis=0)
        return (x, buf), None

    n = len(slot_of)
    (_, buf), _ = jax.lax.scan(step, (x, buf), jnp.arange(n, dtype=jnp.int32))
    return [buf[distinct.index(j)] for j in ids]


def _features(layer_outputs, ids, final_norm, cfg: ModelConfig) -> jax.Array:
    """Concatenate the features of layer ids `ids` from their decoder-layer outputs: HF's
    `output_hidden_states[j + 1]`, which for the last layer is the state after the final norm."""
    last = cfg.num_layers - 1
    return jnp.concatenate(
        [layers.rms_norm(x, final_norm, cfg.rms_norm_eps) if j == last else x
         for j, x in zip(ids, layer_outputs, strict=True)], axis=-1)


def forward(
    params,
    cfg: ModelConfig,
    tokens: jax.Array,
    *,
    cache: KVCache | None = None,
    start: jax.Array | None = None,
    feature_layers: tuple[int, ...] = (),
    logits: bool = True,
    attention: str = "xla",
) -> Output:
    """Run the target on tokens [B, T].

    Without a cache: a causal forward at positions 0..T-1. With a cache: sequence b's tokens sit
    at positions start[b]..start[b]+T-1, are written into the cache there, and attend to cache
    slots up to their own position. `feature_layers` are decoder-layer ids (0-based; any order,
    repeats allowed) whose features are concatenated into `features`. The feature of layer j is
    HF's `output_hidden_states[j + 1]`: the output of decoder layer j, and for the last layer the
    state after the final norm (what DFlash's reference decoder and the serving engines feed the
    drafter).

    Without a cache, with logits=False and feature_layers given (the training step), only layers
    0..max(feature_layers) run and `hidden` is None.

    `attention` (cache-free forward only; the cached forward always uses "xla"):
      "xla"             our einsum attention (layers.attention_logits / masked_softmax);
      "cudnn"           jax.nn.dot_product_attention's fused cuDNN kernel (NVIDIA GPUs, bf16 or
                        fp16 params; fp32 raises ValueError);
      "dot_product_xla" jax.nn.dot_product_attention's XLA implementation; for tests and
                        TPU/CPU comparisons.
    """
    if attention not in ATTENTION:
        raise ValueError(f"attention={attention!r}; choose one of {sorted(ATTENTION)}")
    if cache is not None and attention != "xla":
        raise ValueError(
            f"attention={attention!r} is only for the cache-free forward; the cached forward "
            "(decode, verification) uses attention='xla'"
        )
    bad = [j for j in feature_layers if not 0 <= j < cfg.num_layers]
    if bad:
        raise ValueError(f"feature_layers {bad} outside the target's {cfg.num_layers} layers")
    batch, t = tokens.shape
    if start is None:
        start = jnp.zeros((batch,), jnp.int32)
    positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    inv_freq = layers.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.scaling_dict)
    cos, sin = layers.rope_cos_sin(positions, inv_freq)
    x = jnp.take(params["embed"], tokens, axis=0)

    if cache is None:
        causal = positions[:, :, None] >= positions[:, None, :]  # [B, T, T]
        mask = causal[:, None, None]

        def attend(q, k, v):
            if ATTENTION[attention] is None:
                return _einsum_attention(q, k, v, mask), None
            return layers.causal_attention(q, k, v, ATTENTION[attention]), None

        if feature_layers and not logits:
            outs = _early_stopped_features(params["layers"], x, cos, sin, cfg, attend,
                                           tuple(feature_layers))
            features = _features(outs, feature_layers, params["final_norm"], cfg)
            return Output(None, features, None, None)

        def step(x, p):
            x, _ = decoder_layer(x, p, cos, sin, cfg, attend)
            return x, (x if feature_layers else None)

        x, per_layer = jax.lax.scan(step, x, params["layers"])
        new_cache = None
    else:
        slots = jnp.arange(cache.k.shape[2], dtype=jnp.int32)
        mask = (slots[None, None, :] <= positions[:, :, None])[:, None, None]  # [B,1,1,T,S]

        def step(x, inputs):
            p, ck, cv = inputs

            def attend(q, k, v):
                ck2, cv2 = write_at(ck, k, start), write_at(cv, v, start)
                return _einsum_attention(q, ck2, cv2, mask), (ck2, cv2)

            x, (ck2, cv2) = decoder_layer(x, p, cos, sin, cfg, attend)
            return x, (x if feature_layers else None, ck2, cv2)

        x, (per_layer, ks, vs) = jax.lax.scan(step, x, (params["layers"], cache.k, cache.v))
        new_cache = KVCache(ks, vs)

    features = None
    if feature_layers:
        features = _features([per_layer[j] for j in feature_layers], feature_layers,
                             params["final_norm"], cfg)
    hidden = layers.rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    out_logits = lm_head(params, hidden) if logits else None
    return Output(out_logits, features, new_cache, hidden)


def lm_head_matrix(params) -> jax.Array:
    """The output projection [D, V] (embed.T when embeddings are tied)."""
    return params["lm_head"] if "lm_head" in params else params["embed"].T


def lm_head(params, hidden: jax.Array) -> jax.Array:
    """hidden [..., D] -> fp32 logits [..., V]."""
    w = lm_head_matrix(params)
    return jnp.einsum("...d,dv->...v", hidden.astype(w.dtype), w,
                      preferred_element_type=jnp.float32)


def init_layers(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32, scale: float = 0.02):
    """Random stacked decoder-layer parameters [L, ...]: normal(0, scale) matrices, unit norms."""
    d, h, g, e, f, n = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                        cfg.intermediate_size, cfg.num_layers)
    keys = iter(jax.random.split(key, 7))

    def normal(shape):
        return (scale * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    stacked = {
        "attn_norm": jnp.ones((n, d), dtype),
        "q": normal((n, d, h, e)),
        "k": normal((n, d, g, e)),
        "v": normal((n, d, g, e)),
        "o": normal((n, h, e, d)),
        "mlp_norm": jnp.ones((n, d), dtype),
        "gate": normal((n, d, f)),
        "up": normal((n, d, f)),
        "down": normal((n, f, d)),
    }
    if cfg.qk_norm:
        stacked["q_norm"] = jnp.ones((n, e), dtype)
        stacked["k_norm"] = jnp.ones((n, e), dtype)
    return stacked


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32, scale: float = 0.02):
    """Random parameters with the layout above (tests, benchmarks and the demo target)."""
    k_layers, k_embed, k_head = jax.random.split(key, 3)
    d = cfg.hidden_size
    params = {
        "embed": (scale * jax.random.normal(k_embed, (cfg.vocab_size, d))).astype(dtype),
        "layers": init_layers(cfg, k_layers, dtype, scale),
        "final_norm": jnp.ones((d,), dtype),
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = (scale * jax.random.normal(k_head, (d, cfg.vocab_size))).astype(dtype)
    return params
