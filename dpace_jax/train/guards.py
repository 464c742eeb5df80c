"""The trainer's guards (issue 26): settings an object-store workdir cannot take, the data's
token ids against the target's vocabulary, going back to an earlier checkpoint when a file made
since is damaged, and an export that fails in one line. Used by dpace_jax.train.loop."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from safetensors import SafetensorError

from dpace_jax.config import DEMO_TARGET_PREFIX
from dpace_jax.data import conversations as data_lib
from dpace_jax.drafters import hf as drafter_hf
from dpace_jax.io import storage
from dpace_jax.train import checkpoint as ckpt_lib
from dpace_jax.train import sft


def check_object_store(s, config) -> None:
    """What writes local files into the workdir cannot run with a bucket workdir (one line)."""
    local = {"train.mode=opd": s.mode == "opd",  # rollouts/ are appended to, line by line
             "data.regenerate=True": s.data.regenerate,
             f"target.path={s.target_path!r} (a target built in WORKDIR/target)":
                 not s.target_path or s.target_path.startswith(DEMO_TARGET_PREFIX),
             "data.demo=True without data.paths (WORKDIR/data/demo.jsonl)":
                 bool(config.data.get("demo", False)) and not s.data.paths}
    for what, on in local.items():
        if on:
            raise storage.StorageError(
                f"workdir={s.workdir!r} is on an object store, but {what} writes local files "
                "into the workdir: use a local or shared-file-system workdir for it")


def check_token_ids(source, vocab_size: int, s, workdir, target_dir) -> None:
    """The data's token ids against the target's vocabulary, before the target is loaded."""
    fit = f"the tokenizer of {target_dir} does not fit its config.json (vocab_size)"
    if isinstance(source, data_lib.TokenizedDataset):
        cache = sft.cache_dir(s.data, workdir)
        data_lib.check_token_ids(source.tokens, vocab_size, "the tokenized training data",
                                 f"{fit}, or the tokenization cache in {cache} is damaged: "
                                 "delete it to tokenize again")
    elif isinstance(source, list) and source:  # OPD's prompts
        data_lib.check_token_ids(np.concatenate([np.asarray(p) for p in source]), vocab_size,
                                 "the rollout prompts", fit)


def broadcast(code: int) -> int:
    """Process 0's `code` on every process."""
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(code)))


def rewind(checkpointer: ckpt_lib.Checkpointer, abstract, check, step: int, why: str, file):
    """Restore `step` instead of the newest checkpoint, because `file` (made since `step`) is
    damaged: the file and the newer checkpoints are moved aside (never deleted); a warning line
    says so. Without a checkpoint at `step`, one line saying what to do."""
    if step not in checkpointer.steps():
        raise ValueError(f"{why}; the checkpoint it was made from (step {step}) is gone: restore "
                         "the file, or start the run in a new workdir")
    for newer in (n for n in checkpointer.steps() if n > step):
        checkpointer.move_aside(newer)  # Orbax would not save a step below its newest
    if jax.process_index() == 0:
        aside = file.with_name(f"{file.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
        if storage.exists(file):
            storage.move(file, aside)
        print(f"warning: {why}; going back to the checkpoint of step {step} to make it again "
              f"(the file moved to {aside.name}, newer checkpoints to "
              f"{checkpointer.directory}-unusable)", file=sys.stderr)
    return (step, *checkpointer.restore(step, abstract, check))


def export(params, drafter_cfg, workdir, step: int) -> str:
    """The finished drafter to WORKDIR/hf (on an object store: written locally, then copied,
    its checksum file last). A failure (a full disk) is one line; the checkpoint of the last
    step holds the drafter, and running the same command again exports it."""
    out = workdir / "hf"
    try:
        if not storage.is_object_store(out):
            drafter_hf.export_drafter(params, drafter_cfg, out)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                local = drafter_hf.export_drafter(params, drafter_cfg, Path(tmp) / "hf")
                names = sorted(p.name for p in local.iterdir())
                for name in sorted(names, key=lambda n: n == drafter_hf.CHECKSUMS_NAME):
                    storage.copy_tree(local / name, out / name)
    except (OSError, SafetensorError) as e:  # safetensors wraps a full disk in its own error
        raise OSError(f"exporting the drafter to {out} failed ({ckpt_lib.os_cause(e)}); the "
                      f"checkpoint of step {step} is intact: run the same command again to "
                      "export it") from e
    return str(out)
