"""Verification-matched teachers and the total-variation objective for on-policy drafter training.

Shapes: ``B`` batch, ``N`` replayed blocks, ``K`` block size, ``D`` hidden size, ``V`` vocabulary.
Every function below accepts any leading axes (``[..., V]`` / ``[...]``); ``[B, N, K, ...]`` is the
usual layout of a replay batch.

Why a different teacher (notes: /work/notes/opd_reading.md). The Draft-OPD streams use the
target's temperature-1 softmax p1 as the teacher (the rollout records log p1 of each token).
What speculative decoding accepts is another distribution:

- at temperature 0 the verifier accepts a draft iff it equals the target's argmax, so the
  distribution acceptance depends on is one-hot on the greedy token;
- at temperature T > 0 with top-k / top-p, the verifier samples from (and standard speculative
  sampling accepts against) the tempered, filtered target ``dpace_jax.infer.sampling
  .filtered_log_probs`` computes.

``verify_teacher_logprobs`` returns that distribution. Against it the drafter's per-position
acceptance probability under standard speculative sampling is ``sum_x min(p_x, q_x)``, so
``tv_loss`` (1 minus that) is the per-position rejection probability; at T = 0 with the greedy
draft rule it is exactly ``1 - q(argmax p1)``, the drafter's probability of not proposing the
target's token.

Representation of the one-hot teacher (T = 0): log-prob 0 at the argmax (the first maximal index,
as ``jnp.argmax`` and the decoder's greedy choice break ties) and ``-inf`` elsewhere. This is the
same representation ``filtered_log_probs`` uses outside its top-k / top-p support at T > 0, so the
two cases need no separate handling. Consumers must only exponentiate it (``tv_loss`` does) or
clip it first (``dpace_jax.loss.opd.bernoulli_forward_kl`` clips log-probs to
``[min_logprob, log(1 - eps)]``, so -inf and 0 are both finite there); never multiply a log-prob by
a probability without masking (0 * -inf is NaN).

``filtered_log_probs`` is imported from ``dpace_jax.infer.sampling`` (its home after the package
refactor), falling back to ``dpace_jax.sampling`` (its earlier path).
"""

from __future__ import annotations

import math
import numbers
import operator

import jax
import jax.numpy as jnp

try:  # the module moved during the package refactor; either path provides the same function
    from dpace_jax.infer.sampling import Sampling, filtered_log_probs
except ImportError:  # pragma: no cover - the pre-refactor layout
    from dpace_jax.sampling import Sampling, filtered_log_probs

DEFAULT_CHUNK_SIZE = 2048  # rows (draft positions) of logits per LM-head chunk


# --------------------------------------------------------------------------------------------
# argument checks


def _check_sampling(temperature, top_k, top_p) -> Sampling | None:
    """The filter of a T > 0 teacher (a Sampling), or None for the greedy one-hot teacher."""
    if not isinstance(temperature, numbers.Real) or isinstance(temperature, bool):
        raise ValueError(f"temperature must be a Python number >= 0 (static), got {temperature!r}")
    if not temperature >= 0:  # also rejects NaN
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    # Sampling checks top_k (int >= 0) and top_p (in (0, 1]) with the decoder's messages.
    s = Sampling(temperature=float(temperature), top_k=top_k, top_p=top_p)
    return None if s.greedy else s


def _shape(x) -> tuple:
    return tuple(jnp.shape(x))


def _check_chunk_size(chunk_size) -> int:
    try:
        ok = not isinstance(chunk_size, bool) and operator.index(chunk_size) >= 1
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return operator.index(chunk_size)


# --------------------------------------------------------------------------------------------
# the verification-matched teacher


def verify_teacher_logprobs(target_logits, temperature, top_k: int = 0, top_p: float = 1.0):
    """The target distribution that verification accepts against, as fp32 log-probs.

    target_logits ``[..., V]`` (e.g. ``[B, N, K, V]``) -> ``[..., V]`` float32, no gradient.

    - ``temperature == 0``: one-hot on ``argmax(target_logits)`` (first maximal index): 0 there,
      ``-inf`` elsewhere. top_k / top_p do not change it (the greedy choice ignores them).
    - ``temperature > 0``: ``filtered_log_probs(target_logits, Sampling(temperature, top_k=top_k,
      top_p=top_p))``: softmax(logits / T) restricted to the top_k most likely tokens, then to the
      smallest most-likely set of mass >= top_p, renormalized; ``-inf`` outside.

    ``temperature``, ``top_k`` and ``top_p`` are static Python numbers (a new temperature compiles
    a new program when this is traced under ``jit``; pass them as static arguments).
    """
    s = _check_sampling(temperature, top_k, top_p)
    logits = jax.lax.stop_gradient(jnp.asarray(target_logits))
    if jnp.ndim(logits) < 1:
        raise ValueError(f"target_logits must have shape [..., V], got {_shape(logits)}")
    if s is None:
        v = logits.shape[-1]
        best = jnp.argmax(logits, axis=-1)
        one_hot = jnp.arange(v, dtype=best.dtype) == best[..., None]
        return jnp.where(one_hot, 0.0, -jnp.inf).astype(jnp.float32)
    return filtered_log_probs(logits, s)


def verify_teacher_token_logprobs(target_logits, tokens, temperature, top_k: int = 0,
                                  top_p: float = 1.0):
    """The verify teacher's log-probability of given tokens, e.g. the realized tokens of a rollout,
    for the Bernoulli forward-KL stream of ``dpace_jax.loss.opd.opd_loss`` (its ``logp_real``).

    target_logits ``[..., V]``, tokens ``[...]`` (int, clipped to ``[0, V)``) -> ``[...]`` float32.

    At temperature 0 the value is 0 (p = 1) for the greedy token and -inf (p = 0) for any other.
    With greedy rollouts every realized token is the target's greedy token, so there
    ``logp_real`` is simply 0 everywhere and needs no target logits at all. How ``opd_loss`` treats
    it: ``bernoulli_forward_kl`` clips both log-probs to ``[min_logprob, log(1 - eps)]`` (eps of
    the compute dtype, 1.19e-7 in fp32), so p = 1 becomes p = 1 - eps and the term becomes
    ``l = (1 - eps)(lp - lq) + eps (log eps - log1p(-q))``, i.e. the cross-entropy ``-log q`` up to
    O(eps · 16): its gradient in lq is ``-(1 - eps) + eps q / (1 - q)``, -1 until q reaches
    1 - eps. Two consequences of the clips: a realized token the drafter gives q < e^-10 (lq
    clipped at ``min_logprob``) gets no gradient, and the per-token clamp (10) is never reached
    (``-lq <= 10``). A non-greedy token (-inf) is clipped to p = e^-10.

    Not for the rejected-draft k3 stream at T = 0: a rejected draft is not the argmax, so its
    teacher log-prob is -inf, ``d = clip(-inf - lq, -20, 20) = -20``, the k3 value 19 is clamped to
    10 and passes no gradient. Use ``tv_loss`` at the rejected position instead (1 - q(argmax)).
    """
    logp = verify_teacher_logprobs(target_logits, temperature, top_k, top_p)
    tokens = jnp.asarray(tokens)
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integer, got dtype {tokens.dtype}")
    if _shape(tokens) != _shape(logp)[:-1]:
        raise ValueError(f"tokens has shape {_shape(tokens)}, expected {_shape(logp)[:-1]} "
                         "(target_logits without its vocabulary axis)")
    t = jnp.clip(tokens, 0, logp.shape[-1] - 1).astype(jnp.int32)
    return jnp.take_along_axis(logp, t[..., None], axis=-1)[..., 0]


# --------------------------------------------------------------------------------------------
# total variation


def _masked_mean(values, mask):
    m = mask.astype(values.dtype)
    den = jnp.sum(m)
    return jnp.where(den > 0, jnp.sum(values * m) / jnp.maximum(den, 1.0), 0.0)


def _tv_rows(teacher_logprobs, drafter_logits):
    """Per-row ``1 - sum_x min(p_x, q_x)`` in fp32 (rows may carry any leading axes)."""
    p = jnp.exp(jax.lax.stop_gradient(teacher_logprobs).astype(jnp.float32))
    q = jax.nn.softmax(drafter_logits.astype(jnp.float32), axis=-1)
    return 1.0 - jnp.sum(jnp.minimum(p, q), axis=-1)


def tv_loss(teacher_logprobs, drafter_logits, mask):
    """Total variation between teacher and drafter per position, and its masked mean.

    teacher_logprobs ``[..., V]`` (e.g. ``verify_teacher_logprobs`` of the target's logits; a
    constant: no gradient), drafter_logits ``[..., V]`` (any float dtype; q = softmax in fp32),
    mask ``[...]`` (nonzero = loss position). Returns ``(tv [...] float32, mean scalar)``:

        tv = 1 - sum_x min(p_x, q_x)            (= 0.5 sum_x |p_x - q_x| for normalized p, q)
        mean = sum(m tv) / sum(m)               (0 when the mask is empty)

    ``1 - tv`` is the probability that standard speculative sampling accepts a draft drawn from q
    against p. With the T = 0 one-hot teacher, ``tv = 1 - q(argmax)``: one minus the drafter's
    probability of the token greedy verification accepts. The gradient flows through q only:
    d tv / d z_j = q_j (S - [q_j < p_j]), S = sum over {x: q_x < p_x} of q_x. Masked positions
    give 0 and no gradient whatever they hold (NaN and inf included). In fp32, tv can be a few
    ulps below 0 when q is close to p (it is not clipped, so the gradient stays exact).
    """
    t = jnp.asarray(teacher_logprobs)
    z = jnp.asarray(drafter_logits)
    if jnp.ndim(z) < 1 or _shape(t) != _shape(z):
        raise ValueError(f"teacher_logprobs {_shape(t)} and drafter_logits {_shape(z)} must have "
                         "the same shape [..., V]")
    m = jnp.asarray(mask) != 0
    if _shape(m) != _shape(z)[:-1]:
        raise ValueError(f"mask has shape {_shape(m)}, expected {_shape(z)[:-1]} (drafter_logits "
                         "without its vocabulary axis)")
    keep = m[..., None]
    # Masked rows are replaced before any arithmetic, so garbage there cannot make NaN gradients
    # (p = 1, q uniform there: finite; the row is then dropped).
    tv = _tv_rows(jnp.where(keep, t, 0.0), jnp.where(keep, z, 0.0))
    tv = jnp.where(m, tv, 0.0)
    return tv, _masked_mean(tv, m)


def tv_loss_from_hidden(drafter_hidden, target_hidden, head, mask, temperature, top_k: int = 0,
                        top_p: float = 1.0, chunk_size: int = DEFAULT_CHUNK_SIZE, *,
                        target_head=None, drafter_transform=None):
    """``tv_loss(verify_teacher_logprobs(target_hidden @ target_head, ...), drafter_hidden @ head,
    mask)`` without ``[B, N, K, V]`` logits in memory.

    drafter_hidden ``[B, N, K, D]``: the drafter's final hidden state at each block position.
    target_hidden ``[B, N, K, D]``: for each block position, the target's final hidden state whose
    next-token distribution that position is verified against (for block position k of anchor a
    on the rollout's own text: the target's state at sequence position a + k - 1; for a draft
    after a rejection, the state of a target forward over the rejected branch, as Draft-OPD's
    exact-TV path does). head ``[D, V]``: the drafter's LM head (DFlash drafters share the
    target's); target_head ``[D, V]`` defaults to head. mask ``[B, N, K]`` nonzero = loss position.
    temperature / top_k / top_p: the verify teacher's (static), as in ``verify_teacher_logprobs``.

    The ``R = B*N*K`` rows are processed ``chunk_size`` rows at a time (padded to whole chunks);
    each chunk computes the drafter's and the target's logits ``[chunk, V]`` (hidden cast to the
    head's dtype, fp32 accumulation, as ``dpace_jax.loss.chunked``), the teacher from the target's
    logits and the per-row TV. The chunk body is rematerialized (``jax.checkpoint``), so the
    backward pass also holds one chunk of logits at a time. The teacher branch (target_hidden,
    target_head) is a constant: no gradient; the drafter branch passes gradients to
    drafter_hidden and head. ``drafter_transform(logits)`` maps the drafter's logits (fp32)
    first: DFlash 2's output multiplier and softcap. Returns ``(tv [B, N, K] float32, masked
    mean)``, equal to the unchunked ``tv_loss`` up to float rounding.
    """
    s = _check_sampling(temperature, top_k, top_p)
    chunk_size = _check_chunk_size(chunk_size)
    h = jnp.asarray(drafter_hidden)
    g = jnp.asarray(target_hidden)
    w = jnp.asarray(head)
    wt = w if target_head is None else jnp.asarray(target_head)
    if h.ndim != 4:
        raise ValueError(f"drafter_hidden must have shape [B, N, K, D], got {_shape(h)}")
    if _shape(g) != _shape(h):
        raise ValueError(f"target_hidden has shape {_shape(g)}, expected {_shape(h)} (that of "
                         "drafter_hidden)")
    d = h.shape[-1]
    if w.ndim != 2 or w.shape[0] != d:
        raise ValueError(f"head must have shape [D, V] with D = {d}, got {_shape(w)}")
    if _shape(wt) != _shape(w):
        raise ValueError(f"target_head has shape {_shape(wt)}, expected {_shape(w)} (that of head)")
    m = jnp.asarray(mask) != 0
    lead = _shape(h)[:-1]
    if _shape(m) != lead:
        raise ValueError(f"mask has shape {_shape(m)}, expected {lead}")

    rows = math.prod(lead)
    chunk = max(1, min(chunk_size, rows))
    n = -(-rows // chunk)
    pad = n * chunk - rows
    hc = jnp.pad(h.reshape(rows, d), ((0, pad), (0, 0))).reshape(n, chunk, d)
    gc = jnp.pad(jax.lax.stop_gradient(g).reshape(rows, d), ((0, pad), (0, 0))).reshape(n, chunk, d)
    mc = jnp.pad(m.reshape(rows), (0, pad)).reshape(n, chunk)
    wt = jax.lax.stop_gradient(wt)

    @jax.checkpoint
    def one_chunk(h_rows, g_rows, m_rows):
        keep = m_rows[:, None]
        # Masked (and padding) rows get zero hidden states: finite logits, then dropped.
        z = jnp.einsum("rd,dv->rv", jnp.where(keep, h_rows, 0).astype(w.dtype), w,
                       preferred_element_type=jnp.float32)
        if drafter_transform is not None:
            z = drafter_transform(z)
        zt = jnp.einsum("rd,dv->rv", jnp.where(keep, g_rows, 0).astype(wt.dtype), wt,
                        preferred_element_type=jnp.float32)
        if s is None:
            best = jnp.argmax(zt, axis=-1)
            teacher = jnp.where(jnp.arange(zt.shape[-1]) == best[:, None], 0.0, -jnp.inf)
        else:
            teacher = filtered_log_probs(zt, s)
        return jnp.where(m_rows, _tv_rows(teacher, z), 0.0)

    tv = jax.lax.map(lambda args: one_chunk(*args), (hc, gc, mc))
    tv = tv.reshape(-1)[:rows].reshape(lead)
    return tv, _masked_mean(tv, m)
