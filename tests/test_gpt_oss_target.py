"""gpt-oss targets (dpace_jax.targets.gpt_oss): parity with transformers' PyTorch
GptOssForCausalLM (alternating sliding / full layers, sinks, biases, YaRN, clamped SwiGLU experts),
the cached forward past the window, HF conversion both ways, MXFP4 checkpoints and lossless
speculative decoding, on tiny random models (CPU, fp32)."""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references
from hf_fixtures import (
    check_drafter_trains_on,
    check_moe_matches_torch,
    check_round_trip,
    randomize_,
)
from safetensors.numpy import load_file, save_file

from dpace_jax.targets import hf as convert
from dpace_jax.targets.gpt_oss import mxfp4
from dpace_jax.targets.gpt_oss import parts as gpt_oss
from dpace_jax.targets.model import ModelConfig, forward, forward_cached, init_params

LAYERS = 3
WINDOW = 4
FEATURE_LAYERS = (2, 0, 1, 2)
YARN = {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "truncate": False, "original_max_position_embeddings": 16, "rope_theta": 10000.0}
jit_forward = jax.jit(forward, static_argnames=("cfg", "feature_layers", "logits"))


def make_hf_gpt_oss(path, seed=0, **fields):
    """A random transformers GptOssForCausalLM saved to `path`; returns the torch model."""
    import torch
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(**{
        "vocab_size": 96, "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": LAYERS,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": WINDOW,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        "rope_parameters": dict(YARN), "max_position_embeddings": 256, "swiglu_limit": 0.8,
        "rms_norm_eps": 1e-5, "attn_implementation": "eager", **fields})
    torch.manual_seed(seed)
    model = GptOssForCausalLM(config).eval()
    randomize_(model, seed, std=0.15)
    model.save_pretrained(str(path))
    return model


@pytest.fixture(scope="module")
def hf_target(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt_oss")
    torch_model = make_hf_gpt_oss(path)
    return (path, torch_model, *convert.load_target(path, dtype=jnp.float32))


def _tokens(cfg, batch=2, length=20, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, length))


def test_logits_and_features_match_pytorch(hf_target):
    path, torch_model, params, cfg = hf_target
    f = cfg.family_cfg
    assert cfg.arch == "gpt_oss" and f.sliding_window == WINDOW and f.num_experts == 4
    assert cfg.scaling_dict["rope_type"] == "yarn" and f.swiglu_limit == 0.8
    tokens = _tokens(cfg)  # 20 positions > the window of 4
    ref_logits = check_moe_matches_torch(params, cfg, torch_model, tokens, FEATURE_LAYERS)
    # the window, the sinks and YaRN all matter here: dropping one changes the logits
    wide = dataclasses.replace(cfg, family_cfg=dataclasses.replace(f, sliding_window=1000))
    for other_cfg in (wide, dataclasses.replace(cfg, rope_scaling=None)):
        other = jit_forward(params, other_cfg, jnp.asarray(tokens))
        assert np.abs(np.asarray(other.logits) - ref_logits).max() > 1e-3, other_cfg
    oss = params.layers.oss
    no_sinks = dataclasses.replace(params, layers=dataclasses.replace(
        params.layers, oss=dataclasses.replace(oss, sinks=oss.sinks - 30.0)))
    assert np.abs(np.asarray(jit_forward(no_sinks, cfg, jnp.asarray(tokens)).logits)
                  - ref_logits).max() > 1e-3
    with pytest.raises(ValueError, match="einsum"):
        forward(params, cfg, jnp.asarray(tokens), attention="dot_product")


def _oss_cfg(**kw):
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=32, num_layers=3, num_heads=4,
                num_kv_heads=2, head_dim=8, rope_theta=10000.0, arch="gpt_oss",
                num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                sliding_window=WINDOW, swiglu_limit=0.8,
                layer_types=("sliding_attention", "full_attention", "sliding_attention"),
                rope_scaling=tuple(sorted({k: v for k, v in YARN.items()
                                           if k != "rope_theta"}.items())))
    return ModelConfig.make(**{**base, **kw})


def _random_params(cfg, seed=0, scale=0.15):
    params = init_params(cfg, jax.random.key(seed), jnp.float32, scale=scale)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype)
        if "norm" in jax.tree_util.keystr(path) else x, params)


@functools.cache
def _cached_step(cfg):
    return jax.jit(lambda params, cache, tokens, start:
                   forward_cached(params, cfg, tokens, cache, start, feature_layers=(0, 2)))


@pytest.mark.slow
def test_cached_blocks_with_rollbacks_match_full_forward_past_the_window():
    cfg = _oss_cfg()
    blocks = [(0, 8), (8, 4), (10, 4), (14, 1), (12, 4), (16, 1), (17, 4), (21, 4), (25, 1)]
    references.check_cached_blocks(_random_params(cfg), cfg, blocks)  # past the window 4


def test_save_load_round_trip_and_transformers_reads_ours(hf_target, tmp_path):
    from transformers import GptOssForCausalLM

    path, torch_model, params, cfg = hf_target
    check_round_trip(path, params, cfg, tmp_path, GptOssForCausalLM, torch_model,
                     _tokens(cfg, batch=1, length=11))


def _quantize_codes(rng, shape):
    """Random MXFP4 codes of a [P, R, C] weight: blocks [P, R, C/32, 16], scales [P, R, C/32]."""
    p, r, c = shape
    blocks = rng.integers(0, 256, (p, r, c // 32, 16), dtype=np.uint8)
    scales = rng.integers(120, 130, (p, r, c // 32), dtype=np.uint8)
    return blocks, scales


def _numpy_dequantize(blocks, scales):
    """Independent of dpace_jax.targets.gpt_oss.mxfp4: element by element from the e2m1 bit
    fields."""
    def e2m1(code):
        sign = -1.0 if code & 8 else 1.0
        exp, man = (code >> 1) & 3, code & 1
        return sign * (man * 0.5 if exp == 0 else (1 + man / 2) * 2.0 ** (exp - 1))
    table = np.array([e2m1(c) for c in range(16)])
    lo, hi = table[blocks & 15], table[blocks >> 4]
    vals = np.empty((*blocks.shape[:-1], 32))
    vals[..., 0::2], vals[..., 1::2] = lo, hi
    vals = vals * 2.0 ** (scales.astype(np.float64)[..., None] - 127)
    return vals.reshape(*blocks.shape[:2], -1).transpose(0, 2, 1)


def _mxfp4_copy(src, dst, rng, drop=(), quant=None):
    dst.mkdir()
    tensors = load_file(str(src / convert.WEIGHTS_NAME))
    refs = {}
    for key in list(tensors):
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            w = tensors.pop(key)  # [P, C, R] -> stored as [P, R, C / 32, 16]
            blocks, scales = _quantize_codes(rng, (w.shape[0], w.shape[2], w.shape[1]))
            tensors[key + "_blocks"], tensors[key + "_scales"] = blocks, scales
            refs[key] = (blocks, scales)
    save_file({k: v for k, v in tensors.items() if k not in drop}, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quant or {
        "quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (dst / "config.json").write_text(json.dumps(config))
    return refs


def test_mxfp4_checkpoints_dequantize_like_transformers(hf_target, tmp_path):
    import torch
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    path, _, params, cfg = hf_target
    refs = _mxfp4_copy(path, tmp_path / "q", np.random.default_rng(0))
    for dtype in (jnp.float32, jnp.bfloat16):
        loaded, cfg2 = convert.load_target(tmp_path / "q", dtype=dtype)
        assert cfg2 == cfg
        for i in range(LAYERS):
            for name, leaf in (("gate_up_proj", loaded.layers.oss.expert_gate_up),
                               ("down_proj", loaded.layers.oss.expert_down)):
                blocks, scales = refs[f"model.layers.{i}.mlp.experts.{name}"]
                theirs = convert_moe_packed_tensors(torch.from_numpy(blocks),
                                                    torch.from_numpy(scales), dtype=torch.float32)
                np.testing.assert_array_equal(np.asarray(leaf[i], np.float32), theirs.numpy())
                np.testing.assert_array_equal(np.asarray(leaf[i], np.float32),
                                              _numpy_dequantize(blocks, scales))
        np.testing.assert_array_equal(
            np.asarray(loaded.layers.oss.router_bias, np.float32),
            np.asarray(params.layers.oss.router_bias.astype(dtype), np.float32))
    gone = "model.layers.1.mlp.experts.down_proj_scales"
    _mxfp4_copy(path, tmp_path / "m", np.random.default_rng(0), drop=(gone,))
    with pytest.raises(ValueError, match=gone.replace(".", "[.]")):
        convert.load_target(tmp_path / "m")
    _mxfp4_copy(path, tmp_path / "f", np.random.default_rng(0), quant={"quant_method": "fp8"})
    with pytest.raises(ValueError, match="quantization_config.quant_method='fp8'"):
        convert.load_target(tmp_path / "f")
    with pytest.raises(ValueError, match="down_proj_blocks"):  # MXFP4 tensors, no config
        config = json.loads((tmp_path / "q" / "config.json").read_text())
        del config["quantization_config"]
        (tmp_path / "q" / "config.json").write_text(json.dumps(config))
        convert.load_target(tmp_path / "q")


def test_bad_configs_name_the_field(hf_target):
    path, *_ = hf_target
    base = json.loads((path / "config.json").read_text())
    for change, field in ((dict(layer_types=["full_attention"]), "layer_types"),
                          (dict(num_experts_per_tok=9), "num_experts_per_tok"),
                          (dict(attention_bias=False), "attention_bias"),
                          (dict(num_local_experts=None), "num_local_experts")):
        cfg = {k: v for k, v in {**base, **change}.items() if v is not None}
        with pytest.raises(ValueError, match=field):
            ModelConfig.from_hf(cfg)


def test_speculative_decoding_is_lossless():
    """Greedy speculative decoding with a random DFlash drafter on a gpt-oss target (window 4,
    sequences up to 23) gives the brute-force greedy continuation."""
    cfg = _oss_cfg()
    params = _random_params(cfg, seed=3, scale=0.3)
    references.check_greedy_speculative(params, cfg)


@pytest.mark.slow
def test_sampling_is_lossless_on_a_gpt_oss_target():
    """tests/test_decode.py's chi-square test on a tiny-vocabulary gpt-oss target (window 2 <
    the 7 positions): the sampled (t0, t1, t2) follow the target's exact conditionals."""
    from test_decode import check_sampling

    cfg = _oss_cfg(vocab_size=6, hidden_size=16, head_dim=8, num_heads=2, num_kv_heads=1,
                   sliding_window=2, num_layers=2, layer_types=("sliding_attention",
                                                                "full_attention"))
    check_sampling(_random_params(cfg, seed=11, scale=0.5), cfg, "dflash", 1.0, 0, 1.0, n=6000,
                   both_paths=False)


@pytest.mark.slow
def test_a_drafter_trains_on_a_gpt_oss_target_end_to_end(tmp_path):
    """train.py's run on a tiny gpt-oss target (the demo tokenizer's vocabulary): trains,
    exports in the DFlash format, and the export re-imports to the trained weights."""
    dcfg = check_drafter_trains_on(
        tmp_path, lambda path, vocab: make_hf_gpt_oss(path, vocab_size=vocab))
    assert dcfg.num_target_layers == LAYERS and dcfg.hidden_size == 64


def test_gpt_oss_config_file():
    """configs/gpt_oss_20b.py: the gpt-oss-20b target, block 8, a mask id inside the vocab."""
    import runpy
    from pathlib import Path

    c = runpy.run_path(str(Path(__file__).resolve().parents[1] / "configs" /
                           "gpt_oss_20b.py"))["get_config"]()
    assert c.target.path == "openai/gpt-oss-20b" and c.drafter.block_size == 8
    assert 0 <= c.drafter.mask_token_id < 201088
    assert gpt_oss.LAYER_TYPES == ("sliding_attention", "full_attention")
    assert mxfp4.FP4_VALUES[7] == 6.0
