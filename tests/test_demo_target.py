"""The embedded demo target: corpus, tokenizer, and the cached HF-format builds.

The built checkpoints are checked against transformers' own PyTorch Qwen3 (the reference) and the
corpus tasks against Python's own parser.
"""

from __future__ import annotations

import ast
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpace_jax.demo import corpus as corpus_lib
from dpace_jax.demo import target as target_lib
from dpace_jax.demo.tokenizer import build_tokenizer
from dpace_jax.targets import hf as convert
from dpace_jax.targets import model

pytestmark = pytest.mark.slow  # subprocesses or long compiles: `-m "not slow"` skips them

DIMS = dict(vocab_size=384, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=8)  # shared by both builds, so jitted code is reused
SMALL = target_lib.DemoSize(**DIMS, seq_len=192, batch_size=2, steps=3, learning_rate=3e-3,
                            max_corpus_bytes=150_000)
TEXT = "def f(x):\n    return x + 1  # one\n"


@pytest.fixture(scope="module")
def small_files():
    return corpus_lib.collect_sources(max_total_bytes=150_000, seed=0)


@pytest.fixture(scope="module")
def tokenizer(small_files):
    return build_tokenizer([f.text for f in small_files], 400)


# ----------------------------------------------------------------------------- corpus


def test_corpus_is_deterministic_and_filtered():
    a, b = corpus_lib.collect_sources(), corpus_lib.collect_sources()
    assert [f.path for f in a] == [f.path for f in b] == sorted(f.path for f in a)
    assert corpus_lib.corpus_fingerprint(a) == corpus_lib.corpus_fingerprint(b)
    assert all(f.path.endswith(".py") for f in a)
    parts = {p for f in a for p in f.path.split("/")[:-1]}
    assert not parts & {"test", "tests", "site-packages", "encodings", "__pycache__"}
    assert all(len(f.text.encode()) <= 200_000 for f in a)
    s1 = corpus_lib.collect_sources(max_files=20, seed=1)
    assert [f.path for f in s1] == [f.path for f in corpus_lib.collect_sources(max_files=20,
                                                                                 seed=1)]
    assert [f.path for f in s1] != [f.path for f in corpus_lib.collect_sources(max_files=20,
                                                                                 seed=2)]
    capped = corpus_lib.collect_sources(max_total_bytes=100_000)
    assert 0 < sum(len(f.text.encode()) for f in capped) <= 100_000
    with pytest.raises(FileNotFoundError, match="not a directory"):
        corpus_lib.collect_sources("/nonexistent/dir")


def test_function_tasks_parse_and_split(small_files):
    tasks = corpus_lib.extract_tasks(small_files)
    assert len(tasks) > 20
    assert len({t.name for t in tasks}) == len(tasks)
    for t in tasks:
        # head + body is exactly one function whose only first statement is the docstring
        tree = ast.parse(t.code + t.body)
        (fn,) = tree.body
        assert fn.name == t.name.split("::")[1].split(".")[-1]
        assert ast.get_docstring(fn) is not None and len(fn.body) >= 2
        assert t.prompt.startswith(corpus_lib.PROMPT_HEADER) and t.code in t.prompt
        assert t.answer == f"```python\n{t.body}```"
    train, held = corpus_lib.split_tasks(tasks, heldout_fraction=0.2, seed=0)
    assert held and train and len(train) + len(held) == len(tasks)
    assert not {t.name for t in train} & {t.name for t in held}
    # a task's side does not depend on the other tasks or their order
    _, held_rev = corpus_lib.split_tasks(tasks[::-1][: len(tasks) // 2], heldout_fraction=0.2)
    assert {t.name for t in held_rev} <= {t.name for t in held}
    assert corpus_lib.split_tasks(tasks, heldout_fraction=0.2, seed=1)[1] != held
    with pytest.raises(ValueError, match="heldout_fraction"):
        corpus_lib.split_tasks(tasks, heldout_fraction=1.5)


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_roundtrip_specials_and_template(tokenizer, small_files, tmp_path):
    texts = [small_files[0].text[:500], "def f(x):\n    return x ** 2  # ünïcödé ✓\n\n\t\n"]
    for text in texts:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert len(tokenizer) == 400
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
           ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|MASK|>", "<think>", "</think>")}
    assert len(set(ids.values())) == 6 and max(ids.values()) < 400
    assert tokenizer.pad_token_id == ids["<|endoftext|>"]
    assert tokenizer.eos_token_id == ids["<|im_end|>"]
    assert tokenizer.mask_token == "<|MASK|>" and tokenizer.mask_token_id == ids["<|MASK|>"]
    # each special token is one id even inside text
    assert tokenizer("a<|im_end|>b<think>")["input_ids"][1] == ids["<|im_end|>"]

    user = [{"role": "user", "content": "hi"}]
    off = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True,
                                        enable_thinking=False)
    on = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert on == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert off == on + "<think>\n\n</think>\n\n"
    conv = user + [{"role": "assistant", "content": "yo"}]
    full = tokenizer.apply_chat_template(conv, tokenize=False)
    assert full == off + "yo<|im_end|>\n"  # generation prompt + answer = the training render
    out = tokenizer.apply_chat_template(conv, return_dict=True, return_assistant_tokens_mask=True)
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(masked) == "yo<|im_end|>"

    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(texts[1])["input_ids"] == tokenizer(texts[1])["input_ids"]
    assert again.mask_token_id == ids["<|MASK|>"]
    assert again.apply_chat_template(conv, tokenize=False) == full


def test_tokenizer_is_deterministic(small_files, tokenizer):
    other = build_tokenizer([f.text for f in small_files], 400)
    assert other.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(["x"], 100)


# ----------------------------------------------------------------------------- builds


@functools.partial(jax.jit, static_argnums=1)
def _forward(params, cfg, tokens):
    return model.forward(params, cfg, tokens).logits


def _logits_match(path, text_ids):
    """Our Flax forward on the loaded checkpoint vs transformers' PyTorch Qwen3 on the same."""
    params, cfg = convert.load_target(path, dtype=jnp.float32)
    ours = np.asarray(_forward(params, cfg, jnp.asarray([text_ids]))[0])
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([text_ids])).logits[0].numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    return params, cfg


def test_random_target_loads_in_flax_and_torch(tmp_path):
    path = target_lib.build_random_target(tmp_path / "rnd", seed=3, **DIMS)
    hf_cfg = json.loads((path / "config.json").read_text())
    assert hf_cfg["architectures"] == ["Qwen3ForCausalLM"]
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(TEXT)["input_ids"][:16]
    _, cfg = _logits_match(path, ids)
    assert cfg.vocab_size == 384 and len(tok) <= 384 and cfg.tie_word_embeddings
    assert target_lib.build_random_target(tmp_path / "rnd", seed=3, **DIMS) == path
    with pytest.raises(ValueError, match="unknown size"):
        target_lib.build_random_target(tmp_path / "x", hidden=8)


def test_demo_build_loads_caches_and_survives_interruption(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    path = target_lib.build_demo_target(out, SMALL, seed=0, steps=4, progress=False)
    record = target_lib.read_marker(path)
    assert record["settings"]["steps"] == 4 and np.isfinite(record["final_loss"])
    assert record["chat_tasks"] > 0
    assert json.loads((path / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.mask_token == "<|MASK|>" and tok.chat_template
    conv = [{"role": "user", "content": TEXT}]
    ids = tok.apply_chat_template(conv, add_generation_prompt=True, enable_thinking=False,
                                  return_dict=True)["input_ids"]
    _logits_match(path, ids[-16:])

    # deterministic from the seed
    twin = target_lib.build_demo_target(tmp_path / "twin", SMALL, seed=0, steps=4, progress=False)
    weights = (path / "model.safetensors").read_bytes()
    assert (twin / "model.safetensors").read_bytes() == weights
    assert (twin / "tokenizer.json").read_bytes() == (path / "tokenizer.json").read_bytes()

    # cached: a second call does no work
    def boom(*a, **k):
        raise AssertionError("rebuilt a cached target")

    monkeypatch.setattr(target_lib, "train", boom)
    assert target_lib.build_demo_target(out, SMALL, seed=0, steps=4, progress=False) == path
    monkeypatch.undo()

    # an interrupted rebuild (other settings) leaves the old complete build and no debris;
    # training is stubbed from here on (the build logic, not the optimizer, is under test)
    monkeypatch.setattr(target_lib, "train", lambda params, *a, **k: (params, [1.0]))
    real_save = convert.save_target

    def save_then_crash(*a, **k):
        real_save(*a, **k)
        raise KeyboardInterrupt("simulated crash after the weights were written")

    monkeypatch.setattr(target_lib.convert, "save_target", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        target_lib.build_demo_target(out, SMALL, seed=0, steps=2, progress=False)
    with pytest.raises(KeyboardInterrupt):
        target_lib.build_demo_target(tmp_path / "fresh", SMALL, seed=0, steps=2, progress=False)
    monkeypatch.setattr(target_lib.convert, "save_target", real_save)
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "twin"]
    assert target_lib.read_marker(out)["settings"]["steps"] == 4

    # the next call rebuilds with the new settings
    target_lib.build_demo_target(out, SMALL, seed=0, steps=2, progress=False)
    assert target_lib.read_marker(out)["settings"]["steps"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "twin"]


def test_demo_build_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="unknown demo size"):
        target_lib.build_demo_target(tmp_path / "a", "huge")
    with pytest.raises(ValueError, match="steps"):
        target_lib.build_demo_target(tmp_path / "a", SMALL, steps=0)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a demo build"):
        target_lib.build_demo_target(tmp_path / "mine", SMALL, steps=1, progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
