"""Regeneration: greedy answers equal brute-force greedy decoding turn by turn, the speculative
decoder writes the same file, an interrupted + restarted (sampled) run writes the same file as an
uninterrupted one, and the output loads in the training data pipeline."""

import json

import jax
import jax.numpy as jnp
import pytest
from hf_fixtures import make_tiny_hf_target
from test_evaluate import greedy_reference, make_drafter

from dpace_jax import regenerate
from dpace_jax.data import conversations as data
from dpace_jax.infer import generation
from dpace_jax.infer.sampling import Sampling
from dpace_jax.targets import hf as convert

MAX_NEW = 8
CONVS = [
    [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "old 1"},
     {"role": "user", "content": "And?"}, {"role": "assistant", "content": "old 2"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"},
     {"role": "assistant", "content": "old"}],
    [{"role": "user", "content": "Name one."}, {"role": "assistant", "content": "old"}],
    [{"role": "user", "content": "Ok"}, {"role": "assistant", "content": "old"}],
    [{"role": "user", "content": "Last one"}, {"role": "assistant", "content": "old"}],
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("regen")
    target_dir, _ = make_tiny_hf_target(root / "target", tokenizer=True, seed=5, vocab=260)
    target_cfg = convert.load_config(target_dir)
    drafter_dir = make_drafter(target_cfg, root / "drafter", block_size=3)
    # ShareGPT rows for the first three, role/content rows for the rest
    share = [{"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(
        m["role"], m["role"]), "value": m["content"]} for m in c]} for c in CONVS[:3]]
    src = root / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in share + [{"messages": c}
                                                                  for c in CONVS[3:]]))
    return root, target_dir, target_cfg, drafter_dir, src


def run(setup, out, **kw):
    _, target_dir, _, _, src = setup
    kw = {"max_new_tokens": MAX_NEW, "batch_size": 2, "dtype": "float32", "progress": False,
          **kw}
    return regenerate.regenerate(str(target_dir), [str(src)], out, **kw)


@pytest.mark.slow
def test_greedy_matches_brute_force_and_loads(setup):
    root, target_dir, target_cfg, drafter_dir, _ = setup
    out = root / "greedy.jsonl"
    assert run(setup, out) == {"rows": 5, "written": 5, "skipped": 0, "empty_answers": 0}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5

    tokenizer = convert.load_tokenizer(target_dir)
    params, _ = convert.load_target(target_dir, dtype=jnp.float32)
    stops = generation.stop_token_ids(tokenizer)
    for original, row in zip(CONVS, rows, strict=True):
        msgs = row["messages"]
        assert [m["role"] for m in msgs] == [m["role"] for m in original]
        for j, (old, new) in enumerate(zip(original, msgs, strict=True)):
            if old["role"] != "assistant":
                assert new == old
                continue
            # the answer to the history as regenerated so far (earlier answers included)
            prompt = generation.render_prompt(tokenizer, msgs[:j])
            want = greedy_reference(params, target_cfg, prompt, MAX_NEW, stops)
            assert new["content"] == generation.answer_text(tokenizer, want, stops)

    convs, stats = data.load_conversations([str(out)])
    assert stats["skipped"] == {} and len(convs) == 5
    assert convs == [r["messages"] for r in rows]
    ds, _ = data.tokenize_conversations(convs, tokenizer, max_length=128, block_size=1)
    assert len(ds) == 5

    # the speculative decoder (a random drafter, block 3) writes the same file at T=0
    spec_out = root / "spec.jsonl"
    run(setup, spec_out, drafter=str(drafter_dir))
    assert spec_out.read_text() == out.read_text()

    # a finished file is left alone; other settings on the same file are refused
    assert run(setup, out) == {"rows": 5, "written": 0, "skipped": 5, "empty_answers": 0}
    with pytest.raises(ValueError, match="other settings"):
        run(setup, out, seed=1)


def test_interrupted_run_resumes_to_the_same_file(setup, monkeypatch):
    root = setup[0]
    kw = {"sampling": Sampling(1.0), "seed": 3, "max_samples": 5}
    monkeypatch.setattr(generation, "WINDOW_BATCHES", 1)  # windows of one batch: 3 appends
    whole = root / "whole.jsonl"
    run(setup, whole, **kw)

    real_append = regenerate.append_rows
    calls = []

    def crash_on_second_batch(path, rows):
        calls.append(len(rows))
        if len(calls) == 2:  # half the batch lands, then a line is cut off mid-write
            real_append(path, rows[:1])
            with open(path, "a") as f:
                f.write(json.dumps({"messages": rows[1]["messages"]})[:17])
            raise KeyboardInterrupt("killed")
        real_append(path, rows)

    part = root / "part.jsonl"
    monkeypatch.setattr(regenerate, "append_rows", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        run(setup, part, **kw)
    monkeypatch.setattr(regenerate, "append_rows", real_append)
    assert regenerate.count_complete_rows(part) == 3  # and the cut line is gone
    assert run(setup, part, **kw)["written"] == 2
    assert part.read_text() == whole.read_text()
    rows = [json.loads(line) for line in part.read_text().splitlines()]
    assert len(rows) == 5 and all(len(r["messages"]) == len(c) for r, c in zip(rows, CONVS,
                                                                                strict=True))


def test_cli_and_bad_input(setup, tmp_path, capsys):
    _, target_dir, _, _, src = setup
    out = tmp_path / "cli.jsonl"
    regenerate.main(["--target", str(target_dir), "--input", str(src), "--output", str(out),
                     "--max-new-tokens", "4", "--batch-size", "4", "--max-samples", "2",
                     "--dtype", "float32", "--no-progress"])
    assert "2 rows written" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 2
    with pytest.raises(SystemExit, match="data file not found"):
        regenerate.main(["--target", str(target_dir), "--input", str(tmp_path / "no.jsonl"),
                         "--output", str(out)])
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: not a JSON line"):
        regenerate.count_complete_rows(bad)
    assert jax.device_count() >= 1
