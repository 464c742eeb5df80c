"""The gated delta rule (Qwen3.5's linear-attention token mixer) and its short causal convolution,
as pure functions over arrays. docs/design.md §10 states the formulas and derives the chunked form.

Per head, with a state S [K, V] (K: key width, V: value width), token t updates and reads
    S <- exp(g_t) S
    u_t = beta_t (v_t - S^T k_t)            the delta: what S does not yet predict, scaled
    S <- S + k_t u_t^T
    o_t = S^T q_t
with log-decay g_t <= 0 and beta_t in (0, 1). A token with g_t = 0 and beta_t = 0 leaves S
unchanged: that is how padding and not-yet-accepted tokens are kept out of a committed state.

Two forms compute the same thing: `recurrent` (a scan over tokens: the definition, and decoding)
and `chunked` (training and prefill: a scan over chunks of C tokens, each chunk solved with one
unit-lower-triangular system instead of C sequential steps). Shapes: q, k [B, T, H, K] (already
l2-normalized, q scaled by K**-0.5, key heads repeated to the H value heads), v [B, T, H, V],
g, beta [B, T, H], state [B, H, K, V]; everything in fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def l2norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / sqrt(sum(x^2) + eps) over the last axis, in fp32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def recurrent(q, k, v, g, beta, state):
    """Token by token -> (outputs [B, T, H, V], final state [B, H, K, V])."""

    def step(s, inputs):
        q_t, k_t, v_t, g_t, b_t = inputs  # [B, H, K], [B, H, K], [B, H, V], [B, H], [B, H]
        s = s * jnp.exp(g_t)[..., None, None]
        u = b_t[..., None] * (v_t - jnp.einsum("bhkv,bhk->bhv", s, k_t))
        s = s + k_t[..., :, None] * u[..., None, :]
        return s, jnp.einsum("bhkv,bhk->bhv", s, q_t)

    seq = [jnp.moveaxis(a.astype(jnp.float32), 1, 0) for a in (q, k, v, g, beta)]
    state, out = jax.lax.scan(step, state.astype(jnp.float32), seq)
    return jnp.moveaxis(out, 0, 1), state


def _decay(log_decay: jax.Array) -> jax.Array:
    """exp(log_decay) for log_decay <= 0, exactly 0 below e^-60 (~1e-26, nothing next to the
    O(1) terms it scales: strong decays summed over a chunk would otherwise give denormal floats,
    which some CPUs process a hundred times slower). The argument is clipped to [-60, 0] first,
    so that the masked-out entries above a chunk's diagonal (positive) never overflow: an inf
    there would turn the zero gradient of the mask into a NaN."""
    return jnp.where(log_decay > -60.0, jnp.exp(jnp.clip(log_decay, -60.0, 0.0)), 0.0)


def chunk_size(length: int, largest: int = 64) -> int:
    """The chunk length used for a sequence of `length` tokens: `largest`, or the whole sequence
    when shorter (a verify block is then one chunk, without padding)."""
    return max(1, min(largest, length))


def _forward_substitution(a: jax.Array, rhs: jax.Array) -> jax.Array:
    """x with (I + a) x = rhs, a [..., C, C] strictly lower triangular, rhs [..., C, D]: row by
    row, x_i = rhs_i - a_i . x (C steps, each over every leading index at once)."""

    def row(i, x):
        xi = rhs[..., i, :] - jnp.einsum("...j,...jd->...d", a[..., i, :], x)
        return x.at[..., i, :].set(xi)

    return jax.lax.fori_loop(0, a.shape[-1], row, jnp.zeros_like(rhs))


def _triangular_solve(a: jax.Array, rhs: jax.Array) -> jax.Array:
    """The same with XLA's triangular solve (one kernel on GPU / TPU)."""
    eye = jnp.eye(a.shape[-1], dtype=a.dtype)
    return jax.lax.linalg.triangular_solve(a + eye, rhs, left_side=True, lower=True,
                                           unit_diagonal=True)


def _solve(a: jax.Array, rhs: jax.Array) -> jax.Array:
    """Forward substitution on CPU, where XLA's triangular solve is a LAPACK call that ran 50x
    slower here (and stalled a training run); XLA's solve on GPU / TPU."""
    return jax.lax.platform_dependent(a, rhs, cpu=_forward_substitution,
                                      default=_triangular_solve)


@jax.custom_vjp
def unit_lower_solve(a: jax.Array, rhs: jax.Array) -> jax.Array:
    """(I + a)^-1 rhs for a strictly lower triangular a [..., C, C], with its own backward pass:
    the transposed system, solved the same way."""
    return _solve(a, rhs)


def _solve_fwd(a, rhs):
    x = _solve(a, rhs)
    return x, (a, x)


def _solve_bwd(residuals, dx):
    a, x = residuals
    # (I + a)^T drhs = dx is upper triangular: reversing rows and columns makes it lower.
    flipped = jnp.flip(jnp.swapaxes(a, -1, -2), (-2, -1))
    drhs = jnp.flip(_solve(flipped, jnp.flip(dx, -2)), -2)
    strict = jnp.tril(jnp.ones(a.shape[-2:], jnp.bool_), -1)
    return jnp.where(strict, -jnp.einsum("...id,...jd->...ij", drhs, x), 0.0), drhs


unit_lower_solve.defvjp(_solve_fwd, _solve_bwd)


def chunked(q, k, v, g, beta, state, chunk: int = 64):
    """The same as `recurrent`, chunk by chunk -> (outputs [B, T, H, V], final state).

    Inside a chunk, with c_t the cumulative log-decay from the chunk's start and S0 its initial
    state, the deltas U [C, V] solve (I + A) U = beta V - diag(beta e^c) K S0 where A[t, s] =
    beta_t e^(c_t - c_s) k_t.k_s for s < t; then o_t = e^(c_t) S0^T q_t + sum_{s<=t}
    e^(c_t - c_s) (q_t.k_s) u_s and the chunk ends with e^(c_C) S0 + sum_s e^(c_C - c_s) k_s u_s^T.
    Everything but the terms in S0 is computed for all chunks at once (the triangular solves
    too: U = U0 - W S0 with U0, W independent of the state); the scan over chunks is matmuls.
    T is padded to a multiple of the chunk with g = beta = 0 (no effect on the state)."""
    b, t, h, dk = k.shape
    dv = v.shape[-1]
    n = -(-t // chunk)
    pad = n * chunk - t

    def split(a):  # [B, T, H, ...] -> [N, B, H, C, ...] fp32
        a = jnp.pad(a.astype(jnp.float32), [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        a = a.reshape(b, n, chunk, h, *a.shape[3:])
        return jnp.moveaxis(jnp.moveaxis(a, 1, 0), 2, 3)

    qs, ks, vs, gs, bs = (split(a) for a in (q, k, v, g, beta))
    causal = jnp.tril(jnp.ones((chunk, chunk), jnp.bool_))
    c = jnp.cumsum(gs, axis=-1)  # [N, B, H, C]
    decay = jnp.where(causal, _decay(c[..., :, None] - c[..., None, :]), 0.0)  # e^(c_t - c_s)
    a = jnp.tril(bs[..., :, None] * decay * jnp.einsum("...tk,...sk->...ts", ks, ks), -1)
    solved = unit_lower_solve(a, jnp.concatenate(
        [bs[..., None] * vs, (bs * _decay(c))[..., None] * ks], axis=-1))
    per_chunk = (solved[..., :dv], solved[..., dv:],  # U0 [.., C, V], W [.., C, K]
                 jnp.einsum("...tk,...sk->...ts", qs, ks) * decay,  # (q_t.k_s) e^(c_t - c_s)
                 _decay(c)[..., None] * qs,  # queries reading S0
                 ks * _decay(c[..., -1:] - c)[..., None],  # keys written to the chunk's end
                 _decay(c[..., -1]))  # the chunk's decay of S0

    def one_chunk(s0, inputs):
        u0, w, qk, q_read, k_write, end = inputs
        u = u0 - jnp.einsum("bhtk,bhkv->bhtv", w, s0)
        out = jnp.einsum("bhtk,bhkv->bhtv", q_read, s0) + jnp.einsum("bhts,bhsv->bhtv", qk, u)
        return end[..., None, None] * s0 + jnp.einsum("bhsk,bhsv->bhkv", k_write, u), out

    if n == 1:  # one chunk (a verify block, a short prompt): no loop to compile
        state, out = one_chunk(state.astype(jnp.float32), jax.tree.map(lambda x: x[0],
                                                                       per_chunk))
        out = out[None]
    else:
        state, out = jax.lax.scan(one_chunk, state.astype(jnp.float32), per_chunk)
    out = jnp.moveaxis(jnp.moveaxis(out, 0, 1), 3, 2)  # [B, N, C, H, V]
    return out.reshape(b, n * chunk, h, -1)[:, :t], state


def causal_conv(rows: jax.Array, weight: jax.Array, history: jax.Array) -> jax.Array:
    """Depthwise causal convolution then SiLU: rows [B, T, C] after `history` [B, W-1, C] (the
    W-1 rows before them), weight [C, W] -> [B, T, C]; out_t = silu(sum_j w[:, j] x_(t-W+1+j))."""
    width = weight.shape[-1]
    x = jnp.concatenate([history.astype(rows.dtype), rows], axis=1)
    t = rows.shape[1]
    out = sum(x[:, j:j + t] * weight[:, j] for j in range(width))
    return jax.nn.silu(out.astype(jnp.float32)).astype(rows.dtype)


def conv_history(history: jax.Array, rows: jax.Array, keep: jax.Array) -> jax.Array:
    """The W-1 rows before position keep[b] of concat(history, rows): the convolution's history
    once the first keep[b] of the T rows are committed. history [B, W-1, C], rows [B, T, C]."""
    x = jnp.concatenate([history.astype(rows.dtype), rows], axis=1)

    def one(xb, kb):
        return jax.lax.dynamic_slice_in_dim(xb, kb, history.shape[1], axis=0)

    return jax.vmap(one)(x, keep.astype(jnp.int32))
