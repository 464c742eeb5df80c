"""SHA-256 checksum files for directories the run writes whole (the exported hf/ drafter): the
`sha256sum` format, so that `sha256sum -c checksums.sha256` checks a copy anywhere, written
after the files it lists (a directory whose checksum file is missing was not finished)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

SUMS_NAME = "checksums.sha256"
_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_sums(directory: Path, names: Iterable[str]) -> Path:
    """DIRECTORY/checksums.sha256 listing `names` (files in it)."""
    lines = "".join(f"{sha256_file(directory / n)}  {n}\n" for n in sorted(names))
    (directory / SUMS_NAME).write_text(lines)
    return directory / SUMS_NAME


def verify_sums(directory: Path) -> bool:
    """Check the files listed in DIRECTORY/checksums.sha256: ValueError naming the first that
    is missing or differs. False when there is no checksum file (nothing to check)."""
    sums = directory / SUMS_NAME
    if not sums.is_file():
        return False
    for i, line in enumerate(sums.read_text().splitlines(), 1):
        want, _, name = line.partition("  ")
        if not name or len(want) != 64:
            raise ValueError(f"{sums}:{i}: not a sha256sum line ({line[:60]!r})")
        if not (directory / name).is_file():
            raise ValueError(f"{directory / name} is missing ({sums} lists it)")
        if sha256_file(directory / name) != want:
            raise ValueError(f"{directory / name} is damaged: its SHA-256 differs from {sums}'s")
    return True
