"""The DFlash / D-PACE objectives from final hidden states, without full logits in memory.

At real vocabularies the logits dominate memory: 8192 draft positions x 151936 vocab is 5 GB in
fp32. Here the ``R = B*N*K`` rows of ``hidden [B, N, K, D]`` are processed ``chunk_size`` rows at
a time (padded to a whole number of chunks); each chunk computes its logits ``[chunk, V]`` against
the LM-head matrix ``head [D, V]`` (``hidden`` is cast to head's dtype, accumulation in fp32 as in
``dpace_jax.targets.model.lm_head``) and keeps only the per-row cross-entropy and
argmax-correctness. The chunk body is rematerialized (``jax.checkpoint``), so the backward pass
recomputes one chunk's logits at a time as well. The D-PACE weights need q for every position of a
block, so the per-row statistics come first and the weights (which carry no gradient) after: the
gradient flows only through ce, exactly as on the logits path of ``dpace_jax.loss``, whose formulas
apply here.
"""

from __future__ import annotations

import math
import operator

import jax
import jax.numpy as jnp

from dpace_jax.loss import (
    DEFAULT_ALPHA,
    check_alpha,
    check_gamma,
    check_name,
    check_targets_mask,
    check_variant,
    loss_from_stats,
    token_stats,
)

DEFAULT_CHUNK_SIZE = 2048  # draft positions per LM-head chunk (the run config's default)


def _check_hidden(hidden, head, targets, mask, chunk_size) -> None:
    if hidden.ndim != 4:
        raise ValueError(f"hidden must have shape [B, N, K, D], got {tuple(hidden.shape)}")
    if head.ndim != 2 or head.shape[0] != hidden.shape[-1]:
        raise ValueError(f"head must have shape [D, V] with D = {hidden.shape[-1]} (hidden's last "
                         f"axis), got {tuple(head.shape)}")
    check_targets_mask(targets, mask, hidden.shape[:-1], "hidden")
    try:
        ok = not isinstance(chunk_size, bool) and operator.index(chunk_size) >= 1
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def token_stats_from_hidden(hidden, head, targets, mask, *, chunk_size=DEFAULT_CHUNK_SIZE,
                            transform=None, top_k: int = 0):
    """Per-row fp32 ce and correctness ``[...]`` from hidden ``[..., D]`` and head ``[D, V]``,
    ``chunk_size`` rows of logits at a time (forward and backward). ``transform(logits)`` (fp32)
    maps the head's logits first (DFlash 2's multiplier and softcap). ``top_k`` > 0 also returns
    each row's top_k logits ``[..., top_k]`` (descending, carrying gradients) and their token ids,
    taken from the same chunk of logits: (ce, correct, top_scores, top_ids)."""
    lead = tuple(hidden.shape[:-1])
    d = hidden.shape[-1]
    rows = math.prod(lead)
    chunk = max(1, min(operator.index(chunk_size), rows))
    n = -(-rows // chunk)
    pad = n * chunk - rows
    h = jnp.pad(hidden.reshape(rows, d), ((0, pad), (0, 0))).reshape(n, chunk, d)
    t = jnp.pad(targets.reshape(rows), (0, pad)).reshape(n, chunk)
    m = jnp.pad((mask != 0).reshape(rows), (0, pad)).reshape(n, chunk)

    @jax.checkpoint
    def one_chunk(hc, tc, mc):
        logits = jnp.einsum("rd,dv->rv", hc.astype(head.dtype), head,
                            preferred_element_type=jnp.float32)
        if transform is not None:
            logits = transform(logits)
        stats = token_stats(logits, tc, mc)
        if not top_k:
            return stats
        scores, ids = jax.lax.top_k(logits, top_k)
        return (*stats, scores, ids.astype(jnp.int32))

    out = jax.lax.map(lambda args: one_chunk(*args), (h, t, m))

    def unpad(x):
        return x.reshape(n * chunk, *x.shape[2:])[:rows].reshape(*lead, *x.shape[2:])

    return tuple(unpad(x) for x in out)


def dpace_loss_from_hidden(hidden, head, targets, mask, *, alpha=DEFAULT_ALPHA,
                           variant: str = "dpace", chunk_size: int = DEFAULT_CHUNK_SIZE):
    """``dpace_jax.loss.dpace_loss`` of ``hidden @ head`` -> (loss, aux), computed in chunks."""
    check_variant(variant)
    return objective_from_hidden(variant, hidden, head, targets, mask, alpha=alpha,
                                 chunk_size=chunk_size)


def dflash_loss_from_hidden(hidden, head, targets, mask, *, gamma=None,
                            chunk_size: int = DEFAULT_CHUNK_SIZE):
    """``dpace_jax.loss.dflash_loss`` of ``hidden @ head`` -> (loss, aux), computed in chunks."""
    return objective_from_hidden("dflash", hidden, head, targets, mask, gamma=gamma,
                                 chunk_size=chunk_size)


def objective_from_hidden(name: str, hidden, head, targets, mask, *, alpha=DEFAULT_ALPHA,
                          gamma=None, chunk_size: int = DEFAULT_CHUNK_SIZE):
    """Dispatch by name (one of ``dpace_jax.loss.LOSS_NAMES``) -> (loss, aux)."""
    check_name(name)
    if name == "dflash":
        check_gamma(gamma)
    else:
        check_alpha(alpha)
    _check_hidden(hidden, head, targets, mask, chunk_size)
    ce, correct = token_stats_from_hidden(hidden, head, targets, mask, chunk_size=chunk_size)
    return loss_from_stats(name, ce, correct, mask, alpha=alpha, gamma=gamma)
