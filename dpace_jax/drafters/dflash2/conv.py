"""DFlash 2's grouped dynamic depthwise causal convolution, as pure functions over a block.

Every DFlash 2 drafter layer wraps its attention and its MLP in one such convolution each
(`attention_conv`, `mlp_conv`); with p the convolution's parameters::

    y, d = prepare(input_layernorm(h), p);  h = h + finish(self_attn(y, ctx), d, p)
    y, d = prepare(post_attention_layernorm(h), p');  h = h + finish(mlp(y), d, p')

Shape letters (docs/design.md §1): D hidden, K block size, W taps (`conv_kernel_size`), G groups
= D / gs with gs = `conv_group_size` (channel c = g * gs + j belongs to group g). Any leading dims:
[B, N, K, D] in training (all blocks at once), [B, 1, K, D] when decoding one block.

    prepare(x):  c = x @ kernel_projection -> [..., K, 2, W, G];  return conv(x, base[0], c[.., 0]),
                 c[.., 1]    (the second half is the output side's dynamic kernel, kept for finish)
    finish(y, d) = conv(y, base[1], d)
    conv(x, b, d)[t, g*gs + j] = sum_{s < W} (b[s, g*gs + j] + d[t, s, g]) * x[t - s, g*gs + j]

Tap s reads block position t - s (causal), and reads zero when t - s < 0: the convolution runs
along the block axis K only, so block position 0 (the anchor token) sees only itself, and no tap
ever reaches another block or the context (the context never passes through it). Being causal, a
block cut short (the last verify step of a generation) gives the same values on its positions.

Parameters, ours vs the HF checkpoint (`layers.{i}.{attention,mlp}_conv.*`, verified against the
installed z-lab `dflash` 0.1.0 `GroupedDynamicCausalConv` in tests/test_dflash2_ops.py):
  base_kernel        [2, W, D]        = HF `base_kernel` [2, W, D] as is (side, tap, channel).
  kernel_projection  [D, 2 * W * G]   = HF `kernel_projection.weight` [2 * W * G, D] transposed.
The flattened output index is o = side * (W * G) + tap * G + g (side-major, group fastest), the
C-order reshape of [2, W, G] in the reference.

Precision, as the reference computes it: everything in x's dtype. The projection is a matmul
accumulated in fp32 and rounded once to x's dtype (like torch's Linear); per tap, the base term
`b[s] * x[t - s]` is added to the running sum, then the dynamic term is added with one rounding
(torch's `addcmul`, which evaluates `out + d * x` in fp32 for bf16). In fp32 this is the formula;
in bf16 XLA may keep extra precision between ops, so bit parity with torch is not promised.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class ConvParams(NamedTuple):
    """One grouped dynamic convolution (a pytree)."""

    base_kernel: jax.Array  # [2, W, D]: side 0 = prepare (input), side 1 = finish (output)
    kernel_projection: jax.Array  # [D, 2 * W * G]


def shape_of(params: ConvParams) -> tuple[int, int, int]:
    """(W taps, D hidden, G groups) of `params`, checking that the two arrays agree."""
    base, proj = params.base_kernel, params.kernel_projection
    if base.ndim != 3 or base.shape[0] != 2:
        raise ValueError(f"base_kernel must have shape [2, W, D], got {tuple(base.shape)}")
    _, taps, dim = base.shape
    if proj.ndim != 2 or proj.shape[0] != dim or proj.shape[1] % (2 * taps):
        raise ValueError(f"kernel_projection must have shape [D, 2 * W * G] with D = {dim}, "
                         f"W = {taps}; got {tuple(proj.shape)}")
    groups = proj.shape[1] // (2 * taps)
    if dim % groups:
        raise ValueError(f"G = {groups} groups do not divide D = {dim}")
    return taps, dim, groups


def init(dim: int, taps: int, group_size: int, dtype=jnp.float32) -> ConvParams:
    """The identity convolution (SpecForge's and speculators' init): base tap 0 = 1, the other taps
    0, projection 0, so that prepare(x) = (x, 0) and finish(y, 0) = y exactly."""
    if taps < 1 or group_size < 1 or dim % group_size:
        raise ValueError(f"need taps >= 1 and group_size dividing D; got taps={taps}, "
                         f"group_size={group_size}, D={dim}")
    base = jnp.zeros((2, taps, dim), dtype).at[:, 0].set(1)
    proj = jnp.zeros((dim, 2 * taps * (dim // group_size)), dtype)
    return ConvParams(base, proj)


def from_hf(base_kernel, kernel_projection_weight) -> ConvParams:
    """Our layout from the HF tensors (base [2, W, D], projection weight [2 * W * G, D])."""
    return ConvParams(jnp.asarray(base_kernel), jnp.asarray(kernel_projection_weight).T)


def to_hf(params: ConvParams) -> dict[str, jax.Array]:
    """The HF tensors, keyed by their name inside `layers.{i}.{attention,mlp}_conv.`."""
    return {"base_kernel": params.base_kernel,
            "kernel_projection.weight": params.kernel_projection.T}


def conv(x: jax.Array, base: jax.Array, d: jax.Array) -> jax.Array:
    """The causal grouped convolution of x [..., K, D] along K, with the static kernel base [W, D]
    plus the per-position dynamic kernel d [..., K, W, G] (one coefficient per group and tap).
    Returns [..., K, D] in x's dtype."""
    taps, dim = base.shape
    groups = d.shape[-1]
    if x.shape[-1] != dim or dim % groups or d.shape[-3:] != (x.shape[-2], taps, groups):
        raise ValueError(f"shapes: x {tuple(x.shape)}, base {tuple(base.shape)} [W, D], d "
                         f"{tuple(d.shape)} [..., K, W, G]")
    dt = x.dtype
    k = x.shape[-2]
    lead = x.shape[:-2]
    xg = x.reshape(*lead, k, groups, dim // groups)  # [..., K, G, gs]
    bg = base.astype(dt).reshape(taps, groups, dim // groups)
    dg = d.astype(dt)[..., None]  # [..., K, W, G, 1]
    out = None
    for s in range(min(taps, k)):  # a tap at or past K only ever reads the zeros before the block
        # x[t - s] at position t, zero for t < s: shift down the block axis, pad at its start.
        v = xg if s == 0 else jnp.pad(xg[..., : k - s, :, :],
                                      [(0, 0)] * len(lead) + [(s, 0), (0, 0), (0, 0)])
        base_term = bg[s] * v
        out = base_term if out is None else out + base_term
        dyn = dg[..., s, :, :].astype(jnp.float32) * v.astype(jnp.float32)
        out = (out.astype(jnp.float32) + dyn).astype(dt)  # one rounding, like torch.addcmul
    return out.reshape(x.shape)


def _kernels(x: jax.Array, params: ConvParams) -> jax.Array:
    """x @ kernel_projection -> [..., K, 2, W, G] in x's dtype (fp32 accumulation)."""
    taps, _, groups = shape_of(params)
    w = params.kernel_projection
    c = jnp.einsum("...d,do->...o", x.astype(w.dtype), w, preferred_element_type=jnp.float32)
    return c.astype(x.dtype).reshape(*x.shape[:-1], 2, taps, groups)


def prepare(x: jax.Array, params: ConvParams) -> tuple[jax.Array, jax.Array]:
    """The input side: x [..., K, D] -> (conv(x) [..., K, D], the output side's dynamic kernel
    d [..., K, W, G], both in x's dtype)."""
    c = _kernels(x, params)
    return conv(x, params.base_kernel[0], c[..., 0, :, :]), c[..., 1, :, :]


def finish(y: jax.Array, d: jax.Array, params: ConvParams) -> jax.Array:
    """The output side: convolve the sublayer's output y [..., K, D] with base side 1 and the
    dynamic kernel d [..., K, W, G] that prepare computed from the sublayer's input."""
    return conv(y, params.base_kernel[1], d)
