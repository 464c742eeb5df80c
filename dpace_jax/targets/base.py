"""What every target family shares: the top-level parameters (`TargetParams`), the KV cache, and
`Family`, the base class of a family's registry object (dpace_jax.targets.FAMILIES), whose
defaults are the plain Qwen3-style decoder that Qwen3 and Llama use.

A family describes one HF architecture completely: its config.json fields (parsed into the
family's own nested config, `ModelConfig.family_cfg`) and checks, its parameter schema, its
checkpoint quirks, the config.json it writes, and its layers as *units* for the one layer loop
(dpace_jax.targets.runner): a unit is one decoder layer, or a period of layers for a family whose
layers differ in kind (Qwen3.5). A unit's parameters and cache slice are read in place from the
stacks by a traced unit index, so the loop compiles one unit whatever the depth, and a pipeline
stage (dpace_jax.infer.spd) is just a range of units.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from dpace_jax.nn import layers
from dpace_jax.nn.layers import LAYER, MLP, QK_NORM, LayerParams
from dpace_jax.nn.schema import (
    ArrayInfo,
    Param,
    Schema,
    normal_names,
    split_keys,
    table_params,
)

TOP = {
    "embed": ArrayInfo(("V", "D"), ("vocab", "embed"), "normal", "model.embed_tokens.weight",
                       "same"),
    "final_norm": ArrayInfo(("D",), (None,), "ones", "model.norm.weight", "same"),
    "lm_head": ArrayInfo(("D", "V"), ("embed", "vocab"), "normal", "lm_head.weight", "t"),
}
LAYER_PREFIX = "model.layers.{i}."


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TargetParams:
    embed: jax.Array  # [V, D]
    layers: Any  # the family's stacked decoder layers (LayerParams for Qwen3 / Llama)
    final_norm: jax.Array  # [D]
    lm_head: jax.Array | None = None  # [D, V]; None when tied to the embedding


class KVCache(NamedTuple):
    k: jax.Array  # [L, B, S, G, E]
    v: jax.Array  # [L, B, S, G, E]

    @classmethod
    def zeros(cls, cfg, batch: int, length: int, dtype=jnp.bfloat16,
              num_layers: int | None = None) -> KVCache:
        layers_ = cfg.num_layers if num_layers is None else num_layers
        shape = (layers_, batch, length, cfg.num_kv_heads, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def keys(names_top) -> tuple[dict, dict]:
    """Key paths of a target's normal-initialized parameters: the top-level ones (table order
    of `names_top`) and the decoder layer's (LAYER order), as the model's key splits them: one
    key for the layers, then one per top-level matrix."""
    top = [*names_top]
    split = ("split", 1 + len(top))
    top_keys = {n: (split + (1 + j,),) for j, n in enumerate(top)}
    return top_keys, split_keys(normal_names(LAYER), ((*split, 0),))


def top_params(cfg, info=lambda i: i) -> list[Param]:
    """The embedding, final norm and (untied) LM head."""
    top_keys, _ = keys(normal_names(TOP))
    names = [n for n in TOP if not (n == "lm_head" and cfg.tie_word_embeddings)]
    return table_params(TOP, (), "", None, top_keys, names=names, info=info)


class Family:
    """A target family; subclasses override what differs from the Qwen3 decoder (see the
    module doc). Instances are immutable registry entries."""

    arch = "qwen3"  # our name, ModelConfig.arch
    hf_architectures: tuple[str, ...] = ("Qwen3ForCausalLM",)
    model_types: tuple[str, ...] = ("qwen3",)
    export = ("Qwen3ForCausalLM", "qwen3")  # architecture and model_type written
    qk_norm = True
    dense_mlp = True  # intermediate_size is the width of a dense MLP every layer has
    config_type: type | None = None  # the family's nested config (ModelConfig.family_cfg)
    layers_type: type = LayerParams  # TargetParams.layers

    # --------------------------------------------------------------- configuration

    def family_config(self, hf: dict, num_layers: int, source: str, multimodal: bool = False):
        """The nested config from an HF config dict (ValueError naming a bad field)."""
        return None

    def check_quantization(self, hf: dict, source: str) -> bool:
        """Whether the checkpoint is quantized in a format this family reads; ValueError for
        any other quantization."""
        quant = hf.get("quantization_config")
        if quant is None:
            return False
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        raise ValueError(f"{source}: quantization_config.quant_method={method!r} is not "
                         f"supported for {self.arch!r} (only 'mxfp4' for gpt_oss; or an "
                         "unquantized checkpoint)")

    def make_config(self, **fields):
        """The nested config from flat fields (ModelConfig.make)."""
        if self.config_type is None:
            if fields:
                raise ValueError(f"arch={self.arch!r} has no field(s) {sorted(fields)}")
            return None
        return self.config_type(**fields)

    def check_fields(self, cfg, source: str = "config") -> None:
        """ValueError naming the field when cfg's fields are not consistent (from_hf runs it)."""

    def check(self, cfg, source: str = "config") -> None:
        """ValueError naming the field when the forwards cannot run cfg (its fields, and what
        this implementation supports)."""
        self.check_fields(cfg, source)

    def text_config(self, hf: dict) -> tuple[dict, bool]:
        """(the text model's config dict, whether the checkpoint is multimodal)."""
        return hf, False

    def hf_config(self, cfg, out: dict) -> None:
        """Edit the common config.json dict `out` into this family's."""
        out.update(use_sliding_window=False, sliding_window=None)

    def unsupported(self, hf: dict) -> dict:
        """{field: (is unsupported, expected)} of HF fields this family cannot run."""
        return {"hidden_act": (hf.get("hidden_act", "silu") not in ("silu", "swish"), "silu"),
                "attention_bias": (bool(hf.get("attention_bias", False)), False),
                "mlp_bias": (bool(hf.get("mlp_bias", False)), False),
                "use_sliding_window": (bool(hf.get("use_sliding_window", False)), False)}

    # --------------------------------------------------------------- parameters

    def dims(self, cfg) -> dict[str, int]:
        return layers.dims(cfg)

    def params(self, cfg) -> list[Param]:
        _, layer_keys = keys(normal_names(TOP))
        names = [n for n in LAYER if self.qk_norm or n not in QK_NORM]
        return top_params(cfg) + table_params(LAYER, ("layers",), LAYER_PREFIX,
                                              tuple(range(cfg.num_layers)), layer_keys,
                                              names=names)

    def nodes(self) -> dict[tuple[str, ...], type]:
        return {(): TargetParams, ("layers",): self.layers_type}

    def schema(self) -> Schema:
        return Schema("target", self.params, self.dims, self.nodes())

    def checkpoint_tensors(self, cfg, hf: dict, raw: dict, source: str):
        """(the tensors {name: entry} the schema reads, {name: (packed names)} of tensors to
        unpack, {name: stored name}) of a checkpoint's index `raw`."""
        return raw, {}, {}

    def check_tensors(self, cfg, keys_, source: str) -> None:
        """A checkpoint-level check before the strict key comparison (e.g. expert counts)."""

    def unpack(self, name: str, parts) -> Any:
        raise ValueError(f"{name}: nothing to unpack in a {self.arch} checkpoint")

    # --------------------------------------------------------------- forwards

    norm = staticmethod(layers.rms_norm)  # the final norm's flavour

    def rope(self, cfg, positions):
        return layers.rope_cos_sin_scaled(positions, cfg.head_dim, cfg.rope_theta,
                                          cfg.scaling_dict)

    def check_attention(self, cfg, attention: str) -> None:
        """ValueError when the cache-free forwards cannot use `attention`."""

    def layers_per_unit(self, cfg) -> int:
        return 1

    def num_units(self, cfg) -> int:
        return cfg.num_layers // self.layers_per_unit(cfg)

    def unit_params(self, tree, cfg, u):
        """Unit u's parameters (u traced, local to the stacks given)."""
        return layers.slice_layer(tree, u)

    def unit(self, x, buf, p, layer, ctx, kv, cfg):
        """Unit `layer` (global index, traced) on x [B, T, D] -> (x, buf, new cache slice)."""
        x, kv = layers.decoder_layer(x, p, ctx.cos, ctx.sin, cfg,
                                     lambda q, k, v: ctx.attend(q, k, v, kv))
        return x, ctx.record(buf, x, layer), kv

    def init_cache(self, cfg, batch: int, length: int, dtype, num_units: int | None = None):
        return KVCache.zeros(cfg, batch, length, dtype, num_units)

    def init_pipeline_cache(self, cfg, batch: int, length: int, dtype, num_units: int,
                            num_stages: int):
        """A pipeline stage's cache (dpace_jax.infer.spd): one that rolls back to any of the
        last num_stages positions (a KV cache rolls back by position as it is)."""
        return self.init_cache(cfg, batch, length, dtype, num_units)

    def unit_cache(self, cache, cfg, u):
        return layers.slice_layer(cache, u)

    def set_unit_cache(self, cache, cfg, u, value):
        return jax.tree.map(lambda a, b: jax.lax.dynamic_update_index_in_dim(a, b, u, 0),
                            cache, value)

    def begin(self, cache, cfg, tokens: int, keep):
        """The cache as the layer loop takes it, for a block of `tokens` tokens."""
        return cache

    def commit(self, cache, cfg, keep):
        """After a verification: keep the first keep[b] block tokens (a KV cache needs nothing:
        the next block's start rolls it back)."""
        return cache

    def check_stages(self, cfg, num_stages: int) -> None:
        """ValueError when the layers cannot be split into num_stages equal pipeline stages."""
        if self.num_units(cfg) % num_stages:
            raise ValueError(f"num_stages={num_stages} does not divide the target's "
                             f"num_layers={cfg.num_layers}")


def dense_mlp_keys() -> dict:
    """The decoder layer's keys of its MLP entries (a MoE family's dense layers use them)."""
    _, layer_keys = keys(normal_names(TOP))
    return {n: layer_keys[n] for n in MLP}
