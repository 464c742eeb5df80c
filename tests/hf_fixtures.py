"""Tiny random Hugging Face targets and tokenizers for tests (torch is the reference here only).

make_tiny_hf_target builds a random transformers Qwen3ForCausalLM / LlamaForCausalLM with weights
large enough (std 0.08, random non-unit norm weights) that layout mistakes show up in the outputs,
saves it with save_pretrained (optionally sharded) and returns (path, torch_model).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|MASK|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def make_tiny_tokenizer(out_dir: str | Path | None = None):
    """A byte-level tokenizer (256 byte tokens + SPECIAL_TOKENS = 260 ids) with a chat template,
    as a transformers PreTrainedTokenizerFast; saved to out_dir when given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def tiny_hf_config(arch: str = "qwen3", *, tie: bool = False, vocab: int = 272, layers: int = 2,
                   hidden: int = 64, heads: int = 4, kv_heads: int = 2, head_dim: int = 16,
                   intermediate: int = 128, rope_theta: float = 10000.0):
    from transformers import LlamaConfig, Qwen3Config

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, head_dim=head_dim, rms_norm_eps=1e-6,
                  tie_word_embeddings=tie, max_position_embeddings=1024,
                  attn_implementation="eager")
    if arch == "qwen3":
        return Qwen3Config(rope_theta=rope_theta, **common)
    if arch == "llama":
        return LlamaConfig(rope_theta=rope_theta, rope_scaling=dict(LLAMA3_SCALING), **common)
    raise ValueError(f"arch must be 'qwen3' or 'llama', got {arch!r}")


def randomize_(model, seed: int, std: float = 0.08) -> None:
    """Normal(0, std) matrices and Uniform(0.5, 1.5) norm weights, in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))


def make_tiny_hf_target(tmp_dir: str | Path, arch: str = "qwen3", *, tie: bool = False,
                        sharded: bool = False, seed: int = 0, tokenizer: bool = False,
                        **config_kw):
    """Build, randomize and save a tiny HF causal LM; returns (path, torch_model in eval mode).

    config_kw go to tiny_hf_config (vocab, layers, hidden, heads, kv_heads, head_dim, ...).
    Llama gets llama3 rope scaling with original_max_position_embeddings 32 so it changes the
    frequencies seen at test positions.
    """
    from transformers import LlamaForCausalLM, Qwen3ForCausalLM

    cfg = tiny_hf_config(arch, tie=tie, **config_kw)
    torch.manual_seed(seed)
    model = (Qwen3ForCausalLM if arch == "qwen3" else LlamaForCausalLM)(cfg).eval()
    randomize_(model, seed)
    if tie:
        model.tie_weights()
    path = Path(tmp_dir)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), max_shard_size="20KB" if sharded else "50GB")
    if tokenizer:
        if cfg.vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"tokenizer needs vocab >= {256 + len(SPECIAL_TOKENS)}")
        make_tiny_tokenizer(path)
    return path, model


def torch_outputs(model, tokens: np.ndarray):
    """(logits [B, T, V], hidden_states tuple of [B, T, D]) as float64 NumPy, HF conventions."""
    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(tokens), dtype=torch.long),
                    output_hidden_states=True)
    hidden = tuple(h.double().numpy() for h in out.hidden_states)
    return out.logits.double().numpy(), hidden


def check_transformers_reads_ours(saved_dir, model_class, torch_model, tokens: np.ndarray):
    """transformers loads the checkpoint we saved in saved_dir to torch_model's exact state dict,
    and the two models give bitwise-equal logits on tokens [1, T]. The reloaded model runs the
    same kernels as torch_model (`same_implementations`): bitwise equality holds only for like
    with like (two expert implementations differ in summation order)."""
    reloaded = model_class.from_pretrained(str(saved_dir),
                                           **same_implementations(torch_model)).eval()
    want = torch_model.state_dict()
    assert reloaded.state_dict().keys() == want.keys()
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, want[key]), key
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(torch.as_tensor(tokens)).logits.numpy(),
                                      torch_model(torch.as_tensor(tokens)).logits.numpy())


def same_implementations(torch_model) -> dict:
    """from_pretrained kwargs choosing torch_model's own implementations (attention, experts,
    any other `<name>_implementation` transformers records on the config)."""
    import re

    found = {}
    for attr, value in vars(torch_model.config).items():
        match = re.fullmatch(r"_(\w+)_implementation(_internal)?", attr)
        if match and isinstance(value, str):
            found[f"{match.group(1)}_implementation"] = value
    assert "attn_implementation" in found, sorted(vars(torch_model.config))
    return found


def module_builds(tmp_path_factory, make):
    """name -> (path, torch_model, fp32 params, cfg) of make(path, index, name), the HF model
    `make` saves, each built once per test module."""
    import jax.numpy as jnp

    from dpace_jax.targets import hf as convert

    built = {}

    def get(name):
        if name not in built:
            path = tmp_path_factory.mktemp(name)
            torch_model = make(path, len(built), name)
            built[name] = (path, torch_model, *convert.load_target(path, dtype=jnp.float32))
        return built[name]

    return get


def check_round_trip(path, params, cfg, out_dir, model_class, torch_model, tokens) -> None:
    """The checkpoint transformers saved in `path` -> ours (params) -> saved by us in out_dir ->
    ours again: bit-exact both ways; the in-memory key map (schema.to_hf / from_hf) agrees with
    the file; transformers loads our file to torch_model's state (check_transformers_reads_ours).
    A tied lm_head that transformers wrote anyway is left out of the comparison."""
    from safetensors.numpy import load_file

    from dpace_jax.nn.schema import flatten
    from dpace_jax.targets import hf as convert
    from dpace_jax.targets.model import schema

    theirs = load_file(str(Path(path) / convert.WEIGHTS_NAME))
    if cfg.tie_word_embeddings:
        theirs.pop("lm_head.weight", None)
    ours = schema(cfg).to_hf(cfg, params)
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        np.testing.assert_array_equal(value, theirs[key], err_msg=key)
    again = schema(cfg).from_hf(cfg, theirs, "memory")
    convert.save_target(params, cfg, out_dir)
    loaded, cfg2 = convert.load_target(out_dir, dtype=None)
    assert cfg2 == cfg
    for tree in (loaded, again):
        for (p, a), b in zip(flatten(tree).items(), flatten(params).values(), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg="/".join(p))
    check_transformers_reads_ours(out_dir, model_class, torch_model, tokens)


def check_drafter_trains_on(tmp_path: Path, make_target, drafter_intermediate: int = 0) -> tuple:
    """The trainer's run (configs/tiny.py, 4 steps; drafter.intermediate_size when given) on the
    target that make_target(path, vocab_size) saves, with the demo tokenizer's files copied beside
    it: it finishes with a finite loss, and the DFlash export re-imports to the last checkpoint's
    weights. Returns the exported drafter's config."""
    import json
    import runpy
    import shutil

    import jax

    from dpace_jax.demo import target as demo_target
    from dpace_jax.demo.prepare import prepare
    from dpace_jax.drafters import hf as drafter_hf
    from dpace_jax.infer import generation
    from dpace_jax.train import loop as trainer

    dense = demo_target.build_random_target(tmp_path / "dense", seed=0)
    target = tmp_path / "target"
    make_target(target, json.loads((dense / "config.json").read_text())["vocab_size"])
    for f in dense.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, target / f.name)
    root = Path(__file__).resolve().parents[1]
    c = runpy.run_path(str(root / "configs" / "tiny.py"))["get_config"]()
    c.workdir, c.target.path, c.train.progress = str(tmp_path / "run"), str(target), False
    c.train.max_steps, c.train.save_every, c.data.demo_samples = 4, 4, 64
    c.drafter.intermediate_size = drafter_intermediate
    summary = trainer.run(prepare(c))
    assert summary["finished"] and np.isfinite(summary["final_metrics"]["loss"])
    exported, dcfg = drafter_hf.import_drafter(tmp_path / "run" / "hf")
    trained = generation.load_drafter(tmp_path / "run").params  # the last checkpoint
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 exported, trained)
    return dcfg


def check_moe_matches_torch(params, cfg, torch_model, tokens: np.ndarray, feature_layers,
                            atol: float = 1e-4, dispatches=None):
    """Our forward with each MoE dispatch (of `dispatches`, default all), and the early-stopping
    training forward, give the PyTorch model's logits and hidden_states[j + 1] features (fp32,
    atol 1e-4); returns the reference logits."""
    import jax
    import jax.numpy as jnp

    from dpace_jax.targets import experts, model

    ref_logits, ref_hidden = torch_outputs(torch_model, tokens)
    ref_features = np.concatenate([ref_hidden[j + 1] for j in feature_layers], axis=-1)
    assert np.abs(ref_logits).max() > 0.5  # the comparison is not between near-zero numbers
    run = jax.jit(model.forward, static_argnames=("cfg", "feature_layers"))
    has_experts = experts.experts_config(cfg) is not None
    for dispatch in (dispatches or experts.DISPATCHES) if has_experts else (None,):
        c = experts.with_dispatch(cfg, dispatch) if has_experts else cfg
        out = run(params, c, jnp.asarray(tokens), feature_layers=tuple(feature_layers))
        np.testing.assert_allclose(np.asarray(out.logits), ref_logits, atol=atol, rtol=0)
        np.testing.assert_allclose(np.asarray(out.features), ref_features, atol=atol, rtol=0)
    early = jax.jit(model.features, static_argnums=(1, 3))(params, cfg, jnp.asarray(tokens),
                                                            tuple(feature_layers))
    np.testing.assert_allclose(np.asarray(early), ref_features, atol=atol, rtol=0)
    return ref_logits
