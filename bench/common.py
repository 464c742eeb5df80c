"""Shared helpers of the benchmark scripts: device facts, timing, memory, roofline probes, output.

Every timing blocks on the result (`jax.block_until_ready`), so a figure is the wall time of the
device work plus one dispatch. Medians over repeats are reported; the raw times are kept in the
JSON too.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

GiB = 1024**3

# Dense bf16 tensor-core peak from the vendor data sheets (TFLOP/s, no sparsity), by a substring
# of `device.device_kind`. The first match wins, so the more specific names come first.
SPEC_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("A100", 312.0),
)


def device_info(device=None) -> dict[str, Any]:
    """Where and when the figures were taken."""
    device = device or jax.devices()[0]
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "num_devices": jax.device_count(),
        "jax_version": jax.__version__,
        "host": platform.node(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def spec_peak_tflops(device=None) -> float | None:
    """The data-sheet bf16 peak of this device, None when unknown (e.g. CPU)."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return None
    for name, tflops in SPEC_BF16_TFLOPS:
        if name.lower() in device.device_kind.lower():
            return tflops
    return None


def block(x):
    """Wait for every array in the pytree x; returns x."""
    return jax.block_until_ready(x)


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of `repeats` calls of fn() (each blocked on), after `warmup` untimed calls."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        block(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - t0)
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def summarize(seconds: Sequence[float]) -> dict[str, float]:
    """Median / min / max in milliseconds and the raw times."""
    ms = [1e3 * s for s in seconds]
    return {"median_ms": median(ms), "min_ms": min(ms), "max_ms": max(ms), "n": len(ms),
            "all_ms": [round(m, 4) for m in ms]}


def peak_memory_bytes(device=None) -> int | None:
    """The process's peak device memory so far (`memory_stats()["peak_bytes_in_use"]`), None
    where the backend keeps no statistics (CPU)."""
    device = device or jax.devices()[0]
    stats = device.memory_stats()
    if not stats:
        return None
    peak = stats.get("peak_bytes_in_use")
    return int(peak) if peak is not None else None


def compiled_memory(compiled) -> dict[str, int] | None:
    """XLA's static buffer assignment of a compiled function (arguments, outputs, temporaries,
    aliased = donated bytes), None when the backend does not report it."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        return None
    if m is None:
        return None
    out = {}
    for name in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                 "temp_size_in_bytes", "generated_code_size_in_bytes"):
        value = getattr(m, name, None)
        if value is not None:
            out[name.removesuffix("_in_bytes")] = int(value)
    if {"argument_size", "output_size", "alias_size", "temp_size"} <= out.keys():
        # Live at once during the call: inputs + outputs not aliased to inputs + temporaries.
        out["estimated_peak"] = (out["argument_size"] + out["output_size"] - out["alias_size"]
                                 + out["temp_size"])
    return out


def is_out_of_memory(err: BaseException) -> bool:
    """An XLA allocation failure (reported as a result row instead of ending the run)."""
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def tree_bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def measure_bandwidth(nbytes: int, repeats: int = 10) -> dict[str, float]:
    """Device memory bandwidth from an elementwise pass over a float32 array of ~nbytes: the
    jitted `x + 1` reads nbytes and writes nbytes; bandwidth = 2 * nbytes / median time."""
    n = max(1024, int(nbytes) // 4)
    x = block(jnp.zeros((n,), jnp.float32))
    f = jax.jit(lambda a: a + jnp.ones((), a.dtype))
    times = time_calls(lambda: f(x), repeats, warmup=2)
    t = median(times)
    moved = 2 * n * 4
    return {"array_bytes": n * 4, "bytes_moved": moved, "median_ms": 1e3 * t,
            "bytes_per_s": moved / t}


def measure_matmul(size: int, repeats: int = 10, dtype=jnp.bfloat16) -> dict[str, float]:
    """Achievable matmul throughput: a jitted [size, size] @ [size, size] in dtype (fp32
    accumulation), 2 * size^3 FLOPs."""
    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    a = block(jax.random.normal(key_a, (size, size), jnp.float32).astype(dtype))
    b = block(jax.random.normal(key_b, (size, size), jnp.float32).astype(dtype))
    f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32).astype(dtype))
    times = time_calls(lambda: f(a, b), repeats, warmup=2)
    t = median(times)
    flops = 2.0 * size**3
    return {"size": size, "flops": flops, "median_ms": 1e3 * t, "flops_per_s": flops / t}


def _finite_or_none(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def to_jsonable(obj):
    """Dicts/lists of numbers, strings, numpy and jax scalars -> plain JSON types."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (np.generic, jax.Array)):
        obj = np.asarray(obj).item()
    if isinstance(obj, float):
        return _finite_or_none(obj)
    return obj


def write_json(path: str | Path, obj) -> None:
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise FileNotFoundError(f"--output: directory {path.parent} does not exist")
    path.write_text(json.dumps(to_jsonable(obj), indent=2) + "\n")


def fmt(x, digits: int = 2) -> str:
    """A table cell: numbers rounded, None as a dash."""
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def parse_int_list(text: str, flag: str) -> list[int]:
    """"512,2048" -> [512, 2048]; ValueError naming the flag otherwise."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{flag}: expected positive integers, got {text!r}")
    return values


# Benchmark shapes. `qwen3-4b` is docs/design.md §2 (the paper recipe's target, 5-layer drafter,
# seq 3072, 512 anchors, block 16); `tiny` runs in seconds on a CPU.
SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-4b": {
        "target": dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                       num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
                       rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
                       max_position_embeddings=40960, arch="qwen3"),
        "mask_token_id": 151669,
        "drafter_layers": 5, "block_size": 16,
        "seq_len": 3072, "num_anchors": 512, "batch": 1,
        "contexts": (512, 2048), "batches": (1, 8), "new_tokens": (16, 80),
        "bandwidth_bytes": 2 * GiB, "matmul_size": 8192,
    },
    "tiny": {
        "target": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=6,
                       num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                       rms_norm_eps=1e-6, tie_word_embeddings=True,
                       max_position_embeddings=4096, arch="qwen3"),
        "mask_token_id": 255,
        "drafter_layers": 2, "block_size": 8,
        "seq_len": 128, "num_anchors": 16, "batch": 1,
        "contexts": (32, 64), "batches": (1, 2), "new_tokens": (4, 12),
        "bandwidth_bytes": 16 * 1024**2, "matmul_size": 256,
    },
}


# Qwen3.5-4B (the published config: 32 layers, three gated-DeltaNet layers to one gated attention
# layer, partial RoPE 0.25) and its tiny CPU form with the same layer pattern and head ratios.
_QWEN3_5 = dict(arch="qwen3_5", tie_word_embeddings=True, rms_norm_eps=1e-6,
                partial_rotary_factor=0.25, rope_theta=1e7)


def _qwen3_5_layers(n: int) -> tuple[str, ...]:
    return (("linear_attention",) * 3 + ("full_attention",)) * (n // 4)


SHAPES["qwen3.5-4b"] = {
    **SHAPES["qwen3-4b"],
    "target": dict(**_QWEN3_5, vocab_size=248320, hidden_size=2560, intermediate_size=9216,
                   num_layers=32, num_heads=16, num_kv_heads=4, head_dim=256,
                   max_position_embeddings=262144, layer_types=_qwen3_5_layers(32),
                   linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
                   linear_value_head_dim=128, linear_conv_kernel_dim=4),
    "mask_token_id": 248319,  # the benchmark's drafter is random: any id in the vocabulary
}
SHAPES["qwen3.5-tiny"] = {
    **SHAPES["tiny"],
    "target": dict(**_QWEN3_5, vocab_size=256, hidden_size=64, intermediate_size=128,
                   num_layers=8, num_heads=4, num_kv_heads=1, head_dim=32,
                   max_position_embeddings=4096, layer_types=_qwen3_5_layers(8),
                   linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                   linear_value_head_dim=16, linear_conv_kernel_dim=4),
}

def shape_preset(name: str) -> dict[str, Any]:
    if name not in SHAPES:
        raise ValueError(f"--shape={name!r}; expected one of {sorted(SHAPES)}")
    return SHAPES[name]


def target_config(shape: dict[str, Any]):
    from dpace_jax.targets.model import ModelConfig

    return ModelConfig.make(**shape["target"])


def random_target(cfg, seed: int = 0, dtype=jnp.bfloat16):
    """Random target weights (normal(0, 0.02)), built on the device in one jitted call."""
    from dpace_jax.targets.model import init_params

    init = jax.jit(init_params, static_argnames=("cfg", "dtype", "scale"))
    return block(init(cfg=cfg, key=jax.random.PRNGKey(seed), dtype=dtype, scale=0.02))


def random_drafter(dcfg, seed: int = 1, dtype=jnp.float32):
    from dpace_jax.drafters.dflash import init_drafter_params

    init = jax.jit(init_drafter_params, static_argnames=("cfg", "dtype", "scale"))
    return block(init(cfg=dcfg, key=jax.random.PRNGKey(seed), dtype=dtype, scale=0.02))
