"""Training data: chat conversations -> tokenized samples (batched by dpace_jax.train.batches).

- `load_conversations(paths, *, split="train") -> (convs, stats)` and `write_jsonl(path, rows)`
  (from dpace_jax.data.chat): rows of local `.jsonl` / `.json` / `.parquet` files, directories of
  them, a `datasets.Dataset` or hub ids, in either chat shape (ShareGPT `conversations` or
  `messages`) -> `[{"role", "content"}]` lists. Unusable rows are counted by reason and logged;
  a source whose rows are all unusable is a ValueError naming it.
- `tokenize_conversations(...) -> (TokenizedDataset, stats)`: the chat template (thinking
  disabled), an assistant-only loss mask (content + end-of-turn token), truncation to
  `max_length`, samples with fewer than `2 * block_size` loss tokens dropped (counted); cached
  under `cache_dir` by a hash of everything that decides the result, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpace_jax.data.chat import (  # noqa: F401  (load_conversations, write_jsonl: this API too)
    TEMPLATE_KWARGS,
    BadConversation,
    load_conversations,
    normalize_roles,
    offsets_to_mask,
    render_with_spans,
    token_loss_mask,
    write_jsonl,
)
from dpace_jax.io import digest
from dpace_jax.io.atomic import atomic_dir

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_CHUNK = 256  # conversations tokenized per fast-tokenizer batch call
CHARS_PER_TOKEN = 32  # rows are cut after max_length * this many characters before tokenizing


# -------------------------------------------------------------------------------- tokenizing


@dataclass(frozen=True)
class TokenizedDataset:
    """Samples stored flat: sample i is tokens[offsets[i]:offsets[i+1]] (and its loss_mask)."""

    tokens: np.ndarray  # int32 [total tokens]
    loss_mask: np.ndarray  # uint8 [total tokens]
    offsets: np.ndarray  # int64 [num_samples + 1]

    def __post_init__(self):
        o = self.offsets
        if (
            o.ndim != 1
            or len(o) < 1
            or o[0] != 0
            or o[-1] != len(self.tokens)
            or len(self.tokens) != len(self.loss_mask)
            or np.any(np.diff(o) < 0)
        ):
            raise ValueError("TokenizedDataset: inconsistent tokens/loss_mask/offsets arrays")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        s, e = self.offsets[i], self.offsets[i + 1]
        return {
            "input_ids": np.asarray(self.tokens[s:e], np.int32),
            "loss_mask": np.asarray(self.loss_mask[s:e], np.int32),
        }

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def _hash_conversations(convs) -> str:
    h = hashlib.sha256()
    for c in convs:
        h.update(json.dumps(c, ensure_ascii=False, sort_keys=True).encode())
        h.update(b"\0")
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what decides the token ids: vocabulary/merges/added tokens and the chat template."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    template = tokenizer.chat_template
    h.update(json.dumps(template, sort_keys=True).encode())
    return h.hexdigest()


def cache_key(convs, tokenizer, *, max_length: int, block_size: int, extra: str = "") -> str:
    parts = {
        "format": FORMAT_VERSION,
        "data": _hash_conversations(convs),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "template_kwargs": TEMPLATE_KWARGS,
        "max_length": max_length,
        "block_size": block_size,
        "extra": extra,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:40]


_ARRAYS = ("tokens", "loss_mask", "offsets")


def _save_cache(path: Path, ds: TokenizedDataset, stats: dict, key: str) -> None:
    """Write the cache directory whole (atomic_dir), with a SHA-256 of each array in meta.json.
    A failed write (a full disk) is a warning: the finished tokenization is used all the same,
    and whatever was in the cache before stays as it was."""
    try:
        with atomic_dir(path, lambda p: _load_cache(p, key) is not None) as tmp:
            for name in _ARRAYS:
                np.save(tmp / f"{name}.npy", getattr(ds, name))
            sums = {name: digest.sha256_file(tmp / f"{name}.npy") for name in _ARRAYS}
            # meta.json last: a directory without it never loads as valid.
            (tmp / "meta.json").write_text(json.dumps({"key": key, "stats": stats,
                                                       "sha256": sums}))
    except OSError as e:  # numpy's short write has no errno: say how much room there was
        free = shutil.disk_usage(path.parent).free // 1024 if path.parent.exists() else "?"
        log.warning("tokenization cache %s not written (%s; %s KB free there); training goes "
                    "on with the tokenized data in memory", path, e.strerror or e, free)


def _load_cache(path: Path, key: str) -> tuple[TokenizedDataset, dict] | None:
    """The cached dataset, or None (a miss; a damaged cache is a miss with a warning naming
    the file: its arrays must match the checksums written with them)."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("key") != key:
            return None
        for name, want in (meta.get("sha256") or {}).items():  # older caches have none
            if digest.sha256_file(path / f"{name}.npy") != want:
                raise ValueError(f"{name}.npy differs from its checksum in meta.json")
        arrays = {n: np.load(path / f"{n}.npy", mmap_mode="r") for n in _ARRAYS}
        return TokenizedDataset(**arrays), meta["stats"]
    except (OSError, ValueError, KeyError) as e:
        if path.exists():
            log.warning("ignoring unreadable tokenization cache %s (%s)", path, e)
        return None


def check_token_ids(ids: np.ndarray, vocab_size: int, source: str, hint: str = "") -> None:
    """ValueError naming the first id outside [0, vocab_size), where it is (`source`: what holds
    `ids`) and the likely cause (`hint`). Out-of-range ids would be looked up as the embedding's
    fill value: NaN steps, or silently wrong rows."""
    ids = np.asarray(ids)
    bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    if bad.size:
        raise ValueError(f"{source}: token id {int(ids[bad[0]])} at position {int(bad[0])} is "
                         f"outside the target's vocabulary [0, {vocab_size}) ({bad.size} such "
                         f"ids){'; ' + hint if hint else ''}")


def _cap(conv, limit: int):
    """The conversation with its text cut after `limit` characters of content (later messages
    emptied), or itself when it is shorter: a huge row is never rendered or tokenized whole."""
    total, out = 0, []
    for m in conv:
        keep = max(limit - total, 0)
        total += len(m["content"])
        out.append(m if len(m["content"]) <= keep else {**m, "content": m["content"][:keep]})
    return conv if total <= limit else out


def _encode_chunk(convs, tokenizer, max_length: int, min_loss: int):
    """Render, tokenize, mask, truncate and filter a chunk of conversations."""
    skipped: Counter = Counter()
    limit = max_length * CHARS_PER_TOKEN
    texts, spans, whole = [], [], []
    for conv in convs:
        capped = _cap(conv, limit)
        try:
            text, sp = render_with_spans(capped, tokenizer)
        except BadConversation as e:
            skipped[e.reason] += 1
            continue
        texts.append(text)
        spans.append(sp)
        whole.append(None if capped is conv else conv)
    if getattr(tokenizer, "is_fast", False) and texts:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        pairs = [
            (np.asarray(ids, np.int32), offsets_to_mask(offs, sp))
            for ids, offs, sp in zip(enc["input_ids"], enc["offset_mapping"], spans, strict=True)
        ]
    else:
        pairs = []
        for t, sp in zip(texts, spans, strict=True):
            try:
                pairs.append(token_loss_mask(t, sp, tokenizer))
            except BadConversation as e:
                skipped[e.reason] += 1
                pairs.append(None)
    for i, conv in enumerate(whole):
        # A cut row gives the full row's first max_length tokens when tokens remain well past
        # them (tokenization is local); otherwise (tokens of > CHARS_PER_TOKEN characters),
        # the whole row is tokenized after all.
        if conv is not None and pairs[i] is not None and len(pairs[i][0]) < max_length + 64:
            try:
                pairs[i] = token_loss_mask(*render_with_spans(conv, tokenizer), tokenizer)
            except BadConversation as e:
                skipped[e.reason] += 1
                pairs[i] = None
    pairs = [p for p in pairs if p is not None]
    samples, n_truncated = [], 0
    for ids, mask in pairs:
        if len(ids) > max_length:
            ids, mask = ids[:max_length], mask[:max_length]
            n_truncated += 1
        if int(mask.sum()) < min_loss:
            skipped["too_few_loss_tokens"] += 1
            continue
        samples.append((ids, mask))
    return samples, skipped, n_truncated


_WORKER_TOKENIZER = None


def _worker_init(tokenizer):
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _worker_chunk(convs, max_length, min_loss):
    return _encode_chunk(convs, _WORKER_TOKENIZER, max_length, min_loss)


def _chunk_results(convs, tokenizer, max_length, min_loss, num_workers):
    chunks = [convs[c : c + _CHUNK] for c in range(0, len(convs), _CHUNK)]
    if num_workers <= 1 or len(chunks) <= 1:
        for ch in chunks:
            yield _encode_chunk(ch, tokenizer, max_length, min_loss)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # spawn: the parent may have started JAX threads, which fork would copy in a broken state.
    with ProcessPoolExecutor(
        num_workers,
        mp_context=mp.get_context("spawn"),
        initializer=_worker_init,
        initargs=(tokenizer,),
    ) as pool:
        yield from pool.map(
            _worker_chunk, chunks, [max_length] * len(chunks), [min_loss] * len(chunks)
        )


def tokenize_conversations(
    convs: Sequence[Sequence[Mapping]],
    tokenizer,
    *,
    max_length: int = 3072,
    block_size: int = 16,
    cache_dir=None,
    cache_key_extra: str = "",
    num_workers: int = 1,
    progress: bool = False,
) -> tuple[TokenizedDataset, dict]:
    """Render, mask, truncate and filter conversations (see the module docstring).

    num_workers > 1 renders and tokenizes chunks in that many spawned processes (same result).
    """
    if max_length < 2 or block_size < 1:
        raise ValueError(f"max_length={max_length}, block_size={block_size}: must be >= 2 and >= 1")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat_template"
        )
    convs = list(convs)
    key = cache_key(convs, tokenizer, max_length=max_length, block_size=block_size,
                    extra=cache_key_extra)
    cache_path = None
    if cache_dir is not None:
        cache_path = Path(cache_dir) / f"tokenized-{key}"
        hit = _load_cache(cache_path, key)
        if hit is not None:
            log.info("tokenization cache hit: %s", cache_path)
            return hit[0], {**hit[1], "cache": "hit", "fingerprint": key}

    min_loss = 2 * block_size
    skipped: Counter = Counter()
    n_truncated = 0
    samples = []
    results = _chunk_results(convs, tokenizer, max_length, min_loss, num_workers)
    if progress:
        from tqdm import tqdm

        results = tqdm(results, desc="tokenizing", total=-(-len(convs) // _CHUNK), unit="chunk")
    for chunk_samples, chunk_skipped, chunk_truncated in results:
        samples += chunk_samples
        skipped.update(chunk_skipped)
        n_truncated += chunk_truncated
    lengths = [len(ids) for ids, _ in samples]
    stats = {
        "conversations": len(convs),
        "samples": len(samples),
        "truncated": n_truncated,
        "skipped": dict(skipped),
        "tokens": int(sum(lengths)),
        "loss_tokens": int(sum(int(m.sum()) for _, m in samples)),
        "max_length": max_length,
        "block_size": block_size,
    }
    if not samples:
        raise ValueError(
            f"no usable sample among {len(convs)} conversations (skipped: {dict(skipped)}); each "
            f"needs >= 2*block_size={min_loss} assistant tokens within max_length={max_length}"
        )
    if skipped:
        log.warning("tokenization skipped %s of %d conversations", dict(skipped), len(convs))
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ds = TokenizedDataset(
        np.concatenate([ids for ids, _ in samples]),
        np.concatenate([m for _, m in samples]),
        offsets,
    )
    if cache_path is not None:
        _save_cache(cache_path, ds, stats, key)
    return ds, {**stats, "cache": "miss" if cache_path is not None else "off",
                "fingerprint": key}
