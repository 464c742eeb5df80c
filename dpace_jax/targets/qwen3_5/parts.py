"""One Qwen3.5 layer's pieces (the family: dpace_jax.targets.qwen3_5; its layer loop and cache:
dpace_jax.targets.qwen3_5.decoder); docs/design.md §10 states the formulas.

A layer is pre-norm: x + mixer(norm(x)), then x + mlp(norm(x)). `layer_types[i]` picks the mixer:
  "linear_attention"  the gated DeltaNet: h @ in_qkv -> a depthwise causal convolution of width W
                      and SiLU -> q, k (key heads, l2-normalized, q scaled by K**-0.5, each key head
                      shared by U / key-heads consecutive value heads) and v; beta = sigmoid(h @
                      in_b), g = -exp(a_log) * softplus(h @ in_a + dt_bias); the gated delta rule
                      (dpace_jax.targets.qwen3_5.gated_delta); per value head an RMSNorm (weight w,
                      not around zero) times silu(h @ in_z); @ out.
  "full_attention"    grouped-query attention whose q projection yields per head a query and an
                      output gate: zero-centered q / k norms, RoPE on the first
                      partial_rotary_factor * E dimensions only, output * sigmoid(gate) @ o.
Every other RMSNorm (the layer norms, q / k norms, the final norm) is stored around zero: fp32
normalize, times (1 + w), cast back. The MLP is SwiGLU (dense), or for Qwen3.5-MoE top-k experts
(softmax, top k renormalized; dpace_jax.targets.experts) plus a shared SwiGLU expert
scaled by sigmoid(h @ shared_expert_gate). Text positions are plain RoPE: the multimodal rotary
sections (mrope) coincide for text, where the three position ids are equal.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dpace_jax.nn import layers
from dpace_jax.targets import experts as experts_lib
from dpace_jax.targets.qwen3_5 import gated_delta


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """The zero-centered RMSNorm: fp32 statistics, times (1 + weight) in fp32, cast back."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)


def gated_rms_norm(x: jax.Array, weight: jax.Array, gate: jax.Array, eps: float) -> jax.Array:
    """The DeltaNet output norm: weight * normalize(x) (cast back) times silu(gate) in fp32."""
    x32 = x.astype(jnp.float32)
    normed = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps))
    out = (weight * normed.astype(x.dtype)).astype(jnp.float32)
    return (out * jax.nn.silu(gate.astype(jnp.float32))).astype(x.dtype)


def partial_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """RoPE on the first cos.shape[-1] dimensions of x [..., T, heads, E]; the rest pass."""
    rot = cos.shape[-1]
    return jnp.concatenate([layers.apply_rope(x[..., :rot], cos, sin), x[..., rot:]], axis=-1)


def gated_attention(h, a, cos, sin, cfg, attend):
    """The full-attention mixer on normed h [B, T, D] with its GatedAttnParams slice a;
    `attend(q, k, v)` -> (attention output [B, T, H, E], extra), as in model.decoder_layer."""
    e = cfg.head_dim
    qg = jnp.einsum("btd,dhq->bthq", h, a.q)
    q = partial_rope(rms_norm(qg[..., :e], a.q_norm, cfg.rms_norm_eps), cos, sin)
    k = rms_norm(jnp.einsum("btd,dge->btge", h, a.k), a.k_norm, cfg.rms_norm_eps)
    k = partial_rope(k, cos, sin)
    v = jnp.einsum("btd,dge->btge", h, a.v)
    attn, extra = attend(q, k, v)
    attn = attn * jax.nn.sigmoid(qg[..., e:]).astype(attn.dtype)
    return jnp.einsum("bthe,hed->btd", attn, a.o), extra


class Recurrence:
    """The gated-delta-rule inputs of one linear-attention layer for a block of T tokens: rows
    [B, T, C] (before the convolution), q, k [B, T, U, K], v [B, T, U, Y], g, beta [B, T, U]."""

    def __init__(self, h, p, cfg, history):
        f = cfg.family_cfg
        hk, dk = f.linear_num_key_heads, f.linear_key_head_dim
        u, dv = f.linear_num_value_heads, f.linear_value_head_dim
        b, t, _ = h.shape
        self.rows = jnp.einsum("btd,dc->btc", h, p.in_qkv)
        mixed = gated_delta.causal_conv(self.rows, p.conv, history)
        q, k = (mixed[..., i * hk * dk:(i + 1) * hk * dk].reshape(b, t, hk, dk) for i in (0, 1))
        self.v = mixed[..., 2 * hk * dk:].reshape(b, t, u, dv)
        self.q = gated_delta.l2norm(jnp.repeat(q, u // hk, axis=2)) * dk ** -0.5
        self.k = gated_delta.l2norm(jnp.repeat(k, u // hk, axis=2))
        self.beta = jax.nn.sigmoid(jnp.einsum("btd,du->btu", h, p.in_b))
        a = jnp.einsum("btd,du->btu", h, p.in_a).astype(jnp.float32)
        self.g = -jnp.exp(p.a_log.astype(jnp.float32)) * jax.nn.softplus(a + p.dt_bias)


def kept(x: jax.Array, keep: jax.Array) -> jax.Array:
    """x [B, T, ...] zeroed at block positions t >= keep[b] (g, beta: those tokens then leave the
    state as it is)."""
    t = jnp.arange(x.shape[1])
    mask = t[None, :] < keep[:, None]
    return jnp.where(mask.reshape(*mask.shape, *(1,) * (x.ndim - 2)), x, 0)


def linear_mixer_output(core, h, p, cfg):
    """The DeltaNet's output [B, T, D] from the rule's outputs core [B, T, U, Y] (fp32)."""
    z = jnp.einsum("btd,duy->btuy", h, p.in_z)
    normed = gated_rms_norm(core.astype(h.dtype), p.gated_norm, z, cfg.rms_norm_eps)
    return jnp.einsum("btuy,uyd->btd", normed, p.out)


def moe_mlp(h, e, s, cfg):
    """A Qwen3.5-MoE feed-forward on h [..., D]: routed experts (slice e of ExpertParams) plus
    the shared expert (slice s of SharedExpertParams) scaled by its sigmoid gate."""
    shared = jnp.einsum("...f,fd->...d", jax.nn.silu(jnp.einsum("...d,df->...f", h, s.shared_gate))
                        * jnp.einsum("...d,df->...f", h, s.shared_up), s.shared_down)
    gate = jax.nn.sigmoid(jnp.einsum("...d,d->...", h, s.shared_expert_gate))[..., None]
    return (experts_lib.moe_mlp(h, e, cfg.family_cfg.experts)
            + gate.astype(h.dtype) * shared)
