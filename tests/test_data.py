"""Tests of dpace_jax.data.conversations / dpace_jax.data.chat: loading, loss masks, caching,
batching."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizer_fixtures import build_chat_tokenizer

from dpace_jax.data import conversations as D
from dpace_jax.data.chat import (
    BadConversation,
    normalize_roles,
    render_with_spans,
    token_loss_mask,
)
from dpace_jax.train.batches import Batches

EOT = "<|im_end|>"


def _conv(i: int, turns: int = 2) -> list[dict]:
    msgs = [{"role": "system", "content": "You are helpful."}]
    for t in range(turns):
        msgs.append({"role": "user", "content": f"Question {i}.{t}: what is {i} plus {t}?"})
        msgs.append({"role": "assistant", "content": f"The answer is {i + t}. Hello sea sky {i}!"})
    return msgs


def _sharegpt(conv):
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in conv]}


@pytest.fixture(scope="module")
def tok():
    return build_chat_tokenizer("qwen3")


@pytest.fixture(scope="module")
def dataset(tok):
    ds, _ = D.tokenize_conversations(
        [_conv(i, 1 + i % 3) for i in range(23)], tok, max_length=96, block_size=2
    )
    return ds


# ------------------------------------------------------------------------------------ loading


def test_normalize_roles_both_shapes():
    share = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
    oai = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert normalize_roles(share) == normalize_roles(oai) == oai
    with pytest.raises(BadConversation) as e:
        normalize_roles([{"from": "tool", "value": "x"}, {"from": "gpt", "value": "y"}])
    assert e.value.reason == "unknown_role"
    with pytest.raises(BadConversation) as e:
        normalize_roles([{"role": "user", "content": "hi"}])
    assert e.value.reason == "no_assistant"


def test_load_jsonl_json_parquet_directory(tmp_path):
    import datasets

    convs = [_conv(i) for i in range(6)]
    D.write_jsonl(tmp_path / "a.jsonl", [_sharegpt(c) for c in convs[:2]])
    (tmp_path / "b.json").write_text(json.dumps([{"messages": c} for c in convs[2:4]]))
    rows = [{"messages": c, "id": k} for k, c in enumerate(convs[4:])]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "c.parquet"))
    (tmp_path / "notes.txt").write_text("ignored")
    got, stats = D.load_conversations(tmp_path)
    assert got == convs
    assert stats["rows"] == 6 and stats["conversations"] == 6 and stats["skipped"] == {}
    got2, _ = D.load_conversations([tmp_path / "c.parquet", str(tmp_path / "a.jsonl")])
    assert got2 == convs[4:] + convs[:2]
    got3, _ = D.load_conversations(datasets.Dataset.from_list([_sharegpt(c) for c in convs]))
    assert got3 == convs


def test_bad_rows_are_counted(tmp_path):
    good = [_sharegpt(_conv(0)), {"messages": _conv(1)}]
    p = tmp_path / "mixed.jsonl"
    D.write_jsonl(
        p,
        good
        + [
            {"text": "wrong schema"},
            {"conversations": []},
            {"messages": [{"role": "user", "content": "no answer"}]},
            {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]},
            {"messages": "not a list"},
        ],
    )
    with open(p, "a") as f:
        f.write("{broken json\n")
    convs, stats = D.load_conversations(p)
    assert convs == [_conv(0), _conv(1)]
    assert stats["rows"] == 8
    assert stats["skipped"] == {
        "bad_schema": 2,
        "empty": 1,
        "no_assistant": 1,
        "unknown_role": 1,
        "bad_json": 1,
    }
    # the first few are named with their file and line
    assert stats["skipped_examples"][0].startswith(f"{p}:3: bad_schema: row has keys ['text']")
    assert [e.split(": ")[0] for e in stats["skipped_examples"]] == [f"{p}:{i}"
                                                                    for i in range(3, 8)]
    with pytest.raises(ValueError, match=rf"{p}:3: bad_schema.*\(data.strict=True\)"):
        D.load_conversations(p, strict=True)


def test_a_huge_row_is_cut_before_tokenizing_with_the_same_result(tok, monkeypatch):
    """A 2 MB answer is not tokenized whole (the tokenizer sees at most ~max_length * 32
    characters of it), and the sample equals the one from the whole row."""
    huge = [{"role": "user", "content": "write"},
            {"role": "assistant", "content": "word " * 400_000}]
    lengths = []
    real_call = type(tok).__call__

    def spy(self, texts, *args, **kwargs):
        lengths.extend(len(t) for t in (texts if isinstance(texts, list) else [texts]))
        return real_call(self, texts, *args, **kwargs)

    monkeypatch.setattr(type(tok), "__call__", spy)
    cut, _ = D.tokenize_conversations([huge, _conv(1)], tok, max_length=256, block_size=2)
    assert max(lengths) < 256 * D.CHARS_PER_TOKEN + 200
    monkeypatch.setattr(D, "CHARS_PER_TOKEN", 10**9)  # no cut: the whole row
    whole, _ = D.tokenize_conversations([huge, _conv(1)], tok, max_length=256, block_size=2)
    assert max(lengths) > 2_000_000
    for i in range(2):
        np.testing.assert_array_equal(cut[i]["input_ids"], whole[i]["input_ids"])
        np.testing.assert_array_equal(cut[i]["loss_mask"], whole[i]["loss_mask"])


def test_all_bad_rows_and_missing_file_raise(tmp_path):
    p = tmp_path / "bad.jsonl"
    D.write_jsonl(p, [{"prompt": "a", "completion": "b"}] * 3)
    with pytest.raises(ValueError, match=r"bad\.jsonl.*conversations.*messages"):
        D.load_conversations(p)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        D.load_conversations(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        D.load_conversations(str(tmp_path / "missing_dir"))


def test_write_jsonl_is_atomic(tmp_path):
    p = tmp_path / "out" / "x.jsonl"
    D.write_jsonl(p, [_conv(0)])
    assert json.loads(p.read_text()) == {"messages": _conv(0)}

    def rows():
        yield {"messages": _conv(1)}
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        D.write_jsonl(p, rows())
    assert json.loads(p.read_text()) == {"messages": _conv(0)}
    assert [f.name for f in p.parent.iterdir()] == ["x.jsonl"]


# -------------------------------------------------------------------------------- loss masks


def _masked_runs(tok, ids, mask):
    runs, cur = [], []
    for t, m in zip(ids, mask, strict=True):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


@pytest.mark.parametrize("template", ["qwen3", "chatml"])
def test_loss_mask_marks_exactly_the_assistant_turns(template):
    tok = build_chat_tokenizer(template)
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": "ok"},  # same text as the user turn before it
        {"role": "user", "content": "Café? ☕"},
        {"role": "assistant", "content": " café ☕ sea\nsky "},
        {"role": "user", "content": "And?"},
        {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
        {"role": "user", "content": "trailing question carries no loss"},
    ]
    text, spans = render_with_spans(conv, tok)
    assert text == tok.apply_chat_template(conv[:-1], tokenize=False, enable_thinking=False)
    want = [m["content"] + EOT for m in conv if m["role"] == "assistant"]
    assert [text[s:e] for s, e in spans] == want
    ids, mask = token_loss_mask(text, spans, tok, method="offsets")
    assert tok.decode(ids) == text
    assert _masked_runs(tok, ids, mask) == want
    # The generation prompt (incl. Qwen3's empty think block) is never a loss token.
    unmasked = tok.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    assert "Be brief." in unmasked and "trailing" not in unmasked
    ids2, mask2 = token_loss_mask(text, spans, tok, method="prefix")
    np.testing.assert_array_equal(ids2, ids)
    np.testing.assert_array_equal(mask2, mask)


def test_tokenize_stats_truncation_and_short_samples(tok):
    long_conv = _conv(7, turns=6)
    short_conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    full, _ = D.tokenize_conversations([long_conv], tok, max_length=4096, block_size=2)
    ds, stats = D.tokenize_conversations(
        [long_conv, short_conv, [{"role": "assistant", "content": "no user"}]],
        tok,
        max_length=64,
        block_size=2,
    )
    assert len(full[0]["input_ids"]) > 64  # really over-long
    assert len(ds) == 1 and stats["samples"] == 1 and stats["truncated"] == 1
    np.testing.assert_array_equal(ds[0]["input_ids"], full[0]["input_ids"][:64])
    np.testing.assert_array_equal(ds[0]["loss_mask"], full[0]["loss_mask"][:64])
    # "ok<|im_end|>" is 2 loss tokens < 2*block_size=4; the assistant-only row has no user turn.
    assert stats["skipped"] == {"too_few_loss_tokens": 1, "no_assistant": 1}
    assert stats["loss_tokens"] == int(ds[0]["loss_mask"].sum())
    with pytest.raises(ValueError, match="2\\*block_size"):
        D.tokenize_conversations([short_conv], tok, max_length=64, block_size=2)
    # An over-long conversation is kept (truncated) while >= 2*block_size loss tokens remain.
    first = int(np.argmax(full[0]["loss_mask"]))
    ds, st = D.tokenize_conversations([long_conv], tok, max_length=first + 4, block_size=2)
    assert st["truncated"] == 1 and int(ds[0]["loss_mask"].sum()) == 4
    with pytest.raises(ValueError, match="too_few_loss_tokens"):
        D.tokenize_conversations([long_conv], tok, max_length=first + 3, block_size=2)


def test_worker_processes_give_the_same_result(tok, monkeypatch):
    monkeypatch.setattr(D, "_CHUNK", 4)
    convs = [_conv(i, 1 + i % 3) for i in range(10)] + [[{"role": "user", "content": "x"}]]
    one, s1 = D.tokenize_conversations(convs, tok, max_length=70, block_size=2)
    two, s2 = D.tokenize_conversations(convs, tok, max_length=70, block_size=2, num_workers=2)
    assert s1 == s2
    for name in ("tokens", "loss_mask", "offsets"):
        np.testing.assert_array_equal(getattr(one, name), getattr(two, name))


def test_cache_hit_invalidation_and_interrupted_write(tok, tmp_path, monkeypatch):
    convs = [_conv(i) for i in range(5)]
    kw = dict(max_length=80, block_size=2, cache_dir=tmp_path)

    real_save = np.save
    calls = []

    def failing_save(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed mid-write")
        return real_save(*a, **k)

    monkeypatch.setattr(D.np, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        D.tokenize_conversations(convs, tok, **kw)
    assert list(tmp_path.iterdir()) == []  # nothing left that could load
    monkeypatch.setattr(D.np, "save", real_save)

    ds1, s1 = D.tokenize_conversations(convs, tok, **kw)
    assert s1["cache"] == "miss"

    def boom(*a, **k):
        raise AssertionError("tokenizer used on a cache hit")

    monkeypatch.setattr(D, "render_with_spans", boom)
    monkeypatch.setattr(D, "_encode_chunk", boom)
    ds2, s2 = D.tokenize_conversations(convs, tok, **kw)
    assert s2["cache"] == "hit" and s2["samples"] == s1["samples"]
    for name in ("tokens", "loss_mask", "offsets"):
        np.testing.assert_array_equal(getattr(ds1, name), getattr(ds2, name))
    with pytest.raises(AssertionError, match="cache hit"):  # max_length is part of the key
        D.tokenize_conversations(convs, tok, **{**kw, "max_length": 81})
    with pytest.raises(AssertionError, match="cache hit"):  # and so is the data
        D.tokenize_conversations(convs[:4], tok, **kw)


# ---------------------------------------------------------------------------------- batching


def _expected_batch(ds, idx, S, pad):
    ids = np.full((len(idx), S), pad, np.int32)
    mask = np.zeros((len(idx), S), np.int32)
    for r, i in enumerate(idx):
        x = ds[i]
        n = min(S, len(x["input_ids"]))
        ids[r, :n], mask[r, :n] = x["input_ids"][:n], x["loss_mask"][:n]
    return ids, mask


def test_batches_shapes_and_deterministic_shuffle(dataset):
    B, S = 4, 64
    it = Batches(dataset, B, S, seed=3, pad_id=0)
    assert it.steps_per_epoch == len(dataset) // B == 5
    orders = [it.epoch_order(e) for e in range(3)]
    for o in orders:
        assert sorted(o) == list(range(len(dataset)))
    assert not np.array_equal(orders[0], orders[1])
    np.testing.assert_array_equal(orders[1], Batches(dataset, B, S, seed=3).epoch_order(1))
    assert not np.array_equal(orders[0], Batches(dataset, B, S, seed=4).epoch_order(0))
    for step in range(8):  # crosses the epoch boundary (remainder dropped)
        b = next(it)
        e, j = divmod(step, 5)
        idx = orders[e][j * B : (j + 1) * B]
        ids, mask = _expected_batch(dataset, idx, S, 0)
        assert b["input_ids"].dtype == np.int32 and b["input_ids"].shape == (B, S)
        np.testing.assert_array_equal(b["input_ids"], ids)
        np.testing.assert_array_equal(b["loss_mask"], mask)
        lens = np.minimum(dataset.lengths[idx], S)
        np.testing.assert_array_equal(b["length"], lens)
        np.testing.assert_array_equal(b["attention_mask"], np.arange(S) < lens[:, None])
    assert it.state()["epoch"] == 1 and it.state()["index"] == 3
    assert list(Batches(dataset, B, S, num_epochs=2)).__len__() == 10


def test_resume_from_state_is_exact(dataset):
    run = Batches(dataset, 4, 48, seed=11)
    straight = [next(run) for _ in range(12)]
    it = Batches(dataset, 4, 48, seed=11)
    for _ in range(5):
        next(it)
    saved = json.loads(json.dumps(it.state()))
    resumed = Batches(dataset, 4, 48, seed=11, state=saved)
    for want in straight[5:]:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    with pytest.raises(ValueError, match="seed"):
        Batches(dataset, 4, 48, seed=12, state=saved)
    with pytest.raises(ValueError, match="batch_size"):
        Batches(dataset, 2, 48, seed=11, state=saved)


def test_process_slices_partition_the_global_batch(dataset):
    single = Batches(dataset, 4, 40, seed=5)
    procs = [Batches(dataset, 4, 40, seed=5, process_index=p, process_count=2) for p in (0, 1)]
    for _ in range(7):
        want = next(single)
        parts = [next(p) for p in procs]
        assert parts[0]["input_ids"].shape == (2, 40)
        for k in want:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), want[k])
    with pytest.raises(ValueError, match="divisible"):
        Batches(dataset, 3, 40, process_count=2)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        Batches(dataset, 64, 40)
