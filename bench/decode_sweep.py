"""Decode sweep on the demo's trained target and drafter (issue 29): tokens/s and ms per verify
step of the speculative decoder and of autoregressive decoding, over batch sizes and prompt
contexts, with XLA's cost analysis of one step.

    python bench/decode_sweep.py --label after --markdown        # the whole sweep (~25 min, CPU)
    python bench/decode_sweep.py --batches 1,8 --contexts 128 --label probe --output /tmp/x.json
    python bench/decode_sweep.py --plot docs/decode_cpu.png      # plot the stored labels only

Needs the demo's run (`python -m dpace_jax.demo`: runs/demo with its target in runs/demo/target).

Prompts. Row b of a batch is HumanEval prompt b mod 16 (chat template, as evaluate.py renders
it) behind earlier conversations of the demo's regenerated data as chat history, cut from the
left to exactly `context` tokens: every row is a real question at its real context length, so
the trained drafter accepts what it accepts in evaluation. Generation stops at the tokenizer's
stop tokens or after --max-new-tokens (evaluate.py's settings, greedy).

Timing (as evaluation.py times): per configuration one compiling call of each program, then
--repeats calls alternating the full decode and the same decode with max_new_tokens=1 (the
prefill); loop seconds = median(full) - median(prefill). tokens/s counts the tokens generated
after the first one, per loop second; ms per step = loop seconds / loop iterations (the most verify
steps of any row: the loop runs until its last row ends).

Cost per step: XLA's cost analysis (FLOPs, bytes accessed) of one loop iteration, compiled on its
own by `decode.step_cost` at the context the loop starts from. Results are stored under --label in
--output, so the figures before and after a change live side by side.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import numpy as np

from bench import common

MODES = ("speculative", "autoregressive")
NUM_PROMPTS = 16  # evaluate.py's demo setting (eval.num_samples)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="runs/demo/target", help="target HF directory")
    p.add_argument("--drafter", default="runs/demo", help="run directory or DFlash HF directory")
    p.add_argument("--data", default="runs/demo/data/regenerated.jsonl",
                   help="chat data whose conversations fill the prompts' history")
    p.add_argument("--batches", default="1,2,4,8,16", help="comma-separated batch sizes")
    p.add_argument("--contexts", default="128,512,2048", help="comma-separated prompt lengths")
    p.add_argument("--modes", default=",".join(MODES), help="speculative and/or autoregressive")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed calls of each program")
    p.add_argument("--label", default="", help="the key the results are stored under")
    p.add_argument("--output", default="bench/results/decode_cpu.json")
    p.add_argument("--plot", help="write a plot of every label in --output here (PNG)")
    p.add_argument("--markdown", action="store_true", help="print the label's table")
    p.add_argument("--compare", help="print the table of two stored labels A,B side by side "
                                      "(and the goals of issue 29 for each)")
    p.add_argument("--merge", action="store_true",
                   help="keep the label's stored rows, replacing those measured again (a sweep "
                        "split over several calls)")
    a = p.parse_args(argv)
    a.batches = common.parse_int_list(a.batches, "--batches")
    a.contexts = common.parse_int_list(a.contexts, "--contexts")
    a.modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    if not a.modes or any(m not in MODES for m in a.modes):
        raise ValueError(f"--modes: expected some of {MODES}, got {a.modes}")
    if a.repeats < 1 or a.max_new_tokens < 2:
        raise ValueError("--repeats must be >= 1 and --max-new-tokens >= 2")
    if not a.label and not a.plot and not a.compare:
        raise ValueError("--label: name the results (e.g. before / after), or give only --plot")
    return a


def sweep_prompts(tokenizer, questions, history, context: int, batch: int) -> np.ndarray:
    """[batch, context] int32: question b mod len(questions) after as much history as fills
    the context, cut from the left."""
    from dpace_jax.infer import generation as gen_lib

    rows = []
    for b in range(batch):
        messages, ids = [], []
        question = questions[b % len(questions)]
        for conv in history:
            ids = gen_lib.render_prompt(tokenizer, messages + question)
            if len(ids) >= context:
                break
            messages = messages + conv
        ids = gen_lib.render_prompt(tokenizer, messages + question)
        if len(ids) < context:
            raise ValueError(f"--data: too little history for a context of {context} tokens")
        rows.append(ids[-context:])
    return np.asarray(rows, np.int32)


def load_history(path: str) -> list[list[dict]]:
    """The conversations of a chat JSONL file, as message lists (user then assistant)."""
    convs = []
    for line in Path(path).read_text().splitlines():
        msgs = json.loads(line)["messages"]
        convs.append([{"role": m["role"], "content": m["content"]} for m in msgs])
    return convs


def time_config(gen, drafter, prompts: np.ndarray, repeats: int) -> dict:
    import jax.numpy as jnp

    from dpace_jax.infer import decode

    lengths = np.full((prompts.shape[0],), prompts.shape[1], np.int32)
    prompts = jnp.asarray(prompts)

    def call(n):
        return jax.block_until_ready(decode.decode(
            gen.target_params, gen.target_cfg, drafter, prompts, lengths, max_new_tokens=n,
            stop_token_ids=gen.stop_ids, pad_token_id=gen.pad_id))

    first = {}
    for n in (gen.max_new_tokens, 1):
        t0 = time.perf_counter()
        out = call(n) if n > 1 else call(n)
        first[n] = time.perf_counter() - t0
        if n > 1:
            result = out
    full, pre = [], []
    for _ in range(repeats):
        for n, times in ((gen.max_new_tokens, full), (1, pre)):
            t0 = time.perf_counter()
            call(n)
            times.append(time.perf_counter() - t0)
    loop_s = max(common.median(full) - common.median(pre), 1e-9)
    counts, steps = np.asarray(result.num_tokens), np.asarray(result.num_steps)
    # the generated tokens' digest: labels that decode alike (greedy) store the same one
    digest = hashlib.sha256(np.asarray(result.tokens, np.int32).tobytes()
                            + counts.astype(np.int32).tobytes()).hexdigest()[:16]
    tokens = int((counts - 1).sum())
    iterations = int(steps.max())
    return {"tokens": tokens, "tokens_sha256": digest, "iterations": iterations, "loop_s": loop_s,
            "tokens_per_s": tokens / loop_s,
            "ms_per_step": 1e3 * loop_s / iterations if iterations else None,
            "tau": decode.tau(result), "finished_early": int((counts < gen.max_new_tokens).sum()),
            "full_s": full, "prefill_s": pre, "first_call_s": first[gen.max_new_tokens],
            "first_prefill_call_s": first[1]}


def step_cost(gen, drafter, batch: int, context: int) -> dict | None:
    """XLA's cost analysis of one verify step at `context` (None where the decoder has none)."""
    from dpace_jax.infer import decode

    if not hasattr(decode, "step_cost"):
        return composed_step_cost(gen, drafter, batch, context)
    return decode.step_cost(gen.target_params, gen.target_cfg, drafter, batch=batch,
                            prompt_len=context, max_new_tokens=gen.max_new_tokens,
                            num_stop_ids=len(gen.stop_ids))


def composed_step_cost(gen, drafter, batch: int, context: int) -> dict:
    """The decoder's loop body rebuilt from its parts (propose, verify forward, acceptance,
    drafter context, commit) at the loop's first anchor, for decoders without step_cost."""
    import jax.numpy as jnp

    from dpace_jax.infer import sampling
    from dpace_jax.targets import model

    tp, tcfg, k = gen.target_params, gen.target_cfg, drafter.block_size
    size = context + gen.max_new_tokens + k
    ids = tuple(drafter.target_layer_ids)
    sampler = sampling.GREEDY

    def step(tp, dp, cache, draft_cache, last, anchors, key):
        if k > 1:
            block, q = drafter.propose(dp, drafter.config, tp, draft_cache, last, anchors, key,
                                       sampler)
        else:
            block, q = last[:, None], None
        out = model.forward_cached(tp, tcfg, block, cache, anchors, feature_layers=ids)
        if k > 1:
            acc, emitted = sampling.verify(key, out.logits, q, block, sampler)
            draft_cache = drafter.extend(dp, drafter.config, draft_cache, block, out.features,
                                         anchors)
        else:
            acc, emitted = sampling.verify_match(key, out.logits, block, sampler)
        return model.commit(tcfg, out.cache, acc + 1), draft_cache, emitted

    cache = model.init_cache(tcfg, batch, size, tp.embed.dtype)
    dcache = drafter.init_cache(drafter.params, drafter.config, batch, size)
    anchors = jnp.full((batch,), context, jnp.int32)
    compiled = jax.jit(step).lower(tp, drafter.params, cache, dcache, anchors, anchors,
                                   jax.random.PRNGKey(0)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return {"flops": float(cost.get("flops", 0.0)),
            "bytes accessed": float(cost.get("bytes accessed", 0.0)), "method": "composed"}


def run(a, save=None) -> dict:
    from dpace_jax.data import prompt_sets
    from dpace_jax.infer import decode
    from dpace_jax.infer import generation as gen_lib

    _, tokenizer, gen, loaded, spec = gen_lib.open_target(
        a.target, a.drafter, np.float32, max_new_tokens=a.max_new_tokens, batch_size=1)
    bench = prompt_sets.load_benchmark("humaneval", NUM_PROMPTS)
    questions = [prompt_sets.conversation(s, []) for s in bench.samples]
    history = load_history(a.data)
    drafters = {"speculative": spec, "autoregressive": decode.autoregressive()}
    rows = []
    # Each row is stored as soon as it is measured (save), so a sweep cut short keeps its rows.
    res = {"device": common.device_info(), "drafter": loaded.source, "target": a.target,
           "block_size": loaded.config.block_size, "max_new_tokens": a.max_new_tokens,
           "repeats": a.repeats, "command": "python bench/decode_sweep.py " +
           " ".join(sys.argv[1:]), "results": rows}
    for context in a.contexts:
        for batch in a.batches:
            prompts = sweep_prompts(tokenizer, questions, history, context, batch)
            for mode in a.modes:
                t0, load = time.perf_counter(), os.getloadavg()[0]
                r = {"batch": batch, "context": context, "mode": mode, "loadavg_1min": load,
                     **time_config(gen, drafters[mode], prompts, a.repeats),
                     "cost": step_cost(gen, drafters[mode], batch, context)}
                rows.append(r)
                if save is not None:
                    save(res)
                print(f"B={batch:2d} ctx={context:4d} {mode:14s} {r['tokens_per_s']:8.1f} tok/s "
                      f"{r['ms_per_step']:7.2f} ms/step tau {r['tau']:.2f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return res


def markdown(label: str, res: dict) -> str:
    by = {(r["mode"], r["batch"], r["context"]): r for r in res["results"]}
    batches = sorted({r["batch"] for r in res["results"]})
    contexts = sorted({r["context"] for r in res["results"]})
    modes = [m for m in MODES if any(k[0] == m for k in by)]
    head = ["context", "batch"] + [f"{m[:4]}. {what}" for m in modes
                                   for what in ("tok/s", "ms/step", "tau", "MFLOP/step",
                                                "MB/step")]
    table = []
    for c in contexts:
        for b in batches:
            row = [c, b]
            for m in modes:
                r = by.get((m, b, c))
                cost = (r or {}).get("cost") or {}
                row += ([r["tokens_per_s"], r["ms_per_step"], r["tau"],
                         cost.get("flops", 0) / 1e6 if cost else None,
                         cost.get("bytes accessed", 0) / 1e6 if cost else None]
                        if r else [None] * 5)
            table.append(row)
    d = res["device"]
    return (f"{label}: {d['device_kind']} ({d['date']}, jax {d['jax_version']}), block "
            f"{res['block_size']}, max_new_tokens {res['max_new_tokens']}\n\n"
            + common.markdown_table(head, table))


def compare(store: dict, labels: str) -> str:
    """Two labels side by side (tok/s and ms per step, A -> B), whether they generated the same
    tokens, and issue 29's goals for each label."""
    la, lb = [x.strip() for x in labels.split(",")]
    by = {(lab, r["mode"], r["batch"], r["context"]): r for lab in (la, lb)
          for r in store[lab]["results"]}
    keys = sorted({k[1:] for k in by}, key=lambda k: (k[2], k[1], MODES.index(k[0])))
    head = ["context", "batch", "mode", f"tok/s {la}", f"tok/s {lb}", f"ms/step {la}",
            f"ms/step {lb}", "tau", "same tokens"]
    rows = []
    for mode, b, c in keys:
        ra, rb = by.get((la, mode, b, c)), by.get((lb, mode, b, c))
        same = (None if not (ra and rb and "tokens_sha256" in ra and "tokens_sha256" in rb)
                else ("yes" if ra["tokens_sha256"] == rb["tokens_sha256"] else "NO"))
        rows.append([c, b, mode[:4] + ".", *(r and r["tokens_per_s"] for r in (ra, rb)),
                     *(r and r["ms_per_step"] for r in (ra, rb)), (rb or ra)["tau"], same])
    lines = [common.markdown_table(head, rows), ""]
    for lab in (la, lb):
        lines.append(f"{lab}: " + "; ".join(goals(store[lab]["results"])))
    return "\n".join(lines)


def goals(results: list[dict]) -> list[str]:
    """Issue 29's goals as ratios of one label's rows."""
    by = {(r["mode"], r["batch"], r["context"]): r for r in results}
    out = []
    for mode in MODES:
        for c in sorted({k[2] for k in by}):
            b2, b8 = by.get((mode, 2, c)), by.get((mode, 8, c))
            if b2 and b8:
                out.append(f"{mode[:4]}. ctx {c}: tok/s B8 / B2 = "
                           f"{b8['tokens_per_s'] / b2['tokens_per_s']:.2f} (goal >= 1)")
        short, long = by.get((mode, 1, 128)), by.get((mode, 1, 2048))
        if short and long:
            out.append(f"{mode[:4]}. B1: ms/step ctx 2048 / 128 = "
                       f"{long['ms_per_step'] / short['ms_per_step']:.2f} (goal <= 1.5)")
    spec = by.get(("speculative", 1, 128))
    if spec:
        out.append(f"spec. B1 ctx 128: {spec['tokens_per_s']:.0f} tok/s = "
                   f"{spec['tokens_per_s'] / 230:.2f} x z-lab's 230 (goal >= 2.5)")
    return out


def plot(store: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"before": ":", "after": "-"}
    for label, res in store.items():
        for mode, marker in zip(MODES, ("o", "s"), strict=True):
            for ci, c in enumerate(sorted({r["context"] for r in res["results"]})):
                rows = sorted((r for r in res["results"] if r["mode"] == mode
                               and r["context"] == c), key=lambda r: r["batch"])
                if not rows:
                    continue
                x = [r["batch"] for r in rows]
                # colour: context, marker: mode, line: label
                kw = {"marker": marker, "color": f"C{ci}", "label": f"{label} {mode[:4]}. ctx {c}",
                      "fillstyle": "full" if mode == MODES[0] else "none"}
                axes[0].plot(x, [r["tokens_per_s"] for r in rows], styles.get(label, "--"), **kw)
                axes[1].plot(x, [r["ms_per_step"] for r in rows], styles.get(label, "--"), **kw)
    for ax, what in zip(axes, ("tokens/s", "ms per verify step"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, ncol=2)
    fig.suptitle("demo decode on CPU: dotted before, solid after (issue 29)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    try:
        a = parse_args(argv)
    except ValueError as e:
        sys.exit(f"error: {e}")
    out = Path(a.output)
    store = json.loads(out.read_text()) if out.exists() else {}
    if a.label:
        old = store.get(a.label) if a.merge else None

        def save(res):
            if old is not None:  # the new rows replace the stored ones of the same configuration
                keys = {(r["mode"], r["batch"], r["context"]) for r in res["results"]}
                kept = [r for r in old["results"]
                        if (r["mode"], r["batch"], r["context"]) not in keys]
                res = {**res, "results": kept + res["results"],
                       "commands": old.get("commands", [old["command"]]) + [res["command"]]}
            store[a.label] = res
            common.write_json(out, store)

        run(a, save)
        if a.markdown:
            print(markdown(a.label, store[a.label]))
    if a.compare:
        print(compare(store, a.compare))
    if a.plot:
        plot(store, a.plot)


if __name__ == "__main__":
    main()
