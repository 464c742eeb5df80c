"""Bad checkpoints fail naming the problem; save_target round trips (ours and transformers)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (before safetensors.numpy, for bf16)
import numpy as np
import pytest
import torch
from hf_fixtures import make_tiny_hf_target, make_tiny_tokenizer, torch_outputs
from safetensors.numpy import load_file, save_file

from dpace_jax.targets import hf as convert
from dpace_jax.targets.model import forward


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """name -> (path, torch_model): tiny checkpoints to copy and break."""
    root = tmp_path_factory.mktemp("ckpts")
    return {
        "untied": make_tiny_hf_target(root / "untied", "qwen3", tokenizer=True),
        "tied": make_tiny_hf_target(root / "tied", "qwen3", tie=True, seed=1),
        "sharded": make_tiny_hf_target(root / "sharded", "llama", sharded=True, seed=2),
    }


def _copy(base, name, tmp_path) -> Path:
    dst = tmp_path / name
    shutil.copytree(base[name][0], dst)
    return dst


def _edit_weights(path: Path, edit) -> None:
    file = path / convert.WEIGHTS_NAME
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_tensor(base, tmp_path):
    path = _copy(base, "untied", tmp_path)
    _edit_weights(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"1 missing tensor.*\n.*model\.layers\.1\.mlp\.up_proj"):
        convert.load_target(path)


def test_wrong_shape(base, tmp_path):
    path = _copy(base, "untied", tmp_path)
    key = "model.layers.0.self_attn.k_proj.weight"
    _edit_weights(path, lambda t: t.update({key: t[key][:, :-1].copy()}))
    with pytest.raises(ValueError, match=r"wrong shape.*\n.*k_proj\.weight: \[32, 63\], "
                                         r"expected \[32, 64\]"):
        convert.load_target(path)


def test_unexpected_tensor(base, tmp_path):
    path = _copy(base, "untied", tmp_path)
    extra = "model.layers.0.self_attn.q_proj.bias"
    _edit_weights(path, lambda t: t.update({extra: np.zeros(64, np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected tensor.*\n.*q_proj\.bias"):
        convert.load_target(path)


def test_untied_checkpoint_without_lm_head(base, tmp_path):
    path = _copy(base, "untied", tmp_path)
    _edit_weights(path, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ValueError, match=r"missing.*\n.*lm_head\.weight"):
        convert.load_target(path)


@pytest.mark.parametrize("changes, pattern", [
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"},
     r"unsupported architecture \['MistralForCausalLM'\]"),
    ({"attention_bias": True}, "attention_bias=True is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"use_sliding_window": True}, "use_sliding_window=True is not supported"),
])
def test_unsupported_config(base, tmp_path, changes, pattern):
    path = _copy(base, "untied", tmp_path)
    _edit_config(path, **changes)
    with pytest.raises(ValueError, match=pattern):
        convert.load_target(path)


@pytest.mark.parametrize("keep", [4, 200, -100])
def test_truncated_safetensors(base, tmp_path, keep):
    path = _copy(base, "untied", tmp_path)
    file = path / convert.WEIGHTS_NAME
    data = file.read_bytes()
    file.write_bytes(data[:keep])
    with pytest.raises(ValueError, match=r"model\.safetensors: corrupt or truncated"):
        convert.load_target(path)


def test_missing_shard(base, tmp_path):
    path = _copy(base, "sharded", tmp_path)
    weight_map = json.loads((path / convert.INDEX_NAME).read_text())["weight_map"]
    gone = weight_map["model.layers.1.mlp.down_proj.weight"]
    (path / gone).unlink()
    with pytest.raises(FileNotFoundError, match=f"shard {gone} listed in .*index.json"):
        convert.load_target(path)


def test_no_weights_or_config(base, tmp_path):
    path = _copy(base, "untied", tmp_path)
    (path / convert.WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        convert.load_target(path)
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        convert.load_target(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert.load_target(tmp_path / "nowhere")


def test_tied_lm_head(base, tmp_path):
    path = _copy(base, "tied", tmp_path)
    params0, _ = convert.load_target(path, dtype=jnp.float32)
    embed = "model.embed_tokens.weight"
    _edit_weights(path, lambda t: t.update({"lm_head.weight": t[embed].copy()}))
    params, cfg = convert.load_target(path, dtype=jnp.float32)  # equal copy: accepted
    assert cfg.tie_word_embeddings and params.lm_head is None
    np.testing.assert_array_equal(params.embed, params0.embed)
    _edit_weights(path, lambda t: t.update({"lm_head.weight": t[embed] + 1.0}))
    with pytest.raises(ValueError, match="lm_head.weight differs from model.embed_tokens"):
        convert.load_target(path)


def test_hub_id_offline_uses_only_the_cache(base, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    snapshot = cache / "models--org--tiny" / "snapshots" / "0123abcd"
    shutil.copytree(base["untied"][0], snapshot)
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("0123abcd")
    assert convert.resolve_checkpoint("org/tiny", cache_dir=cache) == snapshot
    with pytest.raises(FileNotFoundError, match="'org/absent'.*HF_HUB_OFFLINE"):
        convert.resolve_checkpoint("org/absent", cache_dir=cache)


def test_tokenizer(base, tmp_path):
    tok = convert.load_tokenizer(base["untied"][0])
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tok("héllo")["input_ids"]) == "héllo"
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        convert.load_tokenizer(base["tied"][0])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["untied", "tied", "sharded"])
def test_save_load_round_trip(base, tmp_path, name):
    from transformers import AutoModelForCausalLM

    src, torch_model = base[name]
    params, cfg = convert.load_target(src, dtype=jnp.float32)
    out = convert.save_target(params, cfg, tmp_path / "out", tokenizer=make_tiny_tokenizer())
    assert sorted(p.name for p in out.iterdir()) == [
        "chat_template.jinja", "config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]  # single file, no temp files left behind
    again, cfg2 = convert.load_target(out, dtype=jnp.float32)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, again, params)

    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(reloaded) is type(torch_model)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 40))
    ref_logits, _ = torch_outputs(torch_model, tokens)
    np.testing.assert_allclose(torch_outputs(reloaded, tokens)[0], ref_logits, atol=1e-5)
    if name == "untied":  # the Flax forward agrees too (parity proper: test_target_parity)
        logits = forward(params, cfg, jnp.asarray(tokens)).logits
        np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=1e-4)


def test_save_bf16_and_config_fields(base, tmp_path):
    params, cfg = convert.load_target(base["sharded"][0], dtype=jnp.float32)
    out = convert.save_target(params, cfg, tmp_path / "bf16", dtype=jnp.bfloat16)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "bfloat16"
    assert config["torch_dtype"] == "bfloat16" and config["rope_scaling"]["rope_type"] == "llama3"
    assert {v.dtype for v in load_file(str(out / convert.WEIGHTS_NAME)).values()} == {
        np.dtype(jnp.bfloat16)}
    back, _ = convert.load_target(out, dtype=None)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b.astype(jnp.bfloat16)))


def test_save_rejects_bad_params_and_crashes_leave_no_partial_file(base, tmp_path):
    params, cfg = convert.load_target(base["untied"][0], dtype=jnp.float32)
    out = convert.save_target(params, cfg, tmp_path / "out")
    before = (out / convert.WEIGHTS_NAME).read_bytes()

    def with_layer(**change):
        return dataclasses.replace(params, layers=dataclasses.replace(params.layers, **change))

    broken = with_layer(up=params.layers.up[:, :, :-1])
    with pytest.raises(ValueError, match=r"layers/up: \[2, 64, 127\], expected \[2, 64, 128\]"):
        convert.save_target(broken, cfg, out)
    missing = dataclasses.replace(params, lm_head=None)
    with pytest.raises(ValueError, match="lm_head: missing"):
        convert.save_target(missing, cfg, out)

    class Exploding:  # a leaf that fails while its layers are being written
        shape, dtype = params.layers.down.shape, params.layers.down.dtype

        def __getitem__(self, i):
            if i == 1:
                raise RuntimeError("device lost")
            return params.layers.down[i]

    crashing = with_layer(down=Exploding())
    with pytest.raises(RuntimeError, match="device lost"):
        convert.save_target(crashing, cfg, out)
    assert (out / convert.WEIGHTS_NAME).read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
