"""A trained drafter, exported, decodes in an independent PyTorch DFlash decoder exactly as in
evaluate.py: the same tokens and the same acceptance length at every verify step.

A random drafter accepts nothing, so it cannot show a wrong feature or mask. Here a small Qwen3
target is trained to answer each of 8 "topic" prompts with that topic's fixed string (over an
alphabet of 6 letters, so the next letters depend on the topic and the position, i.e. on context
beyond the last token), and drafters are trained on those conversations with train.py's trainer
until they accept most of each block. The check runs for a full-attention drafter whose features
include the target's last layer (where HF's feature is after the final norm) and for a drafter
whose layers all slide over a window (8) shorter than the answers (40).

The same trained drafters check the on-policy replay: rolled out with records, their blocks
replayed at the rollout's boundaries draft what the decoder drafted, at every offset.

A DFlash 2 drafter (drafter.arch=dflash2, the published layout: sliding layers, bidirectional in
the block; a selector of rank 16 over 8 candidates) is trained in the same scenario and its
export decodes in z-lab's own reference (`dflash.model.DFlash2DraftModel.from_pretrained` +
`dflash_generate` at T = 0) step by step as in evaluate.py. Its walk leaves the unary argmax on
some of the decoded blocks (counted inside z-lab's decoder) and on some training blocks (the
trainer's walk_changed), while the output stays the autoregressive one.

Sensitivity, checked by hand: with the target features of the code before the last-layer fix
(no final norm on the last layer's feature) the reference decodes prompts with other acceptance
lengths and the test fails; with a reference that ignores the sliding window, all 8 prompts do.
For DFlash 2: with our decoder drafting the unary argmax of the same weights instead of the walk
(eval.selector=False), a prompt decodes with acceptance lengths [3, 8, 8, 8, 8, 5] against
z-lab's [4, 7, 8, 8, 8, 5] and the test fails (the walk had 7 of 52 blocks off the argmax).
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import references
from dflash_reference import Drafter, greedy_decode, load_target
from hf_fixtures import make_tiny_tokenizer

from dpace_jax.config import default_config
from dpace_jax.infer import evaluation, generation
from dpace_jax.targets import hf as convert
from dpace_jax.targets import model
from dpace_jax.train import loop as trainer
from dpace_jax.train.step import StepConfig

pytestmark = pytest.mark.slow  # subprocesses or long compiles: `-m "not slow"` skips them

TOPICS, ANSWER_LEN, ALPHABET = 8, 40, "abcdef"
TARGET = model.ModelConfig(vocab_size=272, hidden_size=64, intermediate_size=128, num_layers=4,
                           num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                           max_position_embeddings=1024)
DRAFTERS = {  # name -> config.drafter fields
    "full": dict(target_layer_ids=(1, 3)),
    "sliding": dict(target_layer_ids=(1, 2), sliding_window=8),
    "dflash2": dict(target_layer_ids=(1, 2), sliding_window=8, is_causal=False, arch="dflash2",
                    selector_rank=16, selector_top_k=8),
}


def conversations():
    rng = np.random.default_rng(0)
    return [[{"role": "user", "content": f"t{i}"},
             {"role": "assistant", "content": "".join(rng.choice(list(ALPHABET), ANSWER_LEN))}]
            for i in range(TOPICS)]


def train_target(tokenizer, out_dir, steps=150):
    """Next-token training on the rendered conversations until the answers are memorized."""
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations()]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, ids))
    tokens = np.full((len(ids), width), tokenizer.pad_token_id, np.int32)
    weights = np.zeros((len(ids), width - 1), np.float32)
    for i, row in enumerate(ids):
        tokens[i, : len(row)] = row
        weights[i, : len(row) - 1] = 1
    params = model.init_params(TARGET, jax.random.PRNGKey(0), jnp.float32, scale=0.05)
    opt = optax.adamw(optax.warmup_cosine_decay_schedule(0, 5e-3, 15, steps), weight_decay=0.0)

    def loss_fn(p):
        logits = model.forward(p, TARGET, tokens[:, :-1]).logits
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
        return jnp.sum(ce * weights) / jnp.sum(weights)

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    state = opt.init(params)
    for _ in range(steps):
        params, state, loss = step(params, state)
    assert float(loss) < 0.2, float(loss)  # nearly memorized: its greedy answers are the strings
    return convert.save_target(params, TARGET, out_dir, tokenizer=tokenizer)


def run_drafter(root, name, target_dir, chats, bench):
    """Train drafter `name` with the trainer behind train.py and evaluate it as evaluate.py
    does -> (report, run config)."""
    c = default_config()
    c.workdir = str(root / name)
    c.target.path, c.target.dtype = str(target_dir), "float32"
    c.drafter.num_layers, c.drafter.block_size = 2, 8
    for key, value in DRAFTERS[name].items():
        setattr(c.drafter, key, value)
    c.data.paths, c.data.max_length = (str(chats),), 96
    c.train.batch_size, c.train.num_anchors, c.train.max_steps = 8, 16, 100
    c.train.lr, c.train.compute_dtype, c.train.loss_chunk_size = 5e-3, "float32", 512
    c.train.progress = False
    c.eval.benchmarks, c.eval.num_samples = (f"alpaca={bench}",), TOPICS
    c.eval.max_new_tokens, c.eval.batch_size = ANSWER_LEN + 8, 8
    assert trainer.run(c)["finished"]
    return evaluation.evaluate(c, progress=False), c


def test_reference_decoder_agrees_step_by_step(tmp_path):
    """One test for both drafters, so that the target is trained once per run (a module
    fixture would be rebuilt on each xdist worker)."""
    tokenizer = make_tiny_tokenizer()
    target_dir = train_target(tokenizer, tmp_path / "target")
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations()))
    bench = tmp_path / "topics.jsonl"
    bench.write_text("".join(json.dumps({"instruction": c[0]["content"]}) + "\n"
                             for c in conversations()))
    target = load_target(target_dir)
    jax_target, _ = convert.load_target(target_dir, dtype=jnp.float32)
    stops = generation.stop_token_ids(tokenizer)
    for name in DRAFTERS:
        report, config = run_drafter(tmp_path, name, target_dir, chats, bench)
        workdir = config.workdir
        result = report["benchmarks"]["alpaca"]
        assert result["mismatches"] == 0, name  # lossless: speculative == autoregressive
        assert result["tau"] > 3.0, (name, result["tau"])  # most of each block is accepted
        if name == "dflash2":
            check_in_zlab_decoder(target, report, workdir, stops)
            continue
        drafter = Drafter(f"{workdir}/hf")
        windows = {layer.window for layer in drafter.layers}
        assert windows == ({8} if name == "sliding" else {None}), (name, windows)
        for sample in result["samples"]:
            tokens, accepted = greedy_decode(target, drafter, sample["prompt_ids"],
                                             max_new_tokens=report["max_new_tokens"],
                                             stop_token_ids=stops)
            assert tokens == sample["output_ids"], (name, sample["id"])
            assert accepted == sample["acceptance_lengths"], (name, sample["id"], accepted,
                                                              sample["acceptance_lengths"])
        # On-policy replay (train.mode=opd): blocks replayed at a rollout's boundaries with the
        # training forward draft what the cached decoder drafted, deep into the blocks.
        loaded = generation.load_drafter(workdir)
        _, _, _, checked, deepest = references.replay_of_a_rollout(
            jax_target, TARGET, loaded.params, loaded.config,
            [sample["prompt_ids"] for sample in result["samples"]],
            max_new=report["max_new_tokens"], seq_len=128, stop_ids=stops,
            step_cfg=StepConfig.from_config(config, 1))
        assert deepest >= 5 and checked > TOPICS * ANSWER_LEN // 2, (name, checked, deepest)


def zlab_generate(model, target, prompt, max_new_tokens, stop_token_ids):
    """z-lab's dflash_generate at T = 0 -> (generated ids, acceptance lengths, blocks decoded,
    blocks whose walk is not the unary argmax). Its statistics time the steps with CUDA
    synchronisation: plain wall time here (CPU)."""
    import dflash.model as dm
    import torch

    counts = [0, 0]
    propose = type(model).propose

    def counting(self, hidden, anchor_ids, output_head, temperature):
        tokens, candidates, q = propose(self, hidden, anchor_ids, output_head, temperature)
        argmax = self.compute_logits(hidden, output_head).argmax(-1)
        counts[0] += 1
        counts[1] += int((tokens != argmax).any())
        return tokens, candidates, q

    model.propose = counting.__get__(model)
    cuda_time, dm._cuda_time = dm._cuda_time, time.perf_counter
    try:
        stats = dm.dflash_generate(model, target, torch.tensor([prompt]), max_new_tokens,
                                   stop_token_ids, temperature=0.0, return_stats=True)
    finally:
        dm._cuda_time = cuda_time
        del model.propose
    return stats.output_ids[0, len(prompt):].tolist(), stats.acceptance_lengths, *counts


def check_in_zlab_decoder(target, report, workdir, stops):
    """The DFlash 2 export decodes step by step in z-lab's reference as in our evaluation."""
    import dflash.model as dm

    metrics = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl")]
    assert metrics[-1]["walk_changed"] > 0, metrics[-1]  # training blocks whose walk moved
    model = dm.DFlash2DraftModel.from_pretrained(f"{workdir}/hf").eval()
    blocks = changed = 0
    for sample in report["benchmarks"]["alpaca"]["samples"]:
        tokens, accepted, n, c = zlab_generate(model, target, sample["prompt_ids"],
                                               report["max_new_tokens"], stops)
        blocks, changed = blocks + n, changed + c
        ours = sample["acceptance_lengths"]
        assert tokens == sample["output_ids"], sample["id"]
        # z-lab records the tokens a step emitted, cut after a stop token; ours the step's
        # acceptance length: they differ on the last step only, by what the stop cut off
        emitted_last = len(sample["output_ids"]) - 1 - sum(ours[:-1])
        assert accepted == ours[:-1] + [emitted_last], (sample["id"], accepted, ours)
        assert emitted_last <= ours[-1]
    assert changed > 0, (changed, blocks)  # the walk decided some drafts
