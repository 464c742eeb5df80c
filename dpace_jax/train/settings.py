"""The run's settings as typed sections, built once from the ml_collections run config at the top
(`Settings.from_config`); nothing below the trainer reads the run config itself. Each section
checks its fields on creation, naming the config field of a bad value.

The resume fingerprint (dpace_jax.train.resume) is derived from these sections: every field of
a section is part of it unless the section lists it in `SAME_RESULT` (switches that change speed
or memory, or what is logged and kept, but not the trained drafter), so a new setting is guarded
by default.

Deprecated spellings still read, with a one-line notice: `train.loss=opd` / `train.loss=spd`
(now `train.mode`), `train.opd_dpace` (now `opd.dpace_weights`).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import numpy as np

from dpace_jax.config import parse_dtype
from dpace_jax.infer.sampling import Sampling
from dpace_jax.train.step import StepConfig

MODES = ("sft", "opd", "spd")


def fingerprint_of(section) -> dict:
    """The section's fields that change the trained result, JSON-able (dtypes by name)."""
    out = {}
    for f in dataclasses.fields(section):
        if f.name in getattr(section, "SAME_RESULT", ()):
            continue
        value = getattr(section, f.name)
        if f.name.endswith("dtype"):
            value = np.dtype(value).name
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """train.* of the loop: the batch, the run's length, logging and checkpoints."""

    batch_size: int
    epochs: int
    max_steps: int  # > 0: stop after this many steps (and size the schedule for them)
    stop_at: int  # > 0: save and exit after this step, as if preempted
    log_every: int
    save_every: int
    keep_checkpoints: int
    strict_resume: bool
    allow_changed: tuple[str, ...]
    progress: bool
    save_every_minutes: float  # > 0: a save by the clock too (dpace_jax.train.preemption)
    max_skipped_steps: int  # skip-step: the longest run of skipped steps allowed (-1: any)

    SAME_RESULT = ("stop_at", "log_every", "save_every", "keep_checkpoints", "strict_resume",
                   "allow_changed", "progress", "epochs", "max_steps",  # total_steps covers these
                   "save_every_minutes", "max_skipped_steps")

    @classmethod
    def from_config(cls, t) -> LoopConfig:
        return cls(int(t.batch_size), int(t.epochs), int(t.max_steps), int(t.stop_at),
                   int(t.log_every), int(t.save_every), int(t.keep_checkpoints),
                   bool(t.strict_resume), tuple(str(a) for a in t.allow_changed),
                   bool(t.progress), float(t.save_every_minutes), int(t.max_skipped_steps))

    def __post_init__(self):
        for name in ("batch_size", "log_every", "save_every", "keep_checkpoints", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)} must be >= 1")
        if not self.save_every_minutes >= 0:  # also NaN
            raise ValueError(f"train.save_every_minutes={self.save_every_minutes} must be >= 0 "
                             "(0: off)")
        if self.max_skipped_steps < -1:
            raise ValueError(f"train.max_skipped_steps={self.max_skipped_steps} must be >= 0, "
                             "or -1 for no limit")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """data.*: where the conversations come from and how they become training sequences."""

    paths: tuple[str, ...]
    split: str
    max_length: int
    cache_dir: str
    strict: bool
    regenerate: bool
    regenerate_max_new_tokens: int
    regenerate_batch_size: int

    SAME_RESULT = ("paths", "split", "cache_dir", "strict", "regenerate",
                   "regenerate_max_new_tokens", "regenerate_batch_size")  # the data's own hash

    @classmethod
    def from_config(cls, d) -> DataConfig:
        return cls(tuple(str(p) for p in d.paths), str(d.split), int(d.max_length),
                   str(d.cache_dir), bool(d.strict), bool(d.regenerate),
                   int(d.regenerate_max_new_tokens), int(d.regenerate_batch_size))

    def __post_init__(self):
        if self.max_length < 2:
            raise ValueError(f"data.max_length={self.max_length} must be >= 2")


@dataclasses.dataclass(frozen=True)
class OpdConfig:
    """opd.*: on-policy post-training (train.mode=opd, dpace_jax.train.opd)."""

    rounds: int
    prompts_per_round: int
    epochs_per_round: int
    max_prompt_length: int
    max_new_tokens: int
    rollout_batch_size: int
    temperature: float
    rule: str
    decay: float  # a rejected draft at block offset j weighs decay^(j-1)
    rejected_weight: float
    dpace_weights: bool  # D-PACE weights (train.alpha) on the realized-token stream
    teacher: str = "softmax"  # softmax (T = 1, Draft-OPD's) | verify (what verification accepts)
    rejected_stream: str = "first"  # first (rejected draft per block) | suffix (all after it)
    tv_reduce: str = "position"  # train.loss=tv: mean per position | per block (Draft-OPD's)

    CHOICES = {"teacher": ("softmax", "verify"), "rejected_stream": ("first", "suffix"),
               "tv_reduce": ("position", "block")}

    @classmethod
    def from_config(cls, o, dpace_weights: bool) -> OpdConfig:
        return cls(int(o.rounds), int(o.prompts_per_round), int(o.epochs_per_round),
                   int(o.max_prompt_length), int(o.max_new_tokens), int(o.rollout_batch_size),
                   float(o.temperature), str(o.rule), float(o.decay), float(o.rejected_weight),
                   bool(dpace_weights), str(o.teacher), str(o.rejected_stream),
                   str(o.tv_reduce))

    def __post_init__(self):
        for name in ("rounds", "prompts_per_round", "epochs_per_round", "max_prompt_length",
                     "max_new_tokens", "rollout_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"opd.{name}={getattr(self, name)} must be >= 1")
        if not 0.0 < self.decay <= 1.0 or self.rejected_weight < 0:
            raise ValueError(f"opd.decay={self.decay} must lie in (0, 1] and "
                             f"opd.rejected_weight={self.rejected_weight} be >= 0")
        try:
            Sampling(self.temperature, self.rule)
        except ValueError as e:
            raise ValueError(f"opd.{e}") from None
        for name, choices in self.CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"opd.{name}={getattr(self, name)!r}; expected one of {choices}")

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.rule)


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """mesh.* and the multi-process launch fields."""

    mesh_shape: tuple[int, ...]
    distributed: bool
    coordinator_address: str
    num_processes: int
    process_id: int

    @classmethod
    def from_config(cls, c) -> DistributedConfig:
        return cls(tuple(int(s) for s in c.mesh.shape), bool(c.distributed),
                   str(c.coordinator_address), int(c.num_processes), int(c.process_id))

    def __post_init__(self):
        shape = self.mesh_shape
        if (len(shape) != 3 or any(n < 1 and n != -1 for n in shape)
                or list(shape).count(-1) > 1):
            raise ValueError(f"mesh.shape={shape}: expected (data, fsdp, tensor), each >= 1 "
                             "and at most one -1 (all remaining devices)")


@dataclasses.dataclass(frozen=True)
class LoggingSettings:
    """logging.*: TensorBoard and Weights & Biases (dpace_jax.train.metrics.MetricsLog)."""

    tensorboard: bool
    wandb: tuple[tuple[str, Any], ...]  # wandb.init's keyword arguments; () when W&B is off

    @classmethod
    def from_config(cls, lg) -> LoggingSettings:
        w = lg.wandb
        given = {k: (list(v) if isinstance(v, tuple) else v) for k, v in w.items() if v}
        if given and not w.project:
            raise ValueError(f"logging.wandb: {sorted(given)} set but logging.wandb.project is "
                             "empty (it turns W&B on)")
        return cls(bool(lg.tensorboard), tuple(sorted(given.items())))

    @property
    def wandb_settings(self) -> dict | None:
        return dict(self.wandb) or None


def _family_fields(d) -> dict:
    """The drafter.* fields of drafter.arch's family config (DFlash 2's), by name."""
    from dpace_jax.drafters import drafter_family

    family = drafter_family(str(d.get("arch", "dflash")))
    if family.config_type is None:
        return {}
    names = [f.name for f in dataclasses.fields(family.config_type)]
    missing = [n for n in names if n not in d]
    if missing:
        raise ValueError(f"drafter.arch={d.arch}: missing field(s) "
                         f"{['drafter.' + n for n in missing]}")
    return {n: d[n] for n in names}


@dataclasses.dataclass(frozen=True)
class DrafterSettings:
    """drafter.*: the drafter to build (or drafter.init_from, the one to start from)."""

    num_layers: int
    block_size: int
    mask_token_id: int
    target_layer_ids: tuple[int, ...]
    init_from: str
    intermediate_size: int
    layer_types: tuple[str, ...]
    sliding_window: int
    is_causal: bool | None
    arch: str = "dflash"
    family: dict = dataclasses.field(default_factory=dict)  # the family's own drafter.* fields
    heads: tuple[int, int, int] = (0, 0, 0)  # num_heads, num_kv_heads, head_dim (0: the target's)

    @classmethod
    def from_config(cls, d) -> DrafterSettings:
        return cls(int(d.num_layers), int(d.block_size), int(d.mask_token_id),
                   tuple(int(i) for i in d.target_layer_ids), str(d.init_from),
                   int(d.get("intermediate_size", 0)), tuple(str(t) for t in d.layer_types),
                   int(d.sliding_window), None if d.is_causal is None else bool(d.is_causal),
                   str(d.get("arch", "dflash")), _family_fields(d),
                   tuple(int(d.get(n, 0)) for n in HEAD_FIELDS))

    def __post_init__(self):
        if self.num_layers < 1 or self.block_size < 2:
            raise ValueError(f"drafter.num_layers={self.num_layers} must be >= 1 and "
                             f"drafter.block_size={self.block_size} >= 2")
        for name, value in zip(HEAD_FIELDS, self.heads, strict=True):
            if value < 0:
                raise ValueError(f"drafter.{name}={value} must be >= 0 (0: the target's)")
        heads, kv = self.heads[0], self.heads[1]
        if heads and kv and heads % kv:
            raise ValueError(f"drafter.num_heads={heads} must be a multiple of "
                             f"drafter.num_kv_heads={kv}")


HEAD_FIELDS = ("num_heads", "num_kv_heads", "head_dim")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The whole run, typed: train.py's config after the demo step (dpace_jax.demo.prepare)."""

    workdir: str
    seed: int
    mode: str
    target_path: str  # a checkpoint directory or hub id ("" or "demo:..." before the demo step)
    target_dtype: str
    step: StepConfig  # its total_steps is a placeholder (1) until the data are known
    loop: LoopConfig
    data: DataConfig
    drafter: DrafterSettings
    opd: OpdConfig
    dist: DistributedConfig
    logging: LoggingSettings
    offline: bool  # never reach the HF hub (also when HF_HUB_OFFLINE is set)
    config: Any = dataclasses.field(default=None, compare=False, repr=False)  # for run_config

    @classmethod
    def from_config(cls, config, *, notify: bool = True) -> Settings:
        """Check and type every section (ValueError naming the field)."""
        if not config.workdir:
            raise ValueError("--config.workdir is required (the run directory)")
        mode, loss = str(config.train.get("mode", "sft")), str(config.train.loss)
        if loss in ("opd", "spd") and mode == "sft":  # the old spelling of the mode
            _notice(notify, f"train.loss={loss} is deprecated: use train.mode={loss}")
            mode, loss = loss, ""
        if mode not in MODES:
            raise ValueError(f"train.mode={mode!r}; expected one of {MODES}")
        from dpace_jax.train.modes import mode_of

        run_mode = mode_of(mode)
        loss = loss or run_mode.default_objective
        if loss not in run_mode.objectives:
            raise ValueError(f"train.loss={loss!r} is not an objective of train.mode={mode}; "
                             f"expected one of {tuple(run_mode.objectives)}")
        dpace_weights = bool(config.opd.get("dpace_weights", False))
        if config.train.get("opd_dpace", False):
            _notice(notify, "train.opd_dpace is deprecated: use opd.dpace_weights=True")
            dpace_weights = True
        parse_dtype(str(config.target.dtype), "target.dtype")
        s = cls(str(config.workdir), int(config.seed), mode, str(config.target.path),
                str(config.target.dtype), StepConfig.from_config(config, 1, loss=loss),
                LoopConfig.from_config(config.train), DataConfig.from_config(config.data),
                DrafterSettings.from_config(config.drafter),
                OpdConfig.from_config(config.opd, dpace_weights),
                DistributedConfig.from_config(config), LoggingSettings.from_config(config.logging),
                bool(config.get("offline", False)), config)
        if s.seed < 0:
            raise ValueError(f"seed={s.seed} must be >= 0")
        run_mode.check(s)
        return s

    def with_total_steps(self, steps: int) -> Settings:
        return dataclasses.replace(self, step=dataclasses.replace(self.step, total_steps=steps))


_NOTIFIED: set[str] = set()


def _notice(notify: bool, text: str) -> None:
    """A one-line notice on stderr, once per process."""
    if notify and text not in _NOTIFIED:
        _NOTIFIED.add(text)
        print(f"notice: {text}", file=sys.stderr)
