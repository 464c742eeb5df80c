"""Benchmark of the jitted speculative decoder (dpace_jax.infer.decode.decode) against the memory
roofline: ms per draft+verify iteration (random DFlash drafter) and per autoregressive step,
set against the time to read the weights and the KV cache once at the bandwidth measured in the
same run.

    python bench/decode.py --shape qwen3-4b --output decode.json --markdown
    python bench/decode.py --shape tiny                       # CPU smoke run
    python bench/decode.py --shape qwen3.5-4b --output decode_qwen3_5.json --markdown
    python bench/decode.py --shape qwen3.5-tiny               # its CPU smoke run

Method. A call of `decode` runs the prefill and then a while loop of verify steps; a random
drafter accepts ~nothing, so every step emits ~1 token and the loop runs ~max_new_tokens - 1
steps with no stop tokens. Each (context, batch, mode) is timed at two max_new_tokens values
n1 < n2 (median of --repeats blocked calls each, after a compiling call); the loop's iteration
count is max(num_steps) (at least one sequence is active in every iteration), and

    ms per iteration = (t(n2) - t(n1)) / (iterations(n2) - iterations(n1))

so prefill, dispatch and host-side checks cancel. The prompt fills the whole context (P = the
context length); the caches hold P + n + K slots, all of which the attention reads.

Roofline (bytes read once per iteration, bf16):
  autoregressive step   target weights (layers + tied embedding as the LM head) + target KV
  draft + verify        the above + drafter weights + one more LM-head pass (the drafter's
                        logits) + the drafter's context KV
with KV = 2 * layers * batch * context * G * E * 2 bytes at the live context length. A Qwen3.5
target's KV counts its full-attention layers only; its linear-attention layers add their fp32
recurrent state and convolution history, read and written once per step.
Bandwidth: a jitted elementwise `x + 1` over a --bandwidth-bytes float32 array (read + write
bytes / time).
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
from dpace_jax.drafters import dflash as drafter_lib
from dpace_jax.infer import decode as decode_lib

MODES = ("dflash", "autoregressive")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen3-4b", help="qwen3-4b | tiny | qwen3.5-4b | "
                   "qwen3.5-tiny")
    p.add_argument("--contexts", help="comma-separated context (prompt) lengths")
    p.add_argument("--batches", help="comma-separated batch sizes")
    p.add_argument("--modes", default=",".join(MODES), help="dflash and/or autoregressive")
    p.add_argument("--new-tokens", help="the two max_new_tokens values n1,n2 (n1 < n2)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per configuration")
    p.add_argument("--drafter-layers", type=int, help="override the shape's drafter depth")
    p.add_argument("--block-size", type=int, help="override the shape's block size")
    p.add_argument("--bandwidth-bytes", type=int, help="array size of the bandwidth probe")
    p.add_argument("--profile", help="write a jax.profiler trace of one n2 call per "
                   "configuration here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="write the results as JSON to this path")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = p.parse_args(argv)
    shape = common.shape_preset(args.shape)
    args.contexts = (common.parse_int_list(args.contexts, "--contexts") if args.contexts
                     else list(shape["contexts"]))
    args.batches = (common.parse_int_list(args.batches, "--batches") if args.batches
                    else list(shape["batches"]))
    args.new_tokens = (common.parse_int_list(args.new_tokens, "--new-tokens")
                       if args.new_tokens else list(shape["new_tokens"]))
    if len(args.new_tokens) != 2 or not 2 <= args.new_tokens[0] < args.new_tokens[1]:
        raise ValueError(f"--new-tokens: expected two values 2 <= n1 < n2, got {args.new_tokens}")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad or not args.modes:
        raise ValueError(f"--modes: {bad or args.modes} not in {MODES}")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    for name in ("drafter_layers", "block_size", "bandwidth_bytes"):
        if getattr(args, name) is None:
            setattr(args, name, shape[name])
    if args.drafter_layers < 1 or args.block_size < 2 or args.bandwidth_bytes < 1:
        raise ValueError("--drafter-layers must be >= 1, --block-size >= 2 and "
                         "--bandwidth-bytes >= 1")
    return args, shape


def kv_bytes(num_layers: int, batch: int, length: int, kv_heads: int, head_dim: int,
             itemsize: int = 2) -> int:
    """k and v of `num_layers` layers for `length` positions."""
    return 2 * num_layers * batch * length * kv_heads * head_dim * itemsize


def roofline(tcfg, dcfg, target_bytes: int, drafter_bytes: int, batch: int, context: int,
             bandwidth: float) -> dict:
    """Bytes read once per step and the time that takes at `bandwidth` bytes/s."""
    head = tcfg.vocab_size * tcfg.hidden_size * 2
    f = tcfg.family_cfg
    hybrid = hasattr(f, "linear_layers")  # Qwen3.5: linear and full attention layers
    attention = len(f.attention_layers) if hybrid else tcfg.num_layers
    kv_t = kv_bytes(attention, batch, context, tcfg.num_kv_heads, tcfg.head_dim)
    if hybrid:  # the recurrent state (fp32) and the convolution history, in and out
        per_layer = batch * (4 * f.linear_num_value_heads * f.linear_key_head_dim
                             * f.linear_value_head_dim + 2 * (f.linear_conv_kernel_dim - 1)
                             * f.conv_channels)  # C: the convolved q|k|v channels
        kv_t += 2 * len(f.linear_layers) * per_layer
    kv_d = kv_bytes(dcfg.num_layers, batch, context, dcfg.num_kv_heads, dcfg.head_dim)
    ar = target_bytes + kv_t
    spec = ar + drafter_bytes + head + kv_d
    return {"target_weight_bytes": target_bytes, "drafter_weight_bytes": drafter_bytes,
            "lm_head_bytes": head, "target_kv_bytes": kv_t, "drafter_kv_bytes": kv_d,
            "autoregressive_bytes": ar, "dflash_bytes": spec,
            "autoregressive_floor_ms": 1e3 * ar / bandwidth,
            "dflash_floor_ms": 1e3 * spec / bandwidth}


def _time_decode(call, repeats: int) -> dict:
    t0 = time.perf_counter()
    result = common.block(call())
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = common.block(call())
        times.append(time.perf_counter() - t0)
    steps = np.asarray(result.num_steps)
    return {"first_call_s": first_s, "time": common.summarize(times),
            "iterations": int(steps.max()), "tokens": np.asarray(result.num_tokens).tolist(),
            "tau": decode_lib.tau(result)}


def bench_one(args, tcfg, target, drafter, context: int, batch: int, mode: str) -> dict:
    rng = np.random.default_rng(args.seed + 1000 * context + batch)
    tokens = rng.integers(0, tcfg.vocab_size - 1, (batch, context), dtype=np.int32)
    prompts = jax.device_put(tokens)
    lengths = np.full((batch,), context, np.int32)
    runs = []
    for n in args.new_tokens:
        def call(n=n):
            return decode_lib.decode(target, tcfg, drafter if mode == "dflash" else None,
                                     prompts, lengths, max_new_tokens=n)

        runs.append({"max_new_tokens": n, **_time_decode(call, args.repeats)})
    if args.profile:
        with jax.profiler.trace(str(Path(args.profile) / f"{mode}_ctx{context}_b{batch}")):
            common.block(call())
    d_iter = runs[1]["iterations"] - runs[0]["iterations"]
    d_ms = runs[1]["time"]["median_ms"] - runs[0]["time"]["median_ms"]
    per_iter = d_ms / d_iter if d_iter > 0 else None
    prefill = (runs[0]["time"]["median_ms"] - per_iter * runs[0]["iterations"]
               if per_iter is not None else None)
    return {"context": context, "batch": batch, "mode": mode, "ms_per_iteration": per_iter,
            "prefill_and_overhead_ms": prefill, "runs": runs}


def main(argv=None) -> dict:
    args, shape = parse_args(argv)
    tcfg = common.target_config(shape)
    dcfg = drafter_lib.DrafterConfig.for_target(
        tcfg, num_layers=args.drafter_layers, block_size=args.block_size,
        mask_token_id=shape["mask_token_id"])
    device = jax.devices()[0]
    bandwidth = common.measure_bandwidth(args.bandwidth_bytes)
    target = common.random_target(tcfg, seed=args.seed)
    dparams = common.random_drafter(dcfg, seed=args.seed + 1, dtype=jnp.bfloat16)
    drafter = decode_lib.dflash_drafter(dparams, dcfg, tcfg)
    target_bytes, drafter_bytes = common.tree_bytes(target), common.tree_bytes(dparams)

    rows = []
    for context in args.contexts:
        for batch in args.batches:
            roof = roofline(tcfg, dcfg, target_bytes, drafter_bytes, batch, context,
                            bandwidth["bytes_per_s"])
            for mode in args.modes:
                try:
                    r = bench_one(args, tcfg, target, drafter, context, batch, mode)
                except Exception as err:  # noqa: BLE001 - only allocation failures recorded
                    if not common.is_out_of_memory(err):
                        raise
                    rows.append({"context": context, "batch": batch, "mode": mode,
                                 "error": str(err).splitlines()[0][:500]})
                    continue
                r["floor_ms"] = roof[f"{mode}_floor_ms"]
                r["ratio_to_floor"] = (r["ms_per_iteration"] / r["floor_ms"]
                                       if r["ms_per_iteration"] is not None else None)
                r["ms_per_token_at_tau"] = (r["ms_per_iteration"] / r["runs"][1]["tau"]
                                            if r["ms_per_iteration"] is not None else None)
                r["roofline"] = roof
                rows.append(r)

    out = {
        "benchmark": "decode",
        "device": common.device_info(device),
        "config": {"shape": args.shape, "contexts": args.contexts, "batches": args.batches,
                   "modes": args.modes, "new_tokens": args.new_tokens, "repeats": args.repeats,
                   "drafter_layers": args.drafter_layers, "block_size": args.block_size,
                   "dtype": "bfloat16", "temperature": 0.0},
        "bandwidth": bandwidth,
        "peak_bytes_in_use": common.peak_memory_bytes(device),
        "results": rows,
    }
    if args.output:
        common.write_json(args.output, out)
    if args.markdown:
        print(markdown(out))
    return out


def markdown(out: dict) -> str:
    rows = [[r["context"], r["batch"], r["mode"], r["ms_per_iteration"], r["floor_ms"],
             r["ratio_to_floor"], r["runs"][1]["tau"], r["prefill_and_overhead_ms"]]
            if "error" not in r else [r["context"], r["batch"], r["mode"], "FAILED: "
                                      + r["error"][:80], None, None, None, None]
            for r in out["results"]]
    table = common.markdown_table(
        ["context", "batch", "mode", "ms / iteration", "weight+KV read ms", "ratio",
         "tau (random drafter)", "prefill+overhead ms"], rows)
    bw, d, c = out["bandwidth"], out["device"], out["config"]
    return "\n".join([
        f"Decode, shape {c['shape']} ({c['drafter_layers']}-layer drafter, block "
        f"{c['block_size']}, max_new_tokens {c['new_tokens']}) on {d['device_kind']} "
        f"({d['date']}, jax {d['jax_version']})", "",
        f"Measured bandwidth: {bw['bytes_per_s'] / 1e12:.3f} TB/s (x + 1 over "
        f"{bw['array_bytes'] / 1e9:.3f} GB, read + write)", "", table])


if __name__ == "__main__":
    main()
