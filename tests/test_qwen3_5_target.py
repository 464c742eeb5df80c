"""Qwen3.5 hybrid targets (dpace_jax.targets.qwen3_5: parts, decoder, gated_delta): parity with
transformers' PyTorch Qwen3_5ForCausalLM / Qwen3_5MoeForCausalLM, the gated delta rule's two forms
against transformers' own, the cache's commit / rollback, HF conversion both ways (text-only and
multimodal checkpoints) and lossless speculative decoding, on tiny random models (CPU, fp32)."""

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
    module_builds,
    randomize_,
)
from safetensors.numpy import load_file, save_file
from test_decode import NEW, check_greedy, check_sampling, random_target, script_drafter

from dpace_jax.infer import decode
from dpace_jax.nn.schema import flatten
from dpace_jax.targets import hf as convert
from dpace_jax.targets import model
from dpace_jax.targets.model import ModelConfig
from dpace_jax.targets.qwen3_5 import gated_delta

LINEAR = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
              linear_value_head_dim=6, linear_conv_kernel_dim=4)
CASES = {  # name -> (moe, config fields beyond the shared tiny shape)
    "dense": (False, dict(num_hidden_layers=4)),  # linear x3, full
    "dense-irregular-tied": (False, dict(  # no period shorter than L: one unrolled group
        num_hidden_layers=5, tie_word_embeddings=True,
        layer_types=["linear_attention", "full_attention", "full_attention",
                     "linear_attention", "linear_attention"])),
    "moe": (True, dict(num_hidden_layers=4, full_attention_interval=2)),  # period 2
}


def make_hf_qwen3_5(path, seed=0, moe=False, **fields):
    """A random transformers Qwen3.5 (MoE) causal LM saved to `path`; returns the torch model."""
    import torch
    from transformers import (
        Qwen3_5ForCausalLM,
        Qwen3_5MoeForCausalLM,
        Qwen3_5MoeTextConfig,
        Qwen3_5TextConfig,
    )

    shape = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=512,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                  "partial_rotary_factor": 0.5},
                 attn_implementation="eager", experts_implementation="eager", **LINEAR)
    if "full_attention_interval" in fields:  # a constructor argument, not a config field
        every = fields.pop("full_attention_interval")
        fields["layer_types"] = ["full_attention" if (i + 1) % every == 0 else
                                 "linear_attention" for i in range(fields["num_hidden_layers"])]
    if moe:
        config = Qwen3_5MoeTextConfig(**{**shape, **dict(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            shared_expert_intermediate_size=24), **fields})
    else:
        config = Qwen3_5TextConfig(**{**shape, "intermediate_size": 48, **fields})
    torch.manual_seed(seed)
    model_ = (Qwen3_5MoeForCausalLM if moe else Qwen3_5ForCausalLM)(config).eval()
    randomize_(model_, seed, std=0.1)
    with torch.no_grad():  # zero-centered norms (all but the DeltaNet's): scales 0.5..1.5
        for name, p in model_.named_parameters():
            if name.endswith("norm.weight") and "linear_attn" not in name:
                p.sub_(1.0)
    if config.tie_word_embeddings:
        model_.tie_weights()
    model_.save_pretrained(str(path))
    return model_


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """name -> (path, torch_model, fp32 params, cfg), each built once per module."""
    return module_builds(tmp_path_factory, lambda path, seed, name: make_hf_qwen3_5(
        path, seed=seed, moe=CASES[name][0], **dict(CASES[name][1])))


def _tokens(cfg, batch=2, length=75, seed=0):  # 75 > 64: two chunks of the gated delta rule
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, length))


@pytest.mark.parametrize("name", list(CASES))
def test_logits_and_features_match_pytorch(build, name):
    """Every layer's hidden state (HF hidden_states[j + 1]) and the logits, through the full
    forward (each MoE dispatch) and the early-stopping training forward; ours in fp32 against
    the PyTorch model in fp64, atol 2e-4 on states of size up to ~4 (the PyTorch model's own fp32
    run is off by up to 5e-5 here: the recurrence amplifies rounding at some positions)."""
    import copy

    path, torch_model, params, cfg = build(name)
    torch_model = copy.deepcopy(torch_model).double()
    moe, fields = CASES[name]
    assert cfg.arch == ("qwen3_5_moe" if moe else "qwen3_5")
    assert cfg.num_layers == fields["num_hidden_layers"]
    assert cfg.family_cfg.partial_rotary_factor == 0.5
    assert cfg.tie_word_embeddings == (params.lm_head is None) == ("tied" in name)
    every = tuple(range(cfg.num_layers))
    # the default dispatch; the dense one is checked against it on a mesh (test_moe_target.py)
    dispatches = ("sorted",)
    check_moe_matches_torch(params, cfg, torch_model, _tokens(cfg), every[::-1], atol=2e-4,
                            dispatches=dispatches)
    if name == "dense":  # one chunk of the rule, and a feature layer short of the last
        check_moe_matches_torch(params, cfg, torch_model, _tokens(cfg, length=9, seed=1), (1,),
                                atol=2e-4, dispatches=dispatches)


def _rule_inputs(seed, batch=2, length=37, key_heads=2, heads=4, k=8, v=6):
    rng = np.random.default_rng(seed)
    f32 = functools.partial(np.asarray, dtype=np.float32)
    q, kk = (f32(rng.normal(size=(batch, length, key_heads, k))) for _ in range(2))
    return dict(q=q, k=kk, v=f32(rng.normal(size=(batch, length, heads, v))),
                g=f32(-0.4 * np.abs(rng.normal(size=(batch, length, heads)))),
                beta=f32(1 / (1 + np.exp(-rng.normal(size=(batch, length, heads))))),
                state=f32(rng.normal(size=(batch, heads, k, v))))


def _ours(x):
    """transformers' kernel inputs -> ours: key heads repeated, l2-normalized, q scaled."""
    rep = x["v"].shape[2] // x["k"].shape[2]
    q = gated_delta.l2norm(jnp.repeat(x["q"], rep, axis=2)) * x["q"].shape[-1] ** -0.5
    return q, gated_delta.l2norm(jnp.repeat(x["k"], rep, axis=2)), x["v"], x["g"], x["beta"]


def test_gated_delta_rule_forms_match_transformers_and_each_other():
    """Recurrent and chunked (chunks of 16 and 64, T = 37 not a multiple) from a nonzero state
    give transformers' torch_recurrent / torch_chunk_gated_delta_rule outputs and final states;
    zeroing g and beta past keep[b] leaves the state of the first keep[b] tokens."""
    import torch
    from transformers.models.qwen3_5 import modeling_qwen3_5 as hf

    x = _rule_inputs(0)
    t = {n: torch.tensor(a) for n, a in x.items()}
    kw = dict(initial_state=t["state"], output_final_state=True, use_qk_l2norm_in_kernel=True)
    refs = [hf.torch_recurrent_gated_delta_rule(t["q"], t["k"], t["v"], t["g"], t["beta"], **kw),
            hf.torch_chunk_gated_delta_rule(t["q"], t["k"], t["v"], t["g"], t["beta"],
                                            chunk_size=16, **kw)]
    ours = [gated_delta.recurrent(*_ours(x), x["state"]),
            gated_delta.chunked(*_ours(x), x["state"], 16),
            gated_delta.chunked(*_ours(x), x["state"], 64)]  # 3 chunks, padded; one chunk
    for out, state in ours:
        for ref_out, ref_state in refs:
            np.testing.assert_allclose(np.asarray(out), ref_out.numpy(), atol=2e-5, rtol=0)
            np.testing.assert_allclose(np.asarray(state), ref_state.numpy(), atol=2e-5, rtol=0)
    from dpace_jax.targets.qwen3_5 import parts as qwen3_5

    keep = jnp.asarray([5, 37])
    q, k, v, g, beta = _ours(x)
    _, kept = gated_delta.chunked(q, k, v, qwen3_5.kept(g, keep), qwen3_5.kept(beta, keep),
                                  x["state"], 16)
    for b, n in enumerate([5, 37]):
        _, prefix = gated_delta.recurrent(q[b:b + 1, :n], k[b:b + 1, :n], v[b:b + 1, :n],
                                          g[b:b + 1, :n], beta[b:b + 1, :n], x["state"][b:b + 1])
        np.testing.assert_allclose(np.asarray(kept[b]), np.asarray(prefix[0]), atol=2e-5)


def test_both_triangular_solvers_solve():
    """Forward substitution (used on CPU) and XLA's triangular solve (used on GPU / TPU) both
    solve (I + a) x = rhs for a strictly lower a."""
    rng = np.random.default_rng(4)
    a = np.tril(rng.normal(size=(3, 16, 16)).astype(np.float32) * 0.3, -1)
    rhs = rng.normal(size=(3, 16, 5)).astype(np.float32)
    for solve in (gated_delta._forward_substitution, gated_delta._triangular_solve):
        x = np.asarray(jax.jit(solve)(a, rhs))
        np.testing.assert_allclose(x + np.einsum("bij,bjd->bid", a, x), rhs, atol=1e-5)


def test_the_chunked_form_has_the_recurrent_forms_gradients():
    """The chunked form's own backward pass (its triangular solves have a custom VJP) gives the
    gradients that autodiff of the token-by-token form gives, for every input and the initial
    state, through outputs and final state (3 chunks of 16, the last padded)."""
    x = _rule_inputs(2, length=45)
    rng = np.random.default_rng(3)
    w_out = rng.normal(size=x["v"].shape).astype(np.float32)
    w_state = rng.normal(size=x["state"].shape).astype(np.float32)

    def loss(rule):
        def f(q, k, v, g, beta, state):
            out, final = rule(q, k, v, g, beta, state)
            return jnp.sum(out * w_out) + jnp.sum(final * w_state)
        return jax.jit(jax.grad(f, argnums=tuple(range(6))))

    args = (*_ours(x), x["state"])
    want = loss(gated_delta.recurrent)(*args)
    got = loss(lambda *a: gated_delta.chunked(*a, 16))(*args)
    for name, a, b in zip(("q", "k", "v", "g", "beta", "state"), got, want, strict=True):
        assert np.abs(np.asarray(b)).max() > 0.1, name
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, err_msg=name)
    # strong decays (e^-5 a token: e^320 across a chunk, masked above its diagonal) stay finite
    strong = loss(lambda *a: gated_delta.chunked(*a, 64))(*args[:3], args[3] * 0 - 5.0,
                                                          *args[4:])
    assert all(np.all(np.isfinite(np.asarray(a))) for a in strong)


@functools.cache
def _jitted(cfg):
    full = jax.jit(lambda p, tokens: model.forward(p, cfg, tokens, feature_layers=(0, 3)))
    cached = jax.jit(lambda p, cache, tokens, start, keep: model.forward_cached(
        p, cfg, tokens, cache, start, feature_layers=(0, 3), keep=keep))
    pending = jax.jit(lambda p, cache, tokens, start: model.forward_cached(
        p, cfg, tokens, cache, start, feature_layers=(0, 3)))
    commit = jax.jit(lambda cache, keep: model.commit(cfg, cache, keep))
    return full, cached, pending, commit


def test_cached_blocks_with_commits_match_the_full_forward(build, name="dense"):
    """A right-padded prefill committing each prompt's length, then blocks of 4 whose first
    keep[b] tokens are committed (keep 1..4, different per sequence: the accepted prefix of a
    verification), rolled back by position in the KV cache: every block's logits and features
    equal the full forward over the sequence so far (atol 5e-5: the two group the recurrence
    into different chunks)."""
    _, _, params, cfg = build(name)
    full, cached, pending, commit = _jitted(cfg)
    rng = np.random.default_rng(3)
    seq = rng.integers(0, cfg.vocab_size, (2, 96))
    ref = full(params, jnp.asarray(seq))
    lengths = np.array([13, 6])
    cache = model.init_cache(cfg, 2, 128, jnp.float32)
    out = cached(params, cache, jnp.asarray(seq[:, :16]), jnp.zeros(2, jnp.int32),
                 jnp.asarray(lengths))
    cache, pos = out.cache, lengths.copy()
    for step in range(12):
        block = np.stack([seq[b, pos[b]:pos[b] + 4] for b in range(2)])
        out = pending(params, cache, jnp.asarray(block), jnp.asarray(pos))
        for b in range(2):
            now = slice(pos[b], pos[b] + 4)
            np.testing.assert_allclose(np.asarray(out.logits[b]), np.asarray(ref.logits[b, now]),
                                       atol=5e-5, rtol=0, err_msg=f"step {step}")
            np.testing.assert_allclose(np.asarray(out.features[b]),
                                       np.asarray(ref.features[b, now]), atol=5e-5, rtol=0)
        keep = np.array([1 + step % 4, 4 - step % 4])
        cache = commit(out.cache, jnp.asarray(keep))
        pos += keep
    with pytest.raises(ValueError, match="no pending block"):
        model.commit(cfg, cache, jnp.asarray(keep))


def test_speculative_greedy_is_lossless_with_rejections_at_every_offset(build):
    """Greedy speculative decoding of a Qwen3.5 target with an oracle drafter that is wrong at a
    quarter of its positions (block 4, a batch of three prompts of different lengths, ragged
    acceptance): the output is the brute-force greedy continuation, and steps accepting 1, 2, 3
    and 4 tokens all occur, so every rollback length of the recurrent state is exercised."""
    _, _, params, cfg = build("dense")
    rs = np.random.RandomState(0)
    lengths = np.array([3, 8, 5])
    prompts = rs.randint(0, cfg.vocab_size, (3, 8))
    rows = [prompts[b, :lengths[b]] for b in range(3)]
    ref = np.asarray(references.greedy_reference(params, cfg, rows, NEW + 4, rows=3, width=48))
    drafter = script_drafter(prompts, lengths, ref, 4, 0.25, seed=1, vocab=cfg.vocab_size)
    res = decode.decode(params, cfg, drafter, prompts, lengths, max_new_tokens=NEW,
                        min_batch=3)  # the scripted drafter's tables are per row
    check_greedy(res, ref[:, :NEW], set())
    assert all(n > 0 for n in decode.acceptance_histogram(res, 4)[1:])


SAMPLING_CFG = ModelConfig.make(vocab_size=6, hidden_size=16, intermediate_size=32, num_layers=2,
                           num_heads=2, num_kv_heads=1, head_dim=8, rope_theta=10000.0,
                           arch="qwen3_5", partial_rotary_factor=0.5,
                           layer_types=("linear_attention", "full_attention"),
                           linear_num_key_heads=1, linear_num_value_heads=2,
                           linear_key_head_dim=4, linear_value_head_dim=4,
                           linear_conv_kernel_dim=3)


@pytest.mark.slow
def test_sampling_is_lossless():
    """Sampled speculative decoding on a Qwen3.5 target with a near-target drafter: the first
    three tokens follow the target's exact distribution (tests/test_decode.py's chi-square), and
    both accepting and rejecting happen."""
    check_sampling(random_target(11, SAMPLING_CFG, scale=0.5), SAMPLING_CFG, "dflash", 1.0, 0,
                   1.0, n=8000)


@pytest.mark.parametrize("name", ["dense-irregular-tied", "moe"])
def test_save_load_round_trip_and_transformers_reads_ours(build, tmp_path, name):
    """Saved by transformers -> ours -> saved by us -> ours again: bit-exact; the in-memory key
    map agrees with the file; transformers loads our file to the same model."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM

    path, torch_model, params, cfg = build(name)
    check_round_trip(path, params, cfg, tmp_path, Qwen3_5MoeForCausalLM if "moe" in name else
                     Qwen3_5ForCausalLM, torch_model, _tokens(cfg, 1, 9))


def test_multimodal_checkpoint_loads_its_text_model(build, tmp_path):
    """A Qwen3_5ForConditionalGeneration checkpoint (text fields under text_config, tensors under
    model.language_model., a vision tower and an MTP head beside them) loads to the same target
    as the text-only checkpoint; a stray tensor is still named."""
    path, _, params, cfg = build("dense")
    text = json.loads((path / "config.json").read_text())
    tensors = {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v
               for k, v in load_file(str(path / convert.WEIGHTS_NAME)).items()}
    tensors["model.visual.blocks.0.attn.qkv.weight"] = np.zeros((6, 2), np.float32)
    tensors["mtp.fc.weight"] = np.zeros((2, 2), np.float32)
    out = tmp_path / "mm"
    out.mkdir()
    save_file(tensors, str(out / convert.WEIGHTS_NAME))
    (out / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
        "tie_word_embeddings": False, "text_config": {**text, "model_type": "qwen3_5_text"},
        "vision_config": {"depth": 1}}))
    loaded, cfg2 = convert.load_target(out, dtype=jnp.float32)
    assert cfg2.family_cfg.multimodal and cfg2 == dataclasses.replace(
        cfg, family_cfg=dataclasses.replace(cfg.family_cfg, multimodal=True))
    for (p, a), b in zip(flatten(loaded).items(), flatten(params).values(), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg="/".join(p))
    tensors["model.language_model.layers.0.linear_attn.extra"] = np.zeros(2, np.float32)
    save_file(tensors, str(out / convert.WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"unexpected tensor.*\n.*model\.layers\.0\.linear_attn"
                                         r"\.extra"):
        convert.load_target(out)


def test_bad_checkpoints_name_the_tensor_or_field(build, tmp_path):
    path, *_ = build("dense")
    gone = "model.layers.1.linear_attn.A_log"
    src = load_file(str(path / convert.WEIGHTS_NAME))
    bad = tmp_path / "a"
    bad.mkdir()
    save_file({k: v for k, v in src.items() if k != gone}, str(bad / convert.WEIGHTS_NAME))
    (bad / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ValueError, match=r"missing tensor.*\n.*" + gone.replace(".", r"\.")):
        convert.load_target(bad)
    base = json.loads((path / "config.json").read_text())
    for change, field in ((dict(linear_num_value_heads=3), "linear_num_value_heads"),
                          (dict(layer_types=["linear_attention"] * 3), "layer_types"),
                          (dict(layer_types=["linear_attention"] * 3 + ["sliding_attention"]),
                           "layer_types"),
                          (dict(attn_output_gate=False), "attn_output_gate"),
                          (dict(rope_parameters={"rope_theta": 1e4, "partial_rotary_factor": 0.3}),
                           "partial_rotary_factor")):
        with pytest.raises(ValueError, match=field):
            ModelConfig.from_hf({**base, **change})
    yarn = ModelConfig.from_hf({**base, "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "partial_rotary_factor": 0.5,
        "original_max_position_embeddings": 64}})
    with pytest.raises(ValueError, match="rope_type='yarn' is not supported"):
        model.forward(random_target(0, yarn, scale=0.1), yarn, jnp.zeros((1, 4), jnp.int32))


@pytest.mark.slow
def test_a_drafter_trains_on_a_qwen3_5_target_end_to_end(tmp_path):
    """train.py's run on a tiny Qwen3.5-MoE target (the demo tokenizer's vocabulary; the drafter's
    MLP width given, the target having no dense one): trains, exports in the DFlash format, and
    the export re-imports to the trained weights."""
    dcfg = check_drafter_trains_on(tmp_path, lambda path, vocab: make_hf_qwen3_5(
        path, moe=True, vocab_size=vocab, num_hidden_layers=4), drafter_intermediate=40)
    assert dcfg.num_target_layers == 4 and dcfg.hidden_size == 32
    assert dcfg.intermediate_size == 40 and dcfg.head_dim == 16


@pytest.mark.slow
def test_regeneration_on_a_qwen3_5_target_is_its_greedy_answer(tmp_path):
    """dpace_jax.regenerate on a tiny Qwen3.5 target (with the test tokenizer): each regenerated
    answer is the brute-force greedy continuation of its rendered history."""
    from hf_fixtures import make_tiny_tokenizer

    from dpace_jax import regenerate
    from dpace_jax.infer import generation

    target = tmp_path / "target"
    make_hf_qwen3_5(target, seed=4, vocab_size=272, num_hidden_layers=4)
    make_tiny_tokenizer(target)
    convs = [[{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "old"},
              {"role": "user", "content": "And?"}, {"role": "assistant", "content": "old"}],
             [{"role": "user", "content": "Name one."}, {"role": "assistant", "content": "x"}]]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    stats = regenerate.regenerate(str(target), [str(src)], out, max_new_tokens=6, batch_size=2,
                                  dtype="float32", progress=False)
    assert stats["written"] == 2
    tokenizer = convert.load_tokenizer(target)
    params, cfg = convert.load_target(target, dtype=jnp.float32)
    stops = generation.stop_token_ids(tokenizer)
    for row in (json.loads(line) for line in out.read_text().splitlines()):
        msgs = row["messages"]
        for j, m in enumerate(msgs):
            if m["role"] == "assistant":
                prompt = generation.render_prompt(tokenizer, msgs[:j])
                want = references.greedy_reference(params, cfg, [prompt], 6, stops)[0]
                assert m["content"] == generation.answer_text(tokenizer, want, stops)


def test_the_qwen3_5_4b_config_and_shape():
    """configs/qwen3_5_4b.py and bench's qwen3.5-4b shape: the published layer pattern (8 full
    attention layers of 32), DFlash's default feature layers for 5 drafter layers, a drafter with
    the target's widths, and about 4.2 B target parameters (embeddings tied) by the schema."""
    import runpy
    from pathlib import Path

    from bench import common
    from dpace_jax.drafters.config import DrafterConfig

    root = Path(__file__).resolve().parents[1]
    c = runpy.run_path(str(root / "configs" / "qwen3_5_4b.py"))["get_config"]()
    assert c.target.path == "Qwen/Qwen3.5-4B" and c.drafter.num_layers == 5
    cfg = common.target_config(common.shape_preset("qwen3.5-4b"))
    assert cfg.family_cfg.attention_layers == tuple(range(3, 32, 4)) and cfg.arch == "qwen3_5"
    dcfg = DrafterConfig.for_target(cfg, num_layers=c.drafter.num_layers,
                                    block_size=c.drafter.block_size, mask_token_id=248319)
    assert dcfg.target_layer_ids == (1, 8, 15, 22, 29) and dcfg.head_dim == 256
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model.schema(cfg).abstract(cfg)))
    assert 4.1e9 < count < 4.3e9, count
