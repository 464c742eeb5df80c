"""Training checkpoints with Orbax: train state + data position + a run fingerprint + checksums.

Each step directory holds `state` (params, optimizer state, step, RNG: sharded arrays) and
`meta` (JSON: the data iterator position, the fingerprint of the settings that must not change
across a resume, and a checksum per array). Orbax writes a step into a temporary directory and
renames it when complete, so an interrupted save never shows up as a restorable step.

`restore` verifies the checksums: damaged bytes are an error naming the step and the array, not a
silently wrong drafter. `restore_latest` walks from the newest step down, moving each step that
cannot be restored aside (renamed into `<dir>-unusable/`, never deleted) and saying so in one
line, until one restores.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
    """A checkpoint step that cannot be used; the message names its directory and the reason."""


@jax.jit
def _word_sums(tree):
    """Per array, the sum of its 32-bit words each times an odd multiplier of its position
    (uint32, wrapping): any changed word changes it."""

    def one(x):
        x = jnp.ravel(x)
        if x.dtype.itemsize == 4:
            words = jax.lax.bitcast_convert_type(x, jnp.uint32)
        elif x.dtype.itemsize == 2:
            words = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
        else:
            words = x.astype(jnp.uint32)
        weight = jnp.arange(x.size, dtype=jnp.uint32) * jnp.uint32(2654435761) | jnp.uint32(1)
        return jnp.sum(words * weight, dtype=jnp.uint32)

    return jax.tree.map(one, tree)


def checksums(tree) -> dict[str, int]:
    """{array path: checksum} of a pytree of arrays (computed on the devices)."""
    sums = jax.device_get(_word_sums(tree))
    return {jax.tree_util.keystr(path): int(v)
            for path, v in jax.tree_util.tree_flatten_with_path(sums)[0]}


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=self._options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        meta = {**meta, "checksums": checksums(state)}
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
        )

    def restore(self, step: int, abstract_state: Any,
                check: Callable[[dict], None] | None = None) -> tuple[Any, dict]:
        """Read the step's meta, pass it to `check` (which raises to refuse the step, e.g. for
        other settings), then restore the state onto the shardings carried by `abstract_state`
        (ShapeDtypeStructs) and verify its checksums (checkpoints written before they existed
        have none). A step that cannot be read raises CheckpointError naming it."""
        where = self.directory / str(step)
        try:
            meta = self._manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            if not isinstance(meta, dict):
                raise ValueError(f"meta is {type(meta).__name__}, not an object")
        except Exception as e:  # Orbax / tensorstore / JSON errors share no base class
            raise CheckpointError(f"{where}: cannot read its meta ({_first_line(e)})") from e
        if check is not None:
            check(meta)
        try:
            state = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state)))["state"]
        except Exception as e:
            raise CheckpointError(f"{where}: cannot restore ({_first_line(e)})") from e
        want = meta.get("checksums")
        if want is not None:
            got = checksums(state)
            bad = sorted(k for k in want if got.get(k) != want[k])
            if bad or set(got) != set(want):
                raise CheckpointError(f"{where}: checksum mismatch in {bad[:3] or 'the tree'}: "
                                      "the saved arrays are damaged")
        return state, meta

    def restore_latest(self, abstract_state: Any, *, strict: bool = False,
                       check: Callable[[dict], None] | None = None):
        """(step, state, meta) of the newest step that restores, or None when there is none.
        A step that cannot be read is moved aside with a one-line warning, or, with `strict`,
        raised; what `check` raises (a refusal of the settings) is passed on."""
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                return (step, *self.restore(step, abstract_state, check))
            except CheckpointError as e:
                if strict:
                    raise CheckpointError(f"{e} (train.strict_resume=True)") from e
                moved = self.move_aside(step)
                print(f"warning: {e}; moved to {moved}, resuming from an older checkpoint",
                      file=sys.stderr)
        return None

    def move_aside(self, step: int) -> Path:
        """Rename step directory `step` into `<directory>-unusable/` (never deleted)."""
        self.close()
        aside = self.directory.parent / f"{self.directory.name}-unusable"
        aside.mkdir(exist_ok=True)
        target = aside / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}"
        (self.directory / str(step)).rename(target)
        self._manager = ocp.CheckpointManager(self.directory, options=self._options)
        return target

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` carrying `shardings` (the restore target)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
