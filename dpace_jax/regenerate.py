"""Regenerate training data with the target's own answers (as DFlash's training data is made).

    python -m dpace_jax.regenerate --target Qwen/Qwen3-8B --input data.jsonl --output out.jsonl \
        [--drafter HF_DIR] [--temperature 0] [--max-new-tokens 2048] [--batch-size 16] \
        [--max-samples N] [--seed 0] [--dtype bfloat16]

Reads chat data in the training formats (`dpace_jax.data.conversations.load_conversations`) and
writes, in input order, `{"messages": [...]}` rows: the same conversations with every assistant turn
replaced by the target's answer to the turns before it (multi-turn: turn 1 is answered, the answer
goes into the history, then turn 2 is answered, ...). Prompts use the chat template with the
generation prompt and thinking disabled. Decoding is batched, greedy at temperature 0, else sampled;
with a drafter the speculative decoder is used (same outputs at temperature 0), else plain
autoregressive decoding (block size 1).

Batches follow length: the rows are taken in fixed windows of WINDOW_BATCHES * B
(dpace_jax.infer.generation.windows), each window sorted by its first prompt's length into
batches of B (a batch is padded to its longest prompt), and the window's rows are appended in input
order. Resumable: rows are appended with flush + fsync after every window; a restart keeps the
complete lines already written (a truncated last line from a crash is cut off) and goes on after
them. Batch j of the window at row w gets the RNG key folded from the seed and w / B + j, so a
restarted run redoes a partly written window exactly and writes the same file as an uninterrupted
one (same settings). The settings are kept in OUTPUT.regen.json; a restart with other settings is
refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import jax

from dpace_jax.config import DTYPES, parse_dtype
from dpace_jax.data import conversations as data_lib
from dpace_jax.infer import generation as ev
from dpace_jax.infer.sampling import GREEDY, Sampling

log = logging.getLogger(__name__)


def _fingerprint(convs) -> str:
    import hashlib

    h = hashlib.sha256()
    for conv in convs:
        h.update(json.dumps(conv, sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def count_complete_rows(path: Path) -> int:
    """Complete JSON lines at the start of `path`; anything after the last newline (a line cut
    off by a crash) is truncated away. A complete line that is not JSON raises ValueError."""
    if not path.exists():
        return 0
    raw = path.read_bytes()
    keep = raw.rfind(b"\n") + 1
    if keep < len(raw):
        with path.open("r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    lines = raw[:keep].splitlines()
    for i, line in enumerate(lines, 1):
        try:
            json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not a JSON line ({e}); not an output of this tool? "
                             "Delete it or pick another --output") from None
    return len(lines)


def append_rows(path: Path, rows: Sequence[dict]) -> None:
    with path.open("a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _first_prompt(tokenizer, conv: list[dict]) -> list[int]:
    """The prompt of a conversation's first assistant turn (its length sorts the batches)."""
    first = next((j for j, m in enumerate(conv) if m["role"] == "assistant"), len(conv))
    return ev.render_prompt(tokenizer, conv[:first])


def regenerate_batch(gen: ev.Generator, tokenizer, drafter, convs: Sequence[list[dict]],
                     key) -> list[list[dict]]:
    """The conversations with each assistant turn replaced, answering turn by turn."""
    out = [[dict(m) for m in conv] for conv in convs]
    slots = [[j for j, m in enumerate(conv) if m["role"] == "assistant"] for conv in out]
    for turn in range(max((len(s) for s in slots), default=0)):
        todo = [i for i, s in enumerate(slots) if len(s) > turn]
        prompts = [ev.render_prompt(tokenizer, out[i][: slots[i][turn]]) for i in todo]
        gens, _ = gen.generate(drafter, prompts, jax.random.fold_in(key, turn))
        for i, g in zip(todo, gens, strict=True):
            out[i][slots[i][turn]]["content"] = ev.answer_text(tokenizer, g.output_ids,
                                                               gen.stop_ids)
    return out


def _empty_answers(rows) -> int:
    return sum(1 for r in rows for m in r if m["role"] == "assistant" and not m["content"].strip())


def regenerate(target: str, inputs, output: str | Path, *, drafter: str | None = None,
               sampling: Sampling = GREEDY, max_new_tokens: int = 1024, batch_size: int = 8,
               max_samples: int | None = None, seed: int = 0, dtype: str = "bfloat16",
               split: str = "train", progress: bool = True) -> dict:
    """Regenerate `inputs` into `output` (resuming it); returns counts."""
    settings = dict(target=str(target), drafter=str(drafter) if drafter else None,
                    temperature=float(sampling.temperature), rule=sampling.rule,
                    top_k=int(sampling.top_k), top_p=float(sampling.top_p),
                    max_new_tokens=int(max_new_tokens), batch_size=int(batch_size),
                    seed=int(seed), dtype=dtype, split=split)
    if settings["batch_size"] < 1 or settings["max_new_tokens"] < 1:
        raise ValueError(f"--batch-size={batch_size} and --max-new-tokens={max_new_tokens} "
                         "must be >= 1")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"--max-samples must be >= 1, got {max_samples}")
    convs, _ = data_lib.load_conversations(inputs, split=split)
    convs = convs[:max_samples] if max_samples else convs
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    meta_path = output.with_name(output.name + ".regen.json")
    settings["input"] = _fingerprint(convs)
    done = count_complete_rows(output)
    if done and meta_path.exists() and json.loads(meta_path.read_text()) != settings:
        raise ValueError(f"{output} was written with other settings ({meta_path}); delete both "
                         "or pick another --output")
    if done > len(convs):
        raise ValueError(f"{output} holds {done} rows but the input has only {len(convs)}")
    meta_path.write_text(json.dumps(settings, indent=1) + "\n")
    if done == len(convs):
        return {"rows": len(convs), "written": 0, "skipped": done, "empty_answers": 0}

    _, tokenizer, gen, _, spec = ev.open_target(
        target, drafter, parse_dtype(dtype, "--dtype"), max_new_tokens=int(max_new_tokens),
        batch_size=int(batch_size), sampling=sampling)
    base_key = jax.random.PRNGKey(int(seed))

    from tqdm import tqdm

    bar = tqdm(total=len(convs), initial=done, desc="regenerate", unit="conv",
               disable=not progress)
    written = empty = 0
    for window in ev.windows(len(convs), batch_size, done):
        # Batches of similar first-prompt length (ev.windows); rows written in input order.
        lengths = [len(_first_prompt(tokenizer, convs[i])) for i in window]
        out = {}
        for j, group in enumerate(ev.length_batches(lengths, batch_size)):
            idx = [window.start + i for i in group]
            key = jax.random.fold_in(base_key, window.start // batch_size + j)
            out.update(zip(idx, regenerate_batch(gen, tokenizer, spec, [convs[i] for i in idx],
                                                 key), strict=True))
        new = [out[i] for i in window if i >= done]
        append_rows(output, [{"messages": r} for r in new])
        written += len(new)
        empty += _empty_answers(new)
        bar.update(len(new))
    bar.close()
    if empty:
        log.warning("%s: %d regenerated assistant turns are empty (the training pipeline skips "
                    "conversations without a non-empty assistant turn)", output, empty)
    return {"rows": len(convs), "written": written, "skipped": done, "empty_answers": empty}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dpace_jax.regenerate",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, help="target HF checkpoint directory or hub id")
    p.add_argument("--input", required=True, nargs="+",
                   help="chat data: JSONL/JSON/Parquet files, directories or hub ids")
    p.add_argument("--output", required=True, help="output JSONL ({'messages': [...]} rows)")
    p.add_argument("--drafter", default=None,
                   help="DFlash HF directory or run directory (speculative decoding)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--rule", default="dflash", choices=["dflash", "speculative"])
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--split", default="train", help="split of hub datasets")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        try:
            sampling = Sampling(a.temperature, a.rule, a.top_k, a.top_p)
        except ValueError as e:
            raise ValueError(f"--{str(e).replace('_', '-')}") from None
        stats = regenerate(a.target, a.input, a.output, drafter=a.drafter, sampling=sampling,
                           max_new_tokens=a.max_new_tokens, batch_size=a.batch_size,
                           max_samples=a.max_samples, seed=a.seed, dtype=a.dtype,
                           split=a.split, progress=not a.no_progress)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"{a.output}: {stats['written']} rows written, {stats['skipped']} already there, "
          f"{stats['rows']} in all")


if __name__ == "__main__":
    main()
