"""On-policy post-training's rounds (Draft-OPD, arXiv 2605.29343; docs/design.md §9;
train.mode=opd: dpace_jax.train.opd.mode).

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
from dpace_jax.io.atomic import atomic_path
from dpace_jax.train import resume
from dpace_jax.train.opd import objective as opd_step
from dpace_jax.train.opd import replay, rollout

log = logging.getLogger(__name__)
def load_prompts(s, tokenizer) -> tuple[list[list[int]], dict]:
    """The prompt set (token ids) from data.paths, and its statistics (`s`: the run settings)."""
    conversations, stats = data_lib.load_conversations(list(s.data.paths), split=s.data.split,
                                                       strict=s.data.strict)
    prompts, skipped = rollout.conversation_prompts(conversations, tokenizer,
                                                    s.opd.max_prompt_length)
    if not prompts:
        raise ValueError(f"data.paths={list(s.data.paths)}: no prompt (a conversation's turns "
                         f"before its first assistant turn, at most "
                         f"opd.max_prompt_length={s.opd.max_prompt_length} tokens)")
    stats = {"load": stats, "prompts": {"prompts": len(prompts), "skipped": skipped,
                                        "fingerprint": rollout.prompts_fingerprint(prompts)}}
    return prompts, stats


def steps_per_round(opd, batch_size: int) -> int:
    return opd.epochs_per_round * (opd.prompts_per_round // batch_size)


def total_steps(opd, batch_size: int) -> int:
    return opd.rounds * steps_per_round(opd, batch_size)


def round_prompts(prompts, r: int, per_round: int) -> list[list[int]]:
    start = (r * per_round) % len(prompts)
    return [prompts[(start + i) % len(prompts)] for i in range(per_round)]


class RoundBatches:
    """The replay batches of the run, rolling each round out when its first batch is asked for
    (the trainer's batch source: `keys`, `take(state)`, `state()`, `save_due(step)`)."""

    keys = opd_step.BATCH_KEYS

    def __init__(self, opd, *, seed: int, batch_size: int, seq_len: int, num_blocks: int,
                 workdir: Path, prompts, gen: gen_lib.Generator, drafter_cfg, rollout_dtype,
                 meta: dict, start_step: int):
        self.opd, self.seed, self.batch_size = opd, seed, batch_size
        self.seq_len, self.num_blocks = seq_len, num_blocks
        self.workdir, self.prompts, self.gen = workdir, prompts, gen
        self.drafter_cfg, self.rollout_dtype, self.meta = drafter_cfg, rollout_dtype, meta
        self.step, self.per_round = int(start_step), steps_per_round(opd, batch_size)
        self.round, self.rows = -1, []
        self.on_round = None  # the trainer's metrics hook: called with each round's row

    def state(self) -> dict:
        return {"round": self.step // self.per_round, "step": self.step}

    def save_due(self, step: int) -> bool:
        """Every round ends with a checkpoint: the next round's rollouts come from it."""
        return step % self.per_round == 0

    def take(self, train_state) -> dict[str, np.ndarray]:
        r, within = divmod(self.step, self.per_round)
        if r != self.round:
            self._roll_out(r, train_state.params, first=within == 0)
        per_epoch = self.per_round // self.opd.epochs_per_round
        epoch, b = divmod(within, per_epoch)
        order = np.random.default_rng([self.seed, r, epoch]).permutation(len(self.rows))
        rows = [self.rows[i] for i in order[b * self.batch_size: (b + 1) * self.batch_size]]
        batch, _ = replay.replay_batch(
            rows, block_size=self.drafter_cfg.block_size,
            seq_len=self.seq_len, num_blocks=self.num_blocks,
            pad_token_id=self.gen.pad_id, need_extra=opd_step.needs_extra(self.opd))
        self.step += 1
        return batch

    def _roll_out(self, r: int, params, first: bool) -> None:
        """Round r's rollout rows: rolled out (or completed) at its first step, read back
        inside it."""
        path = self.workdir / "rollouts" / f"round-{r}.jsonl"
        chosen = round_prompts(self.prompts, r, self.opd.prompts_per_round)
        meta = {**self.meta, "round": r}
        self.round = r
        if not first:
            self.rows = rollout.read_finished(path, chosen, meta)
            rollout.check_rows(path, self.rows, self.drafter_cfg.block_size)
            return
        host = jax.tree.map(lambda x: jnp.asarray(np.asarray(x), self.rollout_dtype), params)
        drafter = decode.dflash_drafter(host, self.drafter_cfg, self.gen.target_cfg)
        key = jax.random.fold_in(jax.random.PRNGKey(self.seed), r)
        self.rows = rollout.rollout(path, self.gen, drafter, chosen, key=key,
                                    meta={**meta, "drafter": rollout.params_fingerprint(host)})
        rollout.check_rows(path, self.rows, self.drafter_cfg.block_size)
        counts = [replay.kept_blocks(row, self.drafter_cfg.block_size, self.seq_len,
                                     self.num_blocks) for row in self.rows]
        dropped = sum(lost for _, lost in counts)
        if dropped:
            log.warning("round %d: %d of %d replay blocks do not fit train.num_anchors=%d blocks "
                        "per row or data.max_length=%d and are not trained on", r, dropped,
                        dropped + sum(len(kept) for kept, _ in counts),
                        self.num_blocks, self.seq_len)
        self._log_round(r, {"round": r, "step": r * self.per_round,
                            "on_policy_tau": decode.mean_acceptance(
                                row["acceptance"] for row in self.rows), "rows": len(self.rows),
                            "tokens": sum(len(row["response"]) for row in self.rows),
                            "blocks": sum(len(kept) for kept, _ in counts),
                            "blocks_dropped": dropped})

    def _log_round(self, r: int, row: dict) -> None:
        """WORKDIR/rounds.jsonl: one row per round (rows of later rounds dropped on resume, a
        damaged row dropped with a warning naming its line); then the metrics hook."""
        path = self.workdir / "rounds.jsonl"
        kept = [json.dumps(old) for old in read_rounds(path) if old.get("round", math.inf) < r]
        with atomic_path(path) as tmp:
            tmp.write_text("".join(k + "\n" for k in [*kept, json.dumps(row)]))
        if self.on_round is not None:
            self.on_round(row)


def damaged_round(s, workdir: Path, prompts, step: int) -> tuple[int, str, Path] | None:
    """For a run restored at `step` inside a round: when that round's rollout file (trained on
    already) cannot be read back whole, (the round's start step, why, the file): the round is
    then rolled out again from its start checkpoint instead of needing a new workdir."""
    per_round = steps_per_round(s.opd, s.loop.batch_size)
    r, within = divmod(step, per_round)
    if within == 0:  # its first step rolls it out (or completes it)
        return None
    path = workdir / "rollouts" / f"round-{r}.jsonl"
    why = rollout.damage(path, len(round_prompts(prompts, r, s.opd.prompts_per_round)))
    return None if why is None else (r * per_round, why, path)


def read_rounds(path: Path) -> list[dict]:
    """The rows of a rounds.jsonl; a damaged line (a torn write, an edit) is skipped with a
    warning naming the file and line."""
    rows = []
    for i, line in enumerate(path.read_text().splitlines() if path.exists() else [], 1):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not an object")
            rows.append(row)
        except ValueError:
            if line.strip():
                log.warning("%s:%d: damaged round row skipped (%r)", path, i, line[:60])
    return rows


def round_batches(s, workdir: Path, prompts, target_dir: Path, target_params, target_cfg,
                  drafter_cfg, tokenizer, start_step: int) -> RoundBatches:
    """The run's RoundBatches (`s`: the run settings), rolling out with the target as loaded
    (its dtype) and opd.*."""
    o = s.opd
    gen = gen_lib.Generator(target_params, target_cfg, gen_lib.stop_token_ids(tokenizer),
                            int(tokenizer.pad_token_id or 0), o.max_new_tokens,
                            o.rollout_batch_size, o.sampling)
    meta = {"target": resume.target_identity(target_dir), "target_dtype": s.target_dtype,
            "max_new_tokens": o.max_new_tokens, "batch_size": o.rollout_batch_size,
            "temperature": o.temperature, "rule": o.rule, "seed": s.seed}
    return RoundBatches(o, seed=s.seed, batch_size=s.loop.batch_size,
                        seq_len=s.data.max_length, num_blocks=s.step.num_anchors,
                        workdir=workdir, prompts=prompts, gen=gen, drafter_cfg=drafter_cfg,
                        rollout_dtype=target_params.embed.dtype, meta=meta,
                        start_step=start_step)
