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
from dpace_jax.data import conversations as data_lib
from dpace_jax.drafters import dflash as drafter_lib
from dpace_jax.drafters import hf as drafter_hf
from dpace_jax.infer import generation
from dpace_jax.io.atomic import atomic_path
from dpace_jax.nn.schema import TARGET_SCHEMA
from dpace_jax.targets import hf as convert
from dpace_jax.targets import model as model_lib
from dpace_jax.train import checkpoint as ckpt_lib
from dpace_jax.train import resume
from dpace_jax.train import step as step_lib
from dpace_jax.train.batches import Batches
from dpace_jax.train.opd import rounds as opd

log = logging.getLogger(__name__)

def mask_token_id(config, tokenizer, target_cfg: model_lib.ModelConfig) -> int:
    """The drafter's mask token: the configured id, else the tokenizer's `<|MASK|>`, else the
    first id past the tokenizer (Qwen3: 151669, inside the padded vocabulary)."""
    if config.drafter.mask_token_id >= 0:
        mask_id = int(config.drafter.mask_token_id)
    else:
        mask_id = tokenizer.convert_tokens_to_ids("<|MASK|>")
        if mask_id is None or mask_id == tokenizer.unk_token_id:
            mask_id = len(tokenizer)
    if not 0 <= mask_id < target_cfg.vocab_size:
        raise ValueError(
            f"drafter.mask_token_id={mask_id} is outside the target vocabulary "
            f"({target_cfg.vocab_size}); set --config.drafter.mask_token_id"
        )
    return mask_id


def attention_layout(drafter) -> dict:
    """layer_types / sliding_window / is_causal of the drafter from config.drafter, checked."""
    window = int(drafter.sliding_window)
    types = tuple(str(t) for t in drafter.layer_types)
    if window < 0:
        raise ValueError(f"drafter.sliding_window={window} must be >= 0 (0: no sliding window)")
    if types:
        if len(types) != int(drafter.num_layers):
            raise ValueError(f"drafter.layer_types has {len(types)} entries; expected one per "
                             f"layer (drafter.num_layers={drafter.num_layers})")
        bad = sorted({t for t in types if t not in drafter_lib.LAYER_TYPES})
        if bad:
            raise ValueError(f"drafter.layer_types: unknown {bad}; expected "
                             f"{' or '.join(drafter_lib.LAYER_TYPES)}")
        sliding = "sliding_attention" in types
        if sliding and not window:
            raise ValueError("drafter.layer_types has sliding_attention layers: set "
                             "drafter.sliding_window >= 1")
        if window and not sliding:
            raise ValueError(f"drafter.sliding_window={window} but drafter.layer_types has no "
                             "sliding_attention layer")
    elif window:
        types = ("sliding_attention",) * int(drafter.num_layers)
    return {"layer_types": types, "sliding_window": window, "is_causal": bool(drafter.is_causal)}


def build_drafter(config, target_cfg, tokenizer) -> tuple[drafter_lib.DrafterConfig, Any]:
    """(drafter config, its initial params): drafter.init_from's (a DFlash HF directory or a
    training run directory), else the drafter.* fields' (params None: initialize)."""
    params = None
    if config.drafter.init_from:
        loaded = generation.load_drafter(config.drafter.init_from)
        dcfg, params = loaded.config, loaded.params
        field = f"{loaded.source}: dflash_config.target_layer_ids"
    else:
        field = "drafter.target_layer_ids"
        ids = tuple(int(i) for i in config.drafter.target_layer_ids) or None
        dcfg = drafter_lib.DrafterConfig.for_target(
            target_cfg,
            num_layers=config.drafter.num_layers,
            block_size=config.drafter.block_size,
            mask_token_id=mask_token_id(config, tokenizer, target_cfg),
            target_layer_ids=ids,
            intermediate_size=int(config.drafter.get("intermediate_size", 0)),
            **attention_layout(config.drafter),
        )
    drafter_lib.check_compatible(dcfg, target_cfg, source="drafter config")
    drafter_lib.warn_if_last_layer(dcfg.target_layer_ids, target_cfg.num_layers, field)
    return dcfg, params


def load_training_data(config, workdir: Path, target_dir: Path, tokenizer, block_size: int):
    """Conversations -> (optionally regenerated by the target) -> tokenized dataset."""
    paths = list(config.data.paths)
    if not paths:
        raise ValueError("data.paths is empty; name training files (or, through train.py, set "
                         "data.demo=True for the demo's chats)")
    if config.data.regenerate:
        from dpace_jax import regenerate

        if jax.process_count() > 1:
            raise ValueError("data.regenerate runs in a single process; regenerate the data "
                             "first with `python -m dpace_jax.regenerate`")

        out = workdir / "data" / "regenerated.jsonl"
        regenerate.regenerate(
            str(target_dir), paths, out, max_new_tokens=int(config.data.regenerate_max_new_tokens),
            batch_size=int(config.data.regenerate_batch_size), seed=int(config.seed),
            dtype=config.target.dtype, split=config.data.split,
            progress=bool(config.train.progress) and jax.process_index() == 0,
        )
        paths = [out]
    conversations, load_stats = data_lib.load_conversations(paths, split=config.data.split,
                                                            strict=bool(config.data.strict))
    cache_dir = Path(config.data.cache_dir) if config.data.cache_dir else workdir / "cache"
    dataset, tok_stats = data_lib.tokenize_conversations(
        conversations, tokenizer, max_length=config.data.max_length,
        block_size=block_size, cache_dir=cache_dir,
    )
    return dataset, {"load": load_stats, "tokenize": tok_stats}


def total_steps(config, num_samples: int) -> int:
    if config.train.max_steps > 0:
        return int(config.train.max_steps)
    per_epoch = num_samples // config.train.batch_size
    if per_epoch < 1:
        raise ValueError(
            f"{num_samples} training samples make no batch of train.batch_size="
            f"{config.train.batch_size}"
        )
    return per_epoch * int(config.train.epochs)


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
    """A training run set up from its config (`setup`), ready for `train`."""

    config: Any
    workdir: Path
    target_dir: Path
    drafter_cfg: drafter_lib.DrafterConfig
    mesh: Any
    target_params: Any
    state: step_lib.TrainState
    train_step: Callable
    batches: Batches
    checkpointer: ckpt_lib.Checkpointer
    fingerprint: dict
    steps: int
    data_stats: dict


def check_config(config) -> None:
    """Settings that fail before any expensive work."""
    if not config.workdir:
        raise ValueError("--config.workdir is required (the run directory)")
    step_lib.StepConfig.from_config(config, 1)  # every train.* setting of the step
    if config.train.loss == step_lib.OPD:
        opd.check(config)
    minimum = {"train.batch_size": 1, "train.log_every": 1, "train.save_every": 1,
               "train.keep_checkpoints": 1, "train.epochs": 1, "drafter.num_layers": 1,
               "drafter.block_size": 2, "data.max_length": 2}
    for field, low in minimum.items():
        section, name = field.split(".")
        if int(config[section][name]) < low:
            raise ValueError(f"{field}={config[section][name]} must be >= {low}")
    if config.train.target_attention == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(f"train.target_attention=cudnn needs an NVIDIA GPU; this run's backend "
                         f"is {jax.default_backend()!r} (use train.target_attention=einsum)")


def setup(config) -> Run:
    """Target, tokenizer, data and drafter loaded and placed on the mesh; the latest checkpoint
    of the work directory restored when there is one (with the settings it was written with)."""
    check_config(config)
    shard_lib.maybe_initialize_distributed(config)
    on_policy = config.train.loss == step_lib.OPD
    workdir = Path(config.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    target_dir = convert.resolve_checkpoint(target_path(config))
    tokenizer = convert.load_tokenizer(target_dir)
    target_cfg = convert.load_config(target_dir)
    dcfg, init_params = build_drafter(config, target_cfg, tokenizer)
    step_args = opd.STEP_ARGS if on_policy else {}
    if config.train.loss == step_lib.SPD:
        from dpace_jax.infer.spd import draft as spd_draft

        spd_draft.check(dcfg, target_cfg, source="drafter config")
        step_args = spd_draft.STEP_ARGS
    if on_policy:
        prompts, data_stats = opd.load_prompts(config, tokenizer)
        steps, data_id = opd.total_steps(config), data_stats["prompts"]["fingerprint"]
    else:
        dataset, data_stats = load_training_data(config, workdir, target_dir, tokenizer,
                                                 dcfg.block_size)
        steps = total_steps(config, len(dataset))
        data_id = data_stats["tokenize"].get("fingerprint")
    step_cfg = step_lib.StepConfig.from_config(config, steps)
    mesh = shard_lib.make_mesh(tuple(config.mesh.shape))
    if config.train.batch_size % shard_lib.num_batch_shards(mesh):
        raise ValueError(f"train.batch_size={config.train.batch_size} must be divisible by the "
                         f"data*fsdp mesh size {shard_lib.num_batch_shards(mesh)}")

    target_dtype = parse_dtype(config.target.dtype, "target.dtype")
    target_shardings = shard_lib.param_shardings(
        TARGET_SCHEMA.abstract(target_cfg, target_dtype), mesh)
    target_params, _ = convert.load_target(target_dir, dtype=target_dtype,
                                           shardings=target_shardings)

    optimizer = step_lib.make_optimizer(step_cfg)
    if init_params is None:
        init_params = drafter_lib.init_drafter_params(dcfg, jax.random.PRNGKey(config.seed))
    abstract_state = jax.eval_shape(
        lambda p: step_lib.init_state(p, optimizer, config.seed), init_params)
    state_shardings = step_lib.state_shardings(abstract_state, mesh)
    state = jax.jit(lambda p: step_lib.init_state(p, optimizer, config.seed),
                    out_shardings=state_shardings)(init_params)

    checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints",
                                         keep=int(config.train.keep_checkpoints))
    fingerprint = resume.run_fingerprint(config, dcfg, steps, data_id, target_dir)
    changed = {}

    def check(meta):
        nonlocal changed
        changed = resume.changed_settings(meta.get("fingerprint") or {}, fingerprint,
                                          config.train.allow_changed,
                                          f"{checkpointer.directory} (its newest checkpoint)")

    found = checkpointer.restore_latest(ckpt_lib.abstract_like(state, state_shardings),
                                        strict=bool(config.train.strict_resume), check=check)
    data_state = None
    if found is not None:
        _, state, meta = found
        data_state = meta["data"]

    if on_policy:
        batches = opd.round_batches(config, workdir, prompts, target_dir, target_params,
                                    target_cfg, dcfg, tokenizer, int(jax.device_get(state.step)))
    else:
        batches = Batches(
            dataset, batch_size=int(config.train.batch_size),
            seq_len=int(config.data.max_length), seed=int(config.seed), state=data_state,
            process_index=jax.process_index(), process_count=jax.process_count())
    train_step = step_lib.make_train_step(target_cfg, dcfg, step_cfg, optimizer, mesh,
                                          state_shardings, target_shardings, **step_args)
    if jax.process_index() == 0:
        if found is None or not (workdir / "run_config.json").exists():  # the first start's
            with atomic_path(workdir / "run_config.json") as tmp:
                tmp.write_text(json.dumps(
                    {"config": config.to_dict(), "drafter": drafter_hf.config_to_hf(dcfg),
                     "total_steps": steps, "data": data_stats}, indent=2, default=str))
        resume.record_start(workdir, int(jax.device_get(state.step)), changed)
    return Run(config, workdir, target_dir, dcfg, mesh, target_params, state, train_step,
               batches, checkpointer, fingerprint, steps, data_stats)


def train(r: Run) -> dict:
    """The loop: steps from the restored one to the end (or train.stop_at), metrics every
    log_every steps, checkpoints every save_every; the finished drafter exported to WORKDIR/hf."""
    config, state = r.config, r.state
    is_main = jax.process_index() == 0
    start_step = int(jax.device_get(state.step))
    metrics_writer = MetricsWriter(r.workdir / "metrics.jsonl", start_step) if is_main else None
    batch_sharding = shard_lib.batch_sharding(r.mesh)
    last, tokens_seen, t_last = {}, 0, time.perf_counter()
    bar = tqdm(total=r.steps, initial=start_step, desc="train",
               disable=not (is_main and config.train.progress))
    end = r.steps if config.train.stop_at <= 0 else min(r.steps, int(config.train.stop_at))
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
            log_now = done % config.train.log_every == 0 or done == end
            save_now = (done % config.train.save_every == 0 or done == end
                        or r.batches.save_due(done))
            if log_now or save_now:
                _stop_if_nonfinite(int(first_bad), config.train.nan_policy, saved)
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
            "target_dir": str(r.target_dir), "steps": r.steps, "data": r.data_stats}


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
