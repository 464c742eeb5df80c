"""Routed experts shared by the MoE families (Qwen3-MoE, Qwen3.5-MoE; gpt-oss's experts differ
in their router and activation: dpace_jax.targets.gpt_oss): the configuration fields, the
parameters and top-k routing with two token dispatches that compute the same function.

Routing (per token): router logits h @ router [P], softmax in fp32, the top k probabilities
(k = num_experts_per_tok), divided by their sum when norm_topk_prob, cast back to h's dtype. The
output is sum over the chosen experts of weight * down(silu(gate h) * up h).

Dispatch (`ExpertsConfig.dispatch`, not an HF field):
  "dense"   the reference: every expert on every token, weighted by a [tokens, P] matrix that is
            zero outside the top k. Simple, exact and shardable like any einsum, but P / k times
            the expert FLOPs and a [tokens, P, M] intermediate: for tests and small models.
  "sorted"  capacity-free grouped dispatch: the tokens' (token, expert) assignments sorted by
            expert, one `lax.ragged_dot` per projection over the expert groups, results weighted
            and scatter-added back. No token is dropped; only the k chosen experts are computed.
            On a mesh it is correct (GSPMD) but gathers the tokens of a layer to sort them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dpace_jax.nn.schema import ArrayInfo

DISPATCHES = ("dense", "sorted")

EXPERTS = {  # a layer's router and its P experts of width M
    "router": ArrayInfo(("D", "P"), ("embed", None), "normal", "mlp.gate.weight", "t"),
    "expert_gate": ArrayInfo(("P", "D", "M"), ("expert", "embed", "mlp"), "normal",
                             "mlp.experts.{e}.gate_proj.weight", "t"),
    "expert_up": ArrayInfo(("P", "D", "M"), ("expert", "embed", "mlp"), "normal",
                           "mlp.experts.{e}.up_proj.weight", "t"),
    "expert_down": ArrayInfo(("P", "M", "D"), ("expert", "mlp", "embed"), "normal",
                             "mlp.experts.{e}.down_proj.weight", "t"),
}
EXPERTS_KEY = 1  # fold_in(model key, 1): the experts' keys, one per EXPERTS entry


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ExpertParams:
    """Routers and experts, stacked over the layers with experts."""

    router: jax.Array  # [Ls, D, P]
    expert_gate: jax.Array  # [Ls, P, D, M]
    expert_up: jax.Array  # [Ls, P, D, M]
    expert_down: jax.Array  # [Ls, P, M, D]


@dataclasses.dataclass(frozen=True)
class ExpertsConfig:
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    norm_topk_prob: bool = False
    dispatch: str = "sorted"  # "dense" (the reference) or "sorted"; not an HF field

    def dims(self) -> dict[str, int]:
        return {"P": self.num_experts, "M": self.moe_intermediate_size}


def hf_fields(hf: dict, source: str, *, width: str = "moe_intermediate_size",
              norm_topk_prob: bool | None = None) -> dict:
    """The ExpertsConfig fields of a config.json (ValueError naming a missing field); the
    expert count is `num_experts` or transformers 5's `num_local_experts`."""
    experts = hf.get("num_experts", hf.get("num_local_experts"))
    if experts is None:
        raise ValueError(f"{source}: missing field 'num_experts'")
    try:
        return dict(num_experts=int(experts), num_experts_per_tok=int(hf["num_experts_per_tok"]),
                    moe_intermediate_size=int(hf[width]),
                    norm_topk_prob=(bool(hf.get("norm_topk_prob", False))
                                    if norm_topk_prob is None else norm_topk_prob))
    except KeyError as e:
        raise ValueError(f"{source}: missing field {e.args[0]!r}") from None


def check(e: ExpertsConfig, source: str, count_field: str = "num_experts") -> None:
    if e.num_experts < 0:
        raise ValueError(f"{source}: {count_field}={e.num_experts} must be >= 0")
    if e.num_experts and not 0 < e.num_experts_per_tok <= e.num_experts:
        raise ValueError(f"{source}: num_experts_per_tok={e.num_experts_per_tok} must be in "
                         f"1..{count_field}={e.num_experts}")
    if e.num_experts and e.moe_intermediate_size <= 0:
        raise ValueError(f"{source}: moe_intermediate_size={e.moe_intermediate_size} must "
                         "be positive")
    if e.dispatch not in DISPATCHES:
        raise ValueError(f"dispatch={e.dispatch!r}; choose one of {DISPATCHES}")


def route(h: jax.Array, router: jax.Array, e: ExpertsConfig) -> tuple[jax.Array, jax.Array]:
    """h [..., D] -> (weights [..., k] in h's dtype, expert ids [..., k] int32)."""
    logits = jnp.einsum("...d,dp->...p", h, router)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, e.num_experts_per_tok)
    if e.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights.astype(h.dtype), experts.astype(jnp.int32)


def dense_dispatch(h, p, weights, experts, e: ExpertsConfig) -> jax.Array:
    """The reference: every expert on every token, weighted by [..., P] (zero outside top k)."""
    w = jnp.sum(jax.nn.one_hot(experts, e.num_experts, dtype=h.dtype) * weights[..., None],
                axis=-2)
    gate = jnp.einsum("...d,pdm->...pm", h, p.expert_gate)
    up = jnp.einsum("...d,pdm->...pm", h, p.expert_up)
    out = jnp.einsum("...pm,pmd->...pd", jax.nn.silu(gate) * up, p.expert_down)
    return jnp.einsum("...pd,...p->...d", out, w)


def sort_assignments(h, experts, num_experts: int):
    """(tokens [T', D] of h, each assignment's token [A] and the order that groups the
    assignments by expert [A], the group sizes [P]) for a ragged dispatch (A = T' * k)."""
    x = h.reshape(-1, h.shape[-1])
    flat = experts.reshape(-1)  # assignment a = token * k + slot
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return x, order // experts.shape[-1], order, sizes


def sorted_dispatch(h, p, weights, experts, e: ExpertsConfig) -> jax.Array:
    """Capacity-free grouped dispatch: assignments sorted by expert, `lax.ragged_dot` per
    projection, weighted outputs scatter-added back to their tokens."""
    x, token, order, sizes = sort_assignments(h, experts, e.num_experts)
    xs = jnp.take(x, token, axis=0)  # [A, D] grouped by expert
    gate = jax.lax.ragged_dot(xs, p.expert_gate, sizes)
    up = jax.lax.ragged_dot(xs, p.expert_up, sizes)
    out = jax.lax.ragged_dot(jax.nn.silu(gate) * up, p.expert_down, sizes)  # [A, D]
    out = out * jnp.take(weights.reshape(-1), order)[:, None]
    return jnp.zeros_like(x).at[token].add(out).reshape(h.shape)


def moe_mlp(h: jax.Array, p, e: ExpertsConfig) -> jax.Array:
    """One layer's routed feed-forward on h [..., D] with its ExpertParams slice p."""
    weights, experts = route(h, p.router, e)
    dispatch = dense_dispatch if e.dispatch == "dense" else sorted_dispatch
    return dispatch(h, p, weights, experts, e)


def experts_config(cfg) -> ExpertsConfig | None:
    """The routed experts' settings of a target config (None without experts)."""
    f = cfg.family_cfg
    if isinstance(f, ExpertsConfig):
        return f
    return getattr(f, "experts", None)


def with_dispatch(cfg, dispatch: str):
    """cfg with its experts' token dispatch set to `dispatch` (a target config with experts)."""
    f = cfg.family_cfg
    if isinstance(f, ExpertsConfig):
        return dataclasses.replace(cfg, family_cfg=dataclasses.replace(f, dispatch=dispatch))
    if getattr(f, "experts", None) is None:
        raise ValueError(f"arch={cfg.arch!r} has no experts to dispatch")
    return dataclasses.replace(cfg, family_cfg=dataclasses.replace(
        f, experts=dataclasses.replace(f.experts, dispatch=dispatch)))
