"""Demo chat data from the standard-library corpus: "complete this function" conversations.

`write_demo_conversations` writes `messages`-style JSONL rows whose assistant turns are the
reference function bodies (real text, used by configs/tiny.py). The demo pipeline then replaces the
answers with the target's own (`python -m dpace_jax.regenerate`), the DFlash way.
"""

from __future__ import annotations

import random
from pathlib import Path

from dpace_jax.data import conversations as data_lib
from dpace_jax.demo import corpus


def demo_conversations(num_samples: int, *, seed: int = 0) -> list[list[dict[str, str]]]:
    """Conversations of the train side of the function tasks of 400 corpus files."""
    files = corpus.collect_sources(max_files=400, seed=seed)
    tasks, _ = corpus.split_tasks(corpus.extract_tasks(files), seed=seed)
    random.Random(seed).shuffle(tasks)
    return [
        [{"role": "user", "content": t.prompt}, {"role": "assistant", "content": t.answer}]
        for t in tasks[:num_samples]
    ]


def write_demo_conversations(path: str | Path, *, num_samples: int, seed: int = 0) -> Path:
    """Write (once) `num_samples` demo conversations to `path` as JSONL; returns the path."""
    path = Path(path)
    if not path.exists():
        rows = [{"messages": conv} for conv in demo_conversations(num_samples, seed=seed)]
        data_lib.write_jsonl(path, rows)
    return path
