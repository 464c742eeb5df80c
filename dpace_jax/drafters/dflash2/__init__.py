"""DFlash 2 drafters (z-lab, August 2026): the DFlash drafter plus, in every layer, a grouped
dynamic causal convolution around the attention and one around the MLP (`conv`), and a candidate
path selector over the target LM head's top-Z tokens (`selector`). docs/dflash2.md states what
they compute and the facts they rely on; this module is the drafter family: its settings, its
parameters (declared once, with their HF names: `DFlash2DraftModel` checkpoints), and the hooks
the DFlash forwards (dpace_jax.drafters.dflash) call.

A fresh DFlash 2 drafter computes what the same DFlash drafter computes: identity convolutions
(base tap 0 = 1, zero projections) and a zero successor codebook (the walk is the unary argmax),
with output_multiplier 1, no softcap and input_embedding_scale 1.

Shape letters (docs/design.md §1): I = 2 (a convolution's input and output sides), W taps
(conv_kernel_size), O = 2 W D / conv_group_size (the dynamic kernels' projection), A the
selector's rank, Z its candidates (selector_top_k).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dpace_jax.drafters import dflash as dflash_lib
from dpace_jax.drafters import register
from dpace_jax.drafters.dflash2 import conv as conv_lib
from dpace_jax.drafters.dflash2.selector import SelectorParams
from dpace_jax.drafters.family import DrafterFamily
from dpace_jax.nn.layers import LayerParams
from dpace_jax.nn.schema import ArrayInfo, Schema, split_keys, table_params

ARCHITECTURE = "DFlash2DraftModel"
SELECTOR_KEY = 5  # fold_in(drafter key, 5): the selector's keys (the backbone's as DFlash's)


def _conv_table(name: str) -> dict[str, ArrayInfo]:
    return {f"{name}_base": ArrayInfo(("I", "W", "D"), (None, None, "embed"), "first_tap",
                                      f"{name}.base_kernel", "same"),
            f"{name}_proj": ArrayInfo(("D", "O"), ("embed", None), "zeros",
                                      f"{name}.kernel_projection.weight", "t")}


CONV = {**_conv_table("attention_conv"), **_conv_table("mlp_conv")}
SELECTOR = {
    "hidden_projection": ArrayInfo(("D", "A"), ("embed", None), "normal",
                                   "candidate_selector.hidden_projection.weight", "t"),
    "predecessor_codebook": ArrayInfo(("V", "A"), ("vocab", None), "normal",
                                      "candidate_selector.predecessor_codebook", "same"),
    "successor_codebook": ArrayInfo(("V", "A"), ("vocab", None), "zeros",
                                    "candidate_selector.successor_codebook", "same"),
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DFlash2Layers(LayerParams):
    """The DFlash layers (LayerParams) and their two convolutions (CONV), stacked."""

    attention_conv_base: jax.Array | None = None  # [L, 2, W, D]
    attention_conv_proj: jax.Array | None = None  # [L, D, O]
    mlp_conv_base: jax.Array | None = None
    mlp_conv_proj: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DFlash2Params:
    fc: jax.Array  # [n * D, D]
    hidden_norm: jax.Array  # [D]
    layers: DFlash2Layers
    final_norm: jax.Array  # [D]
    selector: SelectorParams


@dataclasses.dataclass(frozen=True)
class DFlash2Config:
    """DFlash 2's own settings (DrafterConfig.family_cfg; config.json's dflash_config)."""

    conv_kernel_size: int = 2  # W taps
    conv_group_size: int = 16  # channels per dynamic kernel group
    selector_rank: int = 256
    selector_top_k: int = 16  # Z candidates per draft position
    output_multiplier: float = 1.0  # on the LM head's logits (the unary scores)
    final_logit_softcapping: float = 0.0  # 0: none; else cap * tanh(unary / cap)
    input_embedding_scale: float = 1.0  # on the block's token embeddings

    HF_FIELDS = ("conv_kernel_size", "conv_group_size", "selector_rank", "selector_top_k",
                 "output_multiplier", "final_logit_softcapping", "input_embedding_scale")
    REQUIRED = ("conv_kernel_size", "conv_group_size", "selector_rank", "selector_top_k")


def dims(cfg) -> dict[str, int]:
    f = cfg.family_cfg
    groups = cfg.hidden_size // f.conv_group_size
    return {**dflash_lib.dims(cfg), "I": 2, "W": f.conv_kernel_size,
            "O": 2 * f.conv_kernel_size * groups, "A": f.selector_rank}


def params(cfg):
    """DFlash's parameters (same key paths: a DFlash 2 drafter's backbone initializes as the
    DFlash drafter's of the same seed), the convolutions (identity) and the selector."""
    every = tuple(range(cfg.num_layers))
    conv_keys = {}  # their init is "first_tap" / "zeros": no key
    return (dflash_lib.params(cfg)
            + table_params(CONV, ("layers",), dflash_lib.LAYER_PREFIX, every, conv_keys)
            + table_params(SELECTOR, ("selector",), "", None,
                           split_keys(SELECTOR, (("fold", SELECTOR_KEY),))))


SCHEMA = Schema("DFlash 2 drafter", params, dims,
                {(): DFlash2Params, ("layers",): DFlash2Layers, ("selector",): SelectorParams})


class _Conv:
    """One layer's convolution as decoder_layer's `around` wrapper."""

    def __init__(self, base, proj):
        self.params = conv_lib.ConvParams(base, proj)

    def prepare(self, h):
        return conv_lib.prepare(h, self.params)

    def finish(self, out, state):
        return conv_lib.finish(out, state, self.params)


class DFlash2(DrafterFamily):
    arch = "dflash2"
    architecture = ARCHITECTURE
    config_type = DFlash2Config
    schema = SCHEMA
    # z-lab's DFlash2DraftModel.save_pretrained writes its codebooks (nn.Embedding) with
    # ".weight"; the published checkpoints and vLLM use the bare names
    hf_aliases = {f"candidate_selector.{n}_codebook.weight": f"candidate_selector.{n}_codebook"
                  for n in ("predecessor", "successor")}

    def check(self, cfg) -> None:
        super().check(cfg)
        f = cfg.family_cfg
        for name in ("conv_kernel_size", "conv_group_size", "selector_rank", "selector_top_k"):
            if int(getattr(f, name)) < 1:
                raise ValueError(f"drafter config: {name}={getattr(f, name)} must be >= 1")
        if cfg.hidden_size % f.conv_group_size:
            raise ValueError(f"drafter config: conv_group_size={f.conv_group_size} does not "
                             f"divide hidden_size={cfg.hidden_size}")
        if f.conv_kernel_size > cfg.block_size:
            raise ValueError(f"drafter config: conv_kernel_size={f.conv_kernel_size} is larger "
                             f"than the block (block_size={cfg.block_size})")
        if f.selector_top_k > cfg.vocab_size:
            raise ValueError(f"drafter config: selector_top_k={f.selector_top_k} is larger than "
                             f"the vocabulary (vocab_size={cfg.vocab_size})")
        if not f.output_multiplier > 0 or f.final_logit_softcapping < 0:
            raise ValueError(f"drafter config: output_multiplier={f.output_multiplier} must be > 0"
                             f" and final_logit_softcapping={f.final_logit_softcapping} >= 0")
        if not f.input_embedding_scale > 0:
            raise ValueError(f"drafter config: input_embedding_scale={f.input_embedding_scale} "
                             "must be > 0")

    def config_from_hf(self, hf: dict, dflash_config: dict, source: str) -> DFlash2Config:
        """DFlash 2's fields from dflash_config (else the top level, as z-lab's reader)."""
        def value(name):
            return dflash_config.get(name, hf.get(name))

        missing = [n for n in DFlash2Config.REQUIRED if value(n) is None]
        if missing:
            raise ValueError(f"{source}: missing field(s) {['dflash_config.' + n for n in missing]}"
                             f" of a {ARCHITECTURE}")
        fields = {n: value(n) for n in DFlash2Config.HF_FIELDS if value(n) is not None}
        try:
            return DFlash2Config(**{n: type(getattr(DFlash2Config, n))(v)
                                    for n, v in fields.items()})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: dflash_config: {e}") from None

    def config_to_hf(self, cfg, out: dict) -> None:
        f = cfg.family_cfg
        out["dflash_config"].update({n: getattr(f, n) for n in DFlash2Config.HF_FIELDS})
        # the published checkpoints keep block_size in dflash_config too (readers look there
        # first); the top-level copy stays for DFlash v1 readers
        out["dflash_config"]["block_size"] = cfg.block_size
        if not f.final_logit_softcapping:
            out["dflash_config"]["final_logit_softcapping"] = None

    # --------------------------------------------------------------- forward hooks

    def around(self, p, cfg):
        return (_Conv(p.attention_conv_base, p.attention_conv_proj),
                _Conv(p.mlp_conv_base, p.mlp_conv_proj))

    def embedding_scale(self, cfg) -> float:
        return float(cfg.family_cfg.input_embedding_scale)

    def logit_transform(self, cfg) -> tuple[float, float | None]:
        f = cfg.family_cfg
        return float(f.output_multiplier), (float(f.final_logit_softcapping) or None)

    def train_top_k(self, cfg) -> int:
        return int(cfg.family_cfg.selector_top_k)

    def train_terms(self, params, cfg, hidden, labels, mask, top_scores, top_ids, weights,
                    denominator, step, step_cfg):
        return selector_term(params.selector, hidden, labels, mask, top_scores, top_ids,
                             weights, denominator, step, step_cfg)


FAMILY = register(DFlash2())


def propose(params: DFlash2Params, cfg, target_params, cache, anchor_tokens, anchors, key,
            sampler):
    """One block's drafts per sequence by the candidate selector's walk (the decoder's
    `propose`, dpace_jax.infer.decode.Drafter): the unary scores of draft positions 1..K-1 from
    the target's LM head, then `walk_block` -> (block [B, K], q [B, K, V] or None)."""
    hidden = dflash_lib.draft_hidden(params, cfg, target_params, cache, anchor_tokens,
                                     anchors)[:, 1:]
    unary = dflash_lib.head_logits(target_params, hidden, cfg)  # [B, K-1, V]
    return walk_block(params.selector, hidden, unary, anchor_tokens,
                      cfg.family_cfg.selector_top_k, key, sampler)


def walk_block(sel: SelectorParams, hidden, unary, anchor_tokens, top_k: int, key, sampler):
    """The drafts of one block from its hidden states [B, K-1, D] and unary scores [B, K-1, V]:
    their top-Z candidates, then the greedy walk, or under the speculative rule at T > 0 the
    sampled walk, whose per-position distribution over the vocabulary (zero outside the
    candidates, conditional on the drafted prefix) is returned as q for the lossless
    verification -> (block [B, K]: the anchor token then the drafts, q [B, K, V] or None). Under
    DFlash's match rule the greedy walk drafts: that rule is lossless with any draft."""
    from dpace_jax.drafters.dflash2 import selector

    cand = selector.top_candidates(unary, top_k)
    anchor_tokens = anchor_tokens.astype(jnp.int32)
    if sampler.rule == "speculative" and not sampler.greedy:
        walk = selector.sampled_walk(key, sel, hidden, anchor_tokens, cand.ids, cand.scores,
                                     sampler.temperature, unary.shape[-1])
        q = jnp.concatenate([jnp.zeros_like(walk.q[:, :1]), walk.q], axis=1)
    else:
        walk, q = selector.greedy_walk(sel, hidden, anchor_tokens, cand.ids, cand.scores), None
    return jnp.concatenate([anchor_tokens[:, None], walk.tokens], axis=1), q


def selector_term(sel: SelectorParams, hidden, labels, mask, top_scores, top_ids, weights,
                  denominator, step, step_cfg):
    """The selector's training term (docs/dflash2.md): its teacher-forced cross-entropy over the
    Z unary candidates of each loss position whose label is among them (the gold predecessor:
    the label before it, the anchor token for position 1), weighted like the objective's
    positions ("base") or uniformly, over the objective's denominator, times the scheduled
    alpha -> (term, metrics: top-Z recall, selector accuracy and CE on the covered positions,
    alpha, and the fraction of blocks whose greedy walk drafts other tokens than the unary
    argmax)."""
    from dpace_jax.drafters.dflash2 import selector

    hit = top_ids == labels[..., None]
    gold_in = hit.any(-1)
    cand = selector.Candidates(top_ids, top_scores, gold_in,
                               jnp.where(gold_in, jnp.argmax(hit, -1), -1).astype(jnp.int32))
    stats = selector.selector_loss_stats(sel, hidden, labels, mask, cand,
                                         stop_gradient=step_cfg.selector_stop_gradient)
    w = weights if step_cfg.selector_weights == "base" else jnp.ones_like(weights)
    covered = stats.covered.astype(jnp.float32)
    num = jnp.sum(covered * jax.lax.stop_gradient(w) * stats.ce)
    alpha = selector.selector_alpha(0 if step is None else step, step_cfg.total_steps,
                                    step_cfg.selector_loss_alpha, step_cfg.selector_warmup_ratio,
                                    step_cfg.selector_ramp_ratio)
    term = alpha * jnp.where(denominator > 0, num / jnp.where(denominator > 0, denominator, 1.0),
                             0.0)
    # the greedy walk of every block (from its anchor token) against the unary argmax
    walk = selector.greedy_walk(sel, jax.lax.stop_gradient(hidden[..., 1:, :]),
                                labels[..., 0], top_ids[..., 1:, :],
                                jax.lax.stop_gradient(top_scores[..., 1:, :]))
    valid = mask[..., 1:] != 0
    changed = jnp.any(valid & (walk.tokens != top_ids[..., 1:, 0]), axis=-1)
    blocks = jnp.any(valid, axis=-1)
    metrics = {"topk_recall": stats.recall, "selector_accuracy": stats.accuracy,
               "selector_ce": jnp.sum(covered * stats.ce) / jnp.maximum(jnp.sum(covered), 1.0),
               "selector_alpha": alpha,
               "walk_changed": jnp.sum(changed & blocks) / jnp.maximum(jnp.sum(blocks), 1)}
    return term, jax.tree.map(jax.lax.stop_gradient, metrics)
