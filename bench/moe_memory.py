"""Memory of training a DFlash drafter against a frozen (MoE) target, per device, on paper.

Pure arithmetic from shapes, no devices: parameter bytes of the target (bf16 by default), the
drafter's fp32 master weights + Adam moments + gradients + bf16 compute copy, the activations of one
train step (seq S, N anchors, block K, b sequences per device) and the KV cache for decoding, for a
(data, fsdp, tensor) mesh. Parameters are split exactly as dpace_jax/sharding.py splits them
(`sharding.mesh_axes`: a dimension over its logical axis's mesh axis when that divides it); the
Qwen3-MoE tables come from the family's schema (dpace_jax.targets.qwen3_moe), gpt-oss-120b from the
hand table below (its published layout: biases, attention sinks; our gpt-oss support lands
separately).

Everything past the parameters is an ESTIMATE under the assumptions written next to each term
(docs/moe.md lists them): what XLA keeps alive, fuses or gathers is not modelled buffer by buffer.

    python bench/moe_memory.py                # the tables of docs/moe.md (markdown)
    python bench/moe_memory.py --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpace_jax import sharding  # noqa: E402
from dpace_jax.drafters.config import DrafterConfig  # noqa: E402
from dpace_jax.drafters.dflash import SCHEMA as DRAFTER_SCHEMA  # noqa: E402
from dpace_jax.targets.model import ModelConfig, schema  # noqa: E402

GB, GiB = 1e9, 1024**3
EXPERT_AXIS = "expert"

# Published shapes (config.json of the hub repos; see docs/moe.md for the sources)
QWEN3_30B_A3B = ModelConfig.make(
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_layers=48, num_heads=32,
    num_kv_heads=4, head_dim=128, rope_theta=1e6, arch="qwen3_moe", num_experts=128,
    num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True)
# gpt-oss-120b as the widths a drafter takes from it (intermediate_size = the experts' width)
GPT_OSS_120B = ModelConfig.make(
    vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_layers=36, num_heads=64,
    num_kv_heads=8, head_dim=64, rope_theta=150000.0, arch="qwen3_moe",
    num_experts=128, num_experts_per_tok=4, moe_intermediate_size=2880)

# hardware: (devices, bytes of memory per device); nominal capacities, before any reserve
HARDWARE = {"8 x H100 80GB": (8, 80 * GB), "TPU v5p-8 (4 chips)": (4, 95 * GB)}


@dataclasses.dataclass(frozen=True)
class Array:
    name: str
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical axes (dpace_jax.sharding.LOGICAL_RULES)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def is_expert(self) -> bool:
        return EXPERT_AXIS in self.axes


def schema_arrays(schema, cfg) -> list[Array]:
    """Every parameter leaf of one of our schemas, with the stacked layer axis."""
    out = []
    d = schema.dims(cfg)
    for p in schema.params(cfg):
        out.append(Array("/".join(p.path), p.leaf_shape(d), p.leaf_axes()))
    return out


def gpt_oss_arrays(cfg: ModelConfig) -> list[Array]:
    """gpt-oss in our layout: Qwen3-MoE's minus the q/k norms, plus biases (q, k, v, o, router,
    experts) and one attention sink per head; experts' gate and up as two [P, D, M] arrays."""
    L, D, H, G, E = cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    V, P, M = cfg.vocab_size, cfg.family_cfg.num_experts, cfg.family_cfg.moe_intermediate_size
    layer = [("attn_norm", (D,), (None,)), ("mlp_norm", (D,), (None,)),
             ("q", (D, H, E), ("embed", "heads", "head_dim")),
             ("k", (D, G, E), ("embed", "kv_heads", "head_dim")),
             ("v", (D, G, E), ("embed", "kv_heads", "head_dim")),
             ("o", (H, E, D), ("heads", "head_dim", "embed")),
             ("q_bias", (H, E), ("heads", None)), ("k_bias", (G, E), ("kv_heads", None)),
             ("v_bias", (G, E), ("kv_heads", None)), ("o_bias", (D,), (None,)),
             ("sinks", (H,), ("heads",)), ("router", (D, P), ("embed", None)),
             ("router_bias", (P,), (None,)),
             ("expert_gate", (P, D, M), (EXPERT_AXIS, "embed", "mlp")),
             ("expert_up", (P, D, M), (EXPERT_AXIS, "embed", "mlp")),
             ("expert_down", (P, M, D), (EXPERT_AXIS, "mlp", "embed")),
             ("expert_gate_bias", (P, M), (EXPERT_AXIS, "mlp")),
             ("expert_up_bias", (P, M), (EXPERT_AXIS, "mlp")),
             ("expert_down_bias", (P, D), (EXPERT_AXIS, None))]
    return ([Array("embed", (V, D), ("vocab", "embed")), Array("final_norm", (D,), (None,)),
             Array("lm_head", (D, V), ("embed", "vocab"))]
            + [Array(f"layers/{n}", (L, *s), ("layers", *a)) for n, s, a in layer])


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    cfg: ModelConfig  # the widths (and the drafter's, through DrafterConfig.for_target)
    arrays: tuple[Array, ...]
    target_params_active_note: str = ""

    def params(self) -> int:
        return sum(a.size for a in self.arrays)

    def active_params(self, embedding: bool = True) -> int:
        """Parameters one token uses: experts count k/P; the input embedding only if asked (its
        lookup is not a matmul: some model cards count it, some do not)."""
        k, p = self.cfg.family_cfg.num_experts_per_tok, self.cfg.family_cfg.num_experts
        total = sum(a.size * (k / p if a.is_expert else 1) for a in self.arrays)
        return int(total - (0 if embedding else self.cfg.vocab_size * self.cfg.hidden_size))


def qwen3_moe_target(name: str, cfg: ModelConfig) -> Target:
    return Target(name, cfg, tuple(schema_arrays(schema(cfg), cfg)))


TARGETS = {"Qwen3-30B-A3B": qwen3_moe_target("Qwen3-30B-A3B", QWEN3_30B_A3B),
           "gpt-oss-120b": Target("gpt-oss-120b", GPT_OSS_120B,
                                  tuple(gpt_oss_arrays(GPT_OSS_120B)))}


def drafter_for(cfg: ModelConfig, num_layers: int = 5, block_size: int = 16) -> DrafterConfig:
    return DrafterConfig.for_target(cfg, num_layers=num_layers, block_size=block_size,
                                    mask_token_id=cfg.vocab_size - 1)


def rules_for(experts: str) -> dict:
    """LOGICAL_RULES with the experts' P axis on fsdp (dpace_jax.sharding), unmapped (their D
    axis then takes fsdp: same bytes, other collectives) or the expert arrays fully replicated."""
    rules = dict(sharding.LOGICAL_RULES)
    if experts == "embed":
        rules[EXPERT_AXIS] = None
    elif experts != "fsdp":
        raise ValueError(f"experts={experts!r}; choose fsdp, embed or replicated")
    return rules


def per_device_elements(arrays, mesh: dict[str, int], experts: str = "fsdp") -> float:
    """Elements of `arrays` one device holds under the mesh (sizes of data / fsdp / tensor)."""
    rules, total = rules_for("fsdp" if experts == "replicated" else experts), 0.0
    for a in arrays:
        if experts == "replicated" and a.is_expert:
            total += a.size
            continue
        split = sharding.mesh_axes(a.shape, a.axes, mesh, rules)
        total += a.size / math.prod(mesh[s] for s in split if s)
    return total


def layer_bytes(arrays, dtype_bytes: int, mesh, with_experts: bool) -> float:
    """One decoder layer's weights after an all-gather over fsdp (still split over tensor): what
    a layer-by-layer FSDP forward materializes at once (we count two layers: prefetch). An
    expert-parallel dispatch leaves the experts where they are (with_experts=False)."""
    t = mesh["tensor"]
    stacked = [a for a in arrays if a.axes[0] == "layers" and (with_experts or not a.is_expert)]
    per_layer = sum(a.size / a.shape[0] / (t if ("heads" in a.axes or "mlp" in a.axes) else 1)
                    for a in stacked)
    return per_layer * dtype_bytes


def train_activations(target: Target, dcfg: DrafterConfig, mesh: dict, *, b: float, seq: int,
                      anchors: int, attention: str, remat: bool, dispatch: str,
                      chunk: int = 2048, target_attention: str = "einsum") -> dict[str, float]:
    """Bytes of activations per device (estimates; docs/moe.md states the assumptions)."""
    cfg, t, fsdp = target.cfg, mesh["tensor"], mesh["fsdp"]
    D, H, G, E = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    k, M = cfg.family_cfg.num_experts_per_tok, cfg.family_cfg.moe_intermediate_size
    tokens = b * seq
    out = {}
    # target forward, no gradient: one layer's transients at a time (inputs freed after it)
    scores = 0.0 if target_attention != "einsum" else 2 * b * (H / t) * seq * seq * 4
    out["target: attention scores of one layer (fp32 logits + probs, einsum)"] = scores
    out["target: residual stream, q/k/v/o of one layer (bf16)"] = \
        tokens * (4 * D + 2 * (H + G) * E / t) * 2
    # sorted dispatch: (token, expert) assignments of the tokens it sees; on a mesh it gathers
    # the fsdp group's tokens (GSPMD), an expert-parallel dispatch keeps its own
    seen = tokens * (fsdp if dispatch == "sorted" else 1)
    out[f"target: MoE {dispatch} dispatch of one layer (x, gate, up, act, out; bf16)"] = \
        seen * k * (2 * D + 3 * M / t) * 2 + seen * k * 3 * 4
    out["target: the features kept (n layers, bf16)"] = dcfg.num_features * tokens * D * 2
    out.update(drafter_activations(dcfg, t, b=b, seq=seq, anchors=anchors,
                                   attention=attention, remat=remat, chunk=chunk))
    return out


def drafter_activations(dcfg: DrafterConfig, t: int, *, b: float, seq: int, anchors: int,
                        attention: str, remat: bool, chunk: int = 2048) -> dict[str, float]:
    """Bytes per device of the drafter's forward / backward pass and the chunked LM head, with
    the drafter's own widths (`t`: the tensor axis; docs/moe.md states the assumptions). A
    DFlash 2 drafter also keeps, per layer and row, its two convolutions' outputs and dynamic
    coefficients (prepare: conv'd input [D] + coefficients [O]; finish: output [D])."""
    D, H, G, E = dcfg.hidden_size, dcfg.num_heads, dcfg.num_kv_heads, dcfg.head_dim
    K, F, V = dcfg.block_size, dcfg.intermediate_size, dcfg.vocab_size
    out = {}
    # R rows of blocks; per layer what the backward pass keeps
    R = b * anchors * K
    width = 5 * D + (2 * H + 2 * G) * E / t + 3 * F / t
    if dcfg.arch == "dflash2":  # the projection's O columns have no tensor rule
        f = dcfg.family_cfg
        width += 2 * (2 * D + 2 * f.conv_kernel_size * D // f.conv_group_size)
    per_layer = R * width * 2  # bf16 residuals
    ctx_kv = b * seq * 2 * G * E / t * 2
    L_d = dcfg.num_layers
    if attention == "dense":
        att = (H / t) * R * seq * (4 + 2)  # fp32 scores + bf16 probs, per layer, kept
    else:
        att = (H / t) * R * 4 * 2  # log-sum-exp (+ max) per row, per layer
    kept = L_d * (R * D * 2 + ctx_kv) if remat else L_d * (per_layer + att + ctx_kv)
    out["drafter: activations kept for the backward pass"] = kept
    if attention == "dense" and remat:
        out["drafter: one layer recomputed in the backward pass (~3 score buffers)"] = \
            per_layer + 3 * (H / t) * R * seq * 4
    elif remat:
        out["drafter: one layer recomputed in the backward pass"] = per_layer
    if attention == "flash":  # group 64 blocks x tile 1024 columns, ~4 fp32 buffers
        out["drafter: flash attention tile scores (transient)"] = \
            4 * b * (H / t) * 64 * K * 1024 * 4
    out["drafter: fc input (n features -> D) and hidden (bf16)"] = b * seq * D * 2 * 2
    out["LM head: one chunk of logits, probs, gradient (fp32)"] = 3 * min(chunk, R) * V / t * 4
    return out


def activation_peak(acts: dict[str, float]) -> float:
    """The kept features live through the step; the target forward's transients ("target:")
    are gone before the drafter's forward and backward pass (the rest) begin: the larger
    phase counts."""
    kept = sum(v for k, v in acts.items() if k.startswith("target: the features"))
    target = sum(v for k, v in acts.items() if k.startswith("target:")) - kept
    return kept + max(target, sum(acts.values()) - kept - target)


@dataclasses.dataclass(frozen=True)
class Plan:
    seq: int = 3072
    anchors: int = 512
    block: int = 16
    drafter_layers: int = 5
    global_batch: int = 16
    attention: str = "flash"
    remat: bool = False
    dispatch: str = "sorted"
    experts: str = "fsdp"
    target_attention: str = "einsum"  # "fused": no [S, S] scores (cudnn on GPU; none on TPU yet)
    target_bytes: int = 2  # bf16
    decode_batch: int = 8  # global, for the KV cache
    decode_context: int = 8192


def estimate(target: Target, mesh: dict[str, int], plan: Plan = Plan()) -> dict:
    """Per-device bytes of a train step and of decoding, with the items behind them."""
    dcfg = drafter_for(target.cfg, plan.drafter_layers, plan.block)
    shards = mesh["data"] * mesh["fsdp"]
    b = plan.global_batch / shards
    drafter = schema_arrays(DRAFTER_SCHEMA, dcfg)
    d_elems = per_device_elements(drafter, mesh)
    t_elems = per_device_elements(target.arrays, mesh, plan.experts)
    fixed = {
        "target weights": t_elems * plan.target_bytes,
        "target: two layers all-gathered over fsdp (forward prefetch)":
            2 * layer_bytes(target.arrays, plan.target_bytes, mesh,
                            with_experts=plan.dispatch == "sorted")
            if mesh["fsdp"] > 1 else 0.0,
        "drafter fp32 master + Adam m, v": 3 * 4 * d_elems,
        "drafter fp32 gradients": 4 * d_elems,
        "drafter bf16 compute copy": 2 * d_elems,
    }
    acts = train_activations(target, dcfg, mesh, b=b, seq=plan.seq, anchors=plan.anchors,
                             attention=plan.attention, remat=plan.remat, dispatch=plan.dispatch,
                             target_attention=plan.target_attention)
    # decoding: target + drafter weights (bf16) and both caches, batch split over data x fsdp,
    # kv heads over tensor when they divide
    cfg, t = target.cfg, mesh["tensor"]
    kv_split = t if cfg.num_kv_heads % t == 0 else 1
    per_token = 2 * cfg.num_kv_heads * cfg.head_dim * 2 / kv_split
    rows = max(plan.decode_batch / shards, 1)
    ctx = plan.decode_context + plan.block
    decode = {"target weights": fixed["target weights"],
              "drafter weights (bf16)": 2 * d_elems,
              "target KV cache": cfg.num_layers * rows * ctx * per_token,
              "drafter context KV cache": dcfg.num_layers * rows * ctx * per_token}
    return {"mesh": mesh, "batch_per_device": b, "drafter_params": sum(a.size for a in drafter),
            "train_fixed": fixed, "train_activations": acts,
            "train_activation_peak": activation_peak(acts),
            "train_total": sum(fixed.values()) + activation_peak(acts),
            "decode": decode, "decode_total": sum(decode.values())}


def meshes_for(devices: int, max_data: int = 8) -> list[dict[str, int]]:
    """The (data, fsdp, tensor) shapes with data * fsdp dividing the global batch of 16."""
    out = []
    for data in (d for d in (1, 2, 4, 8) if d <= max_data):
        for tensor in (1, 2, 4, 8):
            if devices % (data * tensor) == 0:
                fsdp = devices // (data * tensor)
                if 16 % (data * fsdp) == 0:
                    out.append({"data": data, "fsdp": fsdp, "tensor": tensor})
    return out


def fmt(x: float) -> str:
    return f"{x / GB:.1f}"


def report(plans: dict[str, Plan], budget_fraction: float,
           max_data: int = 8) -> tuple[str, list]:
    lines, rows = [], []
    for name, target in TARGETS.items():
        p, a = target.params(), target.active_params()
        lines += [f"### {name}", "",
                  f"Parameters: {p / 1e9:.2f} B total, {a / 1e9:.2f} B active per token "
                  f"({target.active_params(embedding=False) / 1e9:.2f} B without the input "
                  f"embedding); bf16 weights {p * 2 / GB:.1f} GB.", ""]
        for hw, (devices, memory) in HARDWARE.items():
            budget = budget_fraction * memory
            lines += [f"{hw}: budget {fmt(budget)} GB per device ({budget_fraction:.0%} of "
                      f"{fmt(memory)} GB). GB per device:", "",
                      "| mesh (data, fsdp, tensor) | plan | b/dev | target | drafter state | "
                      "activations | train total | fits | decode total |", "|" + "---|" * 9]
            for mesh in meshes_for(devices, max_data):
                for label, plan in plans.items():
                    e = estimate(target, mesh, plan)
                    state = sum(v for k, v in e["train_fixed"].items() if k.startswith("drafter"))
                    tgt = sum(v for k, v in e["train_fixed"].items() if k.startswith("target"))
                    fits = e["train_total"] <= budget
                    shape = (mesh["data"], mesh["fsdp"], mesh["tensor"])
                    lines.append(f"| {shape} | {label} | {e['batch_per_device']:g} | {fmt(tgt)} "
                                 f"| {fmt(state)} | {fmt(e['train_activation_peak'])} "
                                 f"| {fmt(e['train_total'])} | {'yes' if fits else 'no'} "
                                 f"| {fmt(e['decode_total'])} |")
                    rows.append({"target": name, "hardware": hw, "plan": label,
                                 "fits": fits, **e})
            lines.append("")
    return "\n".join(lines), rows


def detail(target: str, mesh: dict[str, int], plan: Plan) -> str:
    e = estimate(TARGETS[target], mesh, plan)
    out = [f"{target}, mesh {tuple(mesh.values())}, {plan}:", "", "| item | GB per device |",
           "|---|---|"]
    for group in ("train_fixed", "train_activations"):
        out += [f"| {k} | {fmt(v)} |" for k, v in e[group].items()]
    out.append(f"| activations at the peak (features + the larger phase) | "
               f"{fmt(e['train_activation_peak'])} |")
    out.append(f"| **train step total** | **{fmt(e['train_total'])}** |")
    out += [f"| decode: {k} | {fmt(v)} |" for k, v in e["decode"].items()]
    out.append(f"| **decode total** (batch {plan.decode_batch}, context "
               f"{plan.decode_context}) | **{fmt(e['decode_total'])}** |")
    return "\n".join(out)


PLANS = {"flash": Plan(), "flash+remat": Plan(remat=True),
         "flash+EP": Plan(dispatch="expert_parallel"),
         "flash+remat+EP": Plan(remat=True, dispatch="expert_parallel")}


def parse_args(doc: str, argv=None) -> argparse.Namespace:
    """The memory plans' command line (this script's and bench/dflash2_memory.py's)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--budget-fraction", type=float, default=0.9,
                    help="share of a device's memory the plan may use (the rest: XLA workspace, "
                         "fragmentation)")
    ap.add_argument("--max-data", type=int, default=8,
                    help="only meshes with at most this many data replicas")
    ap.add_argument("--json", default="", help="also write the rows here")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(__doc__, argv)
    text, rows = report(PLANS, args.budget_fraction, args.max_data)
    print(text)
    one = {"data": 1, "fsdp": 8, "tensor": 1}
    for name, mesh, plan in (("Qwen3-30B-A3B", one, Plan()),
                             ("Qwen3-30B-A3B", one, Plan(attention="dense")),
                             ("Qwen3-30B-A3B", {"data": 1, "fsdp": 4, "tensor": 1}, Plan()),
                             ("gpt-oss-120b", one, Plan()),
                             ("gpt-oss-120b", {"data": 1, "fsdp": 4, "tensor": 1},
                              Plan(dispatch="expert_parallel")),
                             ("gpt-oss-120b", {"data": 1, "fsdp": 4, "tensor": 1},
                              Plan(remat=True, dispatch="expert_parallel"))):
        print(detail(name, mesh, plan) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
