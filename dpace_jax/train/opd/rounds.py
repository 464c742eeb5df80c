"""On-policy post-training (Draft-OPD, arXiv 2605.29343; docs/design.md §9) as a train.py mode:
`train.loss=opd`.

The run starts from a trained drafter (`drafter.init_from`: a DFlash HF directory or a training
run directory) and goes through `opd.rounds` rounds. Round r takes the next
`opd.prompts_per_round` prompts of the data (the turns before each conversation's first assistant
turn, wrapping around), rolls them out with the drafter as it is at the round's start
(`dpace_jax.train.opd.rollout`: WORKDIR/rollouts/round-r.jsonl), then trains `opd.epochs_per_round`
epochs of replay batches on them (`dpace_jax.train.opd.replay`, `dpace_jax.train.opd.objective`).

Resuming: every round ends with a checkpoint, so a restart inside round r restores the drafter
that rolled it out; its rollout file is completed, never duplicated (a finished one is read
back), and the replay order is a function of (seed, round, epoch), so the step, data order and RNG
continue where they were. WORKDIR/rounds.jsonl logs each round's on-policy tau.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dpace_jax.data import conversations as data_lib
from dpace_jax.infer import decode
from dpace_jax.infer import generation as gen_lib
from dpace_jax.infer.sampling import Sampling
from dpace_jax.io.atomic import atomic_path
from dpace_jax.train import resume
from dpace_jax.train.opd import objective as opd_step
from dpace_jax.train.opd import replay, rollout

log = logging.getLogger(__name__)
STEP_ARGS = {"objective": opd_step.opd_loss_fn, "batch_keys": opd_step.BATCH_KEYS}


def check(config) -> None:
    """The opd.* settings (ValueError naming the field), before any work."""
    o = config.opd
    for name in ("rounds", "prompts_per_round", "epochs_per_round", "max_prompt_length",
                 "max_new_tokens", "rollout_batch_size"):
        if int(o[name]) < 1:
            raise ValueError(f"opd.{name}={o[name]} must be >= 1")
    if int(config.train.max_steps) > 0:
        raise ValueError(f"train.max_steps={config.train.max_steps} does not apply to "
                         "train.loss=opd: a run is opd.rounds x opd.epochs_per_round x "
                         "(opd.prompts_per_round // train.batch_size) steps; set it to -1")
    if not config.drafter.init_from:
        raise ValueError("train.loss=opd post-trains a drafter: set drafter.init_from (a DFlash "
                         "HF directory or a training run directory)")
    if int(o.prompts_per_round) < int(config.train.batch_size):
        raise ValueError(f"opd.prompts_per_round={o.prompts_per_round} makes no batch of "
                         f"train.batch_size={config.train.batch_size}")
    Sampling(float(o.temperature), str(o.rule))
    if jax.process_count() > 1:
        raise ValueError("train.loss=opd runs in a single process")


def load_prompts(config, tokenizer) -> tuple[list[list[int]], dict]:
    """The prompt set (token ids) from data.paths, and its statistics."""
    conversations, stats = data_lib.load_conversations(
        list(config.data.paths), split=config.data.split, strict=bool(config.data.strict))
    prompts, skipped = rollout.conversation_prompts(conversations, tokenizer,
                                                    int(config.opd.max_prompt_length))
    if not prompts:
        raise ValueError(f"data.paths={list(config.data.paths)}: no prompt (a conversation's "
                         f"turns before its first assistant turn, at most "
                         f"opd.max_prompt_length={config.opd.max_prompt_length} tokens)")
    stats = {"load": stats, "prompts": {"prompts": len(prompts), "skipped": skipped,
                                        "fingerprint": rollout.prompts_fingerprint(prompts)}}
    return prompts, stats


def steps_per_round(config) -> int:
    return int(config.opd.epochs_per_round) * (
        int(config.opd.prompts_per_round) // int(config.train.batch_size))


def total_steps(config) -> int:
    return int(config.opd.rounds) * steps_per_round(config)


def round_prompts(prompts, r: int, per_round: int) -> list[list[int]]:
    start = (r * per_round) % len(prompts)
    return [prompts[(start + i) % len(prompts)] for i in range(per_round)]


class RoundBatches:
    """The replay batches of the run, rolling each round out when its first batch is asked for
    (the trainer's batch source: `keys`, `take(state)`, `state()`, `save_due(step)`)."""

    keys = opd_step.BATCH_KEYS

    def __init__(self, config, workdir: Path, prompts, gen: gen_lib.Generator, drafter_cfg,
                 rollout_dtype, meta: dict, start_step: int):
        self.config, self.workdir, self.prompts, self.gen = config, workdir, prompts, gen
        self.drafter_cfg, self.rollout_dtype, self.meta = drafter_cfg, rollout_dtype, meta
        self.step, self.per_round = int(start_step), steps_per_round(config)
        self.batch_size = int(config.train.batch_size)
        self.round, self.rows = -1, []

    def state(self) -> dict:
        return {"round": self.step // self.per_round, "step": self.step}

    def save_due(self, step: int) -> bool:
        """Every round ends with a checkpoint: the next round's rollouts come from it."""
        return step % self.per_round == 0

    def take(self, train_state) -> dict[str, np.ndarray]:
        r, within = divmod(self.step, self.per_round)
        if r != self.round:
            self._roll_out(r, train_state.params, first=within == 0)
        per_epoch = self.per_round // int(self.config.opd.epochs_per_round)
        epoch, b = divmod(within, per_epoch)
        order = np.random.default_rng([int(self.config.seed), r, epoch]).permutation(
            len(self.rows))
        rows = [self.rows[i] for i in order[b * self.batch_size: (b + 1) * self.batch_size]]
        batch, _ = replay.replay_batch(
            rows, block_size=self.drafter_cfg.block_size,
            seq_len=int(self.config.data.max_length), num_blocks=int(self.config.train.num_anchors),
            pad_token_id=self.gen.pad_id)
        self.step += 1
        return batch

    def _roll_out(self, r: int, params, first: bool) -> None:
        """Round r's rollout rows: rolled out (or completed) at its first step, read back
        inside it."""
        path = self.workdir / "rollouts" / f"round-{r}.jsonl"
        chosen = round_prompts(self.prompts, r, int(self.config.opd.prompts_per_round))
        meta = {**self.meta, "round": r}
        self.round = r
        if not first:
            self.rows = rollout.read_finished(path, chosen, meta)
            return
        host = jax.tree.map(lambda x: jnp.asarray(np.asarray(x), self.rollout_dtype), params)
        drafter = decode.dflash_drafter(host, self.drafter_cfg, self.gen.target_cfg)
        key = jax.random.fold_in(jax.random.PRNGKey(int(self.config.seed)), r)
        self.rows = rollout.rollout(path, self.gen, drafter, chosen, key=key,
                                    meta={**meta, "drafter": rollout.params_fingerprint(host)})
        counts = [replay.kept_blocks(row, self.drafter_cfg.block_size,
                                     int(self.config.data.max_length),
                                     int(self.config.train.num_anchors)) for row in self.rows]
        dropped = sum(lost for _, lost in counts)
        if dropped:
            log.warning("round %d: %d of %d replay blocks do not fit train.num_anchors=%d blocks "
                        "per row or data.max_length=%d and are not trained on", r, dropped,
                        dropped + sum(len(kept) for kept, _ in counts),
                        self.config.train.num_anchors, self.config.data.max_length)
        self._log_round(r, {"round": r, "step": r * self.per_round,
                            "on_policy_tau": decode.mean_acceptance(
                                row["acceptance"] for row in self.rows), "rows": len(self.rows),
                            "tokens": sum(len(row["response"]) for row in self.rows),
                            "blocks": sum(len(kept) for kept, _ in counts),
                            "blocks_dropped": dropped})

    def _log_round(self, r: int, row: dict) -> None:
        """WORKDIR/rounds.jsonl: one row per round (rows of later rounds dropped on resume)."""
        path = self.workdir / "rounds.jsonl"
        kept = [line for line in (path.read_text().splitlines() if path.exists() else [])
                if line.strip() and json.loads(line).get("round", math.inf) < r]
        with atomic_path(path) as tmp:
            tmp.write_text("".join(k + "\n" for k in [*kept, json.dumps(row)]))


def round_batches(config, workdir: Path, prompts, target_dir: Path, target_params, target_cfg,
                  drafter_cfg, tokenizer, start_step: int) -> RoundBatches:
    """The run's RoundBatches, rolling out with the target as loaded (its dtype) and opd.*."""
    o = config.opd
    gen = gen_lib.Generator(target_params, target_cfg, gen_lib.stop_token_ids(tokenizer),
                            int(tokenizer.pad_token_id or 0), int(o.max_new_tokens),
                            int(o.rollout_batch_size), Sampling(float(o.temperature), str(o.rule)))
    meta = {"target": resume.target_identity(target_dir), "target_dtype": str(config.target.dtype),
            "max_new_tokens": int(o.max_new_tokens),
            "batch_size": int(o.rollout_batch_size), "temperature": float(o.temperature),
            "rule": str(o.rule), "seed": int(config.seed)}
    return RoundBatches(config, workdir, prompts, gen, drafter_cfg, target_params.embed.dtype,
                        meta, start_step)
