"""The D-PACE and DFlash training objectives as pure JAX functions.

Shapes: ``B`` sequences, ``N`` blocks per sequence, ``K`` block size, ``V`` vocabulary. Logits are
``[B, N, K, V]`` (any float dtype), targets ``[B, N, K]`` (int) and mask ``[B, N, K]`` (nonzero =
loss position; block position 0, the anchor, is normally masked by the caller). Unmasked targets
must lie in ``[0, V)`` (an out-of-range one gives a NaN loss, not an error, since shapes are all
that can be checked under jit); masked ones may hold anything (e.g. -100).

Per position, ``ce_k = -log q_k`` (computed in fp32) where ``q_k`` is the predicted probability of
the label, and ``m_k`` is the mask.

DFlash decayed CE::

    w_k = exp(-(k - 1) / gamma)            (gamma > 0; None: no decay, w_k = 1)
    loss = sum(m * w * ce) / sum(m * w)    (0 when nothing is unmasked)

D-PACE. The expected number of accepted draft tokens under independent per-position acceptance
probabilities q is ``E = sum_k prod_{j<=k} q_j``, and
``dE / dlog q_k = sum_{j>=k} prod_{i<=j} q_i``: a position matters by how likely the draft
survives up to it (cumulative confidence) times how many tokens can still follow it
(continuation value). With smoothed acceptances
``s_k = (1 - alpha) * q_k + alpha`` (alpha in [0, 1]) and masked positions contributing a factor 1::

    P_k = prod_{j<=k} s_j                  (masked j: s_j := 1)
    w_k = sum_{j>=k} m_j * P_j             "dpace"
    w_k = P_k                              "dpace-cumulative-confidence-only"
    w_k = sum_{j>=k} m_j * P_j / P_k       "dpace-continuation-value-only"
        = sum_{j>=k} m_j * prod_{k<i<=j} s_i   (computed this way: no division, no 0/0)
    loss = sum(m * w * ce) / B             (a per-sequence sum, not a per-token mean)

The weights are computed from stop-gradient q, so ``d loss = sum(m * w * d ce) / B``. With all
q = 1, ``w_k`` is the number of unmasked positions at or after k.

The same objectives from final hidden states and the LM-head matrix, without materializing the
full logits, live in ``dpace_jax.loss.chunked``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DEFAULT_ALPHA = 0.5  # D-PACE's smoothing (the paper's and the run config's default)
DPACE_VARIANTS = ("dpace", "dpace-cumulative-confidence-only", "dpace-continuation-value-only")
LOSS_NAMES = ("dflash",) + DPACE_VARIANTS


# --------------------------------------------------------------------------------------------
# argument checks


def check_alpha(alpha):
    """alpha as a float in [0, 1] (a traced alpha is passed through unchecked)."""
    try:
        a = float(alpha)
    except TypeError:  # a tracer (e.g. vmap over alpha): cannot be checked at trace time
        return alpha
    except ValueError as e:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}") from e
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    return a


def check_variant(variant: str) -> str:
    if variant not in DPACE_VARIANTS:
        raise ValueError(f"variant must be one of {DPACE_VARIANTS}, got {variant!r}")
    return variant


def check_name(name: str) -> str:
    if name not in LOSS_NAMES:
        raise ValueError(f"unknown objective {name!r}; known objectives: {', '.join(LOSS_NAMES)}")
    return name


def check_gamma(gamma):
    """gamma as a float > 0, or None (no decay); a traced gamma is passed through unchecked."""
    if gamma is None:
        return None
    try:
        g = float(gamma)
    except TypeError:  # traced
        return gamma
    except ValueError as e:
        raise ValueError(f"gamma must be None (no decay) or a number > 0, got {gamma!r}") from e
    if not g > 0:
        raise ValueError(f"gamma must be None (no decay) or a number > 0, got {gamma!r}")
    return g


def check_targets_mask(targets, mask, lead: tuple, what: str) -> None:
    """targets and mask must both have shape ``lead`` ([B, N, K], taken from ``what``)."""
    if tuple(targets.shape) != tuple(lead):
        raise ValueError(f"targets has shape {tuple(targets.shape)}, expected {tuple(lead)} "
                         f"([B, N, K] from {what})")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets must be integer token ids, got dtype {targets.dtype}")
    if tuple(mask.shape) != tuple(lead):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(lead)} "
                         f"([B, N, K] from {what})")


def _check_logits(logits, targets, mask) -> None:
    if logits.ndim != 4:
        raise ValueError(f"logits must have shape [B, N, K, V], got {tuple(logits.shape)}")
    check_targets_mask(targets, mask, logits.shape[:-1], "logits")


# --------------------------------------------------------------------------------------------
# weights


def dpace_weights(q, mask, *, alpha=DEFAULT_ALPHA, variant: str = "dpace") -> jax.Array:
    """D-PACE position weights ``w [..., K]`` (fp32, no gradient) from q and mask ``[..., K]``.

    ``s_k = (1 - alpha) q_k + alpha`` (1 where masked), ``P_k = prod_{j<=k} s_j``;
    "dpace": ``w_k = sum_{j>=k} m_j P_j``; "dpace-cumulative-confidence-only": ``w_k = P_k``;
    "dpace-continuation-value-only": ``w_k = sum_{j>=k} m_j prod_{k<i<=j} s_i``
    (= the "dpace" weight divided by P_k, but finite even where P_k underflows to 0).
    """
    alpha = check_alpha(alpha)
    check_variant(variant)
    q = jnp.asarray(q)
    mask = jnp.asarray(mask)
    if q.ndim < 1 or tuple(q.shape) != tuple(mask.shape):
        raise ValueError(f"q {tuple(q.shape)} and mask {tuple(mask.shape)} must have the same "
                         "shape [..., K]")
    q = jax.lax.stop_gradient(q.astype(jnp.float32))
    m = mask != 0
    s = jnp.where(m, (1.0 - alpha) * q + alpha, 1.0)
    k = q.shape[-1]
    if variant == "dpace-continuation-value-only":
        idx = jnp.arange(k)
        later = idx[None, :] > idx[:, None]  # [k, i]: i > k
        # prods[..., k, j] = prod_{k<i<=j} s_i (1 for j <= k); only products of values in [0, 1].
        prods = jnp.cumprod(jnp.where(later, s[..., None, :], 1.0), axis=-1)
        take = (idx[None, :] >= idx[:, None]) & m[..., None, :]  # [..., k, j]: j >= k, m_j
        w = jnp.sum(jnp.where(take, prods, 0.0), axis=-1)
    else:
        p = jnp.cumprod(s, axis=-1)
        if variant == "dpace":
            w = jnp.flip(jnp.cumsum(jnp.flip(jnp.where(m, p, 0.0), -1), axis=-1), -1)
        else:
            w = p
    return jax.lax.stop_gradient(w)


def dflash_weights(k: int, gamma=None) -> jax.Array:
    """DFlash decay ``w [K]``: ``exp(-(k - 1) / gamma)`` per block position k (1 if gamma is
    None)."""
    gamma = check_gamma(gamma)
    if gamma is None:
        return jnp.ones((k,), jnp.float32)
    pos = jnp.arange(k, dtype=jnp.float32)
    return jnp.exp(-(pos - 1.0) / jnp.asarray(gamma, jnp.float32))


# --------------------------------------------------------------------------------------------
# per-token statistics and the losses


def token_stats(logits, targets, mask) -> tuple[jax.Array, jax.Array]:
    """fp32 cross-entropy and argmax-correctness ``[...]`` from logits ``[..., V]``.

    Both are 0/False at masked positions (whatever their target), so masked rows never produce
    NaN; the gradient flows through ``ce`` only.
    """
    x = logits.astype(jnp.float32)
    m = mask != 0
    t = jnp.where(m, targets, 0).astype(jnp.int32)
    lse = jax.nn.logsumexp(x, axis=-1)
    target_logit = jnp.take_along_axis(x, t[..., None], axis=-1)[..., 0]
    ce = jnp.where(m, lse - target_logit, 0.0)
    correct = m & (jnp.argmax(x, axis=-1) == t)
    return ce, correct


def _aux(ce, correct, m, w) -> dict:
    """Logged statistics (all stop-gradient); m and w are [B, N, K], positions on the last axis."""
    ce = jax.lax.stop_gradient(ce)
    mf = m.astype(jnp.float32)
    q = jnp.exp(-ce)
    n = jnp.sum(mf)
    per_pos = jnp.sum(mf, axis=(0, 1))
    safe_n, safe_pos = jnp.maximum(n, 1.0), jnp.maximum(per_pos, 1.0)
    # Expected accepted length per block under acceptance q: sum_k m_k prod_{j<=k, m_j} q_j.
    qm = jnp.where(m, q, 1.0)
    blocks_expected = jnp.sum(mf * jnp.cumprod(qm, axis=-1), axis=-1)
    has_tokens = jnp.any(m, axis=-1).astype(jnp.float32)
    aux = {
        "num_tokens": n,
        "ce": jnp.sum(mf * ce) / safe_n,
        "accuracy": jnp.sum(correct.astype(jnp.float32)) / safe_n,
        "weight_per_position": jnp.sum(mf * w, axis=(0, 1)) / safe_pos,
        "q_per_position": jnp.sum(mf * q, axis=(0, 1)) / safe_pos,
        "accuracy_per_position": jnp.sum(correct.astype(jnp.float32), axis=(0, 1)) / safe_pos,
        "expected_accept_length": (jnp.sum(blocks_expected)
                                   / jnp.maximum(jnp.sum(has_tokens), 1.0)),
    }
    return jax.tree_util.tree_map(jax.lax.stop_gradient, aux)


def loss_from_stats(name: str, ce, correct, mask, *, alpha=DEFAULT_ALPHA, gamma=None):
    """The objective ``name`` from per-token ce / correct / mask ``[B, N, K]`` -> (loss, aux).

    Shared by the logits path here and the chunked hidden-state path (``dpace_jax.loss.chunked``).
    """
    loss, aux, _ = loss_and_weights(name, ce, correct, mask, alpha=alpha, gamma=gamma)
    return loss, aux


def loss_and_weights(name: str, ce, correct, mask, *, alpha=DEFAULT_ALPHA, gamma=None):
    """`loss_from_stats`, and the objective's position weights w ``[B, N, K]`` (no gradient)
    and denominator: loss = sum(m * w * ce) / denominator (``sum(m * w)`` for "dflash", B for
    the D-PACE objectives), for terms that share them (DFlash 2's selector term)."""
    check_name(name)
    m = mask != 0
    mf = m.astype(jnp.float32)
    if name == "dflash":
        w = jnp.broadcast_to(dflash_weights(ce.shape[-1], gamma), ce.shape)
        den = jnp.sum(mf * w)
        num = jnp.sum(mf * w * ce)
        loss = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
    else:
        q = jnp.exp(-jax.lax.stop_gradient(ce))
        w = dpace_weights(q, m, alpha=alpha, variant=name)
        loss = jnp.sum(mf * w * ce) / ce.shape[0]
        den = jnp.asarray(ce.shape[0], jnp.float32)
    return loss, _aux(ce, correct, m, w), (w, den)


def dpace_loss(logits, targets, mask, *, alpha=DEFAULT_ALPHA, variant: str = "dpace"):
    """D-PACE loss ``sum(m * w * ce) / B`` and aux from logits ``[B, N, K, V]``.

    aux: ``num_tokens``, ``ce`` (masked mean), ``accuracy`` (masked argmax == target),
    ``weight_per_position`` / ``q_per_position`` / ``accuracy_per_position`` ``[K]`` (means over
    unmasked positions, 0 where none) and ``expected_accept_length`` (mean over blocks with a loss
    position of ``sum_k m_k prod_{j<=k} q_j``). All aux values carry no gradient.
    """
    check_variant(variant)
    return objective(variant, logits, targets, mask, alpha=alpha)


def dflash_loss(logits, targets, mask, *, gamma=None):
    """DFlash decayed CE ``sum(m * w * ce) / sum(m * w)`` and aux (as in ``dpace_loss``)."""
    return objective("dflash", logits, targets, mask, gamma=gamma)


def objective(name: str, logits, targets, mask, *, alpha=DEFAULT_ALPHA, gamma=None):
    """Dispatch by name (one of ``LOSS_NAMES``) -> (loss, aux); alpha is used by the D-PACE
    objectives, gamma by "dflash"."""
    check_name(name)
    if name == "dflash":
        check_gamma(gamma)
    else:
        check_alpha(alpha)
    _check_logits(logits, targets, mask)
    ce, correct = token_stats(logits, targets, mask)
    return loss_from_stats(name, ce, correct, mask, alpha=alpha, gamma=gamma)
