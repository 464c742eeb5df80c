"""A gpt-oss layer (the family: dpace_jax.targets.gpt_oss): its attention (biases, per-head
sinks, alternating sliding / full layers) and its mixture of experts (biased router, clamped
SwiGLU experts with biases). docs/design.md §2 states the formulas.

Attention, per head h: softmax over the visible keys of q·k / sqrt(E), with one more logit,
sinks[h], in the denominator only (it has no value). Layer i is windowed iff layer_types[i] is
"sliding_attention": a query at position p sees keys at positions p - W < s <= p (W =
sliding_window), otherwise s <= p.

Experts: router logits h @ router + router_bias [P]; the top k logits (k = num_experts_per_tok)
softmaxed among themselves (fp32) are the weights. Expert e on h: g_u = h @ gate_up[e] +
gate_up_bias[e], gate = g_u[0::2] clamped above at `swiglu_limit`, up = g_u[1::2] clamped to
[-limit, limit]; (up + 1) * gate * sigmoid(alpha * gate) @ down[e] + down_bias[e], alpha =
`swiglu_alpha`. Dispatches as in dpace_jax.targets.qwen3_moe ("dense" reference, "sorted"
ragged_dot).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dpace_jax.nn import layers

LAYER_TYPES = ("sliding_attention", "full_attention")


# ----------------------------------------------------------------------------- attention


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """HF GptOssRMSNorm: the weight multiplies the fp32 normalized x, then the cast."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * x32).astype(x.dtype)


def decoder_layer(x, p, m, cos, sin, cfg, attend):
    """One gpt-oss layer on x [B, T, D]: p its LayerParams slice, m its GptOssParams slice;
    `attend(q, k, v, sinks)` -> (attention output [B, T, H, E], extra)."""
    h = rms_norm(x, p.attn_norm, cfg.rms_norm_eps)
    q = jnp.einsum("...td,dhe->...the", h, p.q) + m.q_bias
    k = jnp.einsum("...sd,dge->...sge", h, p.k) + m.k_bias
    v = jnp.einsum("...sd,dge->...sge", h, p.v) + m.v_bias
    q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
    attn, extra = attend(q, k, v, m.sinks)
    x = x + layers.output_projection(attn, p) + m.o_bias
    h = rms_norm(x, p.mlp_norm, cfg.rms_norm_eps)
    return x + moe_mlp(h, m, cfg.family_cfg), extra


# ----------------------------------------------------------------------------- experts


def route(h: jax.Array, m, f) -> tuple[jax.Array, jax.Array]:
    """h [..., D] -> (weights [..., k] in h's dtype, expert ids [..., k] int32)."""
    logits = jnp.einsum("...d,dp->...p", h, m.router) + m.router_bias
    top, experts = jax.lax.top_k(logits, f.num_experts_per_tok)
    weights = jax.nn.softmax(top.astype(jnp.float32), axis=-1)
    return weights.astype(h.dtype), experts.astype(jnp.int32)


def glu(gate_up: jax.Array, f) -> jax.Array:
    """The clamped SwiGLU on [..., 2M] (gate, up interleaved) -> [..., M]."""
    gate = jnp.minimum(gate_up[..., 0::2], f.swiglu_limit)
    up = jnp.clip(gate_up[..., 1::2], -f.swiglu_limit, f.swiglu_limit)
    return (up + 1) * (gate * jax.nn.sigmoid(gate * f.swiglu_alpha))


def dense_dispatch(h, m, weights, experts, f) -> jax.Array:
    """The reference: every expert on every token, weighted by [..., P] (zero outside top k)."""
    w = jnp.sum(jax.nn.one_hot(experts, f.num_experts, dtype=h.dtype) * weights[..., None],
                axis=-2)
    gate_up = jnp.einsum("...d,pdn->...pn", h, m.expert_gate_up) + m.expert_gate_up_bias
    out = jnp.einsum("...pm,pmd->...pd", glu(gate_up, f), m.expert_down) + m.expert_down_bias
    return jnp.einsum("...pd,...p->...d", out, w)


def sorted_dispatch(h, m, weights, experts, f) -> jax.Array:
    """Capacity-free grouped dispatch (as dpace_jax.targets.qwen3_moe.sorted_dispatch), with the
    biases of each assignment's expert."""
    x = h.reshape(-1, h.shape[-1])
    k = experts.shape[-1]
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token, chosen = order // k, jnp.take(flat, order)
    sizes = jnp.bincount(flat, length=f.num_experts).astype(jnp.int32)
    xs = jnp.take(x, token, axis=0)
    gate_up = (jax.lax.ragged_dot(xs, m.expert_gate_up, sizes)
               + jnp.take(m.expert_gate_up_bias, chosen, axis=0))
    out = (jax.lax.ragged_dot(glu(gate_up, f), m.expert_down, sizes)
           + jnp.take(m.expert_down_bias, chosen, axis=0))
    out = out * jnp.take(weights.reshape(-1), order)[:, None]
    return jnp.zeros_like(x).at[token].add(out.astype(x.dtype)).reshape(h.shape)


def moe_mlp(h: jax.Array, m, f) -> jax.Array:
    """One layer's feed-forward on h [..., D] with its GptOssParams slice m."""
    weights, experts = route(h, m, f)
    dispatch = dense_dispatch if f.dispatch == "dense" else sorted_dispatch
    return dispatch(h, m, weights, experts, f)
