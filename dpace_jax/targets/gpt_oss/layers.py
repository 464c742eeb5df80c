"""The gpt-oss target (HF `GptOssForCausalLM`, model_type `gpt_oss`): its configuration fields,
its attention (biases, per-head sinks, alternating sliding / full layers) and its mixture of
experts (biased router, clamped SwiGLU experts with biases). docs/design.md §2 states the formulas.

Parameters (dpace_jax.nn.params): q/k/v/o weights and the two norms in `LayerParams`, the rest of
each layer in `GptOssParams` (params.GPT_OSS), stacked over all L layers. Every layer has experts.

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
from dpace_jax.targets.qwen3_moe import DISPATCHES

LAYER_TYPES = ("sliding_attention", "full_attention")


# ----------------------------------------------------------------------------- configuration


def hf_fields(hf: dict, num_layers: int, source: str) -> dict:
    """The ModelConfig fields of a gpt_oss config.json (ValueError naming a bad field)."""
    experts = hf.get("num_local_experts", hf.get("num_experts"))
    if experts is None:
        raise ValueError(f"{source}: missing field 'num_local_experts'")
    if not hf.get("attention_bias", True):
        raise ValueError(f"{source}: attention_bias=False is not supported for gpt_oss "
                         "(its attention has q/k/v/o biases)")
    types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                      for i in range(num_layers)]
    out = dict(num_experts=int(experts), num_experts_per_tok=int(hf["num_experts_per_tok"]),
               moe_intermediate_size=int(hf["intermediate_size"]),
               sliding_window=int(hf.get("sliding_window") or 0),
               layer_types=tuple(str(t) for t in types),
               swiglu_limit=float(hf.get("swiglu_limit", 7.0)),
               swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)))
    check_fields(out, num_layers, source)
    return out


def check_fields(f: dict, num_layers: int, source: str) -> None:
    if f["num_experts"] < 1 or not 0 < f["num_experts_per_tok"] <= f["num_experts"]:
        raise ValueError(f"{source}: num_experts_per_tok={f['num_experts_per_tok']} must be in "
                         f"1..num_local_experts={f['num_experts']}")
    types = f["layer_types"]
    if len(types) != num_layers or any(t not in LAYER_TYPES for t in types):
        raise ValueError(f"{source}: layer_types={list(types)} must hold {num_layers} entries "
                         f"from {LAYER_TYPES}")
    if "sliding_attention" in types and f["sliding_window"] < 1:
        raise ValueError(f"{source}: sliding_window={f['sliding_window']} must be >= 1 with "
                         "sliding_attention layers")


def check(cfg) -> None:
    """A ModelConfig's gpt-oss fields are consistent (a config built by hand, not from_hf)."""
    if cfg.arch != "gpt_oss":
        return
    if cfg.moe_dispatch not in DISPATCHES:
        raise ValueError(f"moe_dispatch={cfg.moe_dispatch!r}; choose one of {DISPATCHES}")
    check_fields({f: getattr(cfg, f) for f in ("num_experts", "num_experts_per_tok",
                                                "layer_types", "sliding_window")},
                 cfg.num_layers, "config")


def hf_config_fields(cfg) -> dict:
    """The gpt_oss fields of an exported config.json."""
    rope = {"rope_type": "default", **(cfg.scaling_dict or {}), "rope_theta": cfg.rope_theta}
    return dict(num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                intermediate_size=cfg.moe_intermediate_size, sliding_window=cfg.sliding_window,
                layer_types=list(cfg.layer_types), swiglu_limit=cfg.swiglu_limit,
                swiglu_alpha=cfg.swiglu_alpha, attention_bias=True, rope_parameters=rope,
                output_router_logits=False)


def sliding_flags(cfg) -> jax.Array:
    """[L] bool: which layers attend through the sliding window."""
    return jnp.asarray([t == "sliding_attention" for t in cfg.layer_types], jnp.bool_)


# ----------------------------------------------------------------------------- attention


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """HF GptOssRMSNorm: the weight multiplies the fp32 normalized x, then the cast."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * x32).astype(x.dtype)


def visible(q_pos: jax.Array, k_pos: jax.Array, sliding: jax.Array, window: int) -> jax.Array:
    """[B, 1, 1, T, S] mask: key position k_pos [B or 1, S] visible from q_pos [B, T] (causal,
    and within the window when the traced bool `sliding`)."""
    diff = q_pos[:, :, None] - k_pos[:, None, :]
    ok = (diff >= 0) & (jnp.logical_not(sliding) | (diff < window))
    return ok[:, None, None]


def attention(q: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array,
              sinks: jax.Array) -> jax.Array:
    """Grouped-query attention with a sink logit per head: q [B, T, H, E], keys / values
    [B, S, G, E], mask [B, 1, 1, T, S], sinks [H] -> [B, T, H, E]."""
    scores = layers.attention_logits(q, keys)  # [B, G, R, T, S] fp32
    g, r = scores.shape[1], scores.shape[2]
    sink = sinks.astype(jnp.float32).reshape(1, g, r, 1, 1)
    scores = jnp.where(mask, scores, -jnp.inf)
    peak = jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), sink)
    e = jnp.where(mask, jnp.exp(scores - peak), 0.0)
    probs = e / (jnp.sum(e, axis=-1, keepdims=True) + jnp.exp(sink - peak))
    return layers.attention_output(probs, values)


def decoder_layer(x, p, m, cos, sin, cfg, attend, sliding):
    """One gpt-oss layer on x [B, T, D]: p its LayerParams slice, m its GptOssParams slice;
    `attend(q, k, v, sinks, sliding)` -> (attention output [B, T, H, E], extra)."""
    h = rms_norm(x, p.attn_norm, cfg.rms_norm_eps)
    q = jnp.einsum("...td,dhe->...the", h, p.q) + m.q_bias
    k = jnp.einsum("...sd,dge->...sge", h, p.k) + m.k_bias
    v = jnp.einsum("...sd,dge->...sge", h, p.v) + m.v_bias
    q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
    attn, extra = attend(q, k, v, m.sinks, sliding)
    x = x + layers.output_projection(attn, p) + m.o_bias
    h = rms_norm(x, p.mlp_norm, cfg.rms_norm_eps)
    return x + moe_mlp(h, m, cfg), extra


# ----------------------------------------------------------------------------- experts


def route(h: jax.Array, m, cfg) -> tuple[jax.Array, jax.Array]:
    """h [..., D] -> (weights [..., k] in h's dtype, expert ids [..., k] int32)."""
    logits = jnp.einsum("...d,dp->...p", h, m.router) + m.router_bias
    top, experts = jax.lax.top_k(logits, cfg.num_experts_per_tok)
    weights = jax.nn.softmax(top.astype(jnp.float32), axis=-1)
    return weights.astype(h.dtype), experts.astype(jnp.int32)


def glu(gate_up: jax.Array, cfg) -> jax.Array:
    """The clamped SwiGLU on [..., 2M] (gate, up interleaved) -> [..., M]."""
    gate = jnp.minimum(gate_up[..., 0::2], cfg.swiglu_limit)
    up = jnp.clip(gate_up[..., 1::2], -cfg.swiglu_limit, cfg.swiglu_limit)
    return (up + 1) * (gate * jax.nn.sigmoid(gate * cfg.swiglu_alpha))


def dense_dispatch(h, m, weights, experts, cfg) -> jax.Array:
    """The reference: every expert on every token, weighted by [..., P] (zero outside top k)."""
    w = jnp.sum(jax.nn.one_hot(experts, cfg.num_experts, dtype=h.dtype) * weights[..., None],
                axis=-2)
    gate_up = jnp.einsum("...d,pdn->...pn", h, m.expert_gate_up) + m.expert_gate_up_bias
    out = jnp.einsum("...pm,pmd->...pd", glu(gate_up, cfg), m.expert_down) + m.expert_down_bias
    return jnp.einsum("...pd,...p->...d", out, w)


def sorted_dispatch(h, m, weights, experts, cfg) -> jax.Array:
    """Capacity-free grouped dispatch (as dpace_jax.targets.qwen3_moe.sorted_dispatch), with the
    biases of each assignment's expert."""
    x = h.reshape(-1, h.shape[-1])
    k = experts.shape[-1]
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token, chosen = order // k, jnp.take(flat, order)
    sizes = jnp.bincount(flat, length=cfg.num_experts).astype(jnp.int32)
    xs = jnp.take(x, token, axis=0)
    gate_up = (jax.lax.ragged_dot(xs, m.expert_gate_up, sizes)
               + jnp.take(m.expert_gate_up_bias, chosen, axis=0))
    out = (jax.lax.ragged_dot(glu(gate_up, cfg), m.expert_down, sizes)
           + jnp.take(m.expert_down_bias, chosen, axis=0))
    out = out * jnp.take(weights.reshape(-1), order)[:, None]
    return jnp.zeros_like(x).at[token].add(out.astype(x.dtype)).reshape(h.shape)


def moe_mlp(h: jax.Array, m, cfg) -> jax.Array:
    """One layer's feed-forward on h [..., D] with its GptOssParams slice m."""
    weights, experts = route(h, m, cfg)
    dispatch = dense_dispatch if cfg.moe_dispatch == "dense" else sorted_dispatch
    return dispatch(h, m, weights, experts, cfg)
