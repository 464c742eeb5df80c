"""Rollouts for on-policy training: the drafter's own speculative decoding of training prompts,
recorded per verify step (`decode(record=True)`) into a resumable JSONL file.

One row per prompt (`dpace_jax.train.opd.replay.rows_from_result`, plus `index`, the prompt's index
in the prompt set). Prompts are taken in fixed windows of WINDOW_BATCHES * B
(`dpace_jax.infer.generation.windows`), each window sorted by prompt length into batches of B (a
batch is padded to its longest prompt), batch j of the window at w with the RNG key folded from
w / B + j; a window's rows are appended in prompt order with flush + fsync, so a restart keeps
the complete rows, cuts a torn last line, redoes the partly written window exactly and appends
only what is missing: the file ends equal to an uninterrupted one.
`FILE.meta.json` holds what the rows depend on (drafter checksum, target, settings, prompts); a
file written by another drafter, target or setting is refused, naming it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from dpace_jax.infer import decode
from dpace_jax.infer import generation as gen_lib
from dpace_jax.io.atomic import atomic_path
from dpace_jax.regenerate import append_rows, count_complete_rows
from dpace_jax.train.checkpoint import checksums
from dpace_jax.train.opd import replay


def conversation_prompts(conversations, tokenizer, max_length: int) -> tuple[list, int]:
    """Per conversation, the chat-template prompt of the turns before its first assistant turn
    (conversations without one, and prompts longer than max_length, are skipped) ->
    (prompts, number skipped)."""
    prompts, skipped = [], 0
    for conv in conversations:
        first = next((i for i, m in enumerate(conv) if m["role"] == "assistant"), None)
        ids = gen_lib.render_prompt(tokenizer, conv[:first]) if first else []
        if ids and len(ids) <= max_length:
            prompts.append(ids)
        else:
            skipped += 1
    return prompts, skipped


def params_fingerprint(params) -> str:
    """A short hash of a parameter tree's checksums (which drafter made a rollout)."""
    text = json.dumps(checksums(params), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def prompts_fingerprint(prompts: Sequence[Sequence[int]]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(np.asarray(p, np.int64).tobytes() + b"|")
    return h.hexdigest()[:16]


def read_rows(path: Path) -> list[dict]:
    """The rows of a rollout file; a line that is not a JSON object is a ValueError naming the
    file and line."""
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not a JSON line ({e})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{i}: not a rollout row (a JSON {type(row).__name__})")
        rows.append(row)
    return rows


def check_rows(path: Path, rows: Sequence[dict], block_size: int) -> None:
    """Each row self-consistent (replay.blocks), a bad one named by its file and line."""
    for i, row in enumerate(rows, 1):
        replay.blocks(row, block_size, where=f"{path}:{i}")


def damage(path: Path, num_prompts: int) -> str | None:
    """Why the rollout file of a round that has been trained on cannot be read back whole (a
    sentence naming the file), or None when it can. The file is not changed."""
    if not path.exists():
        return f"{path} is missing"
    try:
        rows = read_rows(path)
    except (OSError, ValueError) as e:
        return str(e)
    if len(rows) != num_prompts or not path.read_bytes().endswith(b"\n"):
        return f"{path} holds {len(rows)} complete rows for {num_prompts} prompts"
    return None


def _check_meta(path: Path, meta: dict, ignore: tuple[str, ...] = ()) -> None:
    meta_path = path.with_name(path.name + ".meta.json")
    stored = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    diff = sorted(k for k in {**meta, **stored}
                  if k not in ignore and stored.get(k) != meta.get(k))
    if diff:
        raise ValueError(f"{path} was written by another drafter, target or setting "
                         f"({meta_path}: {diff} differ); delete both to roll out again")


def read_finished(path: Path, prompts, meta: dict) -> list[dict]:
    """The rows of a rollout file that must be complete (its round was trained on); its
    meta is checked except for the drafter (trained since)."""
    meta = {**meta, "prompts": prompts_fingerprint(prompts), "num_prompts": len(prompts)}
    if not path.exists() or count_complete_rows(path) != len(prompts):
        raise ValueError(f"{path} is missing or incomplete, but its round has been trained on: "
                         "restore it, or start the run in a new workdir")
    _check_meta(path, meta, ignore=("drafter",))
    return read_rows(path)


def rollout(path: Path, gen: gen_lib.Generator, drafter: decode.Drafter, prompts, *, key,
            meta: dict) -> list[dict]:
    """Decode `prompts` with `drafter` into the rollout file `path` (resuming it) -> its rows.
    `meta`: what the rows depend on besides the prompts (checked against the file's)."""
    if not prompts:
        raise ValueError(f"{path}: no prompts to roll out")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "prompts": prompts_fingerprint(prompts), "num_prompts": len(prompts)}
    meta_path = path.with_name(path.name + ".meta.json")
    done = count_complete_rows(path)
    if done > len(prompts):
        raise ValueError(f"{path} holds {done} rows for {len(prompts)} prompts; delete it and "
                         f"{meta_path.name} to roll out again")
    if done or meta_path.exists():
        _check_meta(path, meta)
    else:
        with atomic_path(meta_path) as tmp:
            tmp.write_text(json.dumps(meta, indent=1) + "\n")
    size = gen.batch_size
    # Batches of similar length within fixed windows, rows written in prompt order
    # (gen_lib.windows); batch j of the window at w has the key folded with w / size + j.
    for window in gen_lib.windows(len(prompts), size, done):
        out_rows = {}
        groups = gen_lib.length_batches([len(prompts[i]) for i in window], size)
        for j, group in enumerate(groups):
            batch = [prompts[window.start + i] for i in group]
            rows_in = list(batch) + [batch[0]] * (size - len(batch))
            padded, lengths = decode.pad_prompts(rows_in, bucket=gen.bucket,
                                                 pad_token_id=gen.pad_id)
            out = decode.decode(gen.target_params, gen.target_cfg, drafter, padded, lengths,
                                max_new_tokens=gen.max_new_tokens, sampling=gen.sampling,
                                stop_token_ids=gen.stop_ids,
                                rng=jax.random.fold_in(key, window.start // size + j),
                                pad_token_id=gen.pad_id, record=True)
            rows = replay.rows_from_result(jax.tree.map(np.asarray, out), batch)
            for i, row in zip(group, rows, strict=True):
                row["index"] = window.start + i
                out_rows[row["index"]] = row
        append_rows(path, [out_rows[i] for i in window if i >= done])
    return read_rows(path)
