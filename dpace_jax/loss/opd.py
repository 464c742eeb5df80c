"""The Draft-OPD token-level objective (on-policy distillation of DFlash drafters, arXiv 2605.29343)
as pure JAX functions (docs/design.md §9).

Shapes: ``N`` replayed blocks, ``K`` block size, ``V`` vocabulary; every array may carry extra
leading batch axes (``[..., N, K]``). A replayed block starts at an anchor of a target-assisted
rollout and is supervised on

- the realized tokens: what the target actually emitted after the anchor, up to the next block
  boundary (block positions k = 1..K-1; ``real_mask`` marks them), and
- the rejected draft tokens: the first draft token the target rejected during the rollout, at its
  block offset j (1-based; ``rej_mask`` says whether the block has one), and optionally (a
  trailing ``J`` axis) the drafts after it, as the public Draft-OPD code supervises them.

Inputs are log-probabilities of those tokens: ``logq_*`` from the drafter (the gradient flows
through them; ``gather_logprobs`` takes them from drafter logits), ``logp_*`` from the target,
recorded during the rollout at temperature 1 (constants: stop-gradient).

Realized token (forward KL between the two-outcome distributions "this token / anything else"
of target and drafter), with ``lo = min_logprob`` (-10) and ``hi = log(1 - eps)`` (eps of the
compute dtype) so that neither probability reaches 0 or 1::

    lp = clip(log p, lo, hi),  lq = clip(log q, lo, hi),  p = exp(lp),  q = exp(lq)
    l_real = p (lp - lq) + (1 - p) (log1p(-p) - log1p(-q))

Rejected draft token at offset j (Schulman's k3 estimator of the reverse KL)::

    d = clip(log p - log q, -20, 20)
    l_rej = exp(d) - d - 1
    v = decay^max(j - 1, 0)                (decay 0.8: the first draft position weighs 1)

Both per-token losses are clipped to ``[-clamp, clamp]`` (10) before any weighting, then::

    loss = (sum m w l_real + rej_weight sum r v l_rej) / (sum m w + rej_weight sum r v)

with m = real_mask, r = rej_mask, and w = 1 (the paper's objective: a per-token mean) or, with
``dpace_alpha`` set, the D-PACE weights ``w = dpace_weights(q, m, alpha=dpace_alpha)``
(``dpace_jax.loss``; q = exp(logq_real), stop-gradient) on the realized stream; the result is a
weighted mean, equal to the unweighted one whenever all w are equal. The loss is 0 when the
denominator is 0. Weights and denominators carry no gradient, so
``d loss = (sum m w d l_real + rej_weight sum r v d l_rej) / den``; a token whose log-prob was
clipped, or whose loss was clipped, contributes no gradient.

Details taken from the public Draft-OPD code (github.com/bingyang-lei/Draft-OPD,
``verl/verl/trainer/distillation/losses.py``, run with ``forward_kl_weight=1``,
``reverse_kl_weight=0``, ``rejected_draft_use_reverse_kl=True``, decay 0.8, clamps 10 / -10):

- the log-prob floor (``min_logprob``) applies to the realized (Bernoulli) stream only; the k3
  stream has no floor, its log-ratio d is clipped to [-20, 20] instead;
- the Bernoulli term keeps q and p below 1 by clipping both log-probs at log(1 - eps);
- the [-clamp, clamp] clip acts on the per-token loss, before the decay / D-PACE weights;
- a rejected offset below 1 gets weight 1 (the exponent is floored at 0).
One difference: the public k3 is also clipped at a fixed 10 inside verl's ``kl_penalty``; here
``clamp`` alone bounds both streams (the same for the default ``clamp=10``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dpace_jax.loss import check_alpha, dpace_weights

DEFAULT_DECAY = 0.8
DEFAULT_REJ_WEIGHT = 1.0
DEFAULT_CLAMP = 10.0
DEFAULT_MIN_LOGPROB = -10.0
K3_LOG_RATIO_CLIP = 20.0  # |log p - log q| bound before exp in the k3 estimator


# --------------------------------------------------------------------------------------------
# argument checks


def _number(name: str, value, ok, requirement: str):
    """value as a float when ok(value) holds; a traced value is passed through unchecked."""
    try:
        v = float(value)
    except TypeError:  # a tracer: cannot be checked at trace time
        return value
    except ValueError as e:
        raise ValueError(f"{name} must be {requirement}, got {value!r}") from e
    if not ok(v):
        raise ValueError(f"{name} must be {requirement}, got {value!r}")
    return v


def check_opd_args(decay, rej_weight, clamp, min_logprob, dpace_alpha):
    """The static arguments of ``opd_loss``, checked (ValueError naming the argument)."""
    decay = _number("decay", decay, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]")
    rej_weight = _number("rej_weight", rej_weight, lambda v: v >= 0.0, "a number >= 0")
    clamp = _number("clamp", clamp, lambda v: v > 0.0, "a number > 0")
    min_logprob = _number("min_logprob", min_logprob, lambda v: v < 0.0, "a number < 0")
    if dpace_alpha is not None:
        try:
            dpace_alpha = check_alpha(dpace_alpha)
        except ValueError as e:
            raise ValueError(f"dpace_alpha (None: no D-PACE weights): {e}") from e
    return decay, rej_weight, clamp, min_logprob, dpace_alpha


def _shape(x) -> tuple:
    return tuple(jnp.shape(x))


def _check_shapes(logq_real, logp_real, real_mask, logq_rej, logp_rej, rej_offset, rej_mask):
    lead = _shape(logq_real)
    if len(lead) < 2:
        raise ValueError(f"logq_real must have shape [..., N, K], got {lead}")
    for name, x in (("logp_real", logp_real), ("real_mask", real_mask)):
        if _shape(x) != lead:
            raise ValueError(f"{name} has shape {_shape(x)}, expected {lead} (that of logq_real)")
    blocks = lead[:-1]
    rej = _shape(logq_rej)
    if rej[: len(blocks)] != blocks or len(rej) > len(blocks) + 1:
        raise ValueError(f"logq_rej has shape {rej}, expected {blocks} or {blocks + ('J',)} "
                         f"([..., N] or [..., N, J] from logq_real {lead})")
    for name, x in (("logp_rej", logp_rej), ("rej_offset", rej_offset), ("rej_mask", rej_mask)):
        if _shape(x) != rej:
            raise ValueError(f"{name} has shape {_shape(x)}, expected {rej} (that of logq_rej)")
    if not jnp.issubdtype(jnp.result_type(rej_offset), jnp.integer):
        raise ValueError(f"rej_offset must hold integer block offsets, got dtype "
                         f"{jnp.result_type(rej_offset)}")


def _compute_dtype(*xs):
    """fp32, or fp64 when an input is fp64 (x64 mode); never lower than fp32."""
    return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


# --------------------------------------------------------------------------------------------
# per-token losses


def bernoulli_forward_kl(logq, logp, *, min_logprob=DEFAULT_MIN_LOGPROB):
    """Elementwise ``p (lp - lq) + (1 - p) (log1p(-p) - log1p(-q))`` with both log-probs clipped
    to ``[min_logprob, log(1 - eps)]`` (so it is finite for any input, -inf included)."""
    dtype = _compute_dtype(logq, logp)
    hi = math.log1p(-float(jnp.finfo(dtype).eps))
    lq = jnp.clip(jnp.asarray(logq, dtype), min_logprob, hi)
    lp = jnp.clip(jnp.asarray(logp, dtype), min_logprob, hi)
    p, q = jnp.exp(lp), jnp.exp(lq)
    return p * (lp - lq) + (1.0 - p) * (jnp.log1p(-p) - jnp.log1p(-q))


def k3_reverse_kl(logq, logp):
    """Elementwise k3 estimator ``exp(d) - d - 1`` with ``d = clip(logp - logq, -20, 20)``."""
    dtype = _compute_dtype(logq, logp)
    d = jnp.clip(jnp.asarray(logp, dtype) - jnp.asarray(logq, dtype),
                 -K3_LOG_RATIO_CLIP, K3_LOG_RATIO_CLIP)
    return jnp.expm1(d) - d


def rejected_weights(rej_offset, rej_mask, *, decay=DEFAULT_DECAY, dtype=jnp.float32):
    """``decay^max(j - 1, 0)`` where rej_mask is set, else 0 (no gradient)."""
    exponent = jnp.maximum(jnp.asarray(rej_offset) - 1, 0).astype(dtype)
    v = jnp.where(jnp.asarray(rej_mask) != 0, jnp.asarray(decay, dtype) ** exponent, 0.0)
    return jax.lax.stop_gradient(v.astype(dtype))


# --------------------------------------------------------------------------------------------
# the objective


def opd_loss(logq_real, logp_real, real_mask, logq_rej, logp_rej, rej_offset, rej_mask, *,
             decay=DEFAULT_DECAY, rej_weight=DEFAULT_REJ_WEIGHT, clamp=DEFAULT_CLAMP,
             min_logprob=DEFAULT_MIN_LOGPROB, dpace_alpha=None):
    """Draft-OPD loss (scalar) and aux from gathered log-probs (module docstring for the math).

    logq_real, logp_real, real_mask: ``[..., N, K]`` (drafter / target log-prob of the realized
    token at each block position; nonzero mask = supervised). logq_rej, logp_rej, rej_offset
    (int, 1-based), rej_mask: ``[..., N]`` (one rejected draft per block), or ``[..., N, J]``
    (up to J per block, e.g. every draft after the first rejection: each is one more term of the
    rejected stream, weighted by its own offset's decay). Masked entries may hold anything (NaN
    and inf included): they never reach the loss or its gradient. The sums run over all axes.

    aux (no gradient): ``realized_sum`` (sum m w l_real), ``rejected_sum`` (sum r v l_rej, before
    rej_weight), ``denominator``, ``n_realized`` / ``n_rejected`` (token counts),
    ``realized_weight`` (sum m w; n_realized without D-PACE), ``rejected_weight`` (sum r v),
    ``realized_mean`` / ``rejected_mean`` (unweighted means of the clipped per-token losses) and
    ``realized_clamped`` / ``rejected_clamped`` (fraction of tokens whose loss hit the clamp).
    """
    decay, rej_weight, clamp, min_logprob, dpace_alpha = check_opd_args(
        decay, rej_weight, clamp, min_logprob, dpace_alpha)
    _check_shapes(logq_real, logp_real, real_mask, logq_rej, logp_rej, rej_offset, rej_mask)
    dtype = _compute_dtype(logq_real, logq_rej, logp_real, logp_rej)

    m = jnp.asarray(real_mask) != 0
    r = jnp.asarray(rej_mask) != 0
    # Masked entries are replaced before any arithmetic, so garbage there cannot make NaN grads.
    lq_real = jnp.where(m, jnp.asarray(logq_real, dtype), -1.0)
    lp_real = jnp.where(m, jax.lax.stop_gradient(jnp.asarray(logp_real, dtype)), -1.0)
    lq_rej = jnp.where(r, jnp.asarray(logq_rej, dtype), -1.0)
    lp_rej = jnp.where(r, jax.lax.stop_gradient(jnp.asarray(logp_rej, dtype)), -1.0)

    l_real = jnp.clip(bernoulli_forward_kl(lq_real, lp_real, min_logprob=min_logprob),
                      -clamp, clamp)
    l_rej = jnp.clip(k3_reverse_kl(lq_rej, lp_rej), -clamp, clamp)

    mf = m.astype(dtype)
    if dpace_alpha is None:
        w = mf
    else:
        q = jnp.exp(jax.lax.stop_gradient(lq_real))
        w = mf * dpace_weights(q, m, alpha=dpace_alpha).astype(dtype)
    v = rejected_weights(rej_offset, r, decay=decay, dtype=dtype)

    realized_sum = jnp.sum(jnp.where(m, w * l_real, 0.0))
    rejected_sum = jnp.sum(jnp.where(r, v * l_rej, 0.0))
    realized_weight = jnp.sum(w)
    rejected_weight = jnp.sum(v)
    den = realized_weight + rej_weight * rejected_weight
    num = realized_sum + rej_weight * rejected_sum
    has = den > 0
    loss = jnp.where(has, num / jnp.where(has, den, 1.0), 0.0)

    n_real = jnp.sum(mf)
    n_rej = jnp.sum(r.astype(dtype))
    safe_real, safe_rej = jnp.maximum(n_real, 1.0), jnp.maximum(n_rej, 1.0)
    aux = {
        "realized_sum": realized_sum,
        "rejected_sum": rejected_sum,
        "denominator": den,
        "n_realized": n_real,
        "n_rejected": n_rej,
        "realized_weight": realized_weight,
        "rejected_weight": rejected_weight,
        "realized_mean": jnp.sum(jnp.where(m, l_real, 0.0)) / safe_real,
        "rejected_mean": jnp.sum(jnp.where(r, l_rej, 0.0)) / safe_rej,
        "realized_clamped": jnp.sum(m & (jnp.abs(l_real) >= clamp)) / safe_real,
        "rejected_clamped": jnp.sum(r & (jnp.abs(l_rej) >= clamp)) / safe_rej,
    }
    return loss, jax.tree_util.tree_map(jax.lax.stop_gradient, aux)


# --------------------------------------------------------------------------------------------
# log-probs from drafter logits


def gather_logprobs(logits, realized_tokens, rejected_tokens, rej_offset):
    """Drafter log-probs ``(logq_real [..., N, K], logq_rej [..., N])`` from logits
    ``[..., N, K, V]``: entries of the fp32 ``log_softmax`` at the realized token of every
    position and at the rejected token of position ``rej_offset`` of every block.

    Computed as ``logit - logsumexp`` (fp32, fp64 under x64) without an fp32 copy of the
    log-softmax; the rejected token's logit is gathered at all K positions (``[..., N, K]``) and
    the offset picked from that, so no ``[..., N, V]`` row is gathered. Token ids are clipped to
    ``[0, V)`` and offsets to ``[0, K)``, so padding ids (e.g. -100) give finite values that the
    loss's masks then drop.
    """
    if jnp.ndim(logits) < 3:
        raise ValueError(f"logits must have shape [..., N, K, V], got {_shape(logits)}")
    lead = _shape(logits)[:-1]
    if _shape(realized_tokens) != lead:
        raise ValueError(f"realized_tokens has shape {_shape(realized_tokens)}, expected {lead} "
                         "([..., N, K] from logits)")
    for name, x in (("rejected_tokens", rejected_tokens), ("rej_offset", rej_offset)):
        if _shape(x) != lead[:-1]:
            raise ValueError(f"{name} has shape {_shape(x)}, expected {lead[:-1]} ([..., N] from "
                             "logits)")
    for name, x in (("realized_tokens", realized_tokens), ("rejected_tokens", rejected_tokens),
                    ("rej_offset", rej_offset)):
        if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
            raise ValueError(f"{name} must be integer, got dtype {jnp.result_type(x)}")
    v_size, k_size = _shape(logits)[-1], _shape(logits)[-2]
    dtype = _compute_dtype(logits)
    x = jnp.asarray(logits)
    lse = jax.nn.logsumexp(x.astype(dtype), axis=-1)  # [..., N, K]
    t = jnp.clip(jnp.asarray(realized_tokens), 0, v_size - 1).astype(jnp.int32)
    logq_real = jnp.take_along_axis(x, t[..., None], axis=-1)[..., 0].astype(dtype) - lse
    rt = jnp.clip(jnp.asarray(rejected_tokens), 0, v_size - 1).astype(jnp.int32)
    rt = jnp.broadcast_to(rt[..., None, None], lead + (1,))
    rej_all = jnp.take_along_axis(x, rt, axis=-1)[..., 0].astype(dtype) - lse  # [..., N, K]
    j = jnp.clip(jnp.asarray(rej_offset), 0, k_size - 1).astype(jnp.int32)
    logq_rej = jnp.take_along_axis(rej_all, j[..., None], axis=-1)[..., 0]
    return logq_real, logq_rej
