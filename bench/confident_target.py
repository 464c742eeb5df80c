"""A confident demo target: the demo target distilled from itself at temperature 0.

    python bench/confident_target.py --sft runs/demo --out runs/confident/target
    python train.py --config configs/demo.py:cpu-dflash --config.workdir=runs/confident \
        --config.target.path=runs/confident/target            # its data and SFT drafter

Why this target (docs/opd.md, issue 27): the explanation offered for on-policy training lowering
tau on the demo is that the demo target is unsure of its own greedy tokens (median probability
about 0.3), so Draft-OPD's temperature-1 teacher pulls the drafter's confidence on the tokens it
gets right towards that value. Training the target with cross-entropy on its own greedy answers
(the demo run's regenerated data: a temperature-0 sample of itself) raises the probability of
exactly those tokens towards 1 while keeping them its greedy choice, which changes the variable
under test and little else; training it longer on its corpus would change what it says as well.

The fine-tuning runs on the answer tokens only (AdamW, cosine schedule), then OUT is an ordinary
HF checkpoint directory (with the demo's tokenizer and generation config) and OUT/confidence.json
holds, before and after, the target's probability of its greedy token at the answer positions
(median, mean, share above 0.9) and how often the answer token is still its argmax.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax


def answer_rows(path: Path, tokenizer, max_len: int) -> list[tuple[list[int], int]]:
    """(token ids of prompt + first answer, prompt length) per conversation of a chat JSONL."""
    from dpace_jax.infer import generation as gen_lib

    rows = []
    for line in path.read_text().splitlines():
        msgs = json.loads(line)["messages"]
        first = next((i for i, m in enumerate(msgs) if m["role"] == "assistant"), None)
        if not first:
            continue
        prompt = gen_lib.render_prompt(tokenizer, msgs[:first])
        full = tokenizer.apply_chat_template(msgs[: first + 1], tokenize=True)
        full = list(full["input_ids"] if hasattr(full, "keys") else full)  # a BatchEncoding
        if full[: len(prompt)] == prompt and len(prompt) < len(full) <= max_len:
            rows.append((full, len(prompt)))
    return rows


def batch_arrays(rows, pad: int, width: int):
    tokens = np.full((len(rows), width), pad, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for r, (ids, start) in enumerate(rows):
        tokens[r, : len(ids)] = ids
        mask[r, start: len(ids)] = True  # position t is predicted from t - 1
    return tokens, mask


def confidence(params, cfg, rows, pad: int, width: int, batch: int = 16) -> dict:
    """The target's probability of its argmax at every answer position, and how often the
    answer token (its own earlier greedy choice) is that argmax."""
    from dpace_jax.targets import model

    fwd = jax.jit(lambda p, t: model.forward(p, cfg, t).logits)
    p_best, agree = [], []
    for i in range(0, len(rows), batch):
        tokens, mask = batch_arrays(rows[i: i + batch], pad, width)
        logp = jax.nn.log_softmax(fwd(params, jnp.asarray(tokens)).astype(jnp.float32), -1)
        logp = np.asarray(logp)[:, :-1]
        m = mask[:, 1:]
        p_best.append(np.exp(logp.max(-1))[m])
        agree.append((logp.argmax(-1) == tokens[:, 1:])[m])
    p, a = np.concatenate(p_best), np.concatenate(agree)
    return {"positions": int(p.size), "median_p_greedy": float(np.median(p)),
            "mean_p_greedy": float(p.mean()), "share_above_0.9": float((p > 0.9).mean()),
            "answer_is_argmax": float(a.mean())}


def finetune(params, cfg, rows, pad: int, width: int, *, steps: int, batch: int, lr: float,
             seed: int):
    from dpace_jax.targets import model

    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
        optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps, lr * 0.1),
        b1=0.9, b2=0.95, weight_decay=0.0))

    def loss_fn(p, tokens, mask):
        logits = model.forward(p, cfg, tokens[:, :-1]).logits.astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
        m = mask[:, 1:].astype(jnp.float32)
        return jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1.0)

    @jax.jit
    def step(p, state, tokens, mask):
        loss, grads = jax.value_and_grad(loss_fn)(p, tokens, mask)
        updates, state = opt.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    state, rng, losses = opt.init(params), np.random.default_rng(seed), []
    for _ in range(steps):
        pick = rng.choice(len(rows), batch, replace=False)
        tokens, mask = batch_arrays([rows[i] for i in pick], pad, width)
        params, state, loss = step(params, state, jnp.asarray(tokens), jnp.asarray(mask))
        losses.append(float(loss))
    return params, losses


def heldout_confidence(target: Path, report: Path) -> dict:
    """confidence() of `target` at the answer positions of a compare_opd.py evaluation report
    (its greedy HumanEval answers, which that target generated)."""
    from dpace_jax.data import prompt_sets as bench_lib
    from dpace_jax.infer import generation as gen_lib
    from dpace_jax.targets import hf

    data = json.loads(report.read_text())
    samples = data["samples"] if "samples" in data else (
        data["benchmarks"]["humaneval"]["samples"])  # evaluate.py's report
    params, cfg = hf.load_target(target, dtype=jnp.float32)
    tokenizer = hf.load_tokenizer(target)
    bench = bench_lib.load_benchmark("humaneval", len(samples))
    rows = []
    for sample, row in zip(bench.samples, samples, strict=True):
        prompt = gen_lib.render_prompt(tokenizer, bench_lib.conversation(sample, []))
        rows.append((prompt + row["output_ids"], len(prompt)))
    width = max(len(ids) for ids, _ in rows)
    return confidence(params, cfg, rows, int(tokenizer.pad_token_id or 0), width)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sft", default="runs/demo", help="the demo run (its target and its "
                   "regenerated data)")
    p.add_argument("--out", default="runs/confident/target")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout", nargs=2, metavar=("TARGET", "REPORT"), help="only measure "
                   "TARGET's confidence on the greedy answers of a compare_opd.py T = 0 report")
    args = p.parse_args(argv)
    if args.heldout:
        print(json.dumps(heldout_confidence(*map(Path, args.heldout)), indent=1))
        return
    from dpace_jax.targets import hf

    sft, out = Path(args.sft), Path(args.out)
    data = sft / "data" / "regenerated.jsonl"
    if not (sft / "target" / "config.json").is_file() or not data.is_file():
        sys.exit(f"error: --sft={sft}: no target/ or data/regenerated.jsonl (run python -m "
                 "dpace_jax.demo first)")
    if (out / "confidence.json").is_file():
        print((out / "confidence.json").read_text())
        return
    params, cfg = hf.load_target(sft / "target", dtype=jnp.float32)
    tokenizer = hf.load_tokenizer(sft / "target")
    pad = int(tokenizer.pad_token_id or 0)
    rows = answer_rows(data, tokenizer, 384)
    width = max(len(ids) for ids, _ in rows)
    before = confidence(params, cfg, rows, pad, width)
    params, losses = finetune(params, cfg, rows, pad, width, steps=args.steps,
                              batch=args.batch_size, lr=args.lr, seed=args.seed)
    if not np.all(np.isfinite(losses)):
        sys.exit("error: the fine-tuning diverged (non-finite loss): lower --lr")
    after = confidence(params, cfg, rows, pad, width)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    hf.save_target(params, cfg, staging, tokenizer=sft / "target", dtype=jnp.float32)
    shutil.copy(sft / "target" / "generation_config.json", staging)
    report = {"before": before, "after": after, "rows": len(rows), "steps": args.steps,
              "batch_size": args.batch_size, "lr": args.lr, "first_loss": losses[0],
              "final_loss": float(np.mean(losses[-10:])), "source": str(sft / "target")}
    (staging / "confidence.json").write_text(json.dumps(report, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)  # complete or absent: a rerun starts over
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
