"""Device mesh and the one table that maps logical parameter axes to mesh axes.

The mesh has three named axes: `data` (pure data parallelism), `fsdp` (data parallelism whose
replicas also split the parameters and optimizer state) and `tensor` (heads / MLP width / vocab).
Batches are split over ("data", "fsdp"). A parameter dimension is sharded over its mesh axis only
when its size divides evenly; otherwise it stays replicated, so any config runs on any mesh.
Each parameter's logical axes come from its schema (dpace_jax.nn.schema.Schema.rules: by the
parameter's path in the tree); an array of a parameter tree without a rule is an error naming it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis. `None`: replicated.
LOGICAL_RULES: dict[str, str | None] = {
    "layers": None,
    "embed": "fsdp",  # the hidden size D
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "vocab": "tensor",
    "features": "tensor",  # the drafter's fc input (n * D)
    "expert": "fsdp",  # a Qwen3-MoE layer's experts (P); their D axis then stays whole
}


def make_mesh(shape: Sequence[int] | None = None, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh. `shape` may use -1 once for "all remaining devices";
    the default puts every device on `fsdp`."""
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape) if shape is not None else [1, -1, 1]
    if len(shape) != 3:
        raise ValueError(f"mesh shape must have 3 entries (data, fsdp, tensor), got {shape}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape may contain -1 at most once, got {shape}")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"mesh shape {shape} does not divide {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices, found {len(devices)}"
        )
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def mesh_axes(shape: Sequence[int], axes: Sequence[str | None], axis_sizes: dict[str, int],
              rules: dict[str, str | None] = LOGICAL_RULES) -> tuple[str | None, ...]:
    """Per dimension, the mesh axis it is split over (None: whole): its logical axis's rule,
    when that mesh axis is not used by an earlier dimension and divides the size. Shape-only
    (no devices), so that memory plans (bench/moe_memory.py) use the same rule as the run."""
    spec = []
    for dim, logical in zip(shape, axes, strict=True):
        mesh_axis = rules.get(logical) if logical else None
        usable = mesh_axis is not None and mesh_axis not in spec
        spec.append(mesh_axis if usable and dim % axis_sizes[mesh_axis] == 0 else None)
    return tuple(spec)


def _names(path) -> tuple[str, ...]:
    return tuple(n for n in (getattr(p, "name", getattr(p, "key", None)) for p in path)
                 if isinstance(n, str))


def param_shardings(tree, mesh: Mesh, rules: dict[tuple[str, ...], tuple]):
    """NamedShardings for a parameter tree, or a tree holding parameter trees (an optimizer
    state): a leaf whose path ends with a parameter's path in `rules` ({path: logical axes of
    the leaf}, Schema.rules) is sharded by that rule; scalars (step counts) are replicated. Any
    other array is a ValueError naming its path: a parameter without a rule is never silently
    replicated."""

    def one(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        names = _names(path)
        match = next((names[-n:] for n in range(len(names), 0, -1) if names[-n:] in rules), None)
        if match is None:
            if not shape:
                return NamedSharding(mesh, PartitionSpec())
            raise ValueError(f"no sharding rule for array {'/'.join(names) or path} of shape "
                             f"{shape}: not a parameter of this model's schema")
        axes = rules[match]
        if len(shape) != len(axes):
            raise ValueError(f"parameter {'/'.join(match)} has shape {shape}, expected rank "
                             f"{len(axes)} (axes {axes})")
        return NamedSharding(mesh, PartitionSpec(*mesh_axes(shape, axes, dict(mesh.shape))))

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over data and fsdp."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def num_batch_shards(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def maybe_initialize_distributed(config) -> None:
    """jax.distributed.initialize() for multi-process launches (see config.distributed)."""
    if not (config.distributed or config.coordinator_address
            or os.environ.get("JAX_COORDINATOR_ADDRESS")):
        return
    kwargs = {}
    if config.coordinator_address:
        kwargs["coordinator_address"] = config.coordinator_address
    if config.num_processes > 0:
        kwargs["num_processes"] = int(config.num_processes)
    if config.process_id >= 0:
        kwargs["process_id"] = int(config.process_id)
    jax.distributed.initialize(**kwargs)


def gather_to_host(tree, mesh):
    """A host copy of a (possibly multi-process sharded) pytree, on every process."""
    out = jax.jit(lambda t: t, out_shardings=replicated(mesh))(tree)
    return jax.tree.map(np.asarray, out)
