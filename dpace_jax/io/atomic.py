"""Atomic writes: a file or directory is either its old self or complete, never half-written."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from dpace_jax.io.storage import process_umask


def umask_mode(directory: bool = False) -> int:
    """The permissions a plain open() / mkdir() would give under the process umask (temporary
    files and directories are created owner-only; what replaces a real file must not be). The
    umask is read without setting it: os.umask(0) would, for a moment, make what Orbax's writer
    threads create meanwhile world-writable."""
    return (0o777 if directory else 0o666) & ~process_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; when the block ends normally it replaces
    `path` (one rename) with the permissions of a normally created file, when it raises the
    temporary file is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, complete: Callable[[Path], bool]) -> Iterator[Path]:
    """Yield a staging directory beside `path` to fill (what marks it complete written last).
    When the block ends normally the staging directory takes `path`'s place (a copy already there
    is renamed aside, then removed), unless `complete(path)` finds that another process finished
    one first: that one is kept. When the block raises, `path` is untouched. The staging
    directory never stays behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    staging.chmod(umask_mode(directory=True))
    try:
        yield staging
        if not complete(path):
            trash = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.old"
            if path.exists():
                os.replace(path, trash)
            try:
                os.replace(staging, path)
            except OSError:  # another process put its copy there first: keep a complete one
                if not complete(path):
                    raise
            shutil.rmtree(trash, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
