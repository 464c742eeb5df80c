"""Training modes: what a run trains on and with which objective, each one object in MODES,
used by the one set-up (dpace_jax.train.loop.setup) and the one loop.

  sft  supervised: the data's conversations, anchors drawn each step, D-PACE / DFlash CE
       (dpace_jax.train.sft)
  opd  on-policy post-training: rounds of the drafter's own rollouts, the Draft-OPD objective
       (dpace_jax.train.opd.mode)
  spd  the draft module of speculative pipeline decoding, KL to the target
       (dpace_jax.train.spd)

A mode says which objectives it offers (`train.loss` picks one, "" its default), checks its
settings and the drafter before any expensive work, loads its data (and so the run's length),
makes the loop's batch source, and adds its settings to the resume fingerprint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class RunData:
    steps: int  # the run's length in steps
    data_id: str | None  # the data's fingerprint (resume)
    stats: dict  # what loading found (run_config.json, train.py's summary)
    source: Any  # the mode's own: a tokenized dataset, the prompt set


@dataclasses.dataclass(frozen=True)
class BatchInputs:
    """What a mode's batch source may need besides the settings and its data."""

    workdir: Any
    target_dir: Any
    target_params: Any
    target_cfg: Any
    drafter_cfg: Any
    tokenizer: Any
    data_state: dict | None  # the restored checkpoint's data position, if any
    start_step: int


class Mode:
    name: str = ""
    objectives: dict[str, Callable] = {}  # train.loss -> the step's objective
    default_objective: str = ""
    batch_keys: tuple[str, ...] = ("input_ids", "loss_mask")

    def check(self, s) -> None:
        """The mode's settings (ValueError naming the field), before any work."""

    def check_drafter(self, dcfg, target_cfg) -> None:
        """ValueError when the drafter does not fit this mode."""

    def load_data(self, s, workdir, target_dir, tokenizer, dcfg) -> RunData:
        raise NotImplementedError

    def batches(self, s, data: RunData, inputs: BatchInputs):
        """The loop's batch source: `keys`, `take(state)`, `state()`, `save_due(step)`."""
        raise NotImplementedError

    def objective(self, s) -> Callable:
        """The step's objective `f(params, target_params, batch, key, *, target_cfg,
        drafter_cfg, cfg)` for the run's train.loss."""
        return self.objectives[s.step.loss]

    def fingerprint(self, s) -> dict:
        """This mode's settings in the resume fingerprint."""
        return {}

    def rewind(self, s, workdir, data: RunData, step: int) -> tuple[int, str, Any] | None:
        """When the run cannot go on from the restored `step` because a file it made since an
        earlier checkpoint is damaged: (that earlier step, why, the file), and the trainer
        restores that step instead (the file moved aside); None: go on."""
        return None


def mode_of(name: str) -> Mode:
    from dpace_jax.train import sft, spd
    from dpace_jax.train.opd import mode as opd_mode

    modes = {m.name: m for m in (sft.MODE, opd_mode.MODE, spd.MODE)}
    if name not in modes:
        raise ValueError(f"train.mode={name!r}; expected one of {sorted(modes)}")
    return modes[name]
