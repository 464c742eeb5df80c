"""gpt-oss targets (HF `GptOssForCausalLM`, model_type `gpt_oss`): the family. A layer's
computation: dpace_jax.targets.gpt_oss.parts; MXFP4 checkpoints: dpace_jax.targets.gpt_oss.mxfp4.

Parameters (`GptOssLayers`): q/k/v/o weights and the two norms (`attn`, LayerParams) and the rest
of each layer (`oss`, GptOssParams: biases, sinks, router, experts fused in HF's layout), stacked
over all L layers; every layer has experts. The decoding cache is full length for every layer,
the sliding window lives in the mask.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dpace_jax.nn import layers
from dpace_jax.nn.layers import LAYER, MLP, QK_NORM, LayerParams
from dpace_jax.nn.schema import ArrayInfo, split_keys, table_params
from dpace_jax.targets import experts as experts_lib
from dpace_jax.targets.base import LAYER_PREFIX, Family, keys, top_params
from dpace_jax.targets.experts import ExpertsConfig
from dpace_jax.targets.gpt_oss import mxfp4
from dpace_jax.targets.gpt_oss import parts as oss_layers

LAYER_TYPES = ("sliding_attention", "full_attention")
OSS_KEY = 2  # fold_in(model key, 2): the GPT_OSS entries' keys


def _oss(shape, axes, hf, layout="same"):
    return ArrayInfo(shape, axes, "normal", hf, layout)


GPT_OSS = {  # N = 2M: gate and up interleaved on the last axis, as HF stores them
    "q_bias": _oss(("H", "E"), ("heads", "head_dim"), "self_attn.q_proj.bias", "flat"),
    "k_bias": _oss(("G", "E"), ("kv_heads", "head_dim"), "self_attn.k_proj.bias", "flat"),
    "v_bias": _oss(("G", "E"), ("kv_heads", "head_dim"), "self_attn.v_proj.bias", "flat"),
    "o_bias": _oss(("D",), (None,), "self_attn.o_proj.bias"),
    "sinks": _oss(("H",), ("heads",), "self_attn.sinks"),
    "router": _oss(("D", "P"), ("embed", None), "mlp.router.weight", "t"),
    "router_bias": _oss(("P",), (None,), "mlp.router.bias"),
    "expert_gate_up": _oss(("P", "D", "N"), ("expert", "embed", "mlp"), "mlp.experts.gate_up_proj"),
    "expert_gate_up_bias": _oss(("P", "N"), ("expert", "mlp"), "mlp.experts.gate_up_proj_bias"),
    "expert_down": _oss(("P", "M", "D"), ("expert", "mlp", "embed"), "mlp.experts.down_proj"),
    "expert_down_bias": _oss(("P", "D"), ("expert", None), "mlp.experts.down_proj_bias"),
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class GptOssParams:
    """The GPT_OSS parameters of every layer (shapes: GPT_OSS, with a leading L axis)."""

    q_bias: jax.Array
    k_bias: jax.Array
    v_bias: jax.Array
    o_bias: jax.Array
    sinks: jax.Array
    router: jax.Array
    router_bias: jax.Array
    expert_gate_up: jax.Array
    expert_gate_up_bias: jax.Array
    expert_down: jax.Array
    expert_down_bias: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class GptOssLayers:
    attn: LayerParams
    oss: GptOssParams


@dataclasses.dataclass(frozen=True)
class GptOssConfig(ExpertsConfig):
    """moe_intermediate_size is HF's `intermediate_size` (each expert's width)."""

    sliding_window: int = 0
    layer_types: tuple[str, ...] = ()
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702


class GptOss(Family):
    arch = "gpt_oss"
    hf_architectures = ("GptOssForCausalLM",)
    model_types = ("gpt_oss",)
    export = ("GptOssForCausalLM", "gpt_oss")
    qk_norm = False
    config_type = GptOssConfig
    layers_type = GptOssLayers
    norm = staticmethod(oss_layers.rms_norm)

    def family_config(self, hf, num_layers, source, multimodal=False):
        if hf.get("num_local_experts", hf.get("num_experts")) is None:
            raise ValueError(f"{source}: missing field 'num_local_experts'")
        if not hf.get("attention_bias", True):
            raise ValueError(f"{source}: attention_bias=False is not supported for gpt_oss "
                             "(its attention has q/k/v/o biases)")
        types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                          for i in range(num_layers)]
        f = GptOssConfig(**experts_lib.hf_fields(hf, source, width="intermediate_size"),
                         sliding_window=int(hf.get("sliding_window") or 0),
                         layer_types=tuple(str(t) for t in types),
                         swiglu_limit=float(hf.get("swiglu_limit", 7.0)),
                         swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)))
        self._check(f, num_layers, source)
        return f

    def _check(self, f: GptOssConfig, num_layers: int, source: str) -> None:
        if f.num_experts < 1 or not 0 < f.num_experts_per_tok <= f.num_experts:
            raise ValueError(f"{source}: num_experts_per_tok={f.num_experts_per_tok} must be in "
                             f"1..num_local_experts={f.num_experts}")
        experts_lib.check(f, source, "num_local_experts")
        types = f.layer_types
        if len(types) != num_layers or any(t not in LAYER_TYPES for t in types):
            raise ValueError(f"{source}: layer_types={list(types)} must hold {num_layers} "
                             f"entries from {LAYER_TYPES}")
        if "sliding_attention" in types and f.sliding_window < 1:
            raise ValueError(f"{source}: sliding_window={f.sliding_window} must be >= 1 with "
                             "sliding_attention layers")

    def check_fields(self, cfg, source="config"):
        self._check(cfg.family_cfg, cfg.num_layers, source)

    def unsupported(self, hf):  # biases, and its own clamped SwiGLU whatever hidden_act says
        return {k: v for k, v in super().unsupported(hf).items()
                if k not in ("hidden_act", "attention_bias")}

    def hf_config(self, cfg, out):
        f = cfg.family_cfg
        rope = {"rope_type": "default", **(cfg.scaling_dict or {}), "rope_theta": cfg.rope_theta}
        del out["rope_theta"], out["rope_scaling"]
        out.update(num_local_experts=f.num_experts, num_experts_per_tok=f.num_experts_per_tok,
                   intermediate_size=f.moe_intermediate_size, sliding_window=f.sliding_window,
                   layer_types=list(f.layer_types), swiglu_limit=f.swiglu_limit,
                   swiglu_alpha=f.swiglu_alpha, attention_bias=True, rope_parameters=rope,
                   output_router_logits=False)

    def dims(self, cfg):
        f = cfg.family_cfg
        return {**layers.dims(cfg), **f.dims(), "N": 2 * f.moe_intermediate_size}

    def params(self, cfg):
        _, layer_keys = keys(["embed", "lm_head"])
        names = [n for n in LAYER if n not in MLP and n not in QK_NORM]
        every = tuple(range(cfg.num_layers))
        return (top_params(cfg)
                + table_params(LAYER, ("layers", "attn"), LAYER_PREFIX, every, layer_keys,
                               names=names)
                + table_params(GPT_OSS, ("layers", "oss"), LAYER_PREFIX, every,
                               split_keys(GPT_OSS, (("fold", OSS_KEY),))))

    def nodes(self):
        return {**super().nodes(), ("layers", "attn"): LayerParams,
                ("layers", "oss"): GptOssParams}

    def check_quantization(self, hf, source):
        return mxfp4.check_config(hf, self.arch, source)

    def checkpoint_tensors(self, cfg, hf, raw, source):
        if mxfp4.check_config(hf, self.arch, source):
            tensors, packed = mxfp4.fold(raw, source)
            return tensors, packed, {}
        return raw, {}, {}

    def unpack(self, name, parts):
        return mxfp4.dequantize(*parts, name=name)

    def check_attention(self, cfg, attention):
        if attention != "einsum":
            raise ValueError(f"attention={attention!r}: a gpt-oss target (attention sinks) needs "
                             "attention='einsum'")

    def unit_params(self, tree, cfg, u):
        return layers.slice_layer(tree, u)

    def unit(self, x, buf, p, layer, ctx, kv, cfg):
        f = cfg.family_cfg
        sliding = jnp.asarray([t == "sliding_attention" for t in f.layer_types])[layer]
        window = jnp.where(sliding, f.sliding_window, 0)

        def attend(q, k, v, sinks):
            return ctx.attend(q, k, v, kv, window=window, sinks=sinks)

        x, kv = oss_layers.decoder_layer(x, p.attn, p.oss, ctx.cos, ctx.sin, cfg, attend)
        return x, ctx.record(buf, x, layer), kv


FAMILY = GptOss()
