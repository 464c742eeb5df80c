"""Memory of training a DFlash 2 drafter against Qwen3.6-27B (a dense hybrid Qwen3.5-architecture
target), per device, on paper.

Pure arithmetic from shapes, no devices, sharing bench/moe_memory.py's parts: the parameters of
our own schemas (the target's from dpace_jax.targets.qwen3_5, the drafter's from
dpace_jax.drafters.dflash2, the drafter itself built from configs/qwen3_6_27b_dflash2.py exactly
as train.py builds it), split per device by dpace_jax.sharding's rule; the drafter's forward /
backward pass (moe_memory.drafter_activations, with DFlash 2's convolution residuals); and the
peak rule (moe_memory.activation_peak). What is new here: the hybrid target forward (gated
DeltaNet's chunked rule, the gated attention's scores), the chunked LM head's top-Z, the
selector's training term, and the decoding cache of a hybrid target (the KV of its 16
full-attention layers and the recurrent state of its 48 linear layers).

Everything past the parameters is an ESTIMATE under the assumptions written next to each term
(docs/dflash2_memory.md lists them); no figure was measured on a device.

    python bench/dflash2_memory.py                # the tables of docs/dflash2_memory.md
    python bench/dflash2_memory.py --json out.json
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import moe_memory as mm  # noqa: E402
from dpace_jax.drafters.config import DrafterConfig  # noqa: E402
from dpace_jax.drafters.dflash2 import SCHEMA as DFLASH2_SCHEMA  # noqa: E402
from dpace_jax.targets.model import ModelConfig, schema  # noqa: E402

GB = mm.GB
CONFIG = ROOT / "configs" / "qwen3_6_27b_dflash2.py"
# Qwen3.6-27B's config.json as published (Qwen3_5ForConditionalGeneration; the text model's
# fields; sources in docs/dflash2_memory.md), read by our own parser
QWEN3_6_27B_HF = {
    "architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
    "tie_word_embeddings": False,
    "text_config": {
        "model_type": "qwen3_5_text", "num_hidden_layers": 64, "hidden_size": 5120,
        "intermediate_size": 17408, "num_attention_heads": 24, "num_key_value_heads": 4,
        "head_dim": 256, "vocab_size": 248320, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 262144, "full_attention_interval": 4,
        "attn_output_gate": True, "linear_num_key_heads": 16, "linear_num_value_heads": 48,
        "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000000,
                            "partial_rotary_factor": 0.25}}}
HARDWARE = {"8 x H100 80GB": (8, 80 * GB), "8 x H200 141GB": (8, 141 * GB),
            "TPU v5p-8 (4 chips)": (4, 95 * GB)}
RULE_CHUNK = 64  # gated_delta.chunk_size's largest chunk


def qwen3_6_27b() -> mm.Target:
    cfg = ModelConfig.from_hf(QWEN3_6_27B_HF, "Qwen3.6-27B config.json")
    return mm.Target("Qwen3.6-27B", cfg, tuple(mm.schema_arrays(schema(cfg), cfg)))


def run_config():
    spec = importlib.util.spec_from_file_location("qwen3_6_27b_dflash2", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def drafter_of(config, target_cfg: ModelConfig) -> DrafterConfig:
    """The drafter train.py builds from the run config's drafter.* for this target (its mask
    token is set, so no tokenizer is read)."""
    from dpace_jax.train.drafter import build_drafter
    from dpace_jax.train.settings import DrafterSettings

    dcfg, _ = build_drafter(DrafterSettings.from_config(config.drafter), target_cfg, None)
    return dcfg


def drafter_arrays(dcfg: DrafterConfig) -> list[mm.Array]:
    return mm.schema_arrays(DFLASH2_SCHEMA, dcfg)


def largest_layer_bytes(target: mm.Target, dtype_bytes: float, t: int) -> float:
    """One hybrid layer's weights after an all-gather over fsdp (still split over tensor where a
    heads / mlp axis is): the stacks over every layer (norms, MLP) plus the larger mixer
    (a gated DeltaNet's or a gated attention's stack row)."""
    rows: dict[str, float] = {}
    for a in target.arrays:
        if a.axes[0] == "layers":
            stack = a.name.rsplit("/", 1)[0]
            split = t if ("heads" in a.axes or "mlp" in a.axes) else 1
            rows[stack] = rows.get(stack, 0.0) + a.size / a.shape[0] / split
    every = sum(v for k, v in rows.items() if k == "layers/norms")
    return (every + max(v for k, v in rows.items() if k != "layers/norms")) * dtype_bytes


@dataclasses.dataclass(frozen=True)
class Plan:
    seq: int = 3072
    anchors: int = 512
    global_batch: int = 16
    attention: str = "flash"
    remat: bool = False
    target_attention: str = "einsum"  # "fused": no [S, S] scores (cudnn on GPU; none on TPU)
    target_bytes: int = 2  # bf16; 1: FP8 weights (dequantized layer by layer, not implemented)
    chunk: int = 2048  # train.loss_chunk_size
    decode_batch: int = 8  # global
    decode_context: int = 8192


def target_transients(target: mm.Target, mesh: dict, b: float, seq: int,
                      target_attention: str) -> tuple[dict[str, float], dict[str, float]]:
    """The target forward's transients of one layer (no gradient) -> (items, the two mixers)."""
    cfg, t = target.cfg, mesh["tensor"]
    f = cfg.family_cfg
    D, F, H, G, E = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                     cfg.head_dim)
    U, Kd, Y, C = (f.linear_num_value_heads, f.linear_key_head_dim, f.linear_value_head_dim,
                   f.conv_channels)
    tokens = b * seq
    # gated attention: q and its gate (2E per head), k, v, the gated output; fp32 logits + probs
    # per head with the einsum attention, none with a fused kernel
    attn = tokens * ((2 * H * E + H * E) / t + 2 * G * E / (t if G % t == 0 else 1)) * 2
    if target_attention == "einsum":
        attn += 2 * b * (H / t) * seq * seq * 4
    # gated DeltaNet: the rows before and after the convolution (bf16, C has no tensor rule),
    # z (bf16), and around the chunked rule's solve, fp32 per value head: q, k, v, and per chunk
    # of 64 the decays and A [C, C] and the solve's right-hand side and result [C, Y + K]. The
    # rule's heads come from in_qkv, whose channels have no tensor rule: assumed not split.
    rule = tokens * U * (3 * Kd + 2 * RULE_CHUNK + 2 * (Y + Kd)) * 4
    linear = tokens * (2 * C + U * Y / (t if U % t == 0 else 1)) * 2 + rule
    scores = ", einsum scores" if target_attention == "einsum" else ""
    mixers = {"gated DeltaNet (rows, z, chunked rule)": linear,
              f"gated attention (q/gate, k, v, out{scores})": attn}
    items = {
        "target: residual stream and MLP of one layer (x, normed, gate, up, act; bf16)":
            tokens * (3 * D + 3 * F / t) * 2,
        "target: the larger mixer of one layer (below)": max(mixers.values()),
    }
    return items, mixers


def selector_activations(dcfg: DrafterConfig, mesh: dict, R: float, chunk: int,
                         fsdp_head: bool) -> dict[str, float]:
    """DFlash 2's additions to the drafter phase: the top-Z of each LM-head chunk, the selector's
    teacher-forced term and the metric walk, and the target's head gathered for the chunks."""
    t, V, D = mesh["tensor"], dcfg.vocab_size, dcfg.hidden_size
    f = dcfg.family_cfg
    A, Z = f.selector_rank, f.selector_top_k
    out = {
        # lax.top_k over a [chunk, V] block: assumed a sort's keys and indices (4 bytes each)
        "LM head: top-Z of one chunk (sort keys + indices)": 2 * min(chunk, R) * V / t * 4,
        # per row: the projection and the predecessor's codebook row [A], the Z successors'
        # rows [Z, A] for the term, its gradient and the metric walk, the scores [Z] (fp32)
        "selector: projection, codebook rows, scores and their gradients (fp32)":
            R * (2 * A + 3 * Z * A + 4 * Z) * 4,
    }
    if fsdp_head:  # the head [D, V] is split over fsdp on D: assumed gathered for the chunks
        out["LM head: the target's head [D, V] all-gathered over fsdp (bf16)"] = D * V / t * 2
    return out


def estimate(target: mm.Target, dcfg: DrafterConfig, mesh: dict[str, int],
             plan: Plan = Plan()) -> dict:
    """Per-device bytes of a train step and of decoding, with the items behind them."""
    shards = mesh["data"] * mesh["fsdp"]
    b = plan.global_batch / shards
    arrays = drafter_arrays(dcfg)
    d_elems = mm.per_device_elements(arrays, mesh)
    codebooks = mm.per_device_elements([a for a in arrays if a.name.endswith("codebook")], mesh)
    gathered = 2 * largest_layer_bytes(target, 2, mesh["tensor"]) if mesh["fsdp"] > 1 else 0.0
    fixed = {
        "target weights": mm.per_device_elements(target.arrays, mesh) * plan.target_bytes,
        "target: two layers all-gathered over fsdp (forward prefetch, bf16)": gathered,
        "drafter fp32 master + Adam m, v": 3 * 4 * d_elems,
        "drafter fp32 gradients": 4 * d_elems,
        "drafter bf16 compute copy": 2 * d_elems,
    }
    acts, mixers = target_transients(target, mesh, b, plan.seq, plan.target_attention)
    tokens = b * plan.seq
    acts["target: the features kept (n layers, bf16)"] = \
        dcfg.num_features * tokens * dcfg.hidden_size * 2
    acts.update(mm.drafter_activations(dcfg, mesh["tensor"], b=b, seq=plan.seq,
                                       anchors=plan.anchors, attention=plan.attention,
                                       remat=plan.remat, chunk=plan.chunk))
    R = b * plan.anchors * dcfg.block_size
    acts.update(selector_activations(dcfg, mesh, R, plan.chunk, mesh["fsdp"] > 1))
    peak = mm.activation_peak(acts)
    return {"mesh": mesh, "batch_per_device": b, "drafter_params": sum(a.size for a in arrays),
            "codebook_state_per_device": 18 * codebooks, "train_fixed": fixed,
            "train_activations": acts, "target_mixers": mixers,
            "train_activation_peak": peak, "train_total": sum(fixed.values()) + peak,
            **decode(target, dcfg, mesh, plan, fixed["target weights"], d_elems)}


def decode(target: mm.Target, dcfg: DrafterConfig, mesh: dict, plan: Plan, weights: float,
           d_elems: float) -> dict:
    """Decoding at plan.decode_batch x plan.decode_context: both models' weights, the target's
    hybrid cache (KV of its full-attention layers; per linear layer the fp32 state and the
    convolution's history; the pending verify block) and the drafter's context KV (every context
    position: our decoder keeps them all, sliding window or not). Batch over data x fsdp, heads
    over tensor where they divide."""
    cfg, t = target.cfg, mesh["tensor"]
    f = cfg.family_cfg
    rows = max(plan.decode_batch / (mesh["data"] * mesh["fsdp"]), 1)
    ctx = plan.decode_context + dcfg.block_size
    n_att, n_lin = len(f.attention_layers), len(f.linear_layers)
    U, Kd, Y = f.linear_num_value_heads, f.linear_key_head_dim, f.linear_value_head_dim
    u_split = t if U % t == 0 else 1

    def kv(layers, heads, head_dim):
        return layers * rows * ctx * 2 * heads * head_dim * 2 / (t if heads % t == 0 else 1)

    pending = dcfg.block_size * (f.conv_channels * 2 + (U * (Kd + Y) * 4 + 2 * U * 4) / u_split)
    items = {
        "target weights": weights,
        "drafter weights (bf16)": 2 * d_elems,
        f"target KV cache ({n_att} full-attention layers)": kv(n_att, cfg.num_kv_heads,
                                                               cfg.head_dim),
        f"target recurrent state + conv history ({n_lin} gated-DeltaNet layers)":
            n_lin * rows * (U * Kd * Y * 4 / u_split
                            + (f.linear_conv_kernel_dim - 1) * f.conv_channels * 2),
        "target pending verify block (rule inputs of the linear layers)": n_lin * rows * pending,
        "drafter context KV cache": kv(dcfg.num_layers, dcfg.num_kv_heads, dcfg.head_dim),
    }
    return {"decode": items, "decode_total": sum(items.values())}


PLANS = {"flash": Plan(), "flash+remat": Plan(remat=True)}
VARIANTS = {"dense drafter attention": Plan(attention="dense"),
            "fused target attention (cudnn)": Plan(target_attention="fused"),
            "FP8 target weights": Plan(target_bytes=1),
            "seq 8192, global batch 8": Plan(seq=8192, global_batch=8),
            "seq 8192, global batch 8, remat": Plan(seq=8192, global_batch=8, remat=True)}


def row(e: dict, label: str, budgets: list[float]) -> str:
    tgt = sum(v for k, v in e["train_fixed"].items() if k.startswith("target"))
    state = sum(v for k, v in e["train_fixed"].items() if k.startswith("drafter"))
    m = e["mesh"]
    fits = " | ".join("yes" if e["train_total"] <= budget else "no" for budget in budgets)
    return (f"| {(m['data'], m['fsdp'], m['tensor'])} | {label} | {e['batch_per_device']:g} | "
            f"{mm.fmt(tgt)} | {mm.fmt(state)} | {mm.fmt(e['train_activation_peak'])} | "
            f"{mm.fmt(e['train_total'])} | {fits} | {mm.fmt(e['decode_total'])} |")


def header(names: list[str]) -> list[str]:
    fits = " | ".join(f"fits {n}" for n in names)
    return ["| mesh (data, fsdp, tensor) | plan | b/dev | target | drafter state | activations "
            f"| train total | {fits} | decode total |", "|" + "---|" * (8 + len(names))]


def report(target: mm.Target, dcfg: DrafterConfig, budget_fraction: float, max_data: int,
           plans=PLANS, variants=VARIANTS) -> tuple[str, list]:
    """One table per device count (the 8-GPU machines share theirs: the same meshes give the
    same bytes; only the budget differs), then the variants at the all-fsdp mesh."""
    n = sum(a.size for a in drafter_arrays(dcfg))
    lines = [f"Target: {target.params() / 1e9:.2f} B parameters (our schema), bf16 weights "
             f"{target.params() * 2 / GB:.1f} GB. Drafter: {n / 1e9:.3f} B parameters "
             f"({n:,}; attention {dcfg.num_heads} / {dcfg.num_kv_heads} x {dcfg.head_dim}), "
             f"of which the selector's codebooks "
             f"{2 * dcfg.vocab_size * dcfg.family_cfg.selector_rank / 1e6:.1f} M.", ""]
    groups: dict[int, list[tuple[str, float]]] = {}
    for hw, (devices, memory) in HARDWARE.items():
        groups.setdefault(devices, []).append((hw, budget_fraction * memory))
    rows = []
    for devices, machines in groups.items():
        budgets = [budget for _, budget in machines]
        names = [hw.split(" x ")[-1] for hw, _ in machines]
        lines += [f"### {' and '.join(hw for hw, _ in machines)}", "",
                  "Budget per device (" + f"{budget_fraction:.0%} of the nominal memory): "
                  + ", ".join(f"{n} {mm.fmt(b)} GB" for n, b in zip(names, budgets, strict=True))
                  + ". GB per device:", "", *header(names)]
        meshes = mm.meshes_for(devices, max_data)
        todo = [(mesh, label, plan) for mesh in meshes for label, plan in plans.items()]
        todo += [(meshes[0], label, plan) for label, plan in variants.items()
                 if plan.target_attention != "fused" or "TPU" not in machines[0][0]]
        for i, (mesh, label, plan) in enumerate(todo):
            if i == len(meshes) * len(plans):
                lines += ["", f"Variants at {tuple(meshes[0].values())}:", "", *header(names)]
            e = estimate(target, dcfg, mesh, plan)
            lines.append(row(e, label, budgets))
            rows += [{"hardware": hw, "plan": label, "fits": e["train_total"] <= budget, **e}
                     for hw, budget in machines]
        lines.append("")
    return "\n".join(lines), rows


def detail(target: mm.Target, dcfg: DrafterConfig, mesh: dict[str, int], plan: Plan) -> str:
    e = estimate(target, dcfg, mesh, plan)
    out = [f"Qwen3.6-27B, mesh {tuple(mesh.values())}, {plan}:", "", "| item | GB per device |",
           "|---|---|"]
    for group in ("train_fixed", "train_activations"):
        out += [f"| {k} | {mm.fmt(v)} |" for k, v in e[group].items()]
    out += [f"| (target mixer: {k}) | {mm.fmt(v)} |" for k, v in e["target_mixers"].items()]
    out.append(f"| (of the drafter state: the selector's codebooks) | "
               f"{mm.fmt(e['codebook_state_per_device'])} |")
    out.append(f"| activations at the peak (features + the larger phase) | "
               f"{mm.fmt(e['train_activation_peak'])} |")
    out.append(f"| **train step total** | **{mm.fmt(e['train_total'])}** |")
    out += [f"| decode: {k} | {mm.fmt(v)} |" for k, v in e["decode"].items()]
    out.append(f"| **decode total** (batch {plan.decode_batch}, context "
               f"{plan.decode_context}) | **{mm.fmt(e['decode_total'])}** |")
    return "\n".join(out)


def main(argv=None):
    args = mm.parse_args(__doc__, argv)
    target = qwen3_6_27b()
    dcfg = drafter_of(run_config(), target.cfg)
    text, rows = report(target, dcfg, args.budget_fraction, args.max_data)
    print(text)
    for fsdp in (8, 4):  # the config's mesh on the GPUs and on the v5p-8
        print(detail(target, dcfg, {"data": 1, "fsdp": fsdp, "tensor": 1}, Plan()) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
