"""The Qwen3.5 target (HF `Qwen3_5ForCausalLM` / `Qwen3_5MoeForCausalLM`, and the text model of
their `...ForConditionalGeneration` checkpoints): configuration fields and one layer's pieces.
dpace_jax.targets.qwen3_5.decoder runs the layers; docs/design.md §10 states the formulas.

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
(softmax, top k renormalized; dpace_jax.targets.qwen3_moe's dispatches) plus a shared SwiGLU expert
scaled by sigmoid(h @ shared_expert_gate). Text positions are plain RoPE: the multimodal rotary
sections (mrope) coincide for text, where the three position ids are equal.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dpace_jax.nn import layers
from dpace_jax.targets import qwen3_moe as moe
from dpace_jax.targets.qwen3_5 import gated_delta

LAYER_TYPES = ("linear_attention", "full_attention")
ARCHS = ("qwen3_5", "qwen3_5_moe")
# transformers' Qwen3_5TextConfig defaults for fields a config.json may leave out
LINEAR_DEFAULTS = {"linear_num_key_heads": 16, "linear_num_value_heads": 32,
                   "linear_key_head_dim": 128, "linear_value_head_dim": 128,
                   "linear_conv_kernel_dim": 4}
MULTIMODAL_PREFIX = "model.language_model."  # the text model's keys in a multimodal checkpoint
NOT_TEXT_PREFIXES = ("model.visual.", "mtp.")  # its vision tower and multi-token-prediction head


# ----------------------------------------------------------------------------- configuration


def text_config(hf: dict) -> tuple[dict, bool]:
    """(the text model's config dict, whether the checkpoint is multimodal): a
    `..ForConditionalGeneration` config nests the text model's fields under text_config and its
    tensors under model.language_model. (text_tensors)."""
    if not isinstance(hf.get("text_config"), dict):
        return hf, False
    text = dict(hf["text_config"])
    if "tie_word_embeddings" in hf:  # the outer model's setting governs the tying
        text["tie_word_embeddings"] = hf["tie_word_embeddings"]
    text["model_type"] = hf.get("model_type", text.get("model_type"))
    text["architectures"] = [a.replace("ForConditionalGeneration", "ForCausalLM")
                             for a in hf.get("architectures") or []]
    return text, True


def hf_fields(hf: dict, num_layers: int, arch: str, source: str) -> dict:
    """The ModelConfig fields of a qwen3_5 / qwen3_5_moe text config (ValueError naming a bad
    field)."""
    if not hf.get("attn_output_gate", True):
        raise ValueError(f"{source}: attn_output_gate=False is not supported (Qwen3.5's attention "
                         "gates its output)")
    types = hf.get("layer_types")
    if types is None:
        every = int(hf.get("full_attention_interval", 4))
        types = ["full_attention" if (i + 1) % every == 0 else "linear_attention"
                 for i in range(num_layers)]
    rope = hf.get("rope_parameters") or {}
    out = {k: int(hf.get(k, d)) for k, d in LINEAR_DEFAULTS.items()}
    out.update(layer_types=tuple(str(t) for t in types),
               partial_rotary_factor=float(rope.get("partial_rotary_factor",
                                                    hf.get("partial_rotary_factor", 1.0))))
    if arch == "qwen3_5_moe":
        try:
            out.update(num_experts=int(hf["num_experts"]),
                       num_experts_per_tok=int(hf["num_experts_per_tok"]),
                       moe_intermediate_size=int(hf["moe_intermediate_size"]),
                       shared_expert_intermediate_size=int(hf["shared_expert_intermediate_size"]),
                       norm_topk_prob=True)
        except KeyError as e:
            raise ValueError(f"{source}: missing field {e.args[0]!r}") from None
    check_fields(out, num_layers, int(hf.get("head_dim") or 0), source)
    return out


def check_fields(f: dict, num_layers: int, head_dim: int, source: str) -> None:
    types = f["layer_types"]
    if len(types) != num_layers or any(t not in LAYER_TYPES for t in types):
        raise ValueError(f"{source}: layer_types={list(types)} must hold {num_layers} entries "
                         f"from {LAYER_TYPES}")
    if f["linear_num_key_heads"] < 1 or f["linear_num_value_heads"] % f["linear_num_key_heads"]:
        raise ValueError(f"{source}: linear_num_value_heads={f['linear_num_value_heads']} must be "
                         f"a multiple of linear_num_key_heads={f['linear_num_key_heads']}")
    if f["linear_conv_kernel_dim"] < 1:
        raise ValueError(f"{source}: linear_conv_kernel_dim={f['linear_conv_kernel_dim']} must "
                         "be >= 1")
    rot = head_dim * f["partial_rotary_factor"]
    if head_dim and (not 0 < f["partial_rotary_factor"] <= 1 or rot != int(rot) or int(rot) % 2):
        raise ValueError(f"{source}: partial_rotary_factor={f['partial_rotary_factor']} must give "
                         f"an even number of rotary dimensions of head_dim={head_dim}")


def check(cfg) -> None:
    """A ModelConfig's Qwen3.5 fields are consistent (a config built by hand, not from_hf)."""
    if cfg.arch not in ARCHS:
        return
    check_fields({f: getattr(cfg, f) for f in (*LINEAR_DEFAULTS, "layer_types",
                                                "partial_rotary_factor")},
                 cfg.num_layers, cfg.head_dim, "config")
    if cfg.rope_scaling:
        raise ValueError(f"rope_parameters: rope_type={cfg.scaling_dict.get('rope_type')!r} is not "
                         "supported for a Qwen3.5 target (only the default RoPE)")
    if cfg.arch == "qwen3_5_moe":
        moe.check_fields({f: getattr(cfg, f) for f in (
            "num_experts", "num_experts_per_tok", "moe_intermediate_size")}
            | {"decoder_sparse_step": 1, "mlp_only_layers": ()}, cfg.num_layers, "config")


def text_tensors(tensors: dict, multimodal: bool) -> tuple[dict, dict]:
    """A checkpoint's {key: entry} restricted to the text model, under the text-only names ->
    (that dict, {text-only name: stored name}). The vision tower and the multi-token-prediction
    head are dropped (NOT_TEXT_PREFIXES); a multimodal checkpoint's model.language_model.* keys
    become model.*. Anything else stays, so the strict key check still names it."""
    out, original = {}, {}
    for key, entry in tensors.items():
        if key.startswith(NOT_TEXT_PREFIXES):
            continue
        name = key
        if multimodal and key.startswith(MULTIMODAL_PREFIX):
            name = "model." + key[len(MULTIMODAL_PREFIX):]
            original[name] = key
        out[name] = entry
    return out, original


def hf_config_fields(cfg) -> dict:
    """The Qwen3.5 fields of an exported (text-only, ForCausalLM) config.json."""
    out = {k: getattr(cfg, k) for k in LINEAR_DEFAULTS}
    out.update(layer_types=list(cfg.layer_types), attn_output_gate=True,
               rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta,
                                "partial_rotary_factor": cfg.partial_rotary_factor})
    if cfg.arch == "qwen3_5_moe":
        out.update(num_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                   moe_intermediate_size=cfg.moe_intermediate_size,
                   shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
                   output_router_logits=False)
    return out


def rotary_dim(cfg) -> int:
    return int(cfg.head_dim * cfg.partial_rotary_factor)


# ----------------------------------------------------------------------------- a layer's pieces


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
        hk, dk = cfg.linear_num_key_heads, cfg.linear_key_head_dim
        u, dv = cfg.linear_num_value_heads, cfg.linear_value_head_dim
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
    return moe.moe_mlp(h, e, cfg) + gate.astype(h.dtype) * shared
