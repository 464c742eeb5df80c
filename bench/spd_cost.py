"""SPD cost model (docs/spd.md): measured per-stage times and acceptance -> predicted tokens/s of
speculative pipeline decoding on n = 2, 4, 8 devices, set against DFlash decoding and plain
autoregressive decoding on one device.

    python bench/spd_cost.py                       # the demo (runs/demo, runs/demo_spd{2,4})
    python bench/spd_cost.py --measure-pipeline    # also time spd.decode itself (meaningful on a
                                                   # machine with >= n real devices only)

Measured here (one device, batch 1, median of --repeats jitted calls): t_stage(n), one token
through L/n target layers with a KV cache of the decode's length; t_head, final norm + LM head +
argmax; t_draft(n), one call of the trained draft module. Measured by decoding the prompts: the
draft module's acceptance alpha and the pipeline's tokens per step (spd.decode on an n-device
mesh; greedy output checked against the target's own; alpha cross-checked by the module's
training forward on the same answers, per flush age; alpha and tau also at temperature 1 with
the speculative rule), DFlash's tau and its tokens/s and the
autoregressive tokens/s (decode.decode, batch 1, wall clock).

Model (per pipeline step every stage works on one token; stage 0 also drafts and verifies):
  serial      t_step = t_stage(n) + t_draft(n) + t_head + t_comm   (one stream on device 0)
  overlapped  t_step = max(t_stage(n), t_draft(n) + t_head) + t_comm  (the draft hidden)
  tokens/step = 1 / (1 + (1 - alpha) (n - 1))    (a rejection costs n - 1 refill steps; the
                measured tokens/step of the decode is reported beside it)
  AR          t_ar = t_stage(1) + t_head;  predicted speedup = (tokens/step / t_step) * t_ar.
  bound       n * tokens/step: stages of exactly t_ar / n, the draft hidden, no communication.
n = 8 does not divide the demo target's 4 layers: t_stage(8) is the larger of the linear fit of
t_stage(n) in layers per stage (at 1/2 layer) and t_stage(4) / 2, t_draft(8) = t_draft(4),
alpha(8) = alpha(4) (an optimistic assumption: a deeper pipeline feeds the draft shallower
states); all marked "extrapolated".
t_comm is --comm-us (0 by default: the CPU devices here share memory).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", default="runs/demo/target")
    p.add_argument("--dflash", default="runs/demo/hf", help="DFlash drafter (HF dir or run dir)")
    p.add_argument("--spd", default="runs/demo_spd{n}", help="SPD draft module run, {n}: stages")
    p.add_argument("--prompts", default="runs/demo/results.json",
                   help="an evaluate.py results.json: its samples' prompt_ids are decoded")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--max-new", type=int, default=128)
    p.add_argument("--stages", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--repeats", type=int, default=60)
    p.add_argument("--comm-us", type=float, default=0.0, help="per-step communication time")
    p.add_argument("--measure-pipeline", action="store_true",
                   help="time spd.decode (needs >= n real devices to mean anything)")
    p.add_argument("--output", default="bench/results/spd_cpu.json")
    return p.parse_args(argv)


def tokens_per_step(alpha: float, n: int) -> float:
    """Committed tokens per pipeline step when each verification accepts with probability alpha
    (one token per verification, n - 1 refill steps per rejection)."""
    return 1.0 / (1.0 + (1.0 - alpha) * (n - 1))


def predict(t_stage: float, t_draft: float, t_head: float, t_ar: float, alpha: float, n: int,
            comm: float = 0.0) -> dict:
    """Predicted SPD figures for one n (times in seconds)."""
    tps = tokens_per_step(alpha, n)
    serial = t_stage + t_draft + t_head + comm
    overlapped = max(t_stage, t_draft + t_head) + comm
    return {"tokens_per_step": tps, "t_step_serial_ms": 1e3 * serial,
            "t_step_overlapped_ms": 1e3 * overlapped,
            "tokens_per_s_serial": tps / serial, "tokens_per_s_overlapped": tps / overlapped,
            "speedup_serial": tps * t_ar / serial, "speedup_overlapped": tps * t_ar / overlapped,
            "speedup_balanced_bound": n * tps}


def teacher_forced_agreement(params, cfg, module, prompts, lengths, tokens, num_tokens) -> dict:
    """Cross-check of the pipeline's alpha without the pipeline: the draft module's training
    forward over prompt + the target's greedy answer, argmax agreement with the target's next
    token at every answer position, per flush age (n - 1: steady state)."""
    import jax.numpy as jnp
    import numpy as np

    from dpace_jax.infer.spd import draft as spd_draft
    from dpace_jax.targets import model

    batch, width = prompts.shape[0], prompts.shape[1] + tokens.shape[1]
    seqs = np.zeros((batch, width), np.int32)
    for b in range(batch):
        seqs[b, :lengths[b]] = prompts[b, :lengths[b]]
        seqs[b, lengths[b]:lengths[b] + num_tokens[b]] = tokens[b, :num_tokens[b]]
    feats = model.features(params, cfg, jnp.asarray(seqs), module.config.target_layer_ids)
    steps = np.arange(tokens.shape[1])
    heads = np.minimum(lengths[:, None] + steps, width - 2)  # head h predicts h + 1
    live = steps[None, :] < num_tokens[:, None] - 1
    truth = seqs[np.arange(batch)[:, None], heads + 1]
    out = {}
    for age in range(module.config.block_size):
        logits = spd_draft.train_logits(module.params, module.config, params, feats,
                                        jnp.asarray(seqs), jnp.asarray(heads),
                                        jnp.full(heads.shape, age))
        out[str(age)] = float((np.asarray(jnp.argmax(logits, -1)) == truth)[live].mean())
    return out


def main(argv=None):
    args = parse_args(argv)
    trained = [n for n in args.stages if Path(args.spd.format(n=n)).is_dir()]
    if trained and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform"
                                   f"_device_count={max(trained)}").strip()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench import common
    from dpace_jax.infer.sampling import Sampling

    T1 = Sampling(1.0, "speculative")  # the sampled figures: temperature 1, min(1, p/q) rule
    from dpace_jax.infer import decode, generation
    from dpace_jax.infer.spd import draft as spd_draft
    from dpace_jax.infer.spd import pipeline as spd
    from dpace_jax.nn import layers
    from dpace_jax.targets import hf as convert
    from dpace_jax.targets import model

    params, cfg = convert.load_target(args.target, dtype=jnp.float32)
    stops = generation.stop_token_ids(convert.load_tokenizer(args.target))
    samples = json.loads(Path(args.prompts).read_text())["benchmarks"]
    rows = [s["prompt_ids"] for b in samples.values() for s in b["samples"]][:args.num_prompts]
    prompts, lengths = decode.pad_prompts(rows)
    new = args.max_new
    ar = decode.decode(params, cfg, None, prompts, lengths, max_new_tokens=new,
                       stop_token_ids=stops)
    reference = np.asarray(ar.tokens)
    generated = int(np.sum(np.asarray(ar.num_tokens)))
    out = {"device": common.device_info(), "target": args.target, "num_prompts": len(rows),
           "max_new_tokens": new, "stop_token_ids": stops, "generated_tokens": generated,
           "comm_us": args.comm_us}

    # DFlash and autoregressive decoding, batch 1, wall clock (compiled first), prompt by
    # prompt in turn so that the load of a shared machine falls on both alike.
    loaded = generation.load_drafter(args.dflash)
    dflash = decode.dflash_drafter(loaded.params, loaded.config, cfg)
    modes = {"ar": None, "dflash": dflash}
    walls, steps = dict.fromkeys(modes, 0.0), []
    for drafter in modes.values():
        decode.decode(params, cfg, drafter, prompts[:1], lengths[:1], max_new_tokens=new,
                      stop_token_ids=stops)
    for b in range(len(rows)):
        for name, drafter in modes.items():
            t0 = time.perf_counter()
            res = jax.block_until_ready(decode.decode(
                params, cfg, drafter, prompts[b:b + 1], lengths[b:b + 1], max_new_tokens=new,
                stop_token_ids=stops))
            walls[name] += time.perf_counter() - t0
            if drafter is not None:
                steps.append(decode.acceptance_lengths(res)[0])
    res = decode.decode(params, cfg, dflash, prompts, lengths, max_new_tokens=new,
                        stop_token_ids=stops)
    out["dflash"] = {"drafter": loaded.source, "block_size": loaded.config.block_size,
                     "tau": decode.mean_acceptance(steps),
                     "mismatches_vs_ar": int(np.sum(np.asarray(res.tokens) != reference)),
                     "tokens_per_s": generated / walls["dflash"],
                     "ar_tokens_per_s": generated / walls["ar"]}
    out["dflash"]["speedup"] = out["dflash"]["tokens_per_s"] / out["dflash"]["ar_tokens_per_s"]
    res = decode.decode(params, cfg, dflash, prompts, lengths, max_new_tokens=new,
                        stop_token_ids=stops, sampling=T1, rng=jax.random.PRNGKey(1))
    out["dflash"]["tau_t1_speculative"] = decode.tau(res)

    # Component times on one device: every probe once per round, --repeats rounds, medians.
    size = prompts.shape[1] + new + max(args.stages) + 2
    x = jnp.zeros((1, 1, cfg.hidden_size), jnp.float32)
    pos = jnp.asarray([prompts.shape[1]], jnp.int32)
    probes = {}
    for n in sorted({1, 2, 4} | {n for n in args.stages if cfg.num_layers % n == 0}):
        per = cfg.num_layers // n
        probes[("stage", n)] = (
            jax.jit(lambda ly, c, n=n: spd.stage_forward(ly, cfg, x, c, pos, num_stages=n,
                                                         stage=0)[0]),
            (jax.tree.map(lambda a, per=per: a[:per], params.layers),
             spd.stage_cache(cfg, n, 1, size, jnp.float32)))
    probes[("head", 0)] = (jax.jit(lambda h: jnp.argmax(model.lm_head(params, layers.rms_norm(
        h, params.final_norm, cfg.rms_norm_eps)), -1)), (x[:, 0],))
    modules = {n: generation.load_drafter(args.spd.format(n=n)) for n in trained}
    drafters = {n: spd_draft.spd_drafter(m.params, m.config, cfg) for n, m in modules.items()}
    for n, d in drafters.items():
        state = d.init(d.params, d.config, params, prompts[:1],
                       jnp.zeros((n, 1, prompts.shape[1], cfg.hidden_size)), size)
        view = spd.View(jnp.zeros((1, size), jnp.int32), pos, pos - n,
                        jnp.ones((n, 1, cfg.hidden_size)), jnp.ones((n, 1), bool))
        probes[("draft", n)] = (jax.jit(lambda s, v, d=d: d.draft(d.params, d.config, params,
                                                                 s, v)[1]), (state, view))
    rounds = {k: [] for k in probes}
    for _ in range(2):
        for fn, a in probes.values():
            common.block(fn(*a))
    for _ in range(args.repeats):
        for k, (fn, a) in probes.items():
            t0 = time.perf_counter()
            common.block(fn(*a))
            rounds[k].append(time.perf_counter() - t0)
    med = {k: common.median(v) for k, v in rounds.items()}
    t_stage = {n: t for (kind, n), t in med.items() if kind == "stage"}
    t_head = med[("head", 0)]
    fit = np.polyfit([cfg.num_layers / n for n in t_stage], list(t_stage.values()), 1)
    t_ar = t_stage[1] + t_head
    out["times_ms"] = {"stage": {str(n): 1e3 * t for n, t in t_stage.items()},
                       "head": 1e3 * t_head, "ar_model": 1e3 * t_ar,
                       "stage_fit_ms_per_layer_and_fixed": [1e3 * fit[0], 1e3 * fit[1]]}
    out["stages"] = {}
    for n in args.stages:
        entry, extrapolated = {}, []
        if n in trained:
            mod, drafter = modules[n], drafters[n]
            res = spd.decode(params, cfg, drafter, prompts, lengths, num_stages=n,
                             max_new_tokens=new, stop_token_ids=stops)
            if args.measure_pipeline:  # batch 1, prompt by prompt, compiled first
                spd.decode(params, cfg, drafter, prompts[:1], lengths[:1], num_stages=n,
                           max_new_tokens=new, stop_token_ids=stops)
                t0 = time.perf_counter()
                for b in range(len(rows)):
                    jax.block_until_ready(spd.decode(
                        params, cfg, drafter, prompts[b:b + 1], lengths[b:b + 1], num_stages=n,
                        max_new_tokens=new, stop_token_ids=stops))
                entry["measured_tokens_per_s_batch1"] = generated / (time.perf_counter() - t0)
            steps = np.asarray(res.steps)
            sampled = spd.decode(params, cfg, drafter, prompts, lengths, num_stages=n,
                                 max_new_tokens=new, stop_token_ids=stops, sampling=T1,
                                 rng=jax.random.PRNGKey(1))
            entry.update(alpha=spd.acceptance_rate(res), draft_module=mod.source,
                         measured_tokens_per_step=float(generated / steps.sum()),
                         mismatches_vs_ar=int(np.sum(np.asarray(res.tokens) != reference)),
                         teacher_forced_agreement_by_flush_age=teacher_forced_agreement(
                             params, cfg, mod, prompts, lengths, reference,
                             np.asarray(ar.num_tokens)),
                         alpha_t1_speculative=spd.acceptance_rate(sampled),
                         t_draft_ms=1e3 * med[("draft", n)])
        else:
            base = out["stages"].get(str(max(trained))) if trained else None
            if base is None:
                continue
            entry.update(alpha=base["alpha"], t_draft_ms=base["t_draft_ms"])
            extrapolated += ["alpha", "t_draft_ms"]
        if n in t_stage:
            entry["t_stage_ms"] = 1e3 * t_stage[n]
        else:  # the larger of the linear fit and the proportional share of the deepest split
            deepest = max(t_stage)
            entry["t_stage_ms"] = 1e3 * max(float(np.polyval(fit, cfg.num_layers / n)),
                                            t_stage[deepest] * deepest / n)
            extrapolated.append("t_stage_ms")
        entry.update(predict(entry["t_stage_ms"] / 1e3, entry["t_draft_ms"] / 1e3, t_head, t_ar,
                             entry["alpha"], n, args.comm_us / 1e6), extrapolated=extrapolated)
        out["stages"][str(n)] = entry
    common.write_json(args.output, out)
    d = out["dflash"]
    print(f"DFlash (1 device): tau {d['tau']:.2f}, {d['tokens_per_s']:.0f} tok/s vs AR "
          f"{d['ar_tokens_per_s']:.0f} tok/s: {d['speedup']:.2f}x (measured)")
    print(common.markdown_table(
        ["stages", "alpha", "tok/step", "t_stage ms", "t_draft ms", "speedup serial",
         "speedup overlapped", "bound", "extrapolated"],
        [[n, e["alpha"], e["tokens_per_step"], e["t_stage_ms"], e["t_draft_ms"],
          e["speedup_serial"], e["speedup_overlapped"], e["speedup_balanced_bound"],
          ", ".join(e["extrapolated"]) or "-"]
         for n, e in out["stages"].items()]))
    print(f"wrote {args.output}")
    return out


if __name__ == "__main__":
    main()
