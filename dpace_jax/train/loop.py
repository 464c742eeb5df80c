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
from dpace_jax.io.atomic import atomic_path
from dpace_jax.targets import hf as convert
from dpace_jax.targets import model as model_lib
from dpace_jax.train import checkpoint as ckpt_lib
from dpace_jax.train import drafter as drafter_setup
from dpace_jax.train import resume
from dpace_jax.train import step as step_lib
from dpace_jax.train.modes import BatchInputs, Mode, mode_of
from dpace_jax.train.settings import Settings

log = logging.getLogger(__name__)

def _to_host(metrics: dict) -> dict:
    host = {name: np.asarray(value) for name, value in jax.device_get(metrics).items()}
    return {name: a.tolist() if a.ndim else float(a) for name, a in host.items()}


class MetricsWriter:
    """Appends JSON lines. On resume the file is repaired first: rows past the restored step are
    dropped, and so is a damaged row (not a JSON object with a step), reported with its line."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        kept = []
        if path.exists():
            text = path.read_bytes().decode("utf-8", errors="replace")
            for i, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    step = row["step"] if isinstance(row, dict) else None
                except (json.JSONDecodeError, KeyError):
                    step = None
                if not isinstance(step, int):
                    log.warning("%s:%d: damaged metrics row dropped (%r)", path, i, line[:60])
                elif step <= resume_step:
                    kept.append(line)
        with atomic_path(path) as tmp:
            tmp.write_text("".join(k + "\n" for k in kept))

    def write(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


@dataclasses.dataclass
class Run:
    """A training run set up from its settings (`setup`), ready for `train`."""

    settings: Settings
    mode: Mode
    workdir: Path
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


def check_config(config) -> Settings:
    """Every setting, typed and checked before any expensive work (ValueError naming the
    field)."""
    s = Settings.from_config(config)
    if s.step.target_attention == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(f"train.target_attention=cudnn needs an NVIDIA GPU; this run's backend "
                         f"is {jax.default_backend()!r} (use train.target_attention=einsum)")
    return s


def setup(config) -> Run:
    """Target, tokenizer, data and drafter loaded and placed on the mesh; the latest checkpoint
    of the work directory restored when there is one (with the settings it was written with).
    `config` is the run config after the demo step (dpace_jax.demo.prepare); below this point
    only the typed settings are used."""
    s = check_config(config)
    mode = mode_of(s.mode)
    shard_lib.maybe_initialize_distributed(s.dist)
    workdir = Path(s.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    target_dir = convert.resolve_checkpoint(target_path(config))
    tokenizer = convert.load_tokenizer(target_dir)
    target_cfg = convert.load_config(target_dir)
    dcfg, init_params = drafter_setup.build_drafter(s.drafter, target_cfg, tokenizer)
    mode.check_drafter(dcfg, target_cfg)
    data = mode.load_data(s, workdir, target_dir, tokenizer, dcfg)
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

    found = checkpointer.restore_latest(ckpt_lib.abstract_like(state, state_shardings),
                                        strict=s.loop.strict_resume, check=check)
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
            with atomic_path(workdir / "run_config.json") as tmp:
                tmp.write_text(json.dumps(
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
    metrics_writer = MetricsWriter(r.workdir / "metrics.jsonl", start_step) if is_main else None
    batch_sharding = shard_lib.batch_sharding(r.mesh)
    last, tokens_seen, t_last = {}, 0, time.perf_counter()
    bar = tqdm(total=r.steps, initial=start_step, desc="train",
               disable=not (is_main and s.loop.progress))
    end = r.steps if s.loop.stop_at <= 0 else min(r.steps, s.loop.stop_at)
    # Non-finite steps (not applied by the step) are tracked on the device and checked at each
    # log and save, so that the loop never waits for a step just to look at its loss.
    first_bad, skipped = jnp.int32(-1), jnp.int32(0)
    saved = start_step
    try:
        for step in range(start_step, end):
            local = r.batches.take(state)
            batch = {name: jax.make_array_from_process_local_data(batch_sharding, local[name])
                     for name in r.batches.keys}
            state, metrics = r.train_step(state, r.target_params, batch)
            first_bad, skipped = _track_nonfinite(first_bad, skipped, metrics["finite"], step + 1)
            tokens_seen += int(local["input_ids"].size) * jax.process_count()
            done = step + 1
            log_now = done % s.loop.log_every == 0 or done == end
            save_now = (done % s.loop.save_every == 0 or done == end
                        or r.batches.save_due(done))
            if log_now or save_now:
                _stop_if_nonfinite(int(first_bad), s.step.nan_policy, saved)
            if log_now:
                last = _to_host(metrics)
                now = time.perf_counter()
                last.update(step=done, tokens_per_s=tokens_seen / max(now - t_last, 1e-9),
                            skipped_steps=int(skipped))
                tokens_seen, t_last = 0, now
                if metrics_writer:
                    metrics_writer.write(last)
                bar.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last['accuracy']:.3f}",
                                lr=f"{last['lr']:.2e}", tok_s=f"{last['tokens_per_s']:.0f}")
            bar.update(1)
            if save_now:
                r.checkpointer.save(done, state, {"data": r.batches.state(),
                                                  "fingerprint": r.fingerprint})
                saved = done
    finally:
        bar.close()
        r.checkpointer.close()

    hf_dir = None
    finished = int(jax.device_get(state.step)) == r.steps
    if finished:
        # a collective: every process takes part
        params = shard_lib.gather_to_host(state.params, r.mesh)
        if is_main:
            hf_dir = drafter_hf.export_drafter(params, r.drafter_cfg, r.workdir / "hf")
    return {"final_metrics": last, "hf_dir": hf_dir and str(hf_dir), "finished": finished,
            "target_dir": str(r.target_dir), "steps": r.steps, "data": r.data_stats,
            "mode": s.mode}


@jax.jit
def _track_nonfinite(first_bad, skipped, finite, step):
    first_bad = jnp.where((first_bad < 0) & ~finite, jnp.int32(step), first_bad)
    return first_bad, skipped + (~finite).astype(jnp.int32)


def _stop_if_nonfinite(first_bad: int, policy: str, saved: int) -> None:
    if first_bad >= 0 and policy == "stop":
        raise FloatingPointError(
            f"the loss or the gradients of step {first_bad} are not finite "
            f"(train.nan_policy=stop): the run stops; its update was not applied and nothing "
            f"after step {saved} was saved. --config.train.nan_policy=skip-step skips such steps")


def run(config) -> dict:
    """Train per `config` (`setup`, then `train`); returns a summary (final metrics, paths)."""
    return train(setup(config))
