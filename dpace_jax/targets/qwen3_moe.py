"""The Qwen3-MoE feed-forward (HF `Qwen3MoeForCausalLM`, model_type `qwen3_moe`): which layers
have experts, top-k routing, and two token dispatches that compute the same function.

Layers: layer i has experts iff num_experts > 0, i is not in `mlp_only_layers` and
(i + 1) % decoder_sparse_step == 0; the other layers keep a dense SwiGLU MLP of width
intermediate_size. There is no shared expert. The parameters (dpace_jax.nn.params): attention and
norms in `TargetParams.layers` over all L layers, routers and experts in `TargetParams.experts`
stacked over the sparse layers, dense MLPs in `TargetParams.mlp` stacked over the others. The
forwards scan over layer indices; `layer_mlp` picks a layer's stack slot, and a `lax.cond`
chooses the expert or the dense branch when a model mixes both (one scan, one compilation).

Routing (per token): router logits h @ router [P], softmax in fp32, the top k probabilities
(k = num_experts_per_tok), divided by their sum when norm_topk_prob, cast back to h's dtype. The
output is sum over the chosen experts of weight * down(silu(gate h) * up h).

Dispatch (`ModelConfig.moe_dispatch`, not an HF field):
  "dense"   the reference: every expert on every token, weighted by a [tokens, P] matrix that is
            zero outside the top k. Simple, exact and shardable like any einsum, but P / k times
            the expert FLOPs and a [tokens, P, M] intermediate: for tests and small models.
  "sorted"  capacity-free grouped dispatch: the tokens' (token, expert) assignments sorted by
            expert, one `lax.ragged_dot` per projection over the expert groups, results weighted
            and scatter-added back. No token is dropped; only the k chosen experts are computed.
            On a mesh it is correct (GSPMD) but gathers the tokens of a layer to sort them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dpace_jax.nn import layers

DISPATCHES = ("dense", "sorted")


# ----------------------------------------------------------------------------- configuration


def hf_fields(hf: dict, num_layers: int, source: str) -> dict:
    """The ModelConfig fields of a qwen3_moe config.json (ValueError naming a bad field)."""
    experts = hf.get("num_experts", hf.get("num_local_experts"))
    if experts is None:
        raise ValueError(f"{source}: missing field 'num_experts'")
    try:
        out = dict(num_experts=int(experts), num_experts_per_tok=int(hf["num_experts_per_tok"]),
                   moe_intermediate_size=int(hf["moe_intermediate_size"]),
                   norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                   decoder_sparse_step=int(hf.get("decoder_sparse_step", 1)),
                   mlp_only_layers=tuple(sorted(int(i) for i in hf.get("mlp_only_layers") or ())))
    except KeyError as e:
        raise ValueError(f"{source}: missing field {e.args[0]!r}") from None
    check_fields(out, num_layers, source)
    return out


def check_fields(f: dict, num_layers: int, source: str) -> None:
    if f["num_experts"] < 0:
        raise ValueError(f"{source}: num_experts={f['num_experts']} must be >= 0")
    if f["num_experts"] and not 0 < f["num_experts_per_tok"] <= f["num_experts"]:
        raise ValueError(f"{source}: num_experts_per_tok={f['num_experts_per_tok']} must be in "
                         f"1..num_experts={f['num_experts']}")
    if f["num_experts"] and f["moe_intermediate_size"] <= 0:
        raise ValueError(f"{source}: moe_intermediate_size={f['moe_intermediate_size']} must "
                         "be positive")
    if f["decoder_sparse_step"] < 1:
        raise ValueError(f"{source}: decoder_sparse_step={f['decoder_sparse_step']} must be >= 1")
    bad = [i for i in f["mlp_only_layers"] if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"{source}: mlp_only_layers {bad} outside the {num_layers} layers")


def check(cfg) -> None:
    """A ModelConfig's MoE fields are consistent (a config built by hand, not from_hf)."""
    if cfg.arch != "qwen3_moe":
        return
    if cfg.moe_dispatch not in DISPATCHES:
        raise ValueError(f"moe_dispatch={cfg.moe_dispatch!r}; choose one of {DISPATCHES}")
    check_fields({f: getattr(cfg, f) for f in ("num_experts", "num_experts_per_tok",
                                                "moe_intermediate_size", "decoder_sparse_step",
                                                "mlp_only_layers")}, cfg.num_layers, "config")


def sparse_layers(cfg) -> tuple[int, ...]:
    """The layer ids with experts (HF's rule, see the module doc)."""
    if cfg.arch != "qwen3_moe" or cfg.num_experts == 0:
        return ()
    return tuple(i for i in range(cfg.num_layers) if i not in cfg.mlp_only_layers
                 and (i + 1) % cfg.decoder_sparse_step == 0)


def hf_config_fields(cfg) -> dict:
    """The qwen3_moe fields of an exported config.json."""
    return dict(num_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                moe_intermediate_size=cfg.moe_intermediate_size,
                norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=cfg.decoder_sparse_step,
                mlp_only_layers=list(cfg.mlp_only_layers), output_router_logits=False)


def check_expert_count(cfg, keys, source: str) -> None:
    """ValueError naming num_experts when every sparse layer of a checkpoint holds the same
    number of experts (ids 0..c-1) and that number is not the config's."""
    if not cfg.moe_layers:
        return
    found = {i: set() for i in cfg.moe_layers}
    for key in keys:
        parts = key.split(".")
        if (len(parts) > 5 and parts[:2] == ["model", "layers"] and parts[3:5] == ["mlp", "experts"]
                and parts[2].isdigit() and parts[5].isdigit() and int(parts[2]) in found):
            found[int(parts[2])].add(int(parts[5]))
    counts = {len(ids) for ids in found.values()}
    if len(counts) == 1:
        count = counts.pop()
        if count != cfg.num_experts and all(ids == set(range(count)) for ids in found.values()):
            raise ValueError(f"{source}: config num_experts={cfg.num_experts}, but the checkpoint "
                             f"holds {count} experts in each layer with experts "
                             f"(model.layers.{{i}}.mlp.experts.0..{count - 1})")


# ----------------------------------------------------------------------------- computation


def route(h: jax.Array, router: jax.Array, cfg) -> tuple[jax.Array, jax.Array]:
    """h [..., D] -> (weights [..., k] in h's dtype, expert ids [..., k] int32)."""
    logits = jnp.einsum("...d,dp->...p", h, router)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, cfg.num_experts_per_tok)
    if cfg.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights.astype(h.dtype), experts.astype(jnp.int32)


def dense_dispatch(h, p, weights, experts, cfg) -> jax.Array:
    """The reference: every expert on every token, weighted by [..., P] (zero outside top k)."""
    w = jnp.sum(jax.nn.one_hot(experts, cfg.num_experts, dtype=h.dtype) * weights[..., None],
                axis=-2)
    gate = jnp.einsum("...d,pdm->...pm", h, p.expert_gate)
    up = jnp.einsum("...d,pdm->...pm", h, p.expert_up)
    out = jnp.einsum("...pm,pmd->...pd", jax.nn.silu(gate) * up, p.expert_down)
    return jnp.einsum("...pd,...p->...d", out, w)


def sorted_dispatch(h, p, weights, experts, cfg) -> jax.Array:
    """Capacity-free grouped dispatch: assignments sorted by expert, `lax.ragged_dot` per
    projection, weighted outputs scatter-added back to their tokens."""
    x = h.reshape(-1, h.shape[-1])  # [T', D]
    k = experts.shape[-1]
    flat = experts.reshape(-1)  # [T' * k], assignment a = token * k + slot
    order = jnp.argsort(flat, stable=True)
    token = order // k
    sizes = jnp.bincount(flat, length=cfg.num_experts).astype(jnp.int32)
    xs = jnp.take(x, token, axis=0)  # [A, D] grouped by expert
    gate = jax.lax.ragged_dot(xs, p.expert_gate, sizes)
    up = jax.lax.ragged_dot(xs, p.expert_up, sizes)
    out = jax.lax.ragged_dot(jax.nn.silu(gate) * up, p.expert_down, sizes)  # [A, D]
    out = out * jnp.take(weights.reshape(-1), order)[:, None]
    return jnp.zeros_like(x).at[token].add(out).reshape(h.shape)


def moe_mlp(h: jax.Array, p, cfg) -> jax.Array:
    """One sparse layer's feed-forward on h [..., D] with its ExpertParams slice p."""
    weights, experts = route(h, p.router, cfg)
    dispatch = dense_dispatch if cfg.moe_dispatch == "dense" else sorted_dispatch
    return dispatch(h, p, weights, experts, cfg)


def _slice(tree, i):
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), tree)


def layer_mlp(params, cfg, i: jax.Array):
    """The feed-forward h -> out of layer i (a traced index) of a Qwen3-MoE target, or None for
    a dense Qwen3 / Llama target (whose MLP is in its LayerParams)."""
    if cfg.arch != "qwen3_moe":
        return None
    sparse = set(cfg.moe_layers)
    slot_list, n_sparse, n_dense = [], 0, 0
    for j in range(cfg.num_layers):
        slot_list.append(n_sparse if j in sparse else n_dense)
        n_sparse, n_dense = n_sparse + (j in sparse), n_dense + (j not in sparse)
    slot = jnp.asarray(slot_list, jnp.int32)[i]

    def with_experts(h):
        return moe_mlp(h, _slice(params.experts, slot), cfg)

    def dense(h):
        return layers.mlp(h, _slice(params.mlp, slot))

    if not n_dense:
        return with_experts
    if not n_sparse:
        return dense
    is_sparse = jnp.asarray([j in sparse for j in range(cfg.num_layers)])[i]
    return lambda h: jax.lax.cond(is_sparse, with_experts, dense, h)
