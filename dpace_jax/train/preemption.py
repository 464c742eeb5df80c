"""Save, then stop, when the scheduler asks: SIGTERM, JAX's preemption notice, or the clock.

A preemptible VM or a maintenance event sends SIGTERM, then SIGKILL after a grace period
(GCE spot VMs: 30 s; Kubernetes: terminationGracePeriodSeconds; SLURM: KillWait). Without a
handler one process dies at once and loses everything since the last `save_every` step.
`PreemptionWatch` turns the request into a `Decision` at the next step boundary: save a
checkpoint there, then stop with `PREEMPTED_EXIT_CODE`, so that running the same command resumes
without losing a step (as Orbax's `reached_preemption`, MaxText, Megatron's
--exit-signal-handler and Levanter do).

Single process: a SIGTERM handler that only sets a flag (a Python handler runs between
bytecodes of the main thread; doing I/O there could interrupt a save). SIGINT (Ctrl-C) is
handled the same way the first time, so that an interrupted run keeps its last steps; a second
Ctrl-C raises KeyboardInterrupt at once, as before (the loop's `finally` still closes the
checkpointer). A second SIGTERM is ignored: the save is already on its way, and SIGKILL comes
anyway when the grace period ends.

Multi-process (jax.process_count() > 1): all processes must save the same step, or the save's
collectives hang. `jax.distributed.initialize` starts JAX's preemption service, whose C++
handler owns SIGTERM (a Python handler installed after it would replace it, so none is
installed then): `reached_preemption_sync_point(step)`, called at every step by every
process, turns True on all of them at the same step once any process got the notice.
SIGINT (and SIGTERM where the service is off) sets a local flag, and the clock is read on
process 0 only; both are agreed every `sync_every` steps (the loop's log steps, which sync
with the devices anyway) with one small all-gather: stop when any process was signalled, save
by the clock when process 0's clock says so. Every process calls `check` with the same steps.

The watch must be created after `jax.distributed.initialize` (which installs its handler) and
`restore()`d (or left with `with`) at the end of the run.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# 128 + SIGTERM: what a shell, SLURM and Kubernetes report for a process ended by SIGTERM,
# which schedulers treat as "preempted / retry" rather than as the job's failure (exit 1).
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT  # 130: Ctrl-C


@dataclasses.dataclass(frozen=True)
class Decision:
    """What the loop does after a step: `save` a checkpoint at it, then `stop` (exiting with
    `exit_code`); `reason`: "SIGTERM", "SIGINT", "preemption notice", "clock" or ""."""

    save: bool = False
    stop: bool = False
    reason: str = ""
    exit_code: int = 0


CONTINUE = Decision()


def preempted_message(decision: Decision, step: int) -> str:
    """The one line the trainer prints when it stops for `decision` after saving `step`."""
    return (f"preempted ({decision.reason}) at step {step}: checkpoint saved at step {step}; "
            "run the same command to resume")


class Preempted(SystemExit):
    """Raised by the loop after the preemption save is complete: exits with the decision's
    status (uncaught: silently, so print `str(e)` first). `str(e)` is the message."""

    def __init__(self, decision: Decision, step: int, *, saved: bool = True):
        super().__init__(decision.exit_code)
        self.decision, self.step = decision, step
        # not `saved`: the signal came during the set-up, before any step of this start
        self.message = preempted_message(decision, step) if saved else (
            f"preempted ({decision.reason}) before training: nothing new to save (step {step}); "
            "run the same command to resume")

    def __str__(self) -> str:
        return self.message


def jax_preemption_service() -> bool:
    """True when jax.distributed started JAX's preemption service (it then owns SIGTERM)."""
    try:
        from jax._src import distributed

        return distributed.global_state.preemption_sync_manager is not None
    except (ImportError, AttributeError):
        return False


def _allgather(local: np.ndarray) -> np.ndarray:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local))


def _sync_point(step: int) -> bool:
    from jax.experimental import multihost_utils

    try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
    except RuntimeError:  # the service is disabled (jax_enable_preemption_service=False)
        return False


class PreemptionWatch:
    """`check(step)` after every step; see the module doc.

    `save_every_minutes` (<= 0: off): a save at least that often by the clock, counted from the
    last save (`note_saved`). `sync_every`: in multi-process runs, agree on signals and the clock
    every that many steps (the trainer passes train.log_every: one host sync per log step).
    `process_count`, `process_index`, `clock`, `sync_point` and `agree` default to JAX's and
    are injectable for tests; `agree` maps this process's int32 array [signal number or 0,
    clock due] to all processes' [P, 2] (process 0's row first)."""

    def __init__(self, *, save_every_minutes: float = 0.0, sync_every: int = 10,
                 signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT),
                 process_count: int | None = None, process_index: int | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sync_point: Callable[[int], bool] | None = None,
                 agree: Callable[[np.ndarray], np.ndarray] | None = None,
                 jax_service: bool | None = None):
        if process_count is None or process_index is None:
            import jax

            process_count = jax.process_count() if process_count is None else process_count
            process_index = jax.process_index() if process_index is None else process_index
        if int(sync_every) < 1:
            raise ValueError(f"sync_every={sync_every} must be >= 1")
        self.multi = process_count > 1
        self.is_main = process_index == 0
        self.interval_s = float(save_every_minutes) * 60.0
        self.sync_every = int(sync_every)
        self.clock = clock
        self.last_save = clock()
        self.signalled: str | None = None  # name of the first signal received
        self._signum = 0
        self.signalled_at: float | None = None  # time.time() when it came
        service = jax_preemption_service() if jax_service is None else jax_service
        self._sync_point = sync_point or (_sync_point if self.multi and service else None)
        self._agree = agree or _allgather
        self._old: dict[int, Any] = {}
        owned_by_jax = {signal.SIGTERM} if self.multi and service else set()
        if threading.current_thread() is not threading.main_thread():
            log.warning("PreemptionWatch created outside the main thread: no signal handlers "
                        "(signals keep their default effect)")
            return
        for signum in signals:
            if signum not in owned_by_jax:
                self._old[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signalled is None:
            self.signalled, self.signalled_at, self._signum = name, time.time(), signum
            return
        if signum == signal.SIGINT:  # a second Ctrl-C: stop now, as without the watch
            raise KeyboardInterrupt
        # later signals: the save is on its way; SIGKILL ends it anyway

    def signal_decision(self, name: str) -> Decision:
        code = INTERRUPTED_EXIT_CODE if name == "SIGINT" else PREEMPTED_EXIT_CODE
        return Decision(save=True, stop=True, reason=name, exit_code=code)

    def _clock_due(self) -> bool:
        return self.interval_s > 0 and self.clock() - self.last_save >= self.interval_s

    def check(self, step: int) -> Decision:
        """The decision after step `step` completed (the step number a save would have).
        Single process: a flag and a clock read, no device sync. Multi-process: JAX's sync
        point at every step, and one all-gather every `sync_every` steps."""
        if not self.multi:
            if self.signalled:
                return self.signal_decision(self.signalled)
            return Decision(save=True, reason="clock") if self._clock_due() else CONTINUE
        if self._sync_point is not None and self._sync_point(step):
            return Decision(save=True, stop=True, reason="preemption notice",
                            exit_code=PREEMPTED_EXIT_CODE)
        if step % self.sync_every:
            return CONTINUE
        local = np.array([self._signum, self.is_main and self._clock_due()], np.int32)
        agreed = np.asarray(self._agree(local)).reshape(-1, 2)
        signalled = [int(s) for s in agreed[:, 0] if s]
        if signalled:  # the first process's signal names the reason on every process
            return self.signal_decision(signal.Signals(signalled[0]).name)
        return Decision(save=True, reason="clock") if agreed[0, 1] else CONTINUE

    def note_saved(self, step: int) -> None:
        """A checkpoint was saved (for any reason): the clock trigger counts from now."""
        self.last_save = self.clock()

    def restore(self) -> None:
        """Put back the signal handlers that were there before."""
        for signum, old in self._old.items():
            signal.signal(signum, old if old is not None else signal.SIG_DFL)
        self._old = {}

    def __enter__(self) -> PreemptionWatch:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()
