"""Building blocks shared by the targets and the drafters: plain functions over arrays, and the
Qwen3-style pre-norm decoder layer (`LAYER`, its parameters declared once; `LayerParams`, stacked
on a leading L axis; `decoder_layer`). Shape letters: docs/design.md §1.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from dpace_jax.nn.schema import ArrayInfo

LAYER = {
    "attn_norm": ArrayInfo(("D",), (None,), "ones", "input_layernorm.weight", "same"),
    "q": ArrayInfo(("D", "H", "E"), ("embed", "heads", "head_dim"), "normal",
                   "self_attn.q_proj.weight", "in_heads"),
    "k": ArrayInfo(("D", "G", "E"), ("embed", "kv_heads", "head_dim"), "normal",
                   "self_attn.k_proj.weight", "in_heads"),
    "v": ArrayInfo(("D", "G", "E"), ("embed", "kv_heads", "head_dim"), "normal",
                   "self_attn.v_proj.weight", "in_heads"),
    "o": ArrayInfo(("H", "E", "D"), ("heads", "head_dim", "embed"), "normal",
                   "self_attn.o_proj.weight", "out_heads"),
    "mlp_norm": ArrayInfo(("D",), (None,), "ones", "post_attention_layernorm.weight", "same"),
    "gate": ArrayInfo(("D", "F"), ("embed", "mlp"), "normal", "mlp.gate_proj.weight", "t"),
    "up": ArrayInfo(("D", "F"), ("embed", "mlp"), "normal", "mlp.up_proj.weight", "t"),
    "down": ArrayInfo(("F", "D"), ("mlp", "embed"), "normal", "mlp.down_proj.weight", "t"),
    # Qwen3 only (per-head RMSNorm of q and k)
    "q_norm": ArrayInfo(("E",), (None,), "ones", "self_attn.q_norm.weight", "same"),
    "k_norm": ArrayInfo(("E",), (None,), "ones", "self_attn.k_norm.weight", "same"),
}
QK_NORM = ("q_norm", "k_norm")
MLP = ("gate", "up", "down")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerParams:
    """Decoder layers (LAYER), each array with a leading L axis. Absent entries are None: the
    q/k norms of a Llama layer, the MLP of a layer whose feed-forward lives elsewhere (experts),
    the attention of a Qwen3.5 layer (its own mixers)."""

    attn_norm: jax.Array
    q: jax.Array | None = None
    k: jax.Array | None = None
    v: jax.Array | None = None
    o: jax.Array | None = None
    mlp_norm: jax.Array | None = None
    gate: jax.Array | None = None
    up: jax.Array | None = None
    down: jax.Array | None = None
    q_norm: jax.Array | None = None
    k_norm: jax.Array | None = None


def dims(cfg) -> dict[str, int]:
    """The sizes of the decoder layer's letters (D, H, G, E, F) and V for a target or drafter
    config."""
    return {"D": cfg.hidden_size, "H": cfg.num_heads, "G": cfg.num_kv_heads, "E": cfg.head_dim,
            "F": cfg.intermediate_size, "V": cfg.vocab_size}


def slice_layer(tree, i):
    """Layer i (traced) of a stacked tree, read in place (no copy of the stack)."""
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), tree)


def decoder_layer(x, p: LayerParams, cos, sin, cfg, attend, feed_forward=None, around=None):
    """One pre-norm decoder layer on x [..., T, D] (the targets' and the drafters'). `attend(q,
    k, v)` returns (attention output [..., T, H, E], extra) given this layer's queries
    [..., T, H, E] and new keys / values [..., T, G, E]; extra is passed back (e.g. an updated
    cache). `feed_forward`: h -> out when it is not p's SwiGLU MLP (experts). `around`: a pair
    (for the attention, for the MLP) of wrappers with prepare(h) -> (h', state) on the normed
    sublayer input and finish(out, state) on the sublayer's output (DFlash 2's convolutions)."""
    wrap_attn, wrap_mlp = around or (None, None)
    h = rms_norm(x, p.attn_norm, cfg.rms_norm_eps)
    h, state = wrap_attn.prepare(h) if wrap_attn else (h, None)
    q = apply_rope(project_q(h, p, cfg.rms_norm_eps), cos, sin)
    k, v = project_kv(h, p, cfg.rms_norm_eps)
    k = apply_rope(k, cos, sin)
    attn, extra = attend(q, k, v)
    out = output_projection(attn, p)
    x = x + (wrap_attn.finish(out, state) if wrap_attn else out)
    h = rms_norm(x, p.mlp_norm, cfg.rms_norm_eps)
    h, state = wrap_mlp.prepare(h) if wrap_mlp else (h, None)
    out = mlp(h, p) if feed_forward is None else feed_forward(h)
    return x + (wrap_mlp.finish(out, state) if wrap_mlp else out), extra


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm as in HF Qwen3/Llama: statistics in fp32, result cast back to x's dtype."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: Mapping | None = None) -> jax.Array:
    """Inverse frequencies [E/2] of rotary embeddings, with Llama-3.1 ("llama3") scaling."""
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if not scaling:
        return inv
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return inv
    if kind == "yarn":
        return _yarn_inv_freq(head_dim, theta, scaling)
    if kind != "llama3":
        raise ValueError(f"rope_scaling.rope_type={kind!r} is not supported (expected 'llama3' "
                         "or 'yarn')")
    factor = float(scaling["factor"])
    low = float(scaling["low_freq_factor"])
    high = float(scaling["high_freq_factor"])
    old_ctx = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def _yarn_factor(scaling: Mapping) -> float:
    if scaling.get("factor") is None:
        raise ValueError("rope_scaling: a 'yarn' rope needs its 'factor'")
    return float(scaling["factor"])


def _yarn_inv_freq(head_dim: int, theta: float, scaling: Mapping) -> jax.Array:
    """YaRN (transformers' `_compute_yarn_parameters`): per frequency pair j, a blend
    inv = interp * (1 - x_j) + extrap * x_j of extrap = theta^(-2j/E) and interp = extrap / factor,
    with x_j = 1 - clip((j - low) / (high - low), 0, 1) and [low, high] the dims where
    beta_fast / beta_slow rotations fit in original_max_position_embeddings (floor / ceil unless
    truncate is false; high += 0.001 when they meet)."""
    factor = _yarn_factor(scaling)
    fast, slow = float(scaling.get("beta_fast") or 32), float(scaling.get("beta_slow") or 1)
    old_ctx = float(scaling["original_max_position_embeddings"])

    def dim_of(rotations):
        return head_dim * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(fast), dim_of(slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    extrap = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    interp = 1.0 / (factor * theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp
    return interp * (1 - keep) + extrap * keep


def rope_attention_factor(scaling: Mapping | None) -> float:
    """The factor transformers multiplies cos and sin by: 1 except for YaRN, where it is
    `attention_factor`, else mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both
    are set, else mscale(factor) with mscale(s, m) = 0.1 m ln(s) + 1 (1 for s <= 1)."""
    if not scaling or scaling.get("rope_type", scaling.get("type")) != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = _yarn_factor(scaling)

    def mscale(s, m=1.0):
        return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

    m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if m and m_all:
        return float(mscale(factor, m) / mscale(factor, m_all))
    return mscale(factor)


def rope_cos_sin(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape positions.shape + [E] (the two halves repeated, HF convention)."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [..., T, heads, E] by cos/sin [..., T, E] (rotate-half convention), in fp32."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[..., None, :] + rotated * sin[..., None, :]
    return out.astype(x.dtype)


def project_q(x: jax.Array, p, eps: float) -> jax.Array:
    """[..., T, D] -> queries [..., T, H, E], with the per-head q_norm when the layer has one."""
    q = jnp.einsum("...td,dhe->...the", x, p.q)
    return rms_norm(q, p.q_norm, eps) if p.q_norm is not None else q


def project_kv(x: jax.Array, p, eps: float) -> tuple[jax.Array, jax.Array]:
    """[..., S, D] -> keys and values [..., S, G, E] (keys k_norm-ed when the layer has one)."""
    k = jnp.einsum("...sd,dge->...sge", x, p.k)
    v = jnp.einsum("...sd,dge->...sge", x, p.v)
    if p.k_norm is not None:
        k = rms_norm(k, p.k_norm, eps)
    return k, v


def attention_logits(q: jax.Array, k: jax.Array) -> jax.Array:
    """Scaled scores of grouped-query attention: q [..., T, H, E], k [..., S, G, E] ->
    [..., G, R, T, S] in fp32."""
    *lead, t, h, e = q.shape
    g = k.shape[-2]
    q = q.reshape(*lead, t, g, h // g, e)
    scores = jnp.einsum("...tgre,...sge->...grts", q, k, preferred_element_type=jnp.float32)
    return scores / math.sqrt(e)


def attention_output(probs: jax.Array, v: jax.Array) -> jax.Array:
    """probs [..., G, R, T, S] x v [..., S, G, E] -> [..., T, H, E] in v's dtype."""
    out = jnp.einsum("...grts,...sge->...tgre", probs.astype(v.dtype), v)
    *lead, t, g, r, e = out.shape
    return out.reshape(*lead, t, g * r, e)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     implementation: str | None = None) -> jax.Array:
    """Causal grouped-query attention through `jax.nn.dot_product_attention`: q [B, T, H, E],
    k, v [B, T, G, E] -> [B, T, H, E], query t seeing keys 0..t, scale 1/sqrt(E).

    `implementation` is passed on: "cudnn" (fused flash attention on NVIDIA GPUs; bf16 or fp16
    inputs only, checked here rather than cast), "xla", or None (JAX's default, XLA today).
    """
    if implementation == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(
            f"cuDNN attention needs bf16 or fp16 inputs, got {q.dtype}; load the target in "
            "bf16 or use attention='einsum'"
        )
    if implementation == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(f"cuDNN attention needs an NVIDIA GPU; this process runs on "
                         f"{jax.default_backend()!r}: use attention='einsum'")
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)


def masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax over the last axis where mask is True; rows with nothing visible give zeros."""
    scores = jnp.where(mask, scores, -jnp.inf)
    peak = jnp.max(scores, axis=-1, keepdims=True)
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    e = jnp.where(mask, jnp.exp(scores - peak), 0.0)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    return e / jnp.where(denom > 0, denom, 1.0)


def sink_attention(q: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array,
                   sinks: jax.Array | None = None) -> jax.Array:
    """Grouped-query attention of q [B, T, H, E] over keys / values [B, S, G, E] where mask
    [B, 1, 1, T, S] allows -> [B, T, H, E]. `sinks` [H] (gpt-oss): one more logit per head in the
    softmax's denominator only (it has no value); without, a plain masked softmax."""
    scores = attention_logits(q, keys)  # [B, G, R, T, S] fp32
    if sinks is None:
        return attention_output(masked_softmax(scores, mask), values)
    g, r = scores.shape[1], scores.shape[2]
    sink = sinks.astype(jnp.float32).reshape(1, g, r, 1, 1)
    scores = jnp.where(mask, scores, -jnp.inf)
    peak = jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), sink)
    e = jnp.where(mask, jnp.exp(scores - peak), 0.0)
    probs = e / (jnp.sum(e, axis=-1, keepdims=True) + jnp.exp(sink - peak))
    return attention_output(probs, values)


def parts_attention(q: jax.Array, parts, sinks: jax.Array | None = None) -> jax.Array:
    """`sink_attention` over keys split into parts [(keys [B, S_i, G, E], values, mask
    [B|1, 1|G, 1|R, T, S_i]), ...]: one softmax over all of them, without concatenating
    (a cached forward's cache slots and its block). Rows with nothing visible give zeros."""
    scores = [jnp.where(m, attention_logits(q, k), -jnp.inf) for k, _, m in parts]
    peak = functools.reduce(jnp.maximum, [jnp.max(s, axis=-1, keepdims=True) for s in scores])
    if sinks is not None:
        g, r = scores[0].shape[1], scores[0].shape[2]
        sink = sinks.astype(jnp.float32).reshape(1, g, r, 1, 1)
        peak = jnp.maximum(peak, sink)
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    e = [jnp.where(m, jnp.exp(s - peak), 0.0) for s, (_, _, m) in zip(scores, parts, strict=True)]
    denom = functools.reduce(jnp.add, [jnp.sum(x, axis=-1, keepdims=True) for x in e])
    if sinks is not None:
        denom = denom + jnp.exp(sink - peak)
    denom = jnp.where(denom > 0, denom, 1.0)
    outs = [attention_output(x / denom, v) for x, (_, v, _) in zip(e, parts, strict=True)]
    return functools.reduce(jnp.add, outs)


def mlp(x: jax.Array, p) -> jax.Array:
    """SwiGLU feed-forward: down(silu(gate x) * up x)."""
    gate = jnp.einsum("...d,df->...f", x, p.gate)
    up = jnp.einsum("...d,df->...f", x, p.up)
    return jnp.einsum("...f,fd->...d", jax.nn.silu(gate) * up, p.down)


def output_projection(attn: jax.Array, p) -> jax.Array:
    """[..., T, H, E] -> [..., T, D]."""
    return jnp.einsum("...the,hed->...td", attn, p.o)



def rope_cos_sin_scaled(positions: jax.Array, head_dim: int, theta: float,
                        scaling: Mapping | None):
    """RoPE cos, sin [..., E] at positions [...], with the inverse frequencies of `scaling` and,
    for YaRN, its attention factor (transformers multiplies cos and sin by it)."""
    cos, sin = rope_cos_sin(positions, rope_inv_freq(head_dim, theta, scaling))
    factor = rope_attention_factor(scaling)
    return (cos * factor, sin * factor) if factor != 1.0 else (cos, sin)
