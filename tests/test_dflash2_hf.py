"""DFlash 2 drafters in the HF layout (dpace_jax.drafters.hf with the dflash2 family): bit-exact
round trips, the published config fields and tensor names / shapes, z-lab's `dflash` PyTorch
`DFlash2DraftModel` as an independent oracle of that layout (it loads our export strictly and
computes our hidden states and greedy walk from it), DFlash v1 exports unchanged, one-line
errors for bad directories, and evaluate.py on a DFlash 2 directory written by z-lab's model.

Sensitivity, checked by hand: with the kernel projection's output read as (tap, side, group)
instead of (side, tap, group) in dflash2/conv.py, or with the predecessor and successor
codebooks swapped in the HF table, test_zlab_model_loads_and_computes_our_export fails (its
shapes and names still agree: only the computed hidden states / walks show it)."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from drafter_fixtures import CFG, S, random_like
from hf_fixtures import make_tiny_hf_target, randomize_
from safetensors.numpy import load_file
from test_drafter_hf import assert_bit_equal, expected_keys, rewrite

from dpace_jax.config import default_config
from dpace_jax.drafters import dflash as dflash_lib
from dpace_jax.drafters.dflash2 import DFlash2Config
from dpace_jax.drafters.dflash2 import selector as sel_lib
from dpace_jax.drafters.hf import export_drafter, import_drafter
from dpace_jax.infer import evaluation

dm = pytest.importorskip("dflash.model")  # z-lab's reference (a test dependency)

FAMILY = DFlash2Config(conv_kernel_size=3, conv_group_size=16, selector_rank=8, selector_top_k=5,
                       output_multiplier=0.5, final_logit_softcapping=20.0,
                       input_embedding_scale=1.5)
# DFlash 2's published attention layout (sliding, bidirectional in the block) on one layer, a
# full layer under it; D = 64, G = 64 / 16 = 4 groups, W = 3 taps: O = 2 * 3 * 4 = 24
CFG2 = dataclasses.replace(CFG, arch="dflash2", family_cfg=FAMILY,
                           layer_types=("sliding_attention", "full_attention"), sliding_window=3,
                           is_causal=False)
HF_FIELDS = {"conv_kernel_size": 3, "conv_group_size": 16, "selector_rank": 8,
             "selector_top_k": 5, "output_multiplier": 0.5, "final_logit_softcapping": 20.0,
             "input_embedding_scale": 1.5, "block_size": 4}


@pytest.fixture(scope="module")
def params():
    # every parameter random (norms 1 + noise): the convolutions are far from identity and the
    # successor codebook non-zero, so a layout mistake changes what the drafter computes; the
    # codebooks 10x larger, so that the transition scores outweigh the unary gaps on some steps
    p = random_like(dflash_lib.init_drafter_params, CFG2, 1, 0.15)
    sel = p.selector
    return dataclasses.replace(p, selector=dataclasses.replace(
        sel, predecessor_codebook=10 * sel.predecessor_codebook,
        successor_codebook=10 * sel.successor_codebook))


def dflash2_keys(n_layers, d=64, taps=3, groups=4, rank=8, vocab=97):
    keys = {"candidate_selector.hidden_projection.weight": (rank, d),
            "candidate_selector.predecessor_codebook": (vocab, rank),
            "candidate_selector.successor_codebook": (vocab, rank)}
    for i in range(n_layers):
        for conv in ("attention_conv", "mlp_conv"):
            keys[f"layers.{i}.{conv}.base_kernel"] = (2, taps, d)
            keys[f"layers.{i}.{conv}.kernel_projection.weight"] = (2 * taps * groups, d)
    return keys


def test_round_trip_config_and_published_names(params, tmp_path):
    export_drafter(params, CFG2, tmp_path / "f32")
    tensors = load_file(str(tmp_path / "f32" / "model.safetensors"))
    assert {k: v.shape for k, v in tensors.items()} == expected_keys(2) | dflash2_keys(2)
    # HF [out, in] layouts: kernel_projection.weight[o, d] = proj[d, o], hidden_projection too
    np.testing.assert_array_equal(tensors["layers.1.mlp_conv.kernel_projection.weight"][17, 5],
                                  params.layers.mlp_conv_proj[1, 5, 17])
    np.testing.assert_array_equal(tensors["layers.0.attention_conv.base_kernel"],
                                  params.layers.attention_conv_base[0])
    np.testing.assert_array_equal(tensors["candidate_selector.hidden_projection.weight"][6, 40],
                                  params.selector.hidden_projection[40, 6])
    np.testing.assert_array_equal(tensors["candidate_selector.successor_codebook"],
                                  params.selector.successor_codebook)
    hf = json.loads((tmp_path / "f32" / "config.json").read_text())
    assert hf["architectures"] == ["DFlash2DraftModel"] and hf["model_type"] == "qwen3"
    assert hf["dflash_config"] == {"mask_token_id": 96, "target_layer_ids": [1, 3], **HF_FIELDS}
    assert (hf["layer_types"], hf["sliding_window"], hf["is_causal"]) == (
        ["sliding_attention", "full_attention"], 3, False)
    back, cfg = import_drafter(tmp_path / "f32")
    assert cfg == CFG2
    assert_bit_equal(back, params)
    # bf16, each is_causal setting, and no softcap (written as null, read back as 0)
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    for i, is_causal in enumerate((None, True, False)):
        fam = dataclasses.replace(FAMILY, final_logit_softcapping=0.0, output_multiplier=2.0,
                                  input_embedding_scale=0.25)
        cfg = dataclasses.replace(CFG2, is_causal=is_causal, family_cfg=fam)
        export_drafter(p16, cfg, tmp_path / f"bf16-{i}")
        back, cfg_back = import_drafter(tmp_path / f"bf16-{i}")
        assert cfg_back == cfg
        assert_bit_equal(back, p16)
        hf = json.loads((tmp_path / f"bf16-{i}" / "config.json").read_text())
        assert hf["dflash_config"]["final_logit_softcapping"] is None
        assert hf.get("is_causal") == is_causal and hf["torch_dtype"] == "bfloat16"


def test_dflash_v1_export_unchanged(tmp_path):
    p = random_like(dflash_lib.init_drafter_params, CFG, 2, 0.1)
    export_drafter(p, CFG, tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["architectures"] == ["DFlashDraftModel"]
    assert hf["dflash_config"] == {"mask_token_id": 96, "target_layer_ids": [1, 3]}
    assert set(load_file(str(tmp_path / "model.safetensors"))) == set(expected_keys(2))
    back, cfg = import_drafter(tmp_path)
    assert cfg == CFG and cfg.arch == "dflash" and cfg.family_cfg is None
    assert_bit_equal(back, p)


def zlab_load(path):
    """z-lab's DFlash2DraftModel built from our config.json, its state dict loaded strictly
    from our safetensors after z-lab's codebook key mapping (what its from_pretrained does)."""
    from safetensors.torch import load_file as torch_load
    from transformers import Qwen3Config

    hf = json.loads((path / "config.json").read_text())
    model = dm.DFlash2DraftModel(Qwen3Config(**hf)).eval()
    sd = {(k + ".weight" if k.endswith("_codebook") else k): v
          for k, v in torch_load(str(path / "model.safetensors")).items()}
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in sd.items()} == want
    model.load_state_dict(sd, strict=True)
    loaded, info = dm.DFlash2DraftModel.from_pretrained(str(path), output_loading_info=True)
    assert not any(info.values()), info  # transformers' path: nothing missing or unexpected
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    return model


def test_zlab_model_loads_and_computes_our_export(params, tmp_path):
    """The layout's oracle: beyond names and shapes, z-lab's model computes from our export the
    hidden states of our training forward (conv, masks, embedding scale) and our greedy walk."""
    export_drafter(params, CFG2, tmp_path)
    model = zlab_load(tmp_path)
    rng = np.random.default_rng(4)
    embed = rng.standard_normal((97, 64)).astype(np.float32)
    head = (0.3 * rng.standard_normal((64, 97))).astype(np.float32)
    features = rng.standard_normal((1, S, 128)).astype(np.float32)
    tokens = rng.integers(0, 96, (1, S))
    anchors = np.array([[3, 9, 17]])
    target = SimpleNamespace(embed=jnp.asarray(embed))  # all train_forward reads of the target
    ours = np.asarray(dflash_lib.train_forward(params, CFG2, target, jnp.asarray(features),
                                               jnp.asarray(tokens), jnp.asarray(anchors)))[0]
    out_head = torch.nn.Linear(64, 97, bias=False)
    out_head.weight.data = torch.from_numpy(head.T.copy())
    changed = 0
    for n, a in enumerate(anchors[0]):
        block = torch.tensor([[tokens[0, a]] + [96] * 3])
        with torch.no_grad():
            hidden = model(target_hidden=torch.from_numpy(features[:, :a]),
                           noise_embedding=torch.from_numpy(embed)[block] * 1.5,
                           position_ids=torch.arange(a + 4)[None])
            walk, _, _ = model.propose(hidden[:, 1:], block[:, 0], out_head, 0.0)
        np.testing.assert_allclose(ours[n], hidden[0].numpy(), rtol=1e-4, atol=2e-5)
        unary = sel_lib.unary_logits(jnp.asarray(ours[n, 1:]), jnp.asarray(head), 0.5, 20.0)
        cand = sel_lib.top_candidates(unary, 5)
        mine = sel_lib.greedy_walk(params.selector, jnp.asarray(ours[n, 1:]),
                                   jnp.asarray(tokens[0, a]), cand.ids, cand.scores).tokens
        assert np.asarray(mine).tolist() == walk[0].tolist(), n
        changed += int(np.any(np.asarray(mine) != np.asarray(cand.ids[:, 0])))
    assert changed  # the walk is not the unary argmax: the codebooks' mapping matters here


def _one_line(match, *, tensors=None, fields=None):
    """A `rewrite` of an export into a bad directory (config.json claiming DFlash 2, `fields`
    changed in its dflash_config); the import error names `match`."""
    def config(c):
        return {**c, "architectures": ["DFlash2DraftModel"],
                "dflash_config": {**c["dflash_config"], **(fields or {})}}

    return dict(tensors=tensors, config=config), match


def test_bad_directories_are_one_line_errors(params, tmp_path):
    src = export_drafter(params, CFG2, tmp_path / "ok")
    v1 = export_drafter(random_like(dflash_lib.init_drafter_params, CFG, 2, 0.1), CFG,
                        tmp_path / "v1")
    sel = "candidate_selector.successor_codebook"
    proj = "layers.1.attention_conv.kernel_projection.weight"

    def drop(t):
        return {k: v for k, v in t.items() if k != sel}

    cases = {
        # v1 tensors under a config that claims DFlash 2 (with and without its fields)
        "v1-claims-2": (v1, _one_line(r"model.safetensors: missing key\(s\) .*candidate_"
                                      r"selector.hidden_projection.weight.*base_kernel",
                                      fields=HF_FIELDS)),
        "v1-arch-only": (v1, _one_line(r"config.json: missing field\(s\) .*dflash_config."
                                       "conv_kernel_size")),
        "missing-selector": (src, _one_line(rf"model.safetensors: missing key\(s\) \['{sel}'\]",
                                            tensors=drop)),
        "extra": (src, _one_line(r"model.safetensors: unexpected key\(s\) \['layers.0.mlp_conv."
                                 r"bias'\]", tensors=lambda t: {**t, "layers.0.mlp_conv.bias":
                                                                t["norm.weight"]})),
        # z-lab's save_pretrained spelling is read as the published name, but not both at once
        "both-names": (src, _one_line(rf"model.safetensors: holds both {sel} and {sel}.weight",
                                      tensors=lambda t: {**t, f"{sel}.weight": t[sel]})),
        "mis-shaped": (src, _one_line(rf"model.safetensors: key {proj} has shape \(23, 64\), "
                                      r"expected \(24, 64\)",
                                      tensors=lambda t: {**t, proj: t[proj][:23].copy()})),
        "mis-shaped-codebook": (src, _one_line(rf"{sel} has shape \(97, 7\)", tensors=lambda t: {
            **t, sel: t[sel][:, :7].copy()})),
        "group": (src, _one_line("config.json: .*conv_group_size=24 does not divide "
                                 "hidden_size=64", fields={"conv_group_size": 24})),
        "top-k": (src, _one_line("config.json: .*selector_top_k=98 is larger than the "
                                 r"vocabulary \(vocab_size=97\)", fields={"selector_top_k": 98})),
        "kernel": (src, _one_line("config.json: .*conv_kernel_size=5 is larger than the block "
                                  r"\(block_size=4\)", fields={"conv_kernel_size": 5})),
        "rank": (src, _one_line("config.json: .*selector_rank=0 must be >= 1",
                                fields={"selector_rank": 0})),
    }
    for name, (base, (change, match)) in cases.items():
        with pytest.raises(ValueError, match=match) as e:
            import_drafter(rewrite(base, tmp_path / name, **change))
        assert "\n" not in str(e.value), (name, str(e.value))
    # the same checks hold for a config built in code (train.py's drafter.* settings)
    with pytest.raises(ValueError, match="conv_group_size=24 does not divide hidden_size=64"):
        dataclasses.replace(CFG2, family_cfg=dataclasses.replace(FAMILY, conv_group_size=24))


def zlab_directory(out, seed=0):
    """A DFlash 2 drafter for tests/hf_fixtures' tiny target, made by z-lab's PyTorch model
    (random small weights, base_kernel included: z-lab leaves it uninitialised), saved by its
    save_pretrained (transformers' config.json; codebook keys with `.weight`, which the published
    checkpoints leave out)."""
    from transformers import Qwen3Config

    cfg = Qwen3Config(
        vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
        max_position_embeddings=1024, tie_word_embeddings=False,
        layer_types=["sliding_attention"] * 2, use_sliding_window=True, sliding_window=6,
        is_causal=False, num_target_layers=3, architectures=["DFlash2DraftModel"],
        dflash_config=dict(block_size=4, mask_token_id=259, target_layer_ids=[0, 1],
                           conv_kernel_size=2, conv_group_size=16, selector_rank=8,
                           selector_top_k=4, output_multiplier=0.8,
                           final_logit_softcapping=30.0, input_embedding_scale=1.25))
    model = dm.DFlash2DraftModel(cfg)
    randomize_(model, seed, std=0.1)
    model.save_pretrained(str(out))  # its codebooks as `*_codebook.weight`: read as aliases
    assert any(k.endswith("_codebook.weight") for k in load_file(str(out / "model.safetensors")))
    return out


@pytest.mark.slow
def test_evaluate_runs_a_zlab_directory(tmp_path):
    """evaluate.py on a DFlash 2 directory made by z-lab's model: it loads (as arch dflash2,
    with the settings of its config.json), decodes with the selector's walk, and the speculative
    output equals the autoregressive one at T = 0."""
    target_dir, _ = make_tiny_hf_target(tmp_path / "target", tokenizer=True, seed=3,
                                        layers=3)
    drafter_dir = zlab_directory(tmp_path / "zlab")
    _, dcfg = import_drafter(drafter_dir)
    assert dcfg.arch == "dflash2" and dcfg.family_cfg == DFlash2Config(
        conv_kernel_size=2, conv_group_size=16, selector_rank=8, selector_top_k=4,
        output_multiplier=0.8, final_logit_softcapping=30.0, input_embedding_scale=1.25)
    assert (dcfg.block_size, dcfg.sliding_window, dcfg.is_causal) == (4, 6, False)
    bench = tmp_path / "gsm.jsonl"
    bench.write_text("".join(json.dumps({"question": q}) + "\n" for q in ("1+2?", "3*4?")))
    c = default_config()
    c.target.path, c.target.dtype = str(target_dir), "float32"
    c.eval.drafter, c.eval.benchmarks = str(drafter_dir), (f"gsm8k={bench}",)
    c.eval.num_samples, c.eval.max_new_tokens, c.eval.batch_size = 2, 12, 2
    report = evaluation.evaluate(c, progress=False)
    assert report["temperature"] == 0.0 and report["selector"] is True
    assert report["drafter_arch"] == "dflash2"
    result = report["benchmarks"]["gsm8k"]
    assert result["mismatches"] == 0 and result["num_steps"] > 0
    for s in result["samples"]:
        assert s["output_ids"] == s["ar_output_ids"] and len(s["output_ids"]) > 1, s["id"]
