"""On-policy post-training as a training mode (train.mode=opd): a trained drafter
(drafter.init_from) goes through opd.rounds rounds of rolling out the next prompts of the data
and training on the blocks its own drafts induced (dpace_jax.train.opd.rounds) with the
Draft-OPD objective (train.loss=opd; D-PACE weights on the realized stream with
opd.dpace_weights) or the total variation to the teacher (train.loss=tv), both in
dpace_jax.train.opd.objective."""

from __future__ import annotations

import dataclasses
import functools

import jax

from dpace_jax.train.modes import BatchInputs, Mode, RunData
from dpace_jax.train.opd import objective, rounds


class OnPolicy(Mode):
    name = "opd"
    objectives = {"opd": objective.opd_loss_fn, "tv": objective.tv_loss_fn}
    default_objective = "opd"
    batch_keys = objective.BATCH_KEYS

    def check(self, s) -> None:
        if s.loop.max_steps > 0:
            raise ValueError(f"train.max_steps={s.loop.max_steps} does not apply to "
                             "train.mode=opd: a run is opd.rounds x opd.epochs_per_round x "
                             "(opd.prompts_per_round // train.batch_size) steps; set it to -1")
        if not s.drafter.init_from:
            raise ValueError("train.mode=opd post-trains a drafter: set drafter.init_from (a "
                             "DFlash HF directory or a training run directory)")
        if s.opd.prompts_per_round < s.loop.batch_size:
            raise ValueError(f"opd.prompts_per_round={s.opd.prompts_per_round} makes no batch "
                             f"of train.batch_size={s.loop.batch_size}")
        if s.step.loss == "tv" and s.opd.dpace_weights:
            raise ValueError("opd.dpace_weights=True weights Draft-OPD's realized-token stream; "
                             "train.loss=tv has none (use train.loss=opd)")
        if s.step.loss == "tv" and s.opd.rejected_stream == "suffix":
            raise ValueError("opd.rejected_stream=suffix is not available with train.loss=tv "
                             "(its teacher needs a target forward per rejected branch); TV covers "
                             "the first rejection's position: set opd.rejected_stream=first")
        if jax.process_count() > 1:
            raise ValueError("train.mode=opd runs in a single process")

    def load_data(self, s, workdir, target_dir, tokenizer, dcfg) -> RunData:
        prompts, stats = rounds.load_prompts(s, tokenizer)
        return RunData(rounds.total_steps(s.opd, s.loop.batch_size),
                       stats["prompts"]["fingerprint"], stats, prompts)

    def batches(self, s, data: RunData, inputs: BatchInputs):
        return rounds.round_batches(s, inputs.workdir, data.source, inputs.target_dir,
                                    inputs.target_params, inputs.target_cfg, inputs.drafter_cfg,
                                    inputs.tokenizer, inputs.start_step)

    def objective(self, s):
        return functools.partial(self.objectives[s.step.loss], opd=s.opd)

    def fingerprint(self, s) -> dict:
        return {"opd": dataclasses.asdict(s.opd)}

    def rewind(self, s, workdir, data: RunData, step: int):
        return rounds.damaged_round(s, workdir, data.source, step)


MODE = OnPolicy()
