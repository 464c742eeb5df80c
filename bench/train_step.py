"""Benchmark of the full jitted train step (dpace_jax.train.step.make_train_step): frozen target
forward + drafter forward/backward + AdamW, random weights, for the `dflash` and `dpace` losses
in one run.

    python bench/train_step.py --shape qwen3-4b --steps 20 --output train_step.json --markdown
    python bench/train_step.py --shape tiny --steps 3          # CPU smoke run

Per loss: ms/step (median of --steps blocked steps after compilation and --warmup steps),
sequence tokens/s, model FLOPs utilization (analytic FLOP count below, against the data-sheet
peak and against a bf16 matmul measured in the same run), peak device memory (the process's
`peak_bytes_in_use`, None on CPU) and XLA's static buffer estimate; then the D-PACE overhead.

FLOP count (matmuls only; T = B*S tokens, R = B*N*K block rows, P = a decoder layer's matmul
parameters = D*H*E + 2*D*G*E + H*E*D + 3*D*F; L_t = max(target_layer_ids) + 1, the target
layers the step runs):
  target forward     2*P*T*L_t  +  attention L_t * 4*B*H*E * (S(S+1)/2 visible | S^2 computed)
  drafter forward    fc 2*T*F_feat*D;  per layer: context k/v 2*T*D*2*G*E, block projections
                     2*R*P, context attention 4*R*H*E * (mean anchor visible | S computed),
                     in-block attention 4*R*K*H*E
  drafter backward   2x forward (the fc only its weight gradient: features carry no gradient)
  LM-head CE         forward 2*R*D*V, backward 2*R*D*V (hidden gradient only, the head is frozen)
`model` FLOPs count only the visible attention area and no recomputation: the MFU. `executed`
FLOPs count what this implementation multiplies: the full masked areas (except the target's with
--target-attention cudnn and, approximately, the drafter context with --attention flash, which
then recomputes its scores in the backward pass) and the recomputation of the rematerialized
LM-head chunks (and of the drafter layers with --remat).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from dpace_jax import loss as loss_lib
from dpace_jax import sharding as shard_lib
from dpace_jax.config import default_config
from dpace_jax.drafters import block_attention
from dpace_jax.drafters import dflash as drafter_lib
from dpace_jax.loss import chunked as chunked_loss
from dpace_jax.targets import model as model_lib
from dpace_jax.train import step as step_lib

LOSSES = ("dflash", "dpace")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen3-4b", help="qwen3-4b | tiny")
    p.add_argument("--steps", type=int, default=20, help="timed steps per loss (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--remat", action="store_true", help="recompute drafter layers in backward")
    p.add_argument("--attention", default="dense", choices=block_attention.IMPLEMENTATIONS,
                   help="drafter block attention (dpace_jax.drafters.block_attention)")
    p.add_argument("--attention-group", type=int, default=0,
                   help="blocks per attention group (dense: 0 = all at once; flash: 0 = 64)")
    p.add_argument("--attention-tile", type=int, default=block_attention.DEFAULT_FLASH_TILE,
                   help="context columns per flash step")
    p.add_argument("--target-attention", default="einsum", choices=model_lib.TRAIN_ATTENTION,
                   help="target forward attention (cudnn: fused, NVIDIA GPUs)")
    p.add_argument("--loss-chunk-size", type=int, default=chunked_loss.DEFAULT_CHUNK_SIZE,
                   help="draft positions per LM-head chunk")
    p.add_argument("--losses", default=",".join(LOSSES), help="comma-separated loss names")
    p.add_argument("--seq-len", type=int, help="override the shape's sequence length")
    p.add_argument("--num-anchors", type=int, help="override the shape's anchors per sequence")
    p.add_argument("--block-size", type=int, help="override the shape's block size")
    p.add_argument("--batch", type=int, help="override the shape's batch size")
    p.add_argument("--drafter-layers", type=int, help="override the shape's drafter depth")
    p.add_argument("--matmul-size", type=int, help="size of the peak-matmul probe (0: skip)")
    p.add_argument("--profile", help="write a jax.profiler trace of 3 steps per loss here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="write the results as JSON to this path")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = p.parse_args(argv)
    shape = common.shape_preset(args.shape)
    for name in ("seq_len", "num_anchors", "block_size", "batch", "drafter_layers"):
        if getattr(args, name) is None:
            setattr(args, name, shape[name])
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.matmul_size is None:
        args.matmul_size = shape["matmul_size"]
    if args.steps < 1 or args.warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {args.steps}, "
                         f"{args.warmup}")
    if args.loss_chunk_size < 1:
        raise ValueError(f"--loss-chunk-size must be >= 1, got {args.loss_chunk_size}")
    args.losses = [s.strip() for s in args.losses.split(",") if s.strip()]
    bad = [s for s in args.losses if s not in loss_lib.LOSS_NAMES]
    if bad or not args.losses:
        raise ValueError(f"--losses: {bad or args.losses} not in {loss_lib.LOSS_NAMES}")
    if args.seq_len < args.block_size + args.num_anchors:
        raise ValueError(f"--seq-len={args.seq_len} leaves fewer than --num-anchors="
                         f"{args.num_anchors} anchor positions for block size {args.block_size}")
    return args, shape


def make_batch(batch: int, seq: int, vocab: int, mask_token_id: int, seed: int):
    """Random tokens (never the MASK id) with the loss on every position, so every position
    a <= S - K is an anchor candidate and all anchors are kept."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab - 1, (batch, seq), dtype=np.int32)
    tokens[tokens >= mask_token_id] += 1
    return {"input_ids": tokens, "loss_mask": np.ones((batch, seq), np.int32)}


def layer_matmul_params(c) -> int:
    """P: the matmul parameters of one decoder layer (q, k, v, o, gate, up, down)."""
    d, h, g, e, f = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    return d * h * e + 2 * d * g * e + h * e * d + 3 * d * f


def train_flops(tcfg, dcfg, batch: int, seq: int, num_anchors: int, mean_anchor: float,
                remat: bool = False, attention: str = "dense",
                target_attention: str = "einsum") -> dict:
    """The analytic matmul FLOPs of one train step (module docstring), term by term. The target
    runs only up to its deepest feature layer (L_t = max(target_layer_ids) + 1)."""
    t, r = batch * seq, batch * num_anchors * dcfg.block_size
    h, e, g, d = dcfg.num_heads, dcfg.head_dim, dcfg.num_kv_heads, dcfg.hidden_size
    lt, ld, k = max(dcfg.target_layer_ids) + 1, dcfg.num_layers, dcfg.block_size
    th, te = tcfg.num_heads, tcfg.head_dim
    f = {
        "target_projections": 2.0 * layer_matmul_params(tcfg) * t * lt,
        "target_attention_visible": lt * 4.0 * batch * th * te * seq * (seq + 1) / 2,
        "target_attention_computed": lt * 4.0 * batch * th * te * seq * seq,
        "drafter_fc_fwd": 2.0 * t * dcfg.feature_size * d,
        "drafter_context_kv_fwd": ld * 2.0 * t * d * 2 * g * e,
        "drafter_block_projections_fwd": ld * 2.0 * r * layer_matmul_params(dcfg),
        "drafter_context_attention_visible_fwd": ld * 4.0 * r * h * e * mean_anchor,
        "drafter_context_attention_computed_fwd": ld * 4.0 * r * h * e * seq,
        "drafter_block_attention_fwd": ld * 4.0 * r * k * h * e,
        "lm_head_fwd": 2.0 * r * d * dcfg.vocab_size,
    }
    layer_common = (f["drafter_context_kv_fwd"] + f["drafter_block_projections_fwd"]
                    + f["drafter_block_attention_fwd"])
    layers_model = layer_common + f["drafter_context_attention_visible_fwd"]
    if attention == "flash":  # skips the hidden tiles (~ the visible area) but recomputes the
        # context scores (half of the attention forward) in the backward pass
        ctx = f["drafter_context_attention_visible_fwd"]
        layers_exec = layer_common + ctx
        flash_extra = 0.5 * ctx
    else:
        layers_exec = layer_common + f["drafter_context_attention_computed_fwd"]
        flash_extra = 0.0
    target_attention_exec = f["target_attention_visible" if target_attention == "cudnn"
                              else "target_attention_computed"]
    f["model_total"] = (f["target_projections"] + f["target_attention_visible"]
                        + 2 * f["drafter_fc_fwd"] + 3 * layers_model + 2 * f["lm_head_fwd"])
    f["executed_total"] = (f["target_projections"] + target_attention_exec
                           + 2 * f["drafter_fc_fwd"] + (4 if remat else 3) * layers_exec
                           + flash_extra + 3 * f["lm_head_fwd"])
    f["model_target"] = f["target_projections"] + f["target_attention_visible"]
    f["model_drafter"] = 2 * f["drafter_fc_fwd"] + 3 * layers_model
    f["model_lm_head"] = 2 * f["lm_head_fwd"]
    return f


def mean_anchor_position(loss_mask: np.ndarray, block_size: int) -> float:
    """Expected anchor under uniform sampling of eligible positions (loss 1, a <= S - K): the
    number of context positions a block sees, on average."""
    seq = loss_mask.shape[1]
    eligible = (loss_mask > 0) & (np.arange(seq) <= seq - block_size)[None, :]
    return float(np.mean([np.flatnonzero(row).mean() for row in eligible]))


def _step_config(args, loss: str) -> step_lib.StepConfig:
    """The paper recipe of the run config's defaults, with this benchmark's options."""
    c = default_config()
    t = c.train
    t.loss, t.num_anchors, t.compute_dtype = loss, args.num_anchors, "bfloat16"
    t.loss_chunk_size, t.remat, t.attention = args.loss_chunk_size, args.remat, args.attention
    t.attention_group, t.attention_tile = args.attention_group, args.attention_tile
    t.target_attention = args.target_attention
    return step_lib.StepConfig.from_config(c, 100_000)


def bench_loss(args, loss, tcfg, dcfg, target, t_shard, drafter_params, batch, mesh) -> dict:
    """Compile and time the train step of one loss."""
    cfg = _step_config(args, loss)
    optimizer = step_lib.make_optimizer(cfg)
    # A fresh copy: the state is donated to the step.
    state = step_lib.init_state(jax.tree.map(jnp.copy, drafter_params), optimizer, args.seed)
    s_shard = step_lib.state_shardings(state, mesh, dcfg)
    state = common.block(jax.device_put(state, s_shard))
    step = step_lib.make_train_step(tcfg, dcfg, cfg, optimizer, mesh, s_shard, t_shard)
    t0 = time.perf_counter()
    compiled = step.lower(state, target, batch).compile()
    compile_s = time.perf_counter() - t0

    for _ in range(args.warmup):
        state, metrics = common.block(compiled(state, target, batch))
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = common.block(compiled(state, target, batch))
        times.append(time.perf_counter() - t0)
    if args.profile:
        with jax.profiler.trace(str(Path(args.profile) / loss)):
            for _ in range(3):
                state, _ = common.block(compiled(state, target, batch))
    metrics = {k: np.asarray(v).tolist() for k, v in metrics.items()}
    del state
    return {"loss": loss, "compile_s": compile_s, "step": common.summarize(times),
            "metrics": metrics, "peak_bytes_in_use": common.peak_memory_bytes(),
            "compiled_memory": common.compiled_memory(compiled)}


def dpace_overhead(results: list[dict]) -> float | None:
    """(median dpace step - median dflash step) / median dflash step; None without both."""
    by_loss = {r["loss"]: r["step"]["median_ms"] for r in results if "step" in r}
    if "dflash" not in by_loss or "dpace" not in by_loss:
        return None
    return (by_loss["dpace"] - by_loss["dflash"]) / by_loss["dflash"]


def main(argv=None) -> dict:
    args, shape = parse_args(argv)
    tcfg = common.target_config(shape)
    dcfg = drafter_lib.DrafterConfig.for_target(
        tcfg, num_layers=args.drafter_layers, block_size=args.block_size,
        mask_token_id=shape["mask_token_id"])
    mesh = shard_lib.make_mesh((1, 1, 1), jax.devices()[:1])
    device = jax.devices()[0]
    matmul = common.measure_matmul(args.matmul_size) if args.matmul_size else None

    target = common.random_target(tcfg, seed=args.seed)
    t_shard = model_lib.shardings(tcfg, target, mesh)
    target = common.block(jax.device_put(target, t_shard))
    drafter_params = common.random_drafter(dcfg, seed=args.seed + 1)
    host_batch = make_batch(args.batch, args.seq_len, tcfg.vocab_size, dcfg.mask_token_id,
                            args.seed)
    batch = jax.device_put(host_batch, shard_lib.batch_sharding(mesh))

    mean_anchor = mean_anchor_position(host_batch["loss_mask"], dcfg.block_size)
    flops = train_flops(tcfg, dcfg, args.batch, args.seq_len, args.num_anchors, mean_anchor,
                        remat=args.remat, attention=args.attention,
                        target_attention=args.target_attention)
    spec = common.spec_peak_tflops(device)
    results = []
    for loss in args.losses:
        try:
            r = bench_loss(args, loss, tcfg, dcfg, target, t_shard, drafter_params, batch, mesh)
        except Exception as err:  # noqa: BLE001 - only allocation failures are recorded
            if not common.is_out_of_memory(err):
                raise
            results.append({"loss": loss, "error": str(err).splitlines()[0][:500],
                            "peak_bytes_in_use": common.peak_memory_bytes()})
            continue
        sec = r["step"]["median_ms"] / 1e3
        r["tokens_per_s"] = args.batch * args.seq_len / sec
        r["model_tflops_per_s"] = flops["model_total"] / sec / 1e12
        r["executed_tflops_per_s"] = flops["executed_total"] / sec / 1e12
        r["mfu_spec"] = r["model_tflops_per_s"] / spec if spec else None
        r["mfu_measured_matmul"] = (flops["model_total"] / sec / matmul["flops_per_s"]
                                    if matmul else None)
        results.append(r)

    overhead = dpace_overhead(results)
    out = {
        "benchmark": "train_step",
        "device": common.device_info(device),
        "config": {"shape": args.shape, "seq_len": args.seq_len, "num_anchors": args.num_anchors,
                   "block_size": args.block_size, "batch": args.batch,
                   "drafter_layers": args.drafter_layers, "remat": args.remat,
                   "attention": args.attention, "attention_group": args.attention_group,
                   "attention_tile": args.attention_tile,
                   "target_attention": args.target_attention,
                   "loss_chunk_size": args.loss_chunk_size, "steps": args.steps,
                   "warmup": args.warmup, "target_dtype": "bfloat16",
                   "drafter_dtype": "float32 master, bfloat16 compute",
                   "target_layer_ids": list(dcfg.target_layer_ids),
                   "mean_anchor": mean_anchor},
        "params": {"target_bytes": common.tree_bytes(target),
                   "drafter_params": int(sum(x.size for x in jax.tree.leaves(drafter_params)))},
        "spec_peak_tflops": spec,
        "matmul_probe": matmul,
        "flops": flops,
        "results": results,
        "dpace_overhead_vs_dflash": overhead,
    }
    if args.output:
        common.write_json(args.output, out)
    if args.markdown:
        print(markdown(out))
    return out


def _gib(x):
    return None if x is None else x / common.GiB


def markdown(out: dict) -> str:
    rows, errors = [], []
    for r in out["results"]:
        if "error" in r:
            errors.append(f"{r['loss']}: {r['error']}")
            continue
        cm = r["compiled_memory"] or {}
        rows.append([r["loss"], r["step"]["median_ms"], r["step"]["min_ms"],
                     round(r["tokens_per_s"]), r["model_tflops_per_s"],
                     None if r["mfu_spec"] is None else 100 * r["mfu_spec"],
                     None if r["mfu_measured_matmul"] is None else 100 * r["mfu_measured_matmul"],
                     _gib(r["peak_bytes_in_use"]), _gib(cm.get("estimated_peak")),
                     r["compile_s"]])
    table = common.markdown_table(
        ["loss", "ms/step (median)", "min ms", "seq tokens/s", "model TFLOP/s", "MFU % (spec)",
         "MFU % (matmul probe)", "peak GiB", "XLA est. GiB", "compile s"], rows)
    f = out["flops"]
    flop_rows = [[k, f"{v / 1e12:.4g}"] for k, v in f.items()]
    c, d = out["config"], out["device"]
    lines = [f"Train step, shape {c['shape']} (seq {c['seq_len']}, {c['num_anchors']} anchors, "
             f"block {c['block_size']}, batch {c['batch']}, {c['drafter_layers']}-layer drafter, "
             f"remat {c['remat']}, LM-head chunk {c['loss_chunk_size']}, drafter attention "
             f"{c['attention']} (group {c['attention_group']}, tile {c['attention_tile']}), "
             f"target attention {c['target_attention']}) on {d['device_kind']} "
             f"({d['date']}, jax {d['jax_version']})", "", table, ""]
    lines += [f"FAILED {e}" for e in errors] + ([""] if errors else [])
    if out["dpace_overhead_vs_dflash"] is not None:
        lines += [f"D-PACE overhead vs dflash: {100 * out['dpace_overhead_vs_dflash']:+.2f}%", ""]
    if out["matmul_probe"]:
        mp = out["matmul_probe"]
        lines += [f"bf16 matmul probe {mp['size']}^3: {mp['flops_per_s'] / 1e12:.1f} TFLOP/s", ""]
    lines += [common.markdown_table(["FLOP term", "TFLOP"], flop_rows)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
