"""MXFP4 checkpoints (gpt-oss's published format, `quantization_config.quant_method == "mxfp4"`):
the experts' `gate_up_proj` and `down_proj` are stored as `{name}_blocks` (uint8 [P, R, C/32, 16],
two FP4 values a byte, low nibble first) and `{name}_scales` (uint8 [P, R, C/32], one e8m0
exponent per 32 values). Dequantized: value = FP4[nibble] * 2^(scale - 127), FP4 e2m1 =
(0, 0.5, 1, 1.5, 2, 3, 4, 6) and their negatives (codes 8..15); the [P, R, C] result is
transposed to HF's unquantized [P, C, R] layout. Loading dequantizes each tensor on the host
(exactly: every value is representable in bf16) and then casts it to the load dtype.
"""

from __future__ import annotations

import numpy as np

FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)
QUANTIZED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")  # under a layer's prefix
BLOCKS, SCALES = "_blocks", "_scales"


def check_config(hf: dict, arch: str | None, source: str) -> bool:
    """Whether the config declares MXFP4 weights; ValueError for any other quantization (or
    MXFP4 on an architecture other than gpt_oss)."""
    quant = hf.get("quantization_config")
    if quant is None:
        return False
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method != "mxfp4" or arch != "gpt_oss":
        raise ValueError(f"{source}: quantization_config.quant_method={method!r} is not supported "
                         f"for {arch!r} (only 'mxfp4' for gpt_oss; or an unquantized checkpoint)")
    return True


def dequantize(blocks: np.ndarray, scales: np.ndarray, name: str = "tensor") -> np.ndarray:
    """blocks uint8 [P, R, G, 16] and scales uint8 [P, R, G] -> float32 [P, G * 32, R]."""
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
        raise ValueError(f"{name}: MXFP4 blocks and scales must be uint8, got {blocks.dtype} "
                         f"and {scales.dtype}")
    if blocks.ndim != 4 or blocks.shape[-1] != 16 or scales.shape != blocks.shape[:-1]:
        raise ValueError(f"{name}: MXFP4 blocks {list(blocks.shape)} and scales "
                         f"{list(scales.shape)} must be [P, R, G, 16] and [P, R, G]")
    values = np.stack([FP4_VALUES[blocks & 0x0F], FP4_VALUES[blocks >> 4]], axis=-1)
    values = np.ldexp(values.reshape(*blocks.shape[:-1], 32),
                      scales.astype(np.int32)[..., None] - 127)
    return np.ascontiguousarray(values.reshape(*blocks.shape[:2], -1).swapaxes(1, 2))


def fold(tensors: dict[str, tuple], source: str) -> tuple[dict, dict[str, tuple[str, str]]]:
    """Replace each `{key}_blocks` / `{key}_scales` pair of an expert tensor in a checkpoint index
    {key: (file, shape)} by `{key}` with its dequantized shape; returns (the new index,
    {key: (blocks key, scales key)}). A `_blocks` tensor without its `_scales` (or the reverse)
    is a ValueError naming the missing tensor."""
    out, packed = dict(tensors), {}
    for key in tensors:
        for suffix, other in ((BLOCKS, SCALES), (SCALES, BLOCKS)):
            base = key[: -len(suffix)]
            if key.endswith(suffix) and base.endswith(QUANTIZED) and base + other not in tensors:
                raise ValueError(f"{source}: MXFP4 tensor {key} has no {base + other}")
        if key.endswith(BLOCKS) and key[: -len(BLOCKS)].endswith(QUANTIZED):
            base = key[: -len(BLOCKS)]
            file, shape = tensors[key]
            if len(shape) != 4 or shape[-1] != 16 or tensors[base + SCALES][1] != shape[:-1]:
                raise ValueError(f"{source}: MXFP4 tensors {key} {list(shape)} and {base + SCALES}"
                                 f" {list(tensors[base + SCALES][1])} must be [P, R, G, 16] and "
                                 "[P, R, G]")
            out[base] = (file, (shape[0], shape[2] * 32, shape[1]))
            del out[key], out[base + SCALES]
            packed[base] = (key, base + SCALES)
    return out, packed
