"""Qwen3-MoE targets (HF `Qwen3MoeForCausalLM`, model_type `qwen3_moe`): Qwen3 attention, and
routed experts (dpace_jax.targets.experts) in some layers.

Layers: layer i has experts iff num_experts > 0, i is not in `mlp_only_layers` and
(i + 1) % decoder_sparse_step == 0; the other layers keep a dense SwiGLU MLP of width
intermediate_size. There is no shared expert. Parameters (`Qwen3MoeLayers`): attention and norms
over all L layers (`attn`), routers and experts stacked over the sparse layers (`experts`), dense
MLPs over the others (`mlp`). A unit is one layer; its feed-forward is read from its stack slot,
and a `lax.cond` chooses the expert or the dense branch when a model mixes both (one scan, one
compilation).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dpace_jax.nn import layers
from dpace_jax.nn.layers import LAYER, MLP, LayerParams
from dpace_jax.nn.schema import split_keys, table_params
from dpace_jax.targets import experts as experts_lib
from dpace_jax.targets.base import LAYER_PREFIX, Family, dense_mlp_keys, keys, top_params
from dpace_jax.targets.experts import EXPERTS, ExpertParams, ExpertsConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MlpParams:
    """The dense MLPs of the layers without experts."""

    gate: jax.Array  # [Ld, D, F]
    up: jax.Array  # [Ld, D, F]
    down: jax.Array  # [Ld, F, D]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Qwen3MoeLayers:
    attn: LayerParams  # attention and norms, all L layers
    mlp: MlpParams | None = None  # the layers without experts
    experts: ExpertParams | None = None  # the layers with experts


@dataclasses.dataclass(frozen=True)
class Qwen3MoeConfig(ExpertsConfig):
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()


def sparse_layers(cfg) -> tuple[int, ...]:
    """The layer ids with experts (HF's rule, see the module doc)."""
    f = cfg.family_cfg
    if f.num_experts == 0:
        return ()
    return tuple(i for i in range(cfg.num_layers) if i not in f.mlp_only_layers
                 and (i + 1) % f.decoder_sparse_step == 0)


def dense_layers(cfg) -> tuple[int, ...]:
    sparse = sparse_layers(cfg)
    return tuple(i for i in range(cfg.num_layers) if i not in sparse)


class Qwen3Moe(Family):
    arch = "qwen3_moe"
    hf_architectures = ("Qwen3MoeForCausalLM",)
    model_types = ("qwen3_moe",)
    export = ("Qwen3MoeForCausalLM", "qwen3_moe")
    config_type = Qwen3MoeConfig
    layers_type = Qwen3MoeLayers

    def family_config(self, hf, num_layers, source, multimodal=False):
        return Qwen3MoeConfig(
            **experts_lib.hf_fields(hf, source),
            decoder_sparse_step=int(hf.get("decoder_sparse_step", 1)),
            mlp_only_layers=tuple(sorted(int(i) for i in hf.get("mlp_only_layers") or ())))

    def check_fields(self, cfg, source="config"):
        f = cfg.family_cfg
        experts_lib.check(f, source)
        if f.decoder_sparse_step < 1:
            raise ValueError(f"{source}: decoder_sparse_step={f.decoder_sparse_step} must be >= 1")
        bad = [i for i in f.mlp_only_layers if not 0 <= i < cfg.num_layers]
        if bad:
            raise ValueError(f"{source}: mlp_only_layers {bad} outside the {cfg.num_layers} "
                             "layers")

    def hf_config(self, cfg, out):
        f = cfg.family_cfg
        out.update(use_sliding_window=False, sliding_window=None, num_experts=f.num_experts,
                   num_experts_per_tok=f.num_experts_per_tok,
                   moe_intermediate_size=f.moe_intermediate_size,
                   norm_topk_prob=f.norm_topk_prob, decoder_sparse_step=f.decoder_sparse_step,
                   mlp_only_layers=list(f.mlp_only_layers), output_router_logits=False)

    def dims(self, cfg):
        return {**layers.dims(cfg), **cfg.family_cfg.dims()}

    def params(self, cfg):
        _, layer_keys = keys(["embed", "lm_head"])
        names = [n for n in LAYER if n not in MLP]
        out = top_params(cfg) + table_params(LAYER, ("layers", "attn"), LAYER_PREFIX,
                                             tuple(range(cfg.num_layers)), layer_keys,
                                             names=names)
        if dense_layers(cfg):
            out += table_params(LAYER, ("layers", "mlp"), LAYER_PREFIX, dense_layers(cfg),
                                dense_mlp_keys(), names=MLP)
        if sparse_layers(cfg):
            out += table_params(EXPERTS, ("layers", "experts"), LAYER_PREFIX, sparse_layers(cfg),
                                split_keys(EXPERTS, (("fold", experts_lib.EXPERTS_KEY),)),
                                experts=cfg.family_cfg.num_experts)
        return out

    def nodes(self):
        return {**super().nodes(), ("layers", "attn"): LayerParams, ("layers", "mlp"): MlpParams,
                ("layers", "experts"): ExpertParams}

    def check_tensors(self, cfg, keys_, source):
        """ValueError naming num_experts when every sparse layer of a checkpoint holds the same
        number of experts (ids 0..c-1) and that number is not the config's."""
        sparse = sparse_layers(cfg)
        if not sparse:
            return
        found = {i: set() for i in sparse}
        for key in keys_:
            parts = key.split(".")
            if (len(parts) > 5 and parts[:2] == ["model", "layers"]
                    and parts[3:5] == ["mlp", "experts"] and parts[2].isdigit()
                    and parts[5].isdigit() and int(parts[2]) in found):
                found[int(parts[2])].add(int(parts[5]))
        counts = {len(ids) for ids in found.values()}
        n = cfg.family_cfg.num_experts
        if len(counts) == 1:
            count = counts.pop()
            if count != n and all(ids == set(range(count)) for ids in found.values()):
                raise ValueError(f"{source}: config num_experts={n}, but the checkpoint holds "
                                 f"{count} experts in each layer with experts "
                                 f"(model.layers.{{i}}.mlp.experts.0..{count - 1})")

    def unit_params(self, tree, cfg, u):
        """(layer u's attention and norms, its feed-forward h -> out)."""
        sparse = set(sparse_layers(cfg))
        slot_list, n_sparse, n_dense = [], 0, 0
        for j in range(cfg.num_layers):
            slot_list.append(n_sparse if j in sparse else n_dense)
            n_sparse, n_dense = n_sparse + (j in sparse), n_dense + (j not in sparse)
        slot = jnp.asarray(slot_list, jnp.int32)[u]

        def with_experts(h):
            return experts_lib.moe_mlp(h, layers.slice_layer(tree.experts, slot), cfg.family_cfg)

        def dense(h):
            return layers.mlp(h, layers.slice_layer(tree.mlp, slot))

        if not n_dense:
            ffn = with_experts
        elif not n_sparse:
            ffn = dense
        else:
            is_sparse = jnp.asarray([j in sparse for j in range(cfg.num_layers)])[u]
            ffn = lambda h: jax.lax.cond(is_sparse, with_experts, dense, h)  # noqa: E731
        return layers.slice_layer(tree.attn, u), ffn

    def unit(self, x, buf, p, layer, ctx, kv, cfg):
        attn, ffn = p
        x, kv = layers.decoder_layer(x, attn, ctx.cos, ctx.sin, cfg,
                                     lambda q, k, v: ctx.attend(q, k, v, kv), ffn)
        return x, ctx.record(buf, x, layer), kv

    def check_stages(self, cfg, num_stages):
        super().check_stages(cfg, num_stages)
        if dense_layers(cfg) and sparse_layers(cfg):
            raise ValueError(f"a pipeline stage holds an equal share of every parameter stack: "
                             f"this Qwen3-MoE target mixes layers with and without experts "
                             f"(mlp_only_layers={list(cfg.family_cfg.mlp_only_layers)}, "
                             f"decoder_sparse_step={cfg.family_cfg.decoder_sparse_step})")


FAMILY = Qwen3Moe()
