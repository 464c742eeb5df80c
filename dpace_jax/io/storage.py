"""Where a run's files live: a local directory or an object store (`gs://`, `s3://`).

`resolve(workdir)` is the one place that turns the `workdir` setting into a path object: a local
`pathlib.Path` (user-expanded, absolute), or an `etils.epath.Path` for a bucket URL (what Orbax's
CheckpointManager takes too). `Path("gs://b/x").absolute()` would silently be the local folder
`./gs:/b/x`; here an unknown scheme or a typo (`gs:/b/x`) is a one-line error, and so is a bucket
URL whose filesystem package is missing (etils reaches gs:// through gcsfs, s3:// through s3fs,
unless TensorFlow is installed).

The helpers below write run files the way each kind of storage allows:
- writes are atomic: locally a temporary file beside the target, then one rename; on an object
  store every object write is atomic already (the object appears when the upload completes);
- appends: object stores cannot append. `append_text` there reads the object and rewrites it
  whole: right for files that grow by a line per start (run_history.jsonl). Files that grow
  every few seconds (metrics.jsonl, TensorBoard events) are buffered by their writer
  (`dpace_jax.train.metrics`) and rewritten whole at most every `flush_every_s` seconds:
  they keep their one-file format that every reader uses, and stay under an object store's
  rate limit for one object (GCS: about one write per second);
- `move`: a rename locally; on an object store a copy then a delete (there is no rename).

`process_umask()` reads the umask without setting it (os.umask can only read it by changing it,
which races with threads that create files meanwhile, e.g. Orbax's).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from etils import epath

AnyPath = Path | epath.Path

# scheme -> the fsspec package etils.epath needs for it (without TensorFlow)
OBJECT_STORES = {"gs": "gcsfs", "s3": "s3fs"}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):(/*)(.*)$")


class StorageError(ValueError):
    """A workdir that cannot be used; the message names the setting, its value and the fix."""


def _missing_backend(scheme: str) -> str | None:
    """The package to install for `scheme://` paths, or None when one is importable."""
    package = OBJECT_STORES[scheme]
    found = importlib.util.find_spec(package) or importlib.util.find_spec("tensorflow")
    return None if found else package


_find_backend = _missing_backend  # (the test fake replaces _missing_backend: no GCS client)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package
        return False


def resolve(workdir: str | os.PathLike, field: str = "workdir") -> AnyPath:
    """The path object for `workdir` (see the module doc); `field` names the setting in errors."""
    text = os.fspath(workdir)
    if not text:
        raise StorageError(f"{field} is empty: name the run directory")
    match = _SCHEME.match(text)
    if match is None:
        return Path(text).expanduser().absolute()
    scheme, slashes, rest = match.group(1).lower(), match.group(2), match.group(3)
    if scheme == "file" and slashes:
        return Path("/" + rest.lstrip("/")).absolute()
    if scheme in OBJECT_STORES and len(slashes) != 2:
        raise StorageError(f"{field}={text!r}: a {scheme}:// URL has two slashes after the "
                           f"scheme: {scheme}://{rest}")
    if scheme not in OBJECT_STORES:
        if not slashes:  # "name:thing" is a legal local file name; keep it local
            return Path(text).expanduser().absolute()
        known = ", ".join(f"{s}://" for s in OBJECT_STORES)
        raise StorageError(f"{field}={text!r}: unsupported storage scheme {scheme}:// "
                           f"(supported: local paths, {known})")
    if not rest.split("/", 1)[0]:
        raise StorageError(f"{field}={text!r} names no bucket: write {scheme}://BUCKET/PATH")
    package = _missing_backend(scheme)
    if package:
        raise StorageError(f"{field}={text!r} needs the {package} package for {scheme}:// "
                           f"paths (etils.epath's filesystem): pip install {package}")
    if scheme == "gs" and _missing_backend is _find_backend and not _importable("google.cloud"
                                                                                ".storage"):
        # Orbax asks the bucket whether it has a hierarchical namespace before the first save
        raise StorageError(f"{field}={text!r} needs the google-cloud-storage package for "
                           "Orbax's checkpoints on gs://: pip install google-cloud-storage")
    return epath.Path(f"{scheme}://{rest.rstrip('/')}")


def is_object_store(path: AnyPath | str) -> bool:
    """True for a bucket URL (no rename, no append, no O_EXCL)."""
    return os.fspath(path).split("://", 1)[0] in OBJECT_STORES and "://" in os.fspath(path)


def exists(path: AnyPath) -> bool:
    return path.exists()


def mkdir(path: AnyPath) -> None:
    """The directory and its parents (a no-op for an existing one; prefixes on object stores)."""
    path.mkdir(parents=True, exist_ok=True)


def listdir(path: AnyPath) -> list[str]:
    """Sorted names in a directory ([] when it does not exist)."""
    if not path.exists():
        return []
    return sorted(p.name for p in path.iterdir())


def read_bytes(path: AnyPath) -> bytes:
    return path.read_bytes()


def read_text(path: AnyPath) -> str:
    return path.read_bytes().decode("utf-8")


def write_bytes(path: AnyPath, data: bytes) -> None:
    """Replace `path` atomically: readers see the old content or the new, never a part."""
    if is_object_store(path):
        with path.open("wb") as f:  # an object appears when its upload completes
            f.write(data)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~process_umask())  # mkstemp makes it owner-only
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: AnyPath, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def append_text(path: AnyPath, text: str) -> None:
    """Append `text` (locally one O_APPEND write; on an object store the object is rewritten
    whole, for files that grow rarely: see the module doc)."""
    if is_object_store(path):
        old = path.read_bytes() if path.exists() else b""
        write_bytes(path, old + text.encode("utf-8"))
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


def remove(path: AnyPath, missing_ok: bool = True) -> None:
    """Delete a file."""
    path.unlink(missing_ok=missing_ok)


def copy_tree(src: AnyPath, dst: AnyPath) -> None:
    """Copy a file or a directory tree (e.g. a locally written hf/ export to the bucket)."""
    if not src.is_dir():
        write_bytes(dst, src.read_bytes())
        return
    mkdir(dst)
    for child in src.iterdir():
        copy_tree(child, dst / child.name)


def move(src: AnyPath, dst: AnyPath) -> None:
    """Move a file or directory to `dst` (which must not exist): one rename locally, a copy then
    a delete on an object store (not atomic: a reader may briefly see both)."""
    if dst.exists():
        raise FileExistsError(f"{dst} exists: not moving {src} onto it")
    if not (is_object_store(src) or is_object_store(dst)):
        os.rename(src, dst)
        return
    copy_tree(src, dst)
    if src.is_dir():
        src.rmtree()
    else:
        src.unlink()


# ---------------------------------------------------------------------------------- umask

def _umask_from_proc() -> int | None:
    """The umask from /proc/self/status (Linux >= 4.7), None where that is unavailable."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _umask_by_setting() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Read once at import (the first import runs in the main thread before any writer thread):
# the fallback where /proc is unavailable. A umask changed later is seen only through /proc.
_IMPORT_UMASK = _umask_from_proc()
if _IMPORT_UMASK is None:
    _IMPORT_UMASK = _umask_by_setting()


def process_umask() -> int:
    """The process umask, read without changing it (os.umask(0) would, for a moment, make
    every file another thread creates world-writable)."""
    mask = _umask_from_proc()
    return _IMPORT_UMASK if mask is None else mask


# ------------------------------------------------------------------------------ test fake

@contextlib.contextmanager
def fake_object_store(scheme: str = "gs") -> Iterator[Any]:
    """For tests: `scheme://` paths (through `resolve` and etils.epath, as in production) are
    served from memory by an fsspec filesystem that behaves like an object store: no append,
    an object written appears only when its file is closed. Yields the filesystem."""
    from etils.epath import backend as backend_lib
    from fsspec.implementations.memory import MemoryFile, MemoryFileSystem

    prefix = f"{scheme}://"

    class ObjectStore(MemoryFileSystem):
        protocol = (scheme,)
        cachable = False
        store: dict = {}
        pseudo_dirs = [""]

        @classmethod
        def _strip_protocol(cls, path):
            path = os.fspath(path)
            return "/" + path.removeprefix(prefix).strip("/")

        def _open(self, path, mode="rb", **kwargs):
            if "a" in mode or "+" in mode:
                raise NotImplementedError(f"{prefix}: mode {mode!r} (objects cannot append)")
            if "w" not in mode:
                return super()._open(path, mode, **kwargs)
            fs, key = self, self._strip_protocol(path)

            class Upload(io.BytesIO):
                def close(self) -> None:
                    if not self.closed:
                        fs.store[key] = MemoryFile(fs, key, self.getvalue())
                    super().close()

            return Upload()

    fs = ObjectStore()
    fs.store, fs.pseudo_dirs = {}, [""]
    backend_cls = type(backend_lib.fsspec_backend)
    original = backend_cls.fs
    saved_missing = globals()["_missing_backend"]

    def routed(self, path):
        return fs if os.fspath(path).startswith(prefix) else original(self, path)

    backend_cls.fs = routed
    globals()["_missing_backend"] = lambda s: None if s == scheme else saved_missing(s)
    try:
        yield fs
    finally:
        backend_cls.fs = original
        globals()["_missing_backend"] = saved_missing
