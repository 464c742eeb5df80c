"""The stages of SPD's pipeline (dpace_jax.infer.spd.pipeline): how a target is split over the
`stage` mesh axis and what one stage computes. Stage s of n holds the target's layers [s*L/n,
(s+1)*L/n) (a slice of its family's layer loop: dpace_jax.targets.runner) and their cache; its
output is the boundary state b_{s+1}."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from dpace_jax.targets.config import ModelConfig
from dpace_jax.targets.runner import context, run_layers

AXIS = "stage"


def stage_layer_ids(cfg: ModelConfig, num_stages: int) -> tuple[int, ...]:
    """The boundary layers: stage s's last layer id (s + 1) * L / n - 1, for s < n."""
    check_stages(cfg, num_stages)
    per = cfg.num_layers // num_stages
    return tuple((s + 1) * per - 1 for s in range(num_stages))


def check_stages(cfg: ModelConfig, num_stages: int) -> None:
    """ValueError unless the target splits into num_stages equal stages (its family says how:
    a stage holds whole units of its layer loop)."""
    if int(num_stages) != num_stages or num_stages < 2:
        raise ValueError(f"num_stages must be an integer >= 2 (one stage is autoregressive "
                         f"decoding: dpace_jax.infer.decode), got {num_stages}")
    cfg.family.check_stages(cfg, num_stages)


def stage_cache(cfg: ModelConfig, num_stages: int, batch: int, length: int, dtype):
    """One stage's empty cache (its share of the target's units), rolling back like the
    pipeline does (a recurrent layer's: rings of its last states, Family.init_pipeline_cache)."""
    return cfg.family.init_pipeline_cache(cfg, batch, length, dtype,
                                          cfg.family.num_units(cfg) // num_stages, num_stages)


def stage_forward(stage_layers, cfg: ModelConfig, x: jax.Array, cache, start: jax.Array, *,
                  num_stages: int, keep: jax.Array | None = None, stage=None):
    """One stage: its units of the target's layer loop (its shard of every stack) on x
    [B, T, D] at positions start[b] + 0..T-1, writing their cache entries there; queries see
    slots up to their own position -> (x [B, T, D], cache). `stage`: the stage's index (default:
    its index on the `stage` axis, inside shard_map)."""
    fam = cfg.family
    units = fam.num_units(cfg) // num_stages
    positions = start[:, None] + jnp.arange(x.shape[1], dtype=jnp.int32)[None, :]
    ctx = context(fam, cfg, positions, start=start, keep=keep,
                  trash=jax.tree.leaves(cache)[0].shape[2] - 1)
    x, _, cache = run_layers(fam, cfg, stage_layers, x, ctx, cache, stop=units,
                             offset=(jax.lax.axis_index(AXIS) if stage is None else stage) * units)
    return x, cache


def target_specs(target_params):
    """PartitionSpecs: the stacked layers split over `stage`, everything else replicated."""
    specs = jax.tree.map(lambda _: P(), target_params)
    return dataclasses.replace(specs, layers=jax.tree.map(lambda _: P(AXIS),
                                                          target_params.layers))


def stage_mesh(num_stages: int, devices=None) -> Mesh:
    """A 1-D mesh of the first num_stages devices on the `stage` axis."""
    devices = list(jax.devices() if devices is None else devices)
    if num_stages > len(devices):
        raise ValueError(f"num_stages={num_stages} needs as many devices; only {len(devices)} "
                         "available (CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    return Mesh(np.asarray(devices[:num_stages]), (AXIS,))
