"""Steps with a non-finite loss or gradients (never applied by the step: dpace_jax.train.step),
counted on the devices and looked at only at log and save steps, so that the loop never waits
for a step just to read its loss.

`train.nan_policy=stop` ends the run at the first such step, naming it; `skip-step` skips them,
up to `train.max_skipped_steps` in a row: a longer run of them means the target, the data or the
settings are broken (every step of a target with NaN weights is skipped), not an overflow, and
going on would only export the drafter it started from.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# (first non-finite step, steps skipped, current run of skipped steps, step at which the run
# grew past the limit): int32 scalars on the devices, -1 for "none"
Tracker = tuple[jax.Array, jax.Array, jax.Array, jax.Array]


def start() -> Tracker:
    return jnp.int32(-1), jnp.int32(0), jnp.int32(0), jnp.int32(-1)


@jax.jit
def track(t: Tracker, finite, step, limit) -> Tracker:
    """`t` after step `step` (finite or not); `limit`: train.max_skipped_steps (-1: none)."""
    first_bad, skipped, streak, over = t
    bad = ~finite
    first_bad = jnp.where((first_bad < 0) & bad, jnp.int32(step), first_bad)
    streak = jnp.where(bad, streak + 1, 0).astype(jnp.int32)
    over = jnp.where((over < 0) & (limit >= 0) & (streak > limit), jnp.int32(step), over)
    return first_bad, skipped + bad.astype(jnp.int32), streak, over


def check(t: Tracker, policy: str, limit: int, saved: int) -> int:
    """The number of steps skipped so far; FloatingPointError (one line) when the run must stop:
    a non-finite step under `stop`, or more than `limit` in a row under `skip-step`."""
    first_bad, skipped, _, over = (int(v) for v in jax.device_get(t))
    if first_bad >= 0 and policy == "stop":
        raise FloatingPointError(
            f"the loss or the gradients of step {first_bad} are not finite "
            f"(train.nan_policy=stop): the run stops; its update was not applied and nothing "
            f"after step {saved} was saved. --config.train.nan_policy=skip-step skips such steps")
    if over >= 0:
        raise FloatingPointError(
            f"steps {over - limit} to {over} all had a non-finite loss or gradients, more than "
            f"train.max_skipped_steps={limit} in a row (train.nan_policy=skip-step): the run "
            f"stops (nothing after step {saved} was saved); check the target's weights and the "
            "data, or raise train.max_skipped_steps")
    return skipped
