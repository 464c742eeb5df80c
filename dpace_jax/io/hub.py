"""Where a run reaches the Hugging Face hub, said before it does, and `offline` to forbid it.

A local path that does not exist but is shaped like a hub id (`owner/name`: a typo of a local
directory, often) would silently be downloaded, for the target and for the data. `announce`
prints one notice line per such setting before anything is fetched; with `offline` (the
`offline` setting, or HF_HUB_OFFLINE in the environment) the hub libraries read their cache only,
so a cache miss is an error naming the id instead of a download.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".gz")


def looks_like_hub_id(value: str) -> bool:
    """`owner/name` that is not an existing local path (nor a data file name)."""
    return (bool(_HUB_ID.match(value)) and not value.endswith(_DATA_SUFFIXES)
            and not Path(value).expanduser().exists())


def go_offline() -> None:
    """Make huggingface_hub, transformers and datasets use their caches only (for this process
    and the processes it starts); the libraries read these at import, so already imported ones
    are told directly too."""
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for module, name in (("huggingface_hub.constants", "HF_HUB_OFFLINE"),
                         ("datasets.config", "HF_HUB_OFFLINE"),
                         ("datasets.config", "HF_DATASETS_OFFLINE")):
        if module in sys.modules:
            setattr(sys.modules[module], name, True)


def announce(settings: Iterable[tuple[str, str]], offline: bool) -> list[str]:
    """One notice line on stderr per (field, value) that will be read from the hub; returns
    them."""
    lines = []
    for field, value in settings:
        if looks_like_hub_id(value):
            how = ("read from the HF cache only (offline)" if offline else
                   "fetched from the HF hub (--config.offline=True: from the cache only)")
            lines.append(f"notice: {field}={value!r} is not a local path: {how}")
            print(lines[-1], file=sys.stderr)
    return lines
