"""configs/qwen3_6_27b_dflash2.py and its memory plan (bench/dflash2_memory.py): the config passes
the run's checks and builds the published DFlash 2 drafter for a target of Qwen3.6-27B's shapes
(parsed from its config.json fields by our own reader; nothing is downloaded); the plan's parameter
counts against tiny hybrid targets and DFlash 2 drafters built by our init, against hand counts of
the real shapes and the published sizes; its per-device split against dpace_jax.sharding; a smoke
run."""

import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import dflash2_memory as dm  # noqa: E402
from dpace_jax import sharding  # noqa: E402
from dpace_jax.drafters.config import DrafterConfig  # noqa: E402
from dpace_jax.drafters.dflash import init_drafter_params  # noqa: E402
from dpace_jax.drafters.dflash2 import DFlash2Config  # noqa: E402
from dpace_jax.nn.schema import flatten  # noqa: E402
from dpace_jax.targets.model import ModelConfig, init_params, schema  # noqa: E402
from dpace_jax.train.modes import mode_of  # noqa: E402
from dpace_jax.train.settings import Settings  # noqa: E402

# two periods of Qwen3.6's layout (three gated-DeltaNet layers, then gated attention)
TINY = ModelConfig.make(
    vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=8, num_heads=4,
    num_kv_heads=2, head_dim=8, arch="qwen3_5", partial_rotary_factor=0.25,
    layer_types=("linear_attention",) * 3 + ("full_attention",) + ("linear_attention",) * 3
    + ("full_attention",), linear_num_key_heads=2, linear_num_value_heads=6,
    linear_key_head_dim=4, linear_value_head_dim=4, linear_conv_kernel_dim=4)
TINY_DRAFTER = DrafterConfig.for_target(
    TINY, num_layers=2, block_size=8, mask_token_id=95, target_layer_ids=(1, 5),
    layer_types=("sliding_attention",) * 2, sliding_window=16, is_causal=False, arch="dflash2",
    family_cfg=DFlash2Config(conv_kernel_size=2, conv_group_size=16, selector_rank=8,
                             selector_top_k=4))


@pytest.fixture(scope="module")
def real():
    target = dm.qwen3_6_27b()
    return target, dm.drafter_of(dm.run_config(), target.cfg)


def test_config_passes_the_run_checks_and_builds_the_published_drafter(real, tmp_path):
    target, dcfg = real
    config = dm.run_config()
    assert config.target.path == "Qwen/Qwen3.6-27B"
    config.workdir = str(tmp_path)
    s = Settings.from_config(config, notify=False)
    mode_of(s.mode).check_drafter(dcfg, target.cfg)
    assert s.drafter.arch == "dflash2" and s.step.selector_warmup_ratio == 0.0005
    assert (dcfg.arch, dcfg.num_layers, dcfg.block_size) == ("dflash2", 5, 8)
    assert dcfg.layer_types == ("sliding_attention",) * 5 and dcfg.sliding_window == 2048
    assert dcfg.is_causal is False and dcfg.layer_causal == (False,) * 5
    assert dcfg.target_layer_ids == (5, 19, 33, 47, 61) and dcfg.mask_token_id == 248070
    assert dcfg.family_cfg == DFlash2Config(conv_kernel_size=2, conv_group_size=16,
                                            selector_rank=256, selector_top_k=16)
    # the drafter takes the target's widths and the published attention layout (drafter.num_heads
    # etc.; the target has 24 / 4 heads of 256)
    assert (dcfg.hidden_size, dcfg.intermediate_size, dcfg.vocab_size) == (5120, 17408, 248320)
    assert (dcfg.num_heads, dcfg.num_kv_heads, dcfg.head_dim) == (32, 8, 128)
    assert (target.cfg.num_heads, target.cfg.num_kv_heads, target.cfg.head_dim) == (24, 4, 256)
    # DFlash 2's checks run against these shapes: a group size not dividing 5120 is refused
    config.drafter.conv_group_size = 24
    with pytest.raises(ValueError, match="conv_group_size=24 does not divide hidden_size=5120"):
        dm.drafter_of(config, target.cfg)


def test_target_shapes_parse_as_qwen3_6(real):
    cfg = real[0].cfg
    f = cfg.family_cfg
    assert (cfg.arch, cfg.num_layers, cfg.hidden_size, cfg.vocab_size) == (
        "qwen3_5", 64, 5120, 248320)
    assert f.attention_layers == tuple(range(3, 64, 4)) and len(f.linear_layers) == 48
    assert (f.linear_num_key_heads, f.linear_num_value_heads, f.conv_channels) == (16, 48, 10240)
    assert cfg.head_dim * f.partial_rotary_factor == 64 and cfg.rope_theta == 1e7
    assert f.multimodal and not cfg.tie_word_embeddings


def test_counts_equal_tiny_models_built_by_our_init():
    # our init's leaves, traced only (eval_shape: the same shapes, no arrays computed)
    params = flatten(jax.eval_shape(lambda: init_params(TINY, jax.random.key(0), jnp.float32)))
    target = dm.mm.Target("tiny", TINY, tuple(dm.mm.schema_arrays(schema(TINY), TINY)))
    assert {a.name: a.shape for a in target.arrays} == {
        "/".join(p): tuple(x.shape) for p, x in params.items()}
    drafter = flatten(jax.eval_shape(lambda: init_drafter_params(TINY_DRAFTER,
                                                                  jax.random.key(1))))
    assert {a.name: a.shape for a in dm.drafter_arrays(TINY_DRAFTER)} == {
        "/".join(p): tuple(x.shape) for p, x in drafter.items()}


def test_counts_of_the_real_shapes(real):
    target, dcfg = real
    D, F, V, L = 5120, 17408, 248320, 64
    attention = D * 24 * 512 + 2 * D * 4 * 256 + 24 * 256 * D + 2 * 256  # q+gate, k, v, o, norms
    linear = (D * 10240 + D * 48 * 128 + 2 * D * 48 + 10240 * 4 + 2 * 48 + 128
              + 48 * 128 * D)  # in_qkv, in_z, in_b, in_a, conv, dt_bias, a_log, norm, out
    by_hand = 2 * V * D + D + L * (3 * D * F + 2 * D) + 16 * attention + 48 * linear
    assert target.params() == by_hand
    assert target.params() == pytest.approx(27e9, rel=0.01)  # the model card's "27B"
    # the drafter the config builds, by hand (the embedding and head are the target's), is the
    # published drafter's 1,924,404,480 parameters
    layer = (2 * D + D * 32 * 128 * 2 + 2 * D * 8 * 128 + 2 * 128  # norms, q+o, k+v, q/k norms
             + 3 * D * F + 2 * (2 * 2 * D + D * 2 * 2 * D // 16))  # MLP, two convolutions
    drafter = 5 * D * D + 2 * D + 5 * layer + D * 256 + 2 * V * 256  # fc, norms, selector
    assert sum(a.size for a in dm.drafter_arrays(dcfg)) == drafter == 1_924_404_480
    codebooks = [a for a in dm.drafter_arrays(dcfg) if a.name.endswith("codebook")]
    assert sum(a.size for a in codebooks) == 2 * V * 256
    every = 3 * D * F + 2 * D
    assert dm.largest_layer_bytes(target, 2, 1) == 2 * (every + linear)


@pytest.mark.parametrize("shape", [(1, 2, 2), (1, 4, 1), (2, 1, 2)])
def test_per_device_split_is_the_sharding_rule(shape):
    mesh = dict(zip(sharding.MESH_AXES, shape, strict=True))
    for sch, cfg, arrays, init in (
            (schema(TINY), TINY, dm.mm.schema_arrays(schema(TINY), TINY),
             lambda: init_params(TINY, jax.random.key(0), jnp.float32)),
            (dm.DFLASH2_SCHEMA, TINY_DRAFTER, dm.drafter_arrays(TINY_DRAFTER),
             lambda: init_drafter_params(TINY_DRAFTER, jax.random.key(0)))):
        rules = sch.rules(cfg)  # the run's rule: dpace_jax.sharding.param_shardings
        want = 0.0
        for path, leaf in flatten(jax.eval_shape(init)).items():
            spec = sharding.mesh_axes(leaf.shape, rules[path], mesh)
            want += leaf.size / math.prod(mesh[s] for s in spec if s)
        assert dm.mm.per_device_elements(arrays, mesh) == pytest.approx(want)


def test_plan_headlines(real):
    target, dcfg = real
    fsdp8 = dm.estimate(target, dcfg, {"data": 1, "fsdp": 8, "tensor": 1})
    assert fsdp8["train_fixed"]["target weights"] == pytest.approx(target.params() * 2 / 8,
                                                                  rel=1e-3)  # small vectors whole
    # the codebooks have no axis on fsdp: their fp32 state (and bf16 copy) is whole per device
    assert fsdp8["codebook_state_per_device"] == 18 * 2 * 248320 * 256
    assert fsdp8["decode"]["target KV cache (16 full-attention layers)"] == \
        16 * 1 * (8192 + 8) * 2 * 4 * 256 * 2
    assert fsdp8["decode"]["target recurrent state + conv history (48 gated-DeltaNet layers)"] \
        == 48 * (48 * 128 * 128 * 4 + 3 * 10240 * 2)
    replicated = dm.estimate(target, dcfg, {"data": 8, "fsdp": 1, "tensor": 1})
    h100, h200 = (0.9 * dm.HARDWARE[k][1] for k in ("8 x H100 80GB", "8 x H200 141GB"))
    assert fsdp8["train_total"] < h100 < replicated["train_total"] < h200
    v5p = 0.9 * dm.HARDWARE["TPU v5p-8 (4 chips)"][1]
    assert dm.estimate(target, dcfg, {"data": 1, "fsdp": 4, "tensor": 1})["train_total"] < v5p


def test_report_runs(capsys):
    dm.main([])
    out = capsys.readouterr().out
    assert "### 8 x H100 80GB and 8 x H200 141GB" in out and "### TPU v5p-8 (4 chips)" in out
    assert "Target: 26.90 B parameters" in out and "1.924 B" in out
