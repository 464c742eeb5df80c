"""Qwen3-MoE targets (dpace_jax.targets.qwen3_moe): parity with transformers' PyTorch
Qwen3MoeForCausalLM, the two token dispatches, the cached forward, HF conversion both ways and
lossless speculative decoding (greedy and sampled), on tiny random models (CPU, fp32)."""

from __future__ import annotations

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
    module_builds,
    randomize_,
)
from safetensors.numpy import load_file, save_file
from test_decode import check_sampling, random_target

from dpace_jax.targets import experts as experts_lib
from dpace_jax.targets import hf as convert
from dpace_jax.targets import qwen3_moe as moe
from dpace_jax.targets.model import ModelConfig, forward, forward_cached, init_params

LAYERS = 3
FEATURE_LAYERS = (2, 0, 1, 2)  # every layer, the last one (after the final norm) included
CASES = {  # name -> Qwen3MoeConfig fields beyond the shared tiny shape
    "all-sparse-norm": dict(norm_topk_prob=True),
    "mixed-unnormed": dict(norm_topk_prob=False, mlp_only_layers=[1]),
    "step2-norm-tied": dict(norm_topk_prob=True, decoder_sparse_step=2, tie_word_embeddings=True),
}
SHARDED = "step2-norm-tied"  # saved in several safetensors files
jit_forward = jax.jit(forward, static_argnames=("cfg", "feature_layers", "logits"))


def make_hf_moe(path, seed=0, sharded=False, **fields):
    """A random transformers Qwen3MoeForCausalLM saved to `path`; returns the torch model."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(**{
        "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48,
        "moe_intermediate_size": 24, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 256,
        "attn_implementation": "eager", **fields})
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config).eval()
    randomize_(model, seed, std=0.15)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.save_pretrained(str(path), max_shard_size="20KB" if sharded else "50GB")
    return model


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """name -> (path, torch_model, fp32 params, cfg), each built once per module."""
    return module_builds(tmp_path_factory, lambda path, seed, name: make_hf_moe(
        path, seed=seed, sharded=name == SHARDED, **CASES[name]))


def _tokens(cfg, batch=2, length=24, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, length))


@pytest.mark.parametrize("name", list(CASES))
def test_logits_and_features_match_pytorch(build, name):
    path, torch_model, params, cfg = build(name)
    sparse = {"all-sparse-norm": (0, 1, 2), "mixed-unnormed": (0, 2), "step2-norm-tied": (1,)}
    assert cfg.arch == "qwen3_moe" and moe.sparse_layers(cfg) == sparse[name]
    assert cfg.family_cfg.norm_topk_prob == CASES[name]["norm_topk_prob"]
    assert (params.layers.mlp is None) == (len(sparse[name]) == LAYERS)
    assert (path / convert.INDEX_NAME).is_file() == (name == SHARDED)
    check_moe_matches_torch(params, cfg, torch_model, _tokens(cfg), FEATURE_LAYERS)


def _moe_cfg(**kw):
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                num_kv_heads=2, head_dim=8, rope_theta=10000.0, arch="qwen3_moe", num_experts=4,
                num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True,
                mlp_only_layers=(1,))
    return ModelConfig.make(**{**base, **kw})


def _random_params(cfg, seed=0):
    params = init_params(cfg, jax.random.key(seed), jnp.float32, scale=0.15)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype)
        if "norm" in jax.tree_util.keystr(path) else x, params)


def test_dispatches_agree_and_route_top_k():
    """Sorted (grouped, capacity-free) dispatch == the dense reference, on a layer slice with
    more tokens than experts; every token gets exactly k nonzero routing weights."""
    cfg = _moe_cfg(num_experts=6, num_experts_per_tok=3)
    params = _random_params(cfg)
    p = jax.tree.map(lambda a: a[0], params.layers.experts)
    h = jnp.asarray(np.random.default_rng(2).standard_normal((3, 17, 32)), jnp.float32)
    weights, experts = jax.jit(experts_lib.route, static_argnums=2)(h, p.router, cfg.family_cfg)
    np.testing.assert_allclose(np.asarray(weights.sum(-1)), 1.0, rtol=1e-6)
    assert all(len(set(row)) == 3 for row in np.asarray(experts).reshape(-1, 3).tolist())
    dense = jax.jit(experts_lib.dense_dispatch, static_argnums=4)(h, p, weights, experts,
                                                                  cfg.family_cfg)
    grouped = jax.jit(experts_lib.sorted_dispatch, static_argnums=4)(h, p, weights, experts,
                                                                     cfg.family_cfg)
    np.testing.assert_allclose(np.asarray(grouped), np.asarray(dense), atol=1e-5, rtol=0)
    # by hand: the chosen experts' SwiGLU outputs, weighted
    x, e, w = np.asarray(h)[1, 5], np.asarray(experts)[1, 5], np.asarray(weights)[1, 5]
    g, u, d = (np.asarray(a) for a in (p.expert_gate, p.expert_up, p.expert_down))
    want = sum(wk * ((x @ g[k]) / (1 + np.exp(-(x @ g[k]))) * (x @ u[k])) @ d[k]
               for k, wk in zip(e, w, strict=True))
    np.testing.assert_allclose(np.asarray(grouped)[1, 5], want, atol=1e-5)


@functools.cache
def _cached_step(cfg):
    return jax.jit(lambda params, cache, tokens, start:
                   forward_cached(params, cfg, tokens, cache, start, feature_layers=(0, 2)))


def test_cached_blocks_with_rollbacks_match_full_forward():
    """Prefill, then blocks of 4 and 1 with rollbacks, on a mixed layout (both branches)."""
    cfg = _moe_cfg()
    blocks = [(0, 8), (8, 4), (10, 4), (14, 1), (12, 4), (16, 1), (17, 4)]
    references.check_cached_blocks(_random_params(cfg), cfg, blocks)


def test_save_load_round_trip_and_transformers_reads_ours(build, tmp_path):
    """Saved by transformers -> ours -> saved by us -> ours again: bit-exact; the in-memory key
    map agrees with the file; transformers loads our file to the same model."""
    from transformers import Qwen3MoeForCausalLM

    path, torch_model, params, cfg = build("mixed-unnormed")
    check_round_trip(path, params, cfg, tmp_path, Qwen3MoeForCausalLM, torch_model,
                     _tokens(cfg, batch=1, length=9))


def _edited_copy(src, dst, drop=(), **config_changes):
    dst.mkdir()
    tensors = {k: v for k, v in load_file(str(src / convert.WEIGHTS_NAME)).items()
               if k not in drop}
    save_file(tensors, str(dst / convert.WEIGHTS_NAME))
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, **config_changes}))
    return dst


def test_bad_checkpoints_name_the_tensor_or_field(build, tmp_path):
    path, *_ = build("mixed-unnormed")
    gone = "model.layers.2.mlp.experts.3.up_proj.weight"
    with pytest.raises(ValueError, match=r"missing tensor.*\n.*" + gone.replace(".", r"\.")):
        convert.load_target(_edited_copy(path, tmp_path / "a", drop=(gone,)))
    for n in (3, 5):  # the checkpoint has 4 experts per layer
        bad = _edited_copy(path, tmp_path / f"n{n}", num_local_experts=n, num_experts=n)
        with pytest.raises(ValueError, match=f"num_experts={n}.*holds 4 experts"):
            convert.load_target(bad)
    router = "model.layers.0.mlp.gate.weight"
    with pytest.raises(ValueError, match=rf"missing tensor.*\n.*{router.replace('.', '[.]')}"):
        convert.load_target(_edited_copy(path, tmp_path / "r", drop=(router,)))
    for fields, field in ((dict(num_experts_per_tok=5), "num_experts_per_tok"),
                          (dict(mlp_only_layers=[3]), "mlp_only_layers"),
                          (dict(num_experts=None, num_local_experts=None), "num_experts"),
                          (dict(moe_intermediate_size=None), "moe_intermediate_size")):
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(fields)
        with pytest.raises(ValueError, match=field):
            ModelConfig.from_hf({k: v for k, v in cfg.items() if v is not None})
    with pytest.raises(ValueError, match="dispatch='ragged'"):
        jit_forward(_random_params(_moe_cfg()), _moe_cfg(dispatch="ragged"),
                    jnp.zeros((1, 4), jnp.int32))


def test_speculative_decoding_is_lossless():
    """Greedy speculative decoding with a DFlash drafter (random parameters) on a mixed MoE
    target gives the brute-force greedy continuation."""
    cfg = _moe_cfg(vocab_size=64)
    params = _random_params(cfg, seed=3)
    references.check_greedy_speculative(params, cfg)


# a tiny-vocab mixed target (layer 0 dense, layer 1 with experts): its exact conditionals over
# three tokens are 6 + 36 full forwards
SAMPLING_CFG = ModelConfig.make(vocab_size=6, hidden_size=16, intermediate_size=32, num_layers=2,
                           num_heads=2, num_kv_heads=1, head_dim=8, rope_theta=10000.0,
                           arch="qwen3_moe", num_experts=4, num_experts_per_tok=2,
                           moe_intermediate_size=16, norm_topk_prob=True, mlp_only_layers=(0,))


@pytest.mark.slow
@pytest.mark.parametrize("rule,temperature,top_k,top_p", [("dflash", 1.0, 0, 1.0),
                                                           ("speculative", 0.7, 4, 0.9)])
def test_sampling_is_lossless(rule, temperature, top_k, top_p):
    """Sampled speculative decoding on a Qwen3-MoE target (the default, sorted dispatch) with a
    near-target drafter: the first three tokens follow the target's exact filtered distribution
    (tests/test_decode.py's check: Pearson chi-square over the V^3 cells, z < 3.5)."""
    check_sampling(random_target(11, SAMPLING_CFG, scale=0.5), SAMPLING_CFG, rule,
                   temperature, top_k, top_p)


MESH_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec as P
from dpace_jax import sharding
from dpace_jax.targets import model
from dpace_jax.targets.experts import with_dispatch
from dpace_jax.targets.model import ModelConfig, features, forward, init_params

assert jax.device_count() == 8, jax.devices()
mesh = sharding.make_mesh((2, 2, 2))
shared = dict(vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
              head_dim=8, num_experts=4, num_experts_per_tok=2)
yarn = (("beta_fast", 32.0), ("beta_slow", 1.0), ("factor", 4.0),
        ("original_max_position_embeddings", 16), ("rope_type", "yarn"), ("truncate", False))
configs = {
    "qwen3_moe": ModelConfig.make(**shared, intermediate_size=48, arch="qwen3_moe",
                             moe_intermediate_size=24, mlp_only_layers=(1,)),
    "gpt_oss": ModelConfig.make(**shared, intermediate_size=32, arch="gpt_oss",
                           moe_intermediate_size=32, sliding_window=4, swiglu_limit=0.8,
                           rope_theta=10000.0, rope_scaling=yarn,
                           layer_types=("sliding_attention", "full_attention",
                                        "sliding_attention")),
    "qwen3_5_moe": ModelConfig.make(**shared, intermediate_size=0, arch="qwen3_5_moe",
                               moe_intermediate_size=24, shared_expert_intermediate_size=16,
                               norm_topk_prob=True, partial_rotary_factor=0.5,
                               layer_types=("linear_attention", "full_attention",
                                            "linear_attention"),
                               linear_num_key_heads=2, linear_num_value_heads=4,
                               linear_key_head_dim=8, linear_value_head_dim=8,
                               linear_conv_kernel_dim=4),
}
tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (4, 12)))
run = jax.jit(forward, static_argnums=1, static_argnames="feature_layers")
for name, cfg in configs.items():
    params = init_params(cfg, jax.random.key(0), jnp.float32, scale=0.15)
    shardings = model.shardings(cfg, params, mesh)
    if name == "qwen3_moe":
        assert shardings.layers.experts.expert_gate.spec == P(None, "fsdp", None, "tensor")
        assert shardings.layers.experts.router.spec == P(None, "fsdp", None)
        assert shardings.layers.mlp.down.spec == P(None, "tensor", "fsdp")
    placed = jax.device_put(params, shardings)
    ref = run(params, with_dispatch(cfg, "dense"), tokens,
              feature_layers=(0, 1))
    on_mesh = jax.device_put(tokens, sharding.batch_sharding(mesh))
    got = run(placed, cfg, on_mesh)  # the sorted dispatch
    atol = 5e-5 if name == "qwen3_5_moe" else 1e-5  # the recurrence amplifies rounding
    np.testing.assert_allclose(np.asarray(got.logits), np.asarray(ref.logits), atol=atol,
                               rtol=0, err_msg=name)
    feats = jax.jit(features, static_argnums=(1, 3))(placed, cfg, on_mesh, (0, 1))
    np.testing.assert_allclose(np.asarray(feats), np.asarray(ref.features), atol=atol, rtol=0,
                               err_msg=name)
print("MESH_OK")
"""


@pytest.mark.slow
def test_forward_on_a_mesh_with_sharded_experts(tmp_path):
    """On an 8-device CPU mesh (data 2, fsdp 2, tensor 2) with the experts split over fsdp, the
    sorted dispatch gives the single-device dense reference's logits and features, for a
    Qwen3-MoE, a gpt-oss and a Qwen3.5-MoE target."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(tests.parent), os.environ.get("PYTHONPATH", "")]))
    script = tmp_path / "mesh_check.py"
    script.write_text(MESH_SCRIPT)
    result = subprocess.run([sys.executable, str(script)], env=env, text=True,
                            capture_output=True, timeout=300, cwd=tests.parent)
    assert result.returncode == 0 and "MESH_OK" in result.stdout, result.stderr[-3000:]


@pytest.mark.slow
def test_a_drafter_trains_on_a_moe_target_end_to_end(tmp_path):
    """train.py's run on a tiny mixed-layout MoE target (the demo tokenizer's vocabulary):
    trains, exports in the DFlash format, and the export re-imports to the trained weights."""
    dcfg = check_drafter_trains_on(tmp_path, lambda path, vocab: make_hf_moe(
        path, vocab_size=vocab, mlp_only_layers=[1], norm_topk_prob=True))
    assert dcfg.num_target_layers == LAYERS and dcfg.hidden_size == 32
