"""The training run behind train.py: set-up from a config, the loop, logging and checkpoints.

`run(config)` builds (or loads) the target, the tokenizer, the data and the drafter, places them on
the mesh, restores the latest checkpoint of the work directory if any, trains, and writes
`WORKDIR/metrics.jsonl`, checkpoints under `WORKDIR/checkpoints` and the final drafter in the DFlash
HF format under `WORKDIR/hf`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from dpace_jax import sharding as shard_lib
from dpace_jax.config import parse_dtype, target_path
from dpace_jax.drafters import dflash as drafter_lib
from dpace_jax.drafters import hf as drafter_hf
from dpace_jax.drafters.config import DrafterConfig
from dpace_jax.io import hub, storage
from dpace_jax.io import lock as lock_lib
from dpace_jax.targets import hf as convert
from dpace_jax.targets import model as model_lib
from dpace_jax.train import checkpoint as ckpt_lib
from dpace_jax.train import drafter as drafter_setup
from dpace_jax.train import guards, nonfinite, preemption, resume
from dpace_jax.train import step as step_lib
from dpace_jax.train.metrics import MetricsLog, check_wandb
from dpace_jax.train.modes import BatchInputs, Mode, mode_of
from dpace_jax.train.settings import Settings

log = logging.getLogger(__name__)

def _to_host(metrics: dict) -> dict:
    host = {name: np.asarray(value) for name, value in jax.device_get(metrics).items()}
    return {name: a.tolist() if a.ndim else float(a) for name, a in host.items()}


@dataclasses.dataclass
class Run:
    """A training run set up from its settings (`setup`), ready for `train`."""

    settings: Settings
    mode: Mode
    workdir: storage.AnyPath
    target_dir: Path
    drafter_cfg: DrafterConfig
    mesh: Any
    target_params: Any
    state: step_lib.TrainState
    train_step: Callable
    batches: Any
    checkpointer: ckpt_lib.Checkpointer
    fingerprint: dict
    steps: int
    data_stats: dict
    lock: lock_lib.WorkdirLock | None = None  # process 0's, held until train() ends
    watch: preemption.PreemptionWatch | None = None


def check_config(config) -> Settings:
    """Every setting, typed and checked before any expensive work (ValueError naming the
    field)."""
    s = Settings.from_config(config)
    if s.step.target_attention == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(f"train.target_attention=cudnn needs an NVIDIA GPU; this run's backend "
                         f"is {jax.default_backend()!r} (use train.target_attention=einsum)")
    workdir = storage.resolve(s.workdir, "workdir")  # a bucket URL, or one line why not
    if not storage.is_object_store(workdir) and workdir.exists() and not workdir.is_dir():
        raise ValueError(f"workdir={s.workdir!r} is a file; name a run directory")
    if storage.is_object_store(workdir):
        guards.check_object_store(s, config)
    check_wandb(s.logging.wandb_settings, "logging.wandb")
    return s










def setup(config) -> Run:
    """Target, tokenizer, data and drafter loaded and placed on the mesh; the latest checkpoint
    of the work directory restored when there is one (with the settings it was written with).
    `config` is the run config after the demo step (dpace_jax.demo.prepare); below this point
    only the typed settings are used."""
    s = check_config(config)
    shard_lib.maybe_initialize_distributed(s.dist)  # before the watch: JAX's handler first
    workdir = storage.resolve(s.workdir)
    storage.mkdir(workdir)
    # Before anything writes there: Orbax's start-up clean-up alone would delete the temporary
    # step directory of another live run's save in flight.
    lock = lock_lib.acquire_on_main(workdir, is_main=jax.process_index() == 0,
                                    share=guards.broadcast if jax.process_count() > 1 else None)
    watch = None
    try:
        watch = preemption.PreemptionWatch(save_every_minutes=s.loop.save_every_minutes,
                                           sync_every=s.loop.log_every)
        r = _setup(s, config, workdir)
        if watch.signalled and not watch.multi:  # (multi-process: agreed on at the first step)
            raise preemption.Preempted(watch.signal_decision(watch.signalled),
                                       int(jax.device_get(r.state.step)), saved=False)
    except BaseException:
        if watch is not None:
            watch.restore()
        if lock is not None:
            lock.release()
        raise
    return dataclasses.replace(r, lock=lock, watch=watch)


def _setup(s: Settings, config, workdir) -> Run:
    mode = mode_of(s.mode)
    if s.offline:
        hub.go_offline()
    if jax.process_index() == 0:  # before anything is fetched
        hub.announce([("target.path", s.target_path), *(("data.paths", p) for p in s.data.paths)],
                     offline=convert.hub_offline())
    target_dir = convert.resolve_checkpoint(target_path(config))
    tokenizer = convert.load_tokenizer(target_dir)
    target_cfg = convert.load_config(target_dir)
    dcfg, init_params = drafter_setup.build_drafter(s.drafter, target_cfg, tokenizer)
    mode.check_drafter(dcfg, target_cfg)
    data = mode.load_data(s, workdir, target_dir, tokenizer, dcfg)
    guards.check_token_ids(data.source, target_cfg.vocab_size, s, workdir, target_dir)
    s = s.with_total_steps(data.steps)
    mesh = shard_lib.make_mesh(s.dist.mesh_shape)
    if s.loop.batch_size % shard_lib.num_batch_shards(mesh):
        raise ValueError(f"train.batch_size={s.loop.batch_size} must be divisible by the "
                         f"data*fsdp mesh size {shard_lib.num_batch_shards(mesh)}")

    target_dtype = parse_dtype(s.target_dtype, "target.dtype")
    target_shardings = model_lib.shardings(
        target_cfg, model_lib.schema(target_cfg).abstract(target_cfg, target_dtype), mesh)
    target_params, _ = convert.load_target(target_dir, dtype=target_dtype,
                                           shardings=target_shardings)

    optimizer = step_lib.make_optimizer(s.step)
    if init_params is None:
        init_params = drafter_lib.init_drafter_params(dcfg, jax.random.PRNGKey(s.seed))
    abstract_state = jax.eval_shape(
        lambda p: step_lib.init_state(p, optimizer, s.seed), init_params)
    state_shardings = step_lib.state_shardings(abstract_state, mesh, dcfg)
    state = jax.jit(lambda p: step_lib.init_state(p, optimizer, s.seed),
                    out_shardings=state_shardings)(init_params)

    checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=s.loop.keep_checkpoints)
    fingerprint = resume.run_fingerprint(s, mode, dcfg, data.data_id, target_dir)
    changed = {}

    def check(meta):
        nonlocal changed
        changed = resume.changed_settings(meta.get("fingerprint") or {}, fingerprint,
                                          s.loop.allow_changed,
                                          f"{checkpointer.directory} (its newest checkpoint)")

    abstract = ckpt_lib.abstract_like(state, state_shardings)
    found = checkpointer.restore_latest(abstract, strict=s.loop.strict_resume, check=check)
    rewind = found and mode.rewind(s, workdir, data, found[0])
    if rewind:
        found = guards.rewind(checkpointer, abstract, check, *rewind)
    data_state = None
    if found is not None:
        _, state, meta = found
        data_state = meta["data"]

    batches = mode.batches(s, data, BatchInputs(
        workdir, target_dir, target_params, target_cfg, dcfg, tokenizer, data_state,
        int(jax.device_get(state.step))))
    train_step = step_lib.make_train_step(target_cfg, dcfg, s.step, optimizer, mesh,
                                          state_shardings, target_shardings,
                                          objective=mode.objective(s),
                                          batch_keys=mode.batch_keys)
    if jax.process_index() == 0:
        if found is None or not (workdir / "run_config.json").exists():  # the first start's
            storage.write_text(workdir / "run_config.json", json.dumps(
                {"config": config.to_dict(), "drafter": drafter_hf.config_to_hf(dcfg),
                 "mode": s.mode, "total_steps": s.step.total_steps, "data": data.stats},
                indent=2, default=str))
        resume.record_start(workdir, int(jax.device_get(state.step)), changed)
    return Run(s, mode, workdir, target_dir, dcfg, mesh, target_params, state, train_step,
               batches, checkpointer, fingerprint, s.step.total_steps, data.stats)


def train(r: Run) -> dict:
    """The loop: steps from the restored one to the end (or train.stop_at), metrics every
    log_every steps, checkpoints every save_every; the finished drafter exported to WORKDIR/hf."""
    s, state = r.settings, r.state
    is_main = jax.process_index() == 0
    start_step = int(jax.device_get(state.step))
    exit_code, preempted = 1, False
    metrics_log = None
    try:
        metrics_log = MetricsLog(r.workdir, start_step, tensorboard=s.logging.tensorboard,
                                 wandb=s.logging.wandb_settings, wandb_field="logging.wandb",
                                 is_main=is_main)
        if hasattr(r.batches, "on_round"):  # OPD: each round's on-policy tau
            r.batches.on_round = metrics_log.log_round
        state, last = _loop(r, state, start_step, metrics_log)
        hf_dir, finished = None, int(jax.device_get(state.step)) == r.steps
        if finished:
            # the final checkpoint committed first: an export (hf/) means a finished, saved run
            r.checkpointer.wait()
            # a collective: every process takes part
            params = shard_lib.gather_to_host(state.params, r.mesh)
            if is_main:
                hf_dir = guards.export(params, r.drafter_cfg, r.workdir, r.steps)
        exit_code = 0
    except preemption.Preempted as e:
        exit_code, preempted = int(e.code), True
        raise
    finally:
        try:
            r.checkpointer.close()  # waits for the save in flight (the preemption save too)
        finally:
            if metrics_log is not None:
                metrics_log.close(exit_code, preempted)
            if r.watch is not None:
                r.watch.restore()
            if r.lock is not None:  # last: no other run may start while a save is in flight
                r.lock.release()
    return {"final_metrics": last, "hf_dir": hf_dir, "finished": finished,
            "target_dir": str(r.target_dir), "steps": r.steps, "data": r.data_stats,
            "mode": s.mode}


def _loop(r: Run, state, start_step: int, metrics_log: MetricsLog):
    """Steps from `start_step` to the end (or train.stop_at) -> (state, the last metrics row).
    After each step the preemption watch may ask for a save (SIGTERM, JAX's notice, the clock);
    after a stop request's save is committed, preemption.Preempted is raised."""
    s = r.settings
    batch_sharding = shard_lib.batch_sharding(r.mesh)
    last, tokens_seen, t_last = {}, 0, time.perf_counter()
    bar = tqdm(total=r.steps, initial=start_step, desc="train",
               disable=not (jax.process_index() == 0 and s.loop.progress))
    end = r.steps if s.loop.stop_at <= 0 else min(r.steps, s.loop.stop_at)
    tracker, limit = nonfinite.start(), jnp.int32(s.loop.max_skipped_steps)
    saved = start_step
    try:
        for step in range(start_step, end):
            local = r.batches.take(state)
            batch = {name: jax.make_array_from_process_local_data(batch_sharding, local[name])
                     for name in r.batches.keys}
            state, metrics = r.train_step(state, r.target_params, batch)
            tracker = nonfinite.track(tracker, metrics["finite"], step + 1, limit)
            tokens_seen += int(local["input_ids"].size) * jax.process_count()
            done = step + 1
            decision = r.watch.check(done) if r.watch is not None else preemption.CONTINUE
            log_now = done % s.loop.log_every == 0 or done == end
            save_now = (done % s.loop.save_every == 0 or done == end
                        or r.batches.save_due(done) or decision.save)
            if log_now or save_now:  # (a save must not keep a step the policy refuses)
                skipped = nonfinite.check(tracker, s.step.nan_policy, s.loop.max_skipped_steps,
                                          saved)
            if log_now:
                last = _to_host(metrics)
                now = time.perf_counter()
                last.update(step=done, tokens_per_s=tokens_seen / max(now - t_last, 1e-9),
                            skipped_steps=skipped)
                tokens_seen, t_last = 0, now
                metrics_log.write(last)
                bar.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last['accuracy']:.3f}",
                                lr=f"{last['lr']:.2e}", tok_s=f"{last['tokens_per_s']:.0f}")
                r.checkpointer.poll()  # a failed save is said now, not a save_every later
                if r.lock is not None:
                    r.lock.check()  # another run took the workdir over (we froze too long)
            bar.update(1)
            if save_now and saved != done:
                r.checkpointer.save(done, state, {"data": r.batches.state(),
                                                  "fingerprint": r.fingerprint})
                saved = done
                if r.watch is not None:
                    r.watch.note_saved(done)
            if decision.stop:
                r.checkpointer.wait()  # committed before the message says so
                raise preemption.Preempted(decision, saved)
    finally:
        bar.close()
    return state, last




def run(config) -> dict:
    """Train per `config` (`setup`, then `train`); returns a summary (final metrics, paths)."""
    return train(setup(config))
