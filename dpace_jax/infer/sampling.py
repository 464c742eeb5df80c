"""Token choice and the lossless acceptance rules of speculative decoding.

Shapes: B batch, K block size, V vocabulary. A verified block holds [last token, d_1..d_{K-1}]:
the target's logits at block position k predict the token after position k, so draft d_k is
checked against the target's distribution at position k-1. `acc` is the number of leading drafts
accepted (0..K-1) and a step emits acc + 1 tokens: d_1..d_acc, then one token from the target
(a correction at the first rejection, or the bonus after the last position).

Temperature 0 is greedy (argmax of the raw logits; top-k / top-p do not change it). Otherwise the
distribution is softmax(logits / temperature) restricted by top-k then top-p, and the same filter
is applied to target and drafter so that both rules stay lossless for that filtered target.
"""

from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp

RULES = ("dflash", "speculative")


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How tokens are chosen. Hashable, so it is one static argument of the compiled decoder;
    `compile_key()` leaves out the temperature's value, which the decoder takes as a traced
    scalar (a new temperature does not recompile; 0, greedy, is its own program).

    temperature  0: greedy (argmax); > 0: sample softmax(logits / temperature)
    rule         "dflash" (drafter argmax, accepted while equal to the target's choice) or
                 "speculative" (the drafter samples too; min(1, p/q) acceptance)
    top_k        keep the k most likely tokens (0: off)
    top_p        then the smallest most-likely set of mass >= top_p (1: off)
    """

    temperature: float = 0.0
    rule: str = "dflash"
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, numbers.Real) and not t >= 0:  # a traced temperature is not checked
            raise ValueError(f"temperature must be >= 0, got {t}")
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}")
        if isinstance(self.top_k, bool) or int(self.top_k) != self.top_k or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return isinstance(self.temperature, numbers.Real) and self.temperature == 0

    def compile_key(self) -> Sampling:
        """What the compiled decoder depends on: all but the value of a non-zero temperature."""
        return dataclasses.replace(self, temperature=0.0 if self.greedy else 1.0,
                                   top_k=int(self.top_k), top_p=float(self.top_p))

    def with_temperature(self, temperature) -> Sampling:
        """This sampling at `temperature` (a traced scalar inside the decoder)."""
        return self if self.greedy else dataclasses.replace(self, temperature=temperature)


GREEDY = Sampling()


def filtered_log_probs(logits: jax.Array, s: Sampling) -> jax.Array:
    """logits [..., V] -> log-probabilities [..., V] (fp32) of softmax(logits / temperature) kept
    to the top_k most likely tokens, then to the smallest set of most likely tokens whose mass
    reaches top_p (renormalized; -inf outside). The temperature must be > 0."""
    x = logits.astype(jnp.float32) / s.temperature
    if s.top_k and s.top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, s.top_k)[0][..., -1:]
        x = jnp.where(x >= kth, x, -jnp.inf)
    if s.top_p < 1.0:
        order = jnp.argsort(-x, axis=-1)
        probs = jax.nn.softmax(jnp.take_along_axis(x, order, axis=-1), axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = mass_before < s.top_p  # always keeps the most likely token
        keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
        x = jnp.where(keep, x, -jnp.inf)
    return jax.nn.log_softmax(x, axis=-1)


def choose(key: jax.Array, logits: jax.Array, s: Sampling) -> jax.Array:
    """One token per row of logits [..., V]: argmax when greedy, else a sample."""
    if s.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filtered_log_probs(logits, s), axis=-1).astype(jnp.int32)


def leading_true(ok: jax.Array) -> jax.Array:
    """Length of the all-True prefix of ok [B, n] -> [B] int32."""
    return jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=-1), axis=-1).astype(jnp.int32)


def emitted_tokens(drafts: jax.Array, acc: jax.Array, final: jax.Array) -> jax.Array:
    """drafts [B, K] (position 0 unused), acc [B], final [B] -> the step's tokens [B, K]:
    d_1..d_acc, then final; entries past acc are zero."""
    k = drafts.shape[1]
    j = jnp.arange(k, dtype=jnp.int32)[None, :]
    shifted = jnp.concatenate([drafts[:, 1:], jnp.zeros_like(drafts[:, :1])], axis=1)
    out = jnp.where(j < acc[:, None], shifted, final[:, None])
    return jnp.where(j <= acc[:, None], out, 0).astype(jnp.int32)


def propose(key: jax.Array, draft_logits: jax.Array, s: Sampling) -> jax.Array:
    """Draft tokens [B, K] from the drafter's logits [B, K, V] (position 0 is filled with 0):
    argmax unless the rule is "speculative" and sampling is not greedy (then sampled)."""
    if s.rule == "speculative" and not s.greedy:
        tokens = choose(key, draft_logits, s)
    else:
        tokens = jnp.argmax(draft_logits, axis=-1).astype(jnp.int32)
    return tokens.at[:, 0].set(0)


def verify_match(key: jax.Array, target_logits: jax.Array, drafts: jax.Array, s: Sampling):
    """Greedy / DFlash rule: the target chooses t_k at every position (argmax, or a sample at
    temperature > 0); d_k is accepted while d_k == t_{k-1}. Returns (acc [B], tokens [B, K])."""
    chosen = choose(key, target_logits, s)  # [B, K]
    acc = leading_true(drafts[:, 1:] == chosen[:, :-1])
    final = jnp.take_along_axis(chosen, acc[:, None], axis=1)[:, 0]
    return acc, emitted_tokens(drafts, acc, final)


def draft_probs(draft_logits: jax.Array, s: Sampling) -> jax.Array | None:
    """What `propose` draws from under the speculative rule when sampling (the filtered
    distribution of the draft logits [B, K, V]), the q of `verify_speculative`; else None."""
    if s.rule == "speculative" and not s.greedy:
        return jnp.exp(filtered_log_probs(draft_logits, s))
    return None


def verify_speculative(key: jax.Array, target_logits: jax.Array, q: jax.Array,
                       drafts: jax.Array, s: Sampling):
    """Standard speculative sampling (temperature > 0): d_k ~ q_k ([B, K, V] probabilities) is
    accepted with probability min(1, p_{k-1}(d_k) / q_k(d_k)); at the first rejection the token
    is drawn from normalize(max(p_{k-1} - q_k, 0)); when all K-1 are accepted, from p_{K-1}.
    Returns (acc [B], tokens [B, K])."""
    k_accept, k_final = jax.random.split(key)
    p = jnp.exp(filtered_log_probs(target_logits, s))  # [B, K, V]
    d = drafts[:, 1:, None]
    p_d = jnp.take_along_axis(p[:, :-1], d, axis=-1)[..., 0]  # [B, K-1]
    q_d = jnp.take_along_axis(q[:, 1:], d, axis=-1)[..., 0]
    u = jax.random.uniform(k_accept, p_d.shape)
    acc = leading_true(u * q_d < p_d)
    # Correction distribution at index j: residual of p_j - q_{j+1}; index K-1: p_{K-1}.
    residual = jnp.maximum(p[:, :-1] - q[:, 1:], 0.0)
    residual = jnp.concatenate([residual, p[:, -1:]], axis=1)
    pick = acc[:, None, None]
    res = jnp.take_along_axis(residual, pick, axis=1)[:, 0]  # [B, V]
    res = jnp.where(jnp.sum(res, -1, keepdims=True) > 0, res,
                    jnp.take_along_axis(p, pick, axis=1)[:, 0])
    final = jax.random.categorical(k_final, jnp.log(res), axis=-1).astype(jnp.int32)
    return acc, emitted_tokens(drafts, acc, final)


def verify(key: jax.Array, target_logits: jax.Array, q: jax.Array | None,
           drafts: jax.Array, s: Sampling):
    """Dispatch on the rule; greedy, both rules are the same. q: the drafts' distribution
    (`draft_probs`, or a drafter's own), needed by the speculative rule only."""
    if s.rule == "speculative" and not s.greedy:
        return verify_speculative(key, target_logits, q, drafts, s)
    return verify_match(key, target_logits, drafts, s)
