"""The converted Flax target computes what the HF PyTorch original computes (CPU, fp32)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_fixtures import make_tiny_hf_target, torch_outputs

from dpace_jax.nn.layers import rope_inv_freq
from dpace_jax.targets import hf as convert
from dpace_jax.targets.model import KVCache, features, forward, forward_cached

pytestmark = pytest.mark.slow  # subprocesses or long compiles: `-m "not slow"` skips them

LAYERS = 3
# Every layer id, the last one included (HF's hidden_states[L] is after the final norm), in an
# order with a repeat.
FEATURE_LAYERS = (2, 0, 1, 2)
CASES = {
    "qwen3-tied": dict(arch="qwen3", tie=True),
    "qwen3-untied": dict(arch="qwen3", tie=False),
    "llama-llama3-scaling": dict(arch="llama", tie=False),
    "qwen3-sharded": dict(arch="qwen3", tie=False, sharded=True, seed=3),
}
jit_forward = jax.jit(forward, static_argnames=("cfg", "feature_layers", "logits"))


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """name -> (path, torch_model, fp32 params, cfg), each built once per module."""
    built = {}

    def get(name):
        if name not in built:
            path, torch_model = make_tiny_hf_target(tmp_path_factory.mktemp(name),
                                                    layers=LAYERS, **CASES[name])
            built[name] = (path, torch_model, *convert.load_target(path, dtype=jnp.float32))
        return built[name]

    return get


def _tokens(cfg, batch=3, length=48, seed=0):
    # 48 positions: past llama3's original_max_position_embeddings (32) in the fixture
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, length))


@pytest.mark.parametrize("name", list(CASES))
def test_logits_and_features_match_pytorch(build, name):
    path, torch_model, params, cfg = build(name)
    assert cfg.tie_word_embeddings == CASES[name]["tie"]
    assert (params.lm_head is not None) == (not cfg.tie_word_embeddings)
    if CASES[name].get("sharded"):
        weight_map = json.loads((path / convert.INDEX_NAME).read_text())["weight_map"]
        assert len(set(weight_map.values())) > 1 and not (path / convert.WEIGHTS_NAME).exists()
    tokens = _tokens(cfg)
    out = jit_forward(params, cfg, jnp.asarray(tokens), feature_layers=FEATURE_LAYERS)
    ref_logits, ref_hidden = torch_outputs(torch_model, tokens)
    assert out.logits.shape == ref_logits.shape
    np.testing.assert_allclose(np.asarray(out.logits), ref_logits, atol=1e-4, rtol=0)
    ref_features = np.concatenate([ref_hidden[j + 1] for j in FEATURE_LAYERS], axis=-1)
    np.testing.assert_allclose(np.asarray(out.features), ref_features, atol=1e-4, rtol=0)
    assert np.abs(ref_logits).max() > 0.5  # the comparison is not between near-zero numbers
    np.testing.assert_allclose(np.asarray(out.hidden), ref_hidden[LAYERS], atol=1e-4, rtol=0)

    # The training forward (stops after the deepest feature layer, no logits) and the cached
    # forward (prefill of 30 tokens, then a block of 18) make the same features.
    early = jax.jit(features, static_argnums=(1, 3))(params, cfg, jnp.asarray(tokens),
                                                     FEATURE_LAYERS)
    np.testing.assert_allclose(np.asarray(early), ref_features, atol=1e-4, rtol=0)
    cache = KVCache.zeros(cfg, tokens.shape[0], 64, jnp.float32)
    parts = []
    for lo, hi in ((0, 30), (30, 48)):
        start = jnp.full((tokens.shape[0],), lo, jnp.int32)
        step = forward_cached(params, cfg, jnp.asarray(tokens[:, lo:hi]), cache, start,
                              feature_layers=FEATURE_LAYERS)
        cache = step.cache
        parts.append(np.asarray(step.features))
    np.testing.assert_allclose(np.concatenate(parts, axis=1), ref_features, atol=1e-4, rtol=0)


def test_llama3_scaling_is_exercised(build):
    """The fixture's llama3 scaling changes the frequencies, and ours equal HF's."""
    _, torch_model, _, cfg = build("llama-llama3-scaling")
    assert dict(cfg.rope_scaling)["rope_type"] == "llama3"
    ours = np.asarray(rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.scaling_dict))
    plain = np.asarray(rope_inv_freq(cfg.head_dim, cfg.rope_theta, None))
    theirs = torch_model.model.rotary_emb.inv_freq.double().numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    changed = ~np.isclose(ours, plain)
    assert changed.sum() >= 2  # scaled and smoothed bands both present at head_dim 16
    assert not np.isclose(ours / plain, 1 / 8).all()


def test_bf16_load_casts_each_tensor(build):
    path, _, params32, _ = build("qwen3-untied")
    params, _ = convert.load_target(path)  # default dtype: bfloat16
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    assert jax.tree.structure(params) == jax.tree.structure(params32)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params32), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b.astype(jnp.bfloat16)))
    kept, _ = convert.load_target(path, dtype=None)  # stored dtype (fp32 here)
    assert {leaf.dtype for leaf in jax.tree.leaves(kept)} == {jnp.dtype(jnp.float32)}


SHARDING_SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from dpace_jax.targets import hf as convert
    from dpace_jax.nn import schema as P_
    from dpace_jax.targets.model import schema

    path = sys.argv[1]
    assert jax.device_count() == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
    specs = {"embed": P("model", None), "final_norm": P(), "lm_head": P(None, "model"),
             "layers": {"q": P(None, None, "model", None), "k": P(None, None, "model", None),
                        "v": P(None, None, "model", None), "o": P(None, "model", None, None),
                        "gate": P(None, None, "model"), "up": P(None, None, "model"),
                        "down": P(None, "model", None)}}

    def spec_for(path):
        node = specs
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        return NamedSharding(mesh, node if node is not None else P())

    ref, cfg = convert.load_target(path, dtype=jnp.float32)
    # a pytree of shardings shaped like the parameters, and the callable form
    tree = schema(cfg).build({p: spec_for(p) for p in P_.flatten(ref)})
    for shardings in (spec_for, tree):
        params, _ = convert.load_target(path, dtype=jnp.float32, shardings=shardings)
        for names, arr in P_.flatten(params).items():
            want = spec_for(names)
            assert arr.sharding.is_equivalent_to(want, arr.ndim), (names, arr.sharding)
            expect = np.asarray(P_.get(ref, names))
            for shard in arr.addressable_shards:
                assert shard.data.shape == want.shard_shape(arr.shape), names
                np.testing.assert_array_equal(np.asarray(shard.data), expect[shard.index])
            np.testing.assert_array_equal(np.asarray(arr), expect)
    q = params.layers.q
    assert q.addressable_shards[0].data.shape[2] == q.shape[2] // 2
    print("SHARDING_OK")
""")


def test_load_onto_mesh_with_shardings(build, tmp_path):
    """In a 4-device CPU subprocess, every array lands with the requested sharding (callable
    and pytree forms) and each device holds exactly its slice."""
    path = build("qwen3-untied")[0]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    script = tmp_path / "shard_check.py"
    script.write_text(SHARDING_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(path)], env=env, text=True,
                            capture_output=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0 and "SHARDING_OK" in result.stdout, result.stderr[-3000:]
