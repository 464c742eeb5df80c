"""Chat conversations: loading, role normalization, template rendering, assistant loss masks.

A conversation is a list of messages `{"role": "system"|"user"|"assistant", "content": str}`.

- `normalize_roles(turns)`: ShareGPT turns (`{"from", "value"}`, from in human/user/gpt/assistant/
  system, ...) or OpenAI-style messages (`{"role", "content"}`) -> normalized messages. Raises
  `BadConversation` (a ValueError with a short `.reason`) for anything else.
- `conversation_from_row(row)`: a dataset row with a `messages` or `conversations` list ->
  normalized messages (rows of another schema raise `BadConversation`).
- `render_with_spans(conv, tokenizer)`: the chat-template text of the conversation (thinking
  disabled where the template has the switch) and the character spans `[start, end)` that carry
  loss: each assistant turn's content plus its end-of-turn token (e.g. `...<|im_end|>`, not the
  newline after it), as SpecForge marks them.
- `token_loss_mask(text, spans, tokenizer)`: token ids of `text` and a 0/1 mask of the tokens
  inside the spans.
- `load_conversations(paths, *, split="train") -> (convs, stats)` and `write_jsonl(path, rows)`:
  see `dpace_jax.data.conversations` (which re-exports them) for the details.

How the spans are found, without `{% generation %}` support in the template: for assistant turn i,
render the messages before it with the generation prompt (`P_i`) and the messages through it
(`T_i`); the assistant's rendered text is `T_i[len(P_i):]` minus trailing whitespace. It sits at
`len(P_i)` in the full render when the template is prefix-stable (ChatML); otherwise (Qwen3 drops
the empty think block from earlier turns) it is searched for in the full render starting where the
full render and `P_i` diverge.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from dpace_jax.io.atomic import atomic_path

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
}
EXPECTED_SCHEMAS = (
    "'conversations': [{'from': human|gpt|system, 'value': str}, ...] (ShareGPT) or "
    "'messages': [{'role': user|assistant|system, 'content': str}, ...]"
)
# Passed to every chat-template render; templates without the switch ignore it.
TEMPLATE_KWARGS = {"enable_thinking": False}
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")

log = logging.getLogger(__name__)


class BadConversation(ValueError):
    """A row or conversation that cannot be used; `.reason` is a short key for skip counts."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _content_text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and all(
        isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):  # OpenAI content parts, text only
        return "".join(p["text"] for p in content)
    raise BadConversation("bad_content", f"content must be a string, got {type(content).__name__}")


def normalize_roles(turns) -> list[dict[str, str]]:
    """ShareGPT or role/content turns -> `[{"role": system|user|assistant, "content": str}]`."""
    if not isinstance(turns, Sequence) or isinstance(turns, str | bytes):
        raise BadConversation("bad_schema", f"expected a list of turns, got {type(turns).__name__}")
    if len(turns) == 0:
        raise BadConversation("empty", "conversation has no turns")
    out = []
    for t in turns:
        if not isinstance(t, Mapping):
            raise BadConversation("bad_schema", f"turn is a {type(t).__name__}, not a dict")
        role = t.get("role")
        role = t.get("from") if role is None else role
        content = t.get("content")
        content = t.get("value") if content is None else content
        if not isinstance(role, str) or content is None:
            raise BadConversation("bad_schema", f"turn has keys {sorted(t)}")
        norm = ROLE_ALIASES.get(role.strip().lower())
        if norm is None:
            raise BadConversation("unknown_role", f"role {role!r}")
        out.append({"role": norm, "content": _content_text(content)})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        raise BadConversation("no_assistant", "no non-empty assistant turn")
    return out


def conversation_from_row(row) -> list[dict[str, str]]:
    """A dataset row with `messages` or `conversations` -> normalized messages."""
    if not isinstance(row, Mapping):
        raise BadConversation("bad_schema", f"row is a {type(row).__name__}, not an object")
    turns = row.get("messages")
    if turns is None:
        turns = row.get("conversations")
    if turns is None:
        raise BadConversation("bad_schema", f"row has keys {sorted(row)}")
    return normalize_roles(turns)


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(
            list(messages),
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **TEMPLATE_KWARGS,
        )
    except Exception as e:  # jinja raise_exception(...), undefined fields, ...
        raise BadConversation("template_error", str(e)) from e
    if not isinstance(text, str):
        raise BadConversation("template_error", f"rendered a {type(text).__name__}")
    return text


def render_with_spans(conv, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """Full chat-template text and the character spans of the assistant turns (content + EOT)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat_template; the "
            "target's tokenizer must define one"
        )
    last = max((i for i, m in enumerate(conv) if m["role"] == "assistant"), default=-1)
    if last < 0:
        raise BadConversation("no_assistant", "no assistant turn")
    first_user = next((i for i, m in enumerate(conv) if m["role"] == "user"), None)
    if first_user is None or first_user > last:
        raise BadConversation("no_assistant", "no assistant turn after a user turn")
    msgs = conv[: last + 1]  # trailing user/system turns carry no loss
    full = _render(tokenizer, msgs, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i in range(first_user + 1, len(msgs)):
        if msgs[i]["role"] != "assistant":
            continue
        prefix = _render(tokenizer, msgs[:i], add_generation_prompt=True)
        through = _render(tokenizer, msgs[: i + 1], add_generation_prompt=False)
        if not through.startswith(prefix):
            raise BadConversation(
                "mask_mismatch", "the template's generation prompt does not prefix its own turn"
            )
        target = through[len(prefix) :].rstrip()
        if not target:
            continue
        at = len(prefix)
        if at >= cursor and full.startswith(prefix) and full.startswith(target, at):
            start = at
        else:
            start = full.find(target, max(cursor, len(os.path.commonprefix([full, prefix]))))
            if start < 0:
                raise BadConversation(
                    "mask_mismatch", f"assistant turn {i} not found in the rendered conversation"
                )
        spans.append((start, start + len(target)))
        cursor = start + len(target)
    return full, spans


def offsets_to_mask(offsets, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """uint8 [n]: 1 for tokens whose first character lies inside one of the spans `[s, e)`;
    `offsets` are the tokens' (start, end) character offsets [n, 2]."""
    starts = np.asarray(offsets, np.int64).reshape(-1, 2)[:, 0]
    mask = np.zeros(len(starts), bool)
    for s, e in spans:
        mask |= (starts >= s) & (starts < e)
    return mask.astype(np.uint8)


def _mask_by_offsets(text, spans, tokenizer):
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return np.asarray(enc["input_ids"], np.int32), offsets_to_mask(enc["offset_mapping"], spans)


def _mask_by_prefix(text, spans, tokenizer):
    def enc(s):
        return list(tokenizer(s, add_special_tokens=False)["input_ids"])

    ids = enc(text)
    mask = np.zeros(len(ids), np.uint8)
    for s, e in spans:
        before, through = enc(text[:s]), enc(text[:e])
        if through[: len(before)] != before or ids[: len(through)] != through:
            raise BadConversation("mask_mismatch", "tokenization is not prefix-stable at a turn")
        mask[len(before) : len(through)] = 1
    return np.asarray(ids, np.int32), mask


def token_loss_mask(text, spans, tokenizer, method: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Token ids int32 [n] of `text` (no added special tokens) and the uint8 [n] mask of the
    tokens inside `spans`.

    method: "offsets" (character offsets, fast tokenizers), "prefix" (tokenize the text up to each
    span boundary and check it is a token prefix of the full text), or "auto" (offsets when the
    tokenizer supports them).
    """
    if method == "auto":
        method = "offsets" if getattr(tokenizer, "is_fast", False) else "prefix"
    if method == "offsets":
        return _mask_by_offsets(text, spans, tokenizer)
    if method == "prefix":
        return _mask_by_prefix(text, spans, tokenizer)
    raise ValueError(f"method={method!r}: expected 'auto', 'offsets' or 'prefix'")


# ----------------------------------------------------------------------------------- loading


def _is_hub_id(s: str) -> bool:
    return (
        not s.startswith((".", "/", "~"))
        and not s.endswith(DATA_SUFFIXES)
        and s.count("/") <= 1
        and " " not in s
    )


def _sources(paths) -> list[tuple[str, object]]:
    """(kind, what) pairs: ("file", Path), ("hub", id) or ("dataset", datasets.Dataset)."""
    if not isinstance(paths, list | tuple):
        paths = [paths]
    out: list[tuple[str, object]] = []
    for p in paths:
        if not isinstance(p, str | os.PathLike):
            out.append(("dataset", p))
            continue
        path = Path(p).expanduser()
        if path.is_dir():
            files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix in DATA_SUFFIXES)
            if not files:
                raise FileNotFoundError(f"{path}: directory holds no {DATA_SUFFIXES} files")
            out += [("file", f) for f in files]
        elif path.is_file():
            if path.suffix not in DATA_SUFFIXES:
                raise ValueError(f"{path}: unsupported data file type (expected {DATA_SUFFIXES})")
            out.append(("file", path))
        elif _is_hub_id(str(p)):
            out.append(("hub", str(p)))
        else:
            raise FileNotFoundError(f"data file not found: {path}")
    if not out:
        raise ValueError("no data sources given")
    return out


_BAD_JSON = object()


def json_document(text: str) -> list | None:
    """The rows of a .json file's text: a list, {"data": [...]} or one object; None when it is
    not one such document (maybe JSON lines in a .json file)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    if isinstance(data, Mapping) and isinstance(data.get("data"), list):
        data = data["data"]
    return data if isinstance(data, list) else [data] if isinstance(data, Mapping) else None


def _json_rows(path: Path) -> Iterator[tuple[str, object]]:
    """(where, row) of a JSON / JSONL file; where is "file:line" (JSONL) or "file[i]"."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    rows = json_document(text) if path.suffix == ".json" else None
    if rows is not None:
        yield from ((f"{path}[{i}]", row) for i, row in enumerate(rows))
        return
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield f"{path}:{i}", json.loads(line)
            except json.JSONDecodeError:
                yield f"{path}:{i}", _BAD_JSON


def _source_rows(kind: str, what, name: str, split: str) -> Iterable[tuple[str, object]]:
    if kind == "file" and what.suffix in (".jsonl", ".json"):
        return _json_rows(what)
    import datasets  # heavy import, only when needed

    if kind == "file":
        try:
            rows = datasets.load_dataset("parquet", data_files=str(what), split="train")
        except Exception as e:  # Arrow and datasets errors share no base class
            cause = e.__cause__ or e  # datasets wraps Arrow's error
            raise ValueError(f"{what}: cannot be read as Parquet: {type(cause).__name__}: "
                             f"{' '.join(str(cause).split())[:200]}") from None
    elif kind == "hub":
        try:
            rows = datasets.load_dataset(what, split=split)
        except Exception as e:
            raise FileNotFoundError(
                f"{what!r} is not a local file or directory, and loading it as a hub dataset "
                f"(split={split!r}) failed: {type(e).__name__}: {e}"
            ) from e
    else:
        rows = what
    return ((f"{name} row {i}", row) for i, row in enumerate(rows))


SKIP_EXAMPLES = 5  # unusable rows named (file and line) per source


def load_conversations(paths, *, split: str = "train",
                       strict: bool = False) -> tuple[list[list[dict]], dict]:
    """Load and normalize chat conversations from files, directories, hub ids or Datasets.
    Unusable rows are counted by reason, the first few named with their file and line
    (`stats["skipped_examples"]`); with `strict` the first one is a ValueError."""
    convs: list[list[dict]] = []
    skipped: Counter = Counter()
    per_source, examples = [], []
    for kind, what in _sources(paths):
        name = str(what) if kind != "dataset" else f"<{type(what).__name__}>"
        n_rows, n_kept, bad = 0, 0, Counter()
        for where, row in _source_rows(kind, what, name, split):
            n_rows += 1
            try:
                if row is _BAD_JSON:
                    raise BadConversation("bad_json", "not a JSON line")
                convs.append(conversation_from_row(row))
                n_kept += 1
            except BadConversation as e:
                if strict:
                    raise ValueError(f"{where}: {e} (data.strict=True)") from None
                bad[e.reason] += 1
                if sum(bad.values()) <= SKIP_EXAMPLES:
                    examples.append(f"{where}: {e}"[:200])
        if n_kept == 0:
            raise ValueError(
                f"{name}: none of its {n_rows} rows is a usable conversation "
                f"(skipped: {dict(bad)}); expected rows with {EXPECTED_SCHEMAS}, each with at "
                "least one non-empty assistant turn"
            )
        if bad:
            log.warning("%s: skipped %d of %d rows: %s; first: %s", name, sum(bad.values()),
                        n_rows, dict(bad), "; ".join(examples[-min(SKIP_EXAMPLES,
                                                                    sum(bad.values())):]))
        log.info("%s: %d conversations", name, n_kept)
        skipped.update(bad)
        per_source.append({"source": name, "rows": n_rows, "conversations": n_kept})
    stats = {
        "rows": sum(s["rows"] for s in per_source),
        "conversations": len(convs),
        "skipped": dict(skipped),
        "skipped_examples": examples,
        "sources": per_source,
    }
    return convs, stats


def write_jsonl(path, rows: Iterable) -> Path:
    """Write rows (dicts, or message lists -> {"messages": ...}) as JSONL, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            if isinstance(row, list):
                row = {"messages": row}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return path
