"""bench/moe_memory.py's parameter arithmetic: against a tiny Qwen3-MoE target built by our own
init, against the published sizes of Qwen3-30B-A3B (and of the Qwen3-4B drafter of
docs/performance.md), its per-device split against dpace_jax.sharding's rule, and a smoke run."""

import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import moe_memory as mm  # noqa: E402
from dpace_jax import sharding  # noqa: E402
from dpace_jax.nn.schema import flatten  # noqa: E402
from dpace_jax.targets.model import ModelConfig, init_params, schema  # noqa: E402

TINY = ModelConfig.make(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=4,
                        num_heads=4,
                   num_kv_heads=2, head_dim=8, arch="qwen3_moe", num_experts=8,
                   num_experts_per_tok=2, moe_intermediate_size=16, mlp_only_layers=(1,),
                   decoder_sparse_step=1)


def test_counts_equal_a_tiny_target_built_by_our_init():
    params = init_params(TINY, jax.random.key(0), jnp.float32)
    leaves = flatten(params)
    target = mm.qwen3_moe_target("tiny", TINY)
    assert target.params() == sum(x.size for x in leaves.values())
    assert {a.name: a.shape for a in target.arrays} == {
        "/".join(p): tuple(x.shape) for p, x in leaves.items()}
    experts = sum(x.size for p, x in leaves.items() if p[-1].startswith("expert_"))
    k_over_p = TINY.family_cfg.num_experts_per_tok / TINY.family_cfg.num_experts
    assert target.active_params() == int(target.params() - experts * (1 - k_over_p))
    assert target.active_params(embedding=False) == target.active_params() - 96 * 32


def test_qwen3_30b_a3b_matches_the_published_sizes():
    target = mm.TARGETS["Qwen3-30B-A3B"]
    assert target.params() == pytest.approx(30.5e9, rel=0.02)
    assert target.active_params() == pytest.approx(3.3e9, rel=0.02)
    oss = mm.TARGETS["gpt-oss-120b"]  # model card: 116.8 B total, 5.1 B active
    assert oss.params() == pytest.approx(116.8e9, rel=0.02)
    assert oss.active_params(embedding=False) == pytest.approx(5.1e9, rel=0.02)


def test_qwen3_4b_drafter_is_the_performance_docs():
    cfg = ModelConfig(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_layers=36,
                      num_heads=32, num_kv_heads=8, head_dim=128, tie_word_embeddings=True)
    drafter = mm.schema_arrays(mm.DRAFTER_SCHEMA, mm.drafter_for(cfg))
    assert sum(a.size for a in drafter) == pytest.approx(537.4e6, abs=0.05e6)
    assert sum(a.size for a in mm.schema_arrays(schema(cfg), cfg)) == pytest.approx(
        4.02e9, rel=0.005)


@pytest.mark.parametrize("shape", [(1, 2, 2), (1, 4, 1), (2, 1, 2)])
def test_per_device_split_is_the_sharding_rule(shape):
    mesh = dict(zip(sharding.MESH_AXES, shape, strict=True))
    rules = schema(TINY).rules(TINY)  # the run's rule: dpace_jax.sharding.param_shardings
    params = jax.eval_shape(lambda: init_params(TINY, jax.random.key(0), jnp.float32))
    want = 0.0
    for path, leaf in flatten(params).items():
        spec = sharding.mesh_axes(leaf.shape, rules[path], mesh)
        want += leaf.size / math.prod(mesh[s] for s in spec if s)
    target = mm.qwen3_moe_target("tiny", TINY)
    assert mm.per_device_elements(target.arrays, mesh) == pytest.approx(want)
    assert mm.per_device_elements(target.arrays, mesh, "embed") == pytest.approx(want)
    replicated = mm.per_device_elements(target.arrays, mesh, "replicated")
    assert replicated > want or mesh["fsdp"] == mesh["tensor"] == 1


def test_report_runs(capsys):
    mm.main([])
    out = capsys.readouterr().out
    assert "### Qwen3-30B-A3B" in out and "### gpt-oss-120b" in out
    e = mm.estimate(mm.TARGETS["Qwen3-30B-A3B"], {"data": 1, "fsdp": 8, "tensor": 1})
    assert e["batch_per_device"] == 2
    assert e["train_fixed"]["target weights"] == pytest.approx(
        mm.TARGETS["Qwen3-30B-A3B"].params() * 2 / 8, rel=0.01)
