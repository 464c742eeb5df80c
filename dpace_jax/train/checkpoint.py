"""Training checkpoints with Orbax: train state + data position + a run fingerprint + checksums.

Each step directory holds `state` (params, optimizer state, step, RNG: sharded arrays) and
`meta` (JSON: the data iterator position, the fingerprint of the settings that must not change
across a resume, and a checksum per array). Orbax writes a step into a temporary directory and
renames it when complete, so an interrupted save never shows up as a restorable step.

`restore` verifies the checksums: damaged bytes are an error naming the step and the array, not a
silently wrong drafter. `restore_latest` walks from the newest step down, moving each step that
cannot be restored aside (renamed into `<dir>-unusable/`, never deleted) and saying so in one
line, until one restores. In multi-process runs every process reads the step, all agree on the
verdict (a read can fail on one host only), and process 0 alone moves the step while the others
wait for it.

The directory may be on an object store (`gs://`, `s3://`: an etils path from
dpace_jax.io.storage). A save that fails (a full disk, an OS or storage error) is one
CheckpointError naming the step and the cause; Orbax deletes old steps only after a new one is
committed, so the steps saved before it stay restorable.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from dpace_jax.io import storage


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


def os_cause(e: BaseException) -> str:
    """An OS error as its description (TensorStore and safetensors bury it in their messages),
    else the error's first line."""
    code = getattr(e, "errno", None)
    found = re.search(r"os_error_code='?(\d+)|\(os error (\d+)\)", str(e))
    code = code or (int(found.group(1) or found.group(2)) if found else None)
    return f"{os.strerror(code)} [errno {code}]" if code else _first_line(e)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _agree(ok: bool) -> bool:
    """True when `ok` on every process (one small all-gather; `ok` itself in one process)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(ok))).min())


class Checkpointer:
    def __init__(self, directory: storage.AnyPath | str, *, keep: int = 3,
                 async_save: bool = True):
        # a bucket URL stays one (pathlib would make gs://b/x the local folder ./gs:/b/x)
        self.directory = storage.resolve(os.fspath(directory), "checkpoint directory")
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
            # S3 has no rename (Orbax's default commit there): a commit-file marker instead
            temporary_path_class=(ocp.path.atomicity.CommitFileTemporaryPath
                                  if os.fspath(self.directory).startswith("s3://") else None),
        )
        self._manager = ocp.CheckpointManager(self.directory, options=self._options)
        self._pending: int | None = None  # the step of a save that may still be in flight

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def steps(self) -> list[int]:
        """The committed steps in the directory, oldest first."""
        self._manager.reload()  # from the directory, not Orbax's memory of it
        return sorted(self._manager.all_steps())

    def _failed(self, step: int | None, e: Exception) -> CheckpointError:
        # from the directory: Orbax already forgot the steps it meant to delete after this save
        kept = [s for s in self.steps() if s != step]
        return CheckpointError(
            f"saving checkpoint step {step} to {self.directory} failed ({os_cause(e)}); "
            f"the steps saved before it are intact: {kept or 'none'}")

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Start saving `step` (asynchronously); CheckpointError when this save or the one
        still in flight failed."""
        meta = {**meta, "checksums": checksums(state)}
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
            )
        except Exception as e:  # Orbax raises the previous save's error here too
            raise self._failed(step if self._pending is None else self._pending, e) from e
        self._pending = step

    def wait(self) -> None:
        """Wait for the save in flight; CheckpointError when it failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._failed(self._pending, e) from e
        self._pending = None

    def poll(self) -> None:
        """CheckpointError when the save in flight has failed already (cheap: no waiting; one
        small all-gather in multi-process runs, so that all processes stop together)."""
        done = self._pending is not None and not self._manager.is_saving_in_progress()
        if done or jax.process_count() > 1:
            error = None
            if done:
                try:
                    self.wait()
                except CheckpointError as e:
                    error = e
            _raise_unless_agreed(error, f"{self.directory}: another process's save failed")

    def restore(self, step: int, abstract_state: Any,
                check: Callable[[dict], None] | None = None) -> tuple[Any, dict]:
        """Read the step's meta, pass it to `check` (which raises to refuse the step, e.g. for
        other settings), then restore the state onto the shardings carried by `abstract_state`
        (ShapeDtypeStructs) and verify its checksums (checkpoints written before they existed
        have none). A step that cannot be read raises CheckpointError naming it."""
        where = self.directory / str(step)
        error = meta = state = None
        try:
            meta = self._manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            if not isinstance(meta, dict):
                raise ValueError(f"meta is {type(meta).__name__}, not an object")
        except Exception as e:  # Orbax / tensorstore / JSON errors share no base class
            error = CheckpointError(f"{where}: cannot read its meta ({_first_line(e)})")
        _raise_unless_agreed(error, f"{where}: another process cannot read it")
        if check is not None:
            check(meta)
        try:
            state = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state)))["state"]
        except Exception as e:
            error = CheckpointError(f"{where}: cannot restore ({_first_line(e)})")
        _raise_unless_agreed(error, f"{where}: another process cannot restore it")
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
                if jax.process_index() == 0:
                    print(f"warning: {e}; moved to {moved}, resuming from an older checkpoint",
                          file=sys.stderr)
        return None

    def move_aside(self, step: int) -> storage.AnyPath:
        """Move step directory `step` into `<directory>-unusable/` (never deleted): process 0
        moves it (every process renaming it would fail on all but one), every process waits
        for that, then reopens the directory."""
        self.close()
        aside = self.directory.parent / f"{self.directory.name}-unusable"
        target = aside / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}"
        if jax.process_index() == 0:
            storage.mkdir(aside)
            storage.move(self.directory / str(step), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"dpace:move_aside:{step}")
        self._manager = ocp.CheckpointManager(self.directory, options=self._options)
        return target

    def close(self) -> None:
        """Wait for the save in flight (CheckpointError when it failed), then close."""
        try:
            self.wait()
        except CheckpointError:
            with contextlib.suppress(Exception):  # Orbax's close waits and raises it again
                self._manager.close()
            raise
        self._manager.close()


def _raise_unless_agreed(error: CheckpointError | None, elsewhere: str) -> None:
    """Raise `error`, or, when another process failed, a CheckpointError(`elsewhere`): every
    process gives up together, before any collective that the others would wait in."""
    if not _agree(error is None):
        raise error or CheckpointError(elsewhere)


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` carrying `shardings` (the restore target)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
