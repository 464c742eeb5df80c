"""Evaluation behind evaluate.py: a target and a drafter, named benchmarks, tau and speedup.

`evaluate(config)` loads the target (HF directory or hub id; WORKDIR/target for a run without
`target.path`) and a drafter (`eval.drafter`: a DFlash HF directory, or a run directory: its latest
Orbax checkpoint, else its `hf/` export; "" = the run's WORKDIR), checks that they fit each other
before anything is decoded, and runs every benchmark twice on the same prompts (chat template,
thinking disabled): with the speculative decoder and with plain autoregressive decoding (block
size 1, same loop). mt-bench's second turn is asked after each decoder's own first answer.

Timing: prompts are sorted by length and batched (`eval.batch_size` rows, short batches filled up
with copies) into right-padded widths rounded up to BUCKET tokens, so few shapes compile. Each
shape is run once untimed before it is timed (compile time excluded), every call ends in
`block_until_ready`, and the prefill (timed as the same decode with max_new_tokens=1) is
subtracted: tokens/s counts the tokens generated after the first one, per second of decode loop.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpace_jax import benchmarks as bench_lib
from dpace_jax import convert, decode, drafter_hf, targets
from dpace_jax import drafter as drafter_lib
from dpace_jax.chat import TEMPLATE_KWARGS
from dpace_jax.config import parse_dtype
from dpace_jax.model import ModelConfig

BUCKET = 64
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


# ----------------------------------------------------------------------------- tokens


def stop_token_ids(tokenizer) -> list[int]:
    """The tokenizer's eos token(s) plus <|im_end|> / <|endoftext|> where they exist."""
    ids = set()
    eos = tokenizer.eos_token_id
    ids.update(eos if isinstance(eos, list | tuple) else [eos] if eos is not None else [])
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in STOP_TOKENS if t in vocab)
    return sorted(int(i) for i in ids)


def render_prompt(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Token ids of the chat-template prompt (generation prompt added, thinking disabled)."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=True, **TEMPLATE_KWARGS)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def answer_text(tokenizer, output_ids: Sequence[int], stop_ids: Sequence[int]) -> str:
    """The generated text without the final stop token and special tokens."""
    ids = list(output_ids)
    if ids and ids[-1] in set(stop_ids):
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=True)


# ----------------------------------------------------------------------------- drafters


@dataclasses.dataclass(frozen=True)
class LoadedDrafter:
    params: Any
    config: drafter_lib.DrafterConfig
    source: str  # what was loaded, for messages and results
    expected: dict | None = None  # the run's recorded drafter config (run_config.json), if any


def _restore_checkpoint(ckpt_dir: Path, dcfg: drafter_lib.DrafterConfig):
    """(step, drafter params) of the latest complete Orbax step, or None when there is none."""
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(ckpt_dir.absolute(),
                                    options=ocp.CheckpointManagerOptions(create=False))
    try:
        step = manager.latest_step()
        if step is None:
            return None
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.eval_shape(
            lambda: drafter_lib.init_drafter_params(dcfg, jax.random.PRNGKey(0)))
        target = {"params": jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=sharding), abstract)}
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)))
        return step, restored["state"]["params"]
    finally:
        manager.close()


def load_drafter(path: str | Path) -> LoadedDrafter:
    """A DFlash HF directory, or a training run directory (latest checkpoint, else hf/)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"drafter {path} does not exist (expected a DFlash HF directory "
                                "or a training run directory)")
    run_config = path / "run_config.json"
    if not run_config.is_file():
        params, dcfg = drafter_hf.import_drafter(path)
        return LoadedDrafter(params, dcfg, str(path))
    expected = json.loads(run_config.read_text()).get("drafter")
    if not isinstance(expected, dict):
        raise ValueError(f"{run_config}: missing field 'drafter' (the run's drafter config)")
    if (path / "checkpoints").is_dir():
        dcfg = drafter_hf.config_from_hf(expected, f"{run_config} field 'drafter'")
        found = _restore_checkpoint(path / "checkpoints", dcfg)
        if found is not None:
            step, params = found
            return LoadedDrafter(params, dcfg, f"{path / 'checkpoints'} step {step}", expected)
    if (path / "hf").is_dir():
        params, dcfg = drafter_hf.import_drafter(path / "hf")
        return LoadedDrafter(params, dcfg, str(path / "hf"), expected)
    raise FileNotFoundError(f"run directory {path} holds no checkpoint (checkpoints/) and no "
                            "exported drafter (hf/); train first or pass a DFlash HF directory "
                            "as --config.eval.drafter")


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids.update(int(i) for i, tok in added.items() if getattr(tok, "special", False))
    return ids


def check_drafter(loaded: LoadedDrafter, target_cfg: ModelConfig, tokenizer=None, *,
                  max_new_tokens: int = 0) -> None:
    """ValueError naming the field when the drafter cannot serve this target: widths, feature
    layers, mask token (in the vocabulary, not an ordinary or a stop token), block size (within
    the target's positions; as recorded by the run that trained it)."""
    cfg, src = loaded.config, loaded.source
    drafter_lib.check_compatible(cfg, target_cfg, source=src)
    drafter_lib.warn_if_last_layer(cfg.target_layer_ids, target_cfg.num_layers,
                                   f"{src}: target_layer_ids")
    if loaded.expected is not None:
        want = drafter_hf.config_from_hf(loaded.expected, "run_config.json field 'drafter'")
        for field in ("block_size", "mask_token_id", "target_layer_ids", "hidden_size",
                      "layer_types", "sliding_window", "is_causal"):
            if getattr(cfg, field) != getattr(want, field):
                raise ValueError(f"{src}: {field}={getattr(cfg, field)} but the run that trained "
                                 f"it (run_config.json) has {field}={getattr(want, field)}")
    if cfg.block_size + max_new_tokens > target_cfg.max_position_embeddings:
        raise ValueError(f"{src}: block_size={cfg.block_size} + max_new_tokens={max_new_tokens} "
                         f"exceeds the target's max_position_embeddings="
                         f"{target_cfg.max_position_embeddings}")
    if tokenizer is not None:
        mask = cfg.mask_token_id
        if mask in stop_token_ids(tokenizer):
            raise ValueError(f"{src}: mask_token_id={mask} is a stop token of the target's "
                             "tokenizer")
        if mask < len(tokenizer) and mask not in _special_ids(tokenizer):
            raise ValueError(f"{src}: mask_token_id={mask} is the ordinary token "
                             f"{tokenizer.convert_ids_to_tokens(mask)!r} of the target's "
                             "tokenizer; expected its mask token or an id past the tokenizer")


def as_decoder(loaded: LoadedDrafter, target_cfg: ModelConfig, dtype) -> decode.Drafter:
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), loaded.params)
    return decode.dflash_drafter(params, loaded.config, target_cfg, source=loaded.source)


# ----------------------------------------------------------------------------- generation


@dataclasses.dataclass(frozen=True)
class Generation:
    output_ids: list[int]  # generated tokens, the stop token included
    acceptance_lengths: list[int]


@dataclasses.dataclass
class Generator:
    """Batched decoding of token prompts with fixed decoding settings; tracks warm shapes."""

    target_params: Any
    target_cfg: ModelConfig
    stop_ids: list[int]
    pad_id: int
    max_new_tokens: int
    batch_size: int
    temperature: float = 0.0
    rule: str = "dflash"
    top_k: int = 0
    top_p: float = 1.0
    bucket: int = BUCKET
    warm: set = dataclasses.field(default_factory=set)

    def _call(self, drafter, prompts, lengths, key, max_new):
        out = decode.decode(self.target_params, self.target_cfg, drafter, prompts, lengths,
                            max_new_tokens=max_new, temperature=self.temperature, rule=self.rule,
                            top_k=self.top_k, top_p=self.top_p, stop_token_ids=self.stop_ids,
                            rng=key, pad_token_id=self.pad_id)
        return jax.block_until_ready(out)

    def _timed(self, name, drafter, prompts, lengths, key, max_new):
        shape = (name, prompts.shape, max_new)
        if shape not in self.warm:
            self._call(drafter, prompts, lengths, key, max_new)
            self.warm.add(shape)
        t0 = time.perf_counter()
        out = self._call(drafter, prompts, lengths, key, max_new)
        return out, time.perf_counter() - t0

    def generate(self, drafter, prompts: Sequence[Sequence[int]], key, *, name: str = "",
                 timed: bool = False) -> tuple[list[Generation], float]:
        """Decode up to batch_size prompts (filled up to batch_size with copies of the first) ->
        (one Generation per prompt, seconds of decode loop with the prefill subtracted: 0 unless
        timed)."""
        if not 0 < len(prompts) <= self.batch_size:
            raise ValueError(f"generate: {len(prompts)} prompts for batch_size "
                             f"{self.batch_size}")
        rows = list(prompts) + [prompts[0]] * (self.batch_size - len(prompts))
        padded, lengths = decode.pad_prompts(rows, bucket=self.bucket, pad_token_id=self.pad_id)
        seconds = 0.0
        if timed:
            out, t_all = self._timed(name, drafter, padded, lengths, key, self.max_new_tokens)
            _, t_prefill = self._timed(name, drafter, padded, lengths, key, 1)
            seconds = max(t_all - t_prefill, 1e-9)
        else:
            out = self._call(drafter, padded, lengths, key, self.max_new_tokens)
        tokens, counts = np.asarray(out.tokens), np.asarray(out.num_tokens)
        accept = decode.acceptance_lengths(out)
        gens = [Generation(tokens[b, : counts[b]].tolist(), accept[b])
                for b in range(len(prompts))]
        return gens, seconds


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (sorted, stable)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


# ----------------------------------------------------------------------------- benchmarks


def run_benchmark(gen: Generator, tokenizer, bench: bench_lib.Benchmark, drafters: dict, *,
                  seed: int = 0, bar=None) -> dict:
    """Decode every turn of every sample with each drafter of `drafters` ({"spec": Drafter,
    "ar": Drafter}); -> {name: {"samples": [...], "seconds", "tokens"}}."""
    runs = {}
    for name, drafter in drafters.items():
        answers = {i: [] for i in range(len(bench.samples))}
        rows, seconds, tokens = [], 0.0, 0
        for turn in range(max(len(s.turns) for s in bench.samples)):
            todo = [i for i, s in enumerate(bench.samples) if len(s.turns) > turn]
            prompts = [render_prompt(tokenizer, bench_lib.conversation(bench.samples[i],
                                                                       answers[i]))
                       for i in todo]
            for batch_no, group in enumerate(length_batches([len(p) for p in prompts],
                                                            gen.batch_size)):
                key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), turn),
                                         batch_no)
                gens, secs = gen.generate(drafter, [prompts[j] for j in group], key,
                                          name=name, timed=True)
                seconds += secs
                for j, g in zip(group, gens, strict=True):
                    i = todo[j]
                    answers[i].append(answer_text(tokenizer, g.output_ids, gen.stop_ids))
                    tokens += len(g.output_ids) - 1
                    rows.append({"id": bench.samples[i].id, "turn": turn, "index": i,
                                 "prompt_ids": prompts[j], "output_ids": g.output_ids,
                                 "acceptance_lengths": g.acceptance_lengths})
                if bar is not None:
                    bar.update(len(group))
        rows.sort(key=lambda r: (r["index"], r["turn"]))
        runs[name] = {"samples": rows, "seconds": seconds, "tokens": tokens}
    return runs


def summarize(runs: dict, block_size: int, check_lossless: bool) -> dict:
    """The per-benchmark result: tau, histogram, tokens/s, speedup, samples."""
    spec, ar = runs["spec"], runs["ar"]
    lengths = [n for r in spec["samples"] for n in r["acceptance_lengths"]]
    hist = np.bincount(np.asarray(lengths, np.int64), minlength=block_size + 1)
    spec_tps = spec["tokens"] / spec["seconds"] if spec["seconds"] > 0 else float("nan")
    ar_tps = ar["tokens"] / ar["seconds"] if ar["seconds"] > 0 else float("nan")
    samples, mismatches = [], 0
    for s, a in zip(spec["samples"], ar["samples"], strict=True):
        same = s["output_ids"] == a["output_ids"]
        mismatches += not same
        samples.append({"id": s["id"], "turn": s["turn"], "prompt_ids": s["prompt_ids"],
                        "output_ids": s["output_ids"], "acceptance_lengths":
                        s["acceptance_lengths"], "ar_output_ids": a["output_ids"],
                        "matches_ar": same})
    return {
        "tau": float(np.mean(lengths)) if lengths else float("nan"),
        "histogram": hist[: block_size + 1].tolist(),
        "spec_tokens_per_s": spec_tps, "ar_tokens_per_s": ar_tps,
        "speedup": spec_tps / ar_tps if ar_tps > 0 else float("nan"),
        "num_steps": len(lengths), "spec_tokens": spec["tokens"], "ar_tokens": ar["tokens"],
        "spec_seconds": spec["seconds"], "ar_seconds": ar["seconds"],
        "mismatches": mismatches if check_lossless else None,
        "samples": samples,
    }


def evaluate(config, *, benchmarks: Sequence[str] | None = None, output: str | None = None,
             progress: bool = True) -> dict:
    """Run the benchmarks of `config.eval` (or `benchmarks`); write `output` (JSON) if given."""
    ev = config.eval
    specs = list(benchmarks) if benchmarks else list(ev.benchmarks)
    for spec in specs:
        bench_lib.parse_spec(spec)  # unknown names fail before anything is loaded
    if int(ev.batch_size) < 1 or int(ev.max_new_tokens) < 1:
        raise ValueError(f"eval.batch_size={ev.batch_size} and eval.max_new_tokens="
                         f"{ev.max_new_tokens} must be >= 1")
    drafter_path = ev.drafter or config.workdir
    if not drafter_path:
        raise ValueError("no drafter: set --config.eval.drafter (a DFlash HF directory or a run "
                         "directory) or --config.workdir")
    target_dir = targets.resolve(config, build=False)
    tokenizer = convert.load_tokenizer(target_dir)
    target_cfg = convert.load_config(target_dir)
    loaded = load_drafter(drafter_path)
    check_drafter(loaded, target_cfg, tokenizer, max_new_tokens=int(ev.max_new_tokens))
    dtype = parse_dtype(config.target.dtype, "target.dtype")
    target_params, _ = convert.load_target(target_dir, dtype=dtype)
    drafters = {"spec": as_decoder(loaded, target_cfg, dtype), "ar": decode.autoregressive()}
    gen = Generator(target_params, target_cfg, stop_token_ids(tokenizer),
                    int(tokenizer.pad_token_id or 0), int(ev.max_new_tokens),
                    int(ev.batch_size), float(ev.temperature), str(ev.rule), bucket=BUCKET)
    num = int(ev.num_samples) if int(ev.num_samples) > 0 else None
    loaded_benches = [bench_lib.load_benchmark(s, num) for s in specs]

    from tqdm import tqdm

    total = 2 * sum(len(s.turns) for b in loaded_benches for s in b.samples)
    bar = tqdm(total=total, desc="evaluate", unit="turn", disable=not progress)
    results = {}
    for bench in loaded_benches:
        bar.set_postfix(benchmark=bench.name)
        runs = run_benchmark(gen, tokenizer, bench, drafters, seed=int(config.seed), bar=bar)
        results[bench.name] = {**summarize(runs, loaded.config.block_size,
                                           check_lossless=gen.temperature == 0),
                               "source": bench.source}
    bar.close()
    device = jax.devices()[0]
    report = {
        "benchmarks": results,
        "target": str(target_dir), "drafter": loaded.source,
        "block_size": loaded.config.block_size, "temperature": gen.temperature,
        "rule": gen.rule, "max_new_tokens": gen.max_new_tokens, "batch_size": gen.batch_size,
        "device": f"{device.platform}:{getattr(device, 'device_kind', '')}",
        "num_devices": jax.device_count(), "jax_version": jax.__version__,
        "config": config.to_dict(),
    }
    if output:
        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    return report


def format_report(report: dict) -> str:
    """A short table per benchmark."""
    lines = [f"target {report['target']}  drafter {report['drafter']}  "
             f"(block {report['block_size']}, T={report['temperature']}, {report['device']})"]
    for name, r in report["benchmarks"].items():
        hist = " ".join(f"{k}:{n}" for k, n in enumerate(r["histogram"]) if k and n)
        check = "" if r["mismatches"] is None else f"  spec!=AR: {r['mismatches']}"
        lines.append(f"{name:10s} tau {r['tau']:.3f}  spec {r['spec_tokens_per_s']:.1f} tok/s  "
                     f"AR {r['ar_tokens_per_s']:.1f} tok/s  speedup {r['speedup']:.2f}x{check}")
        lines.append(f"{'':10s} acceptance lengths {hist}")
    return "\n".join(lines)
