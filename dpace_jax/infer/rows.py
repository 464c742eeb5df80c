"""Per-sequence indexing of batched buffers, shared by the decoders (dpace_jax.infer.decode and
the SPD pipeline): each sequence b reads or writes its own row(s) of a [B, S, ...] buffer."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def is_stop(tokens: jax.Array, stop_ids: jax.Array) -> jax.Array:
    """Whether each token is one of stop_ids [n] (tokens of any shape)."""
    return jnp.any(tokens[..., None] == stop_ids, axis=-1)


def gather_rows(buf: jax.Array, idx: jax.Array) -> jax.Array:
    """buf [B, S, ...], idx [B] -> buf[b, idx[b]]."""
    return jax.vmap(lambda b, i: b[i])(buf, idx)


def set_rows(buf: jax.Array, idx: jax.Array, value: jax.Array, where: jax.Array) -> jax.Array:
    """buf with buf[b, idx[b]] = value[b] where where[b]."""
    old = gather_rows(buf, idx)
    new = jnp.where(where.reshape(where.shape + (1,) * (old.ndim - 1)), value, old)
    return jax.vmap(lambda b, i, v: b.at[i].set(v))(buf, idx, new.astype(buf.dtype))


def write_rows(buf: jax.Array, rows: jax.Array, start: jax.Array, count: jax.Array):
    """buf [B, M], rows [B, K]: buf[b, start[b] + j] = rows[b, j] for j < count[b]."""

    def one(b, r, s, n):
        old = jax.lax.dynamic_slice_in_dim(b, s, r.shape[0])
        new = jnp.where(jnp.arange(r.shape[0]) < n, r, old)
        return jax.lax.dynamic_update_slice_in_dim(b, new, s, axis=0)

    return jax.vmap(one)(buf, rows, start, count)
