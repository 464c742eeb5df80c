"""DFlash HF export/import, checked against an independent PyTorch re-implementation of the drafter
(written here from docs/design.md §3, with an explicit [N*K, S+N*K] mask) loaded from the export."""

import dataclasses
import json
import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from drafter_fixtures import CFG, S, random_like
from safetensors.numpy import load_file, save_file

from dpace_jax.drafters.dflash import DrafterConfig, init_drafter_params, train_forward
from dpace_jax.drafters.hf import export_drafter, import_drafter
from dpace_jax.targets import model


@pytest.fixture(scope="module")
def params():
    return random_like(init_drafter_params, CFG, 1, 0.15)


def expected_keys(n_layers, d=64, h=4, g=2, e=16, f=128, n_feat=2):
    keys = {"fc.weight": (d, n_feat * d), "hidden_norm.weight": (d,), "norm.weight": (d,)}
    for i in range(n_layers):
        keys |= {
            f"layers.{i}.self_attn.q_proj.weight": (h * e, d),
            f"layers.{i}.self_attn.k_proj.weight": (g * e, d),
            f"layers.{i}.self_attn.v_proj.weight": (g * e, d),
            f"layers.{i}.self_attn.o_proj.weight": (d, h * e),
            f"layers.{i}.self_attn.q_norm.weight": (e,),
            f"layers.{i}.self_attn.k_norm.weight": (e,),
            f"layers.{i}.mlp.gate_proj.weight": (f, d),
            f"layers.{i}.mlp.up_proj.weight": (f, d),
            f"layers.{i}.mlp.down_proj.weight": (d, f),
            f"layers.{i}.input_layernorm.weight": (d,),
            f"layers.{i}.post_attention_layernorm.weight": (d,),
        }
    return keys


def test_export_keys_shapes_and_config(params, tmp_path):
    export_drafter(params, CFG, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checksums.sha256", "config.json",
                                                         "model.safetensors"]
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert {k: v.shape for k, v in tensors.items()} == expected_keys(2)
    # [out, in] layout: q_proj.weight[h*E + e, d] == q[d, h, e]
    np.testing.assert_array_equal(tensors["layers.1.self_attn.q_proj.weight"][2 * 16 + 5, 7],
                                  params.layers.q[1, 7, 2, 5])
    np.testing.assert_array_equal(tensors["fc.weight"][3, 100], params.fc[100, 3])
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["architectures"] == ["DFlashDraftModel"] and hf["model_type"] == "qwen3"
    assert hf["dflash_config"] == {"mask_token_id": 96, "target_layer_ids": [1, 3]}
    assert (hf["num_hidden_layers"], hf["block_size"], hf["num_target_layers"]) == (2, 4, 6)
    assert (hf["hidden_size"], hf["intermediate_size"], hf["head_dim"]) == (64, 128, 16)
    assert (hf["num_attention_heads"], hf["num_key_value_heads"], hf["vocab_size"]) == (4, 2, 97)
    assert hf["tie_word_embeddings"] is False and hf["torch_dtype"] == "float32"
    assert hf["rope_theta"] == 10000.0 and hf["rope_scaling"] is None


def assert_bit_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_round_trip_bit_exact(params, tmp_path, dtype):
    p = jax.tree.map(lambda x: x.astype(dtype), params)
    export_drafter(p, CFG, tmp_path)
    back, cfg = import_drafter(tmp_path)
    assert cfg == CFG
    assert_bit_equal(back, p)
    sliding = dataclasses.replace(CFG, layer_types=("sliding_attention", "full_attention"),
                                  sliding_window=5, is_causal=True)
    export_drafter(p, sliding, tmp_path / "sliding")
    assert import_drafter(tmp_path / "sliding")[1] == sliding
    hf = json.loads((tmp_path / "sliding" / "config.json").read_text())
    assert (hf["layer_types"], hf["sliding_window"], hf["use_sliding_window"],
            hf["is_causal"]) == (["sliding_attention", "full_attention"], 5, True, True)
    # exporting fp32 master weights as bf16
    export_drafter(params, CFG, tmp_path / "cast", dtype=dtype)
    back, _ = import_drafter(tmp_path / "cast")
    assert_bit_equal(back, p)
    hf = json.loads((tmp_path / "cast" / "config.json").read_text())
    assert hf["torch_dtype"] == np.dtype(dtype).name


def test_llama_style_target_rope_scaling(tmp_path):
    scaling = model.freeze_scaling({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192})
    target = model.ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=8,
                               num_heads=4, num_kv_heads=1, head_dim=8,
                               rope_scaling=scaling, arch="llama")
    cfg = DrafterConfig.for_target(target, num_layers=1, block_size=3, mask_token_id=7)
    assert cfg.target_layer_ids == (4,)
    p = random_like(init_drafter_params, cfg, 5, 0.1)
    export_drafter(p, cfg, tmp_path)
    back, cfg2 = import_drafter(tmp_path)
    assert cfg2 == cfg and cfg2.rope_scaling == scaling
    assert_bit_equal(back, p)


def test_prefixed_and_sharded_checkpoints(params, tmp_path):
    export_drafter(params, CFG, tmp_path / "ref")
    tensors = load_file(str(tmp_path / "ref" / "model.safetensors"))
    config = (tmp_path / "ref" / "config.json").read_text()
    pre = tmp_path / "prefixed"
    pre.mkdir()
    (pre / "config.json").write_text(config)
    save_file({"model." + k: v for k, v in tensors.items()}, str(pre / "model.safetensors"))
    assert_bit_equal(import_drafter(pre)[0], params)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text(config)
    names = sorted(tensors)
    shards = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(sharded / shard))
        weight_map |= {k: shard for k in keys}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_bit_equal(import_drafter(sharded)[0], params)


def rewrite(src, dst, *, tensors=None, config=None):
    dst.mkdir()
    t = load_file(str(src / "model.safetensors"))
    c = json.loads((src / "config.json").read_text())
    save_file(tensors(t) if tensors else t, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(config(c) if config else c))
    return dst


def test_import_errors(params, tmp_path):
    src = export_drafter(params, CFG, tmp_path / "ok")
    key = "layers.1.mlp.up_proj.weight"

    def drop(t):
        return {k: v for k, v in t.items() if k != key}

    cases = [
        (dict(tensors=drop), f"missing key.*{key}"),
        (dict(tensors=lambda t: {**t, "lm_head.weight": t["fc.weight"]}),
         "unexpected key.*lm_head.weight"),
        (dict(tensors=lambda t: {**t, key: t[key][:, :32].copy()}), f"{key} has shape"),
        (dict(config=lambda c: {**c, "architectures": ["Qwen3ForCausalLM"]}), "architectures"),
        (dict(config=lambda c: {k: v for k, v in c.items() if k != "dflash_config"}),
         "dflash_config"),
        (dict(config=lambda c: {**c, "dflash_config": {"mask_token_id": 3}}),
         "dflash_config.target_layer_ids"),
        (dict(config=lambda c: {k: v for k, v in c.items() if k != "block_size"}), "block_size"),
        (dict(config=lambda c: {k: v for k, v in c.items() if k != "hidden_size"}),
         "hidden_size"),
        (dict(config=lambda c: {**c, "num_target_layers": 3}), "target_layer_ids"),
    ]
    for i, (change, match) in enumerate(cases):
        with pytest.raises(ValueError, match=match):
            import_drafter(rewrite(src, tmp_path / f"bad{i}", **change))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        import_drafter(tmp_path / "nowhere")
    sliding = {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 8,
               "use_sliding_window": True}
    layout_cases = [
        ({"layer_types": ["full_attention", "local"]}, r"layer_types \['local'\] unknown"),
        ({"layer_types": ["full_attention"] * 3}, "layer_types has 3 entries.*num_layers=2"),
        ({**sliding, "sliding_window": 0}, "'sliding_window' is 0, expected an integer >= 1"),
        ({**sliding, "sliding_window": "8"}, "'sliding_window' is '8'"),
        ({**sliding, "use_sliding_window": False}, "sliding_attention layers but "
                                                   "use_sliding_window=False"),
        ({**sliding, "sliding_window": None}, "sliding_window=None"),
        ({"layer_types": "full_attention"}, "expected a list of layer type names"),
    ]
    for i, (fields, match) in enumerate(layout_cases):
        with pytest.raises(ValueError, match=match):
            import_drafter(rewrite(src, tmp_path / f"layout{i}",
                                   config=lambda c, f=fields: {**c, **f}))
    (tmp_path / "ok" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        import_drafter(tmp_path / "ok")


def test_published_style_layouts(params, tmp_path):
    """Configs without layer_types read as transformers' Qwen3Config reads them (sliding from
    max_window_layers on, only with use_sliding_window), block_size inside dflash_config."""
    src = export_drafter(params, CFG, tmp_path / "ok")

    def published(c, **extra):
        c = {k: v for k, v in c.items() if k not in ("layer_types", "is_causal", "block_size")}
        return {**c, "dflash_config": {**c["dflash_config"], "block_size": 4}, **extra}

    cases = {
        "all": (dict(use_sliding_window=True, sliding_window=16, max_window_layers=0),
                ("sliding_attention",) * 2, 16),
        "last": (dict(use_sliding_window=True, sliding_window=16, max_window_layers=1),
                 ("full_attention", "sliding_attention"), 16),
        "default-28": (dict(use_sliding_window=True, sliding_window=16),
                       ("full_attention",) * 2, 0),
        "window-unused": (dict(use_sliding_window=False, sliding_window=16, max_window_layers=0),
                          ("full_attention",) * 2, 0),
    }
    for name, (extra, types, window) in cases.items():
        _, cfg = import_drafter(rewrite(src, tmp_path / name,
                                        config=lambda c, e=extra: published(c, **e)))
        assert (cfg.layer_types, cfg.sliding_window, cfg.block_size) == (types, window, 4), name
        assert cfg.is_causal is None  # absent: the readers' default


# ---- independent PyTorch reference --------------------------------------------------------------

def torch_drafter(sd, hf, features, block_embeds, anchors):
    """One sequence: features [S, F], block embeddings [N, K, D], anchors [N] -> hidden [N, K, D].
    All blocks' queries against keys [ctx; all blocks] with an explicit mask."""
    eps, theta = hf["rms_norm_eps"], hf["rope_theta"]
    h_, g_, e_ = hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]
    n, k, d = block_embeds.shape
    s = features.shape[0]

    def rms(x, w):
        x = x.float()
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def rope(x, pos):  # x [T, heads, E]
        inv = 1.0 / theta ** (torch.arange(0, e_, 2, dtype=torch.float32) / e_)
        ang = pos[:, None].float() * inv
        emb = torch.cat([ang, ang], -1)
        cos, sin = emb.cos()[:, None], emb.sin()[:, None]
        rotated = torch.cat([-x[..., e_ // 2:], x[..., : e_ // 2]], -1)
        return x * cos + rotated * sin

    c = rms(F.linear(features, sd["fc.weight"]), sd["hidden_norm.weight"])
    x = block_embeds.reshape(n * k, d)
    block_of = torch.arange(n).repeat_interleave(k)
    pos_block = (anchors[:, None] + torch.arange(k)).reshape(-1)
    pos_all = torch.cat([torch.arange(s), pos_block])
    # Per layer: context slots p < anchor (sliding: also p > query position - W), and the own
    # block (causal by z-lab's rule: sliding layers unless is_causal says otherwise; sliding:
    # also within W of the query, both ways).
    ctx_seen = torch.arange(s)[None, :] < anchors[block_of][:, None]
    in_window = torch.arange(s)[None, :] > pos_block[:, None] - (hf["sliding_window"] or 0)
    same_block = block_of[:, None] == block_of[None, :]
    up_to_self = pos_block[None, :] <= pos_block[:, None]
    types = hf.get("layer_types") or ["full_attention"] * hf["num_hidden_layers"]
    for i in range(hf["num_hidden_layers"]):
        def w(name, i=i):
            return sd[f"layers.{i}.{name}.weight"]

        sliding = types[i] == "sliding_attention"
        causal = sliding if hf.get("is_causal") is None else hf["is_causal"]
        own = same_block & up_to_self if causal else same_block
        if sliding:
            own = own & ((pos_block[:, None] - pos_block[None, :]).abs() < hf["sliding_window"])
        mask = torch.cat([ctx_seen & in_window if sliding else ctx_seen, own], 1)  # [NK, S+NK]

        h = rms(x, w("input_layernorm"))
        q = rope(rms(F.linear(h, w("self_attn.q_proj")).view(n * k, h_, e_),
                     w("self_attn.q_norm")), pos_block)
        kv_in = torch.cat([c, h])
        keys = rope(rms(F.linear(kv_in, w("self_attn.k_proj")).view(-1, g_, e_),
                        w("self_attn.k_norm")), pos_all)
        vals = F.linear(kv_in, w("self_attn.v_proj")).view(-1, g_, e_)
        keys = keys.repeat_interleave(h_ // g_, dim=1)
        vals = vals.repeat_interleave(h_ // g_, dim=1)
        scores = torch.einsum("the,she->hts", q, keys) / math.sqrt(e_)
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        attn = torch.einsum("hts,she->the", probs, vals).reshape(n * k, h_ * e_)
        x = x + F.linear(attn, w("self_attn.o_proj"))
        h = rms(x, w("post_attention_layernorm"))
        x = x + F.linear(F.silu(F.linear(h, w("mlp.gate_proj"))) * F.linear(h, w("mlp.up_proj")),
                         w("mlp.down_proj"))
    return rms(x, sd["norm.weight"]).view(n, k, d)


# Attention layouts: DFlash's mask, a sliding layer under a full one (window 5 < most anchors),
# and a sliding layer narrower than the block (window 3 < K = 4) after a causal full layer.
LAYOUTS = {
    "full": {},
    "sliding+full": dict(layer_types=("sliding_attention", "full_attention"), sliding_window=5),
    "causal-full+sliding": dict(layer_types=("full_attention", "sliding_attention"),
                                sliding_window=3, is_causal=True),
    # DFlash 2's published layout: sliding layers with is_causal false (bidirectional inside
    # the block, within the window: 3 < the block of 4)
    "bidirectional-sliding": dict(layer_types=("sliding_attention",) * 2, sliding_window=3,
                                  is_causal=False),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("attention", ["dense", "flash"])
def test_matches_torch_reference(params, tmp_path, layout, attention):
    from safetensors.torch import load_file as torch_load

    cfg = dataclasses.replace(CFG, **LAYOUTS[layout])
    export_drafter(params, cfg, tmp_path)
    assert import_drafter(tmp_path)[1] == cfg
    sd = torch_load(str(tmp_path / "model.safetensors"))
    hf = json.loads((tmp_path / "config.json").read_text())
    rng = np.random.default_rng(4)
    embed = rng.standard_normal((97, 64)).astype(np.float32)
    features = rng.standard_normal((2, S, 128)).astype(np.float32)
    tokens = rng.integers(0, 96, (2, S))
    anchors = np.array([[0, 3, 7, 20], [5, 11, 12, 0]])
    target = SimpleNamespace(embed=jnp.asarray(embed))  # all train_forward reads of the target
    ours = train_forward(params, cfg, target, jnp.asarray(features), jnp.asarray(tokens),
                         jnp.asarray(anchors), attention=attention, attention_group=3,
                         attention_tile=8)
    mask_id = hf["dflash_config"]["mask_token_id"]

    def reference(b, hf):
        ids = np.full((4, 4), mask_id)
        ids[:, 0] = tokens[b, anchors[b]]
        return torch_drafter(sd, hf, torch.from_numpy(features[b]),
                             torch.from_numpy(embed[ids]), torch.from_numpy(anchors[b])).numpy()

    for b in range(2):
        np.testing.assert_allclose(np.asarray(ours[b]), reference(b, hf), atol=3e-5, rtol=1e-4)
    if layout != "full":  # the layout changes the result: the reference is not blind to it
        full = reference(0, {**hf, "layer_types": None, "is_causal": False})
        assert np.abs(np.asarray(ours[0]) - full).max() > 1e-2
