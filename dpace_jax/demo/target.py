"""The embedded demo target: a small Qwen3 causal LM trained here on the standard library.

`build_demo_target(out_dir, size)` collects the corpus (dpace_jax.demo.corpus), trains the
tokenizer (dpace_jax.demo.tokenizer), trains the LM with next-token cross-entropy on a mix of raw
source windows and chat-formatted function tasks (user: signature + docstring, assistant: the body
in a code fence, ending with `<|im_end|>`), and saves an ordinary HF checkpoint directory
(config.json with architectures ["Qwen3ForCausalLM"], model.safetensors, tokenizer files) through
dpace_jax.targets.hf.save_target. `build_random_target` saves a tiny random-weight target the same
way (tests and the tiny config).

Both are cached: a build is staged in a hidden sibling directory, `demo_build.json` (the settings
and their hash) is written last, and the directory is renamed into place; a later call with the
same settings and corpus returns at once, and an interrupted build leaves nothing at `out_dir`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpace_jax.demo import corpus as corpus_lib
from dpace_jax.demo.tokenizer import IM_END, PAD, build_tokenizer
from dpace_jax.io.atomic import atomic_dir
from dpace_jax.targets import hf as convert
from dpace_jax.targets import model

MARKER = "demo_build.json"
BUILD_VERSION = 2  # bump when the build recipe changes, so cached builds are redone


@dataclasses.dataclass(frozen=True)
class DemoSize:
    # model
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    # training
    seq_len: int
    batch_size: int
    steps: int
    learning_rate: float
    warmup_frac: float = 0.05
    weight_decay: float = 0.1
    chat_fraction: float = 0.5  # share of batch rows that start at a chat-formatted task
    compute_dtype: str = "float32"
    save_dtype: str = "float32"
    # corpus (None: the whole filtered standard library)
    max_corpus_bytes: int | None = None
    # more ModelConfig fields (name, value): another architecture than Qwen3
    model_extra: tuple = ()


DEMO_SIZES: dict[str, DemoSize] = {
    # ~2.7 minutes on an idle 2-core CPU, 1.2M training tokens; greedy answers vary and about
    # half end with <|im_end|> (fewer steps or a higher rate gave prompt-independent loops).
    "cpu": DemoSize(vocab_size=2048, hidden_size=128, intermediate_size=384, num_layers=4,
                    num_heads=4, num_kv_heads=2, head_dim=32, seq_len=256, batch_size=8,
                    steps=600, learning_rate=3e-3, chat_fraction=0.75),
    # ~30M parameters, 33M training tokens: a few minutes on one H100 (not yet timed there).
    "gpu": DemoSize(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_layers=8,
                    num_heads=8, num_kv_heads=4, head_dim=64, seq_len=512, batch_size=32,
                    steps=2000, learning_rate=1.5e-3, compute_dtype="bfloat16",
                    save_dtype="bfloat16"),
}
# The cpu recipe with a Qwen3.5 hybrid target (dpace_jax/targets/qwen3_5/parts.py): three
# gated-DeltaNet layers and one gated-attention layer with RoPE on a quarter of each head.
DEMO_SIZES["cpu-qwen3.5"] = dataclasses.replace(DEMO_SIZES["cpu"], model_extra=(
    ("arch", "qwen3_5"), ("partial_rotary_factor", 0.25),
    ("layer_types", ("linear_attention",) * 3 + ("full_attention",)),
    ("linear_num_key_heads", 2), ("linear_num_value_heads", 4), ("linear_key_head_dim", 32),
    ("linear_value_head_dim", 32), ("linear_conv_kernel_dim", 4)))

RANDOM_DEFAULTS = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=3,
                       num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True)
RANDOM_CORPUS_BYTES = 200_000

# One compiled program per config (eager init compiles every random op separately).
_init_params = jax.jit(model.init_params, static_argnums=(0, 2))


# ----------------------------------------------------------------------------- the cache


def _settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def read_marker(out_dir: str | os.PathLike) -> dict | None:
    """The build record of a complete build at out_dir, or None."""
    path = Path(out_dir) / MARKER
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _cached_build(out_dir, settings: dict, build: Callable[[Path], dict]) -> Path:
    """Return out_dir if it holds a complete build of `settings`, else run build(staging) and
    move the staging directory into place, with the marker written last."""
    out = Path(out_dir).expanduser().absolute()
    digest = _settings_hash(settings)
    marker = read_marker(out)
    if marker is not None and marker.get("hash") == digest:
        return out
    if out.exists() and marker is None and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not a demo build (no {MARKER}); refusing to "
                         "overwrite it: pass an empty or new directory")
    with atomic_dir(out, lambda p: (read_marker(p) or {}).get("hash") == digest) as staging:
        record = {"hash": digest, "settings": settings, **build(staging)}
        (staging / MARKER).write_text(json.dumps(record, indent=2) + "\n")
    return out


# ----------------------------------------------------------------------------- data


MODEL_FIELDS = frozenset(f.name for f in dataclasses.fields(model.ModelConfig))


def _model_config(**sizes) -> model.ModelConfig:
    """Tied embeddings and 4096 positions unless `sizes` (ModelConfig fields) say otherwise."""
    return model.ModelConfig.make(**{"tie_word_embeddings": True, "max_position_embeddings": 4096,
                                **sizes})


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    encoded = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    return [e.ids for e in encoded]


def _save(params, cfg, staging: Path, tokenizer, dtype) -> None:
    convert.save_target(params, cfg, staging, tokenizer=tokenizer, dtype=dtype)
    ids = tokenizer.convert_tokens_to_ids
    generation = {"eos_token_id": [ids(IM_END), ids(PAD)], "pad_token_id": ids(PAD),
                  "do_sample": False}
    (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def chat_text(tokenizer, task: corpus_lib.FunctionTask) -> str:
    """A task rendered as one conversation (what generation sees with enable_thinking=False)."""
    messages = [{"role": "user", "content": task.prompt},
                {"role": "assistant", "content": task.answer}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


class Batches:
    """Seeded training windows [batch, seq_len + 1]: rows are either a random window of the
    source stream (files joined by <|endoftext|>) or, with probability chat_fraction, a window of
    the chat stream (conversations joined by <|endoftext|>) starting at a conversation."""

    def __init__(self, source: np.ndarray, chat: np.ndarray, chat_starts: np.ndarray,
                 size: DemoSize, seed: int):
        self.n = size.seq_len + 1
        if len(source) < self.n + 1:
            raise ValueError(f"the corpus has {len(source)} tokens, fewer than seq_len + 2")
        self.source, self.chat_starts = source, chat_starts
        self.chat = np.concatenate([chat, chat[: self.n]]) if len(chat) else chat
        self.size, self.rng = size, np.random.default_rng(seed)

    def next(self) -> np.ndarray:
        rows = np.empty((self.size.batch_size, self.n), np.int32)
        for r in range(self.size.batch_size):
            if len(self.chat_starts) and self.rng.random() < self.size.chat_fraction:
                s = int(self.chat_starts[self.rng.integers(len(self.chat_starts))])
                stream = self.chat
            else:
                s, stream = int(self.rng.integers(len(self.source) - self.n)), self.source
            window = stream[s : s + self.n]
            if len(window) < self.n:  # a chat stream shorter than one window
                window = np.resize(window, self.n)
            rows[r] = window
        return rows


def _prepare_data(size: DemoSize, files, tokenizer, seed: int):
    pad = tokenizer.convert_tokens_to_ids(PAD)
    source = np.fromiter(
        (t for ids in _encode(tokenizer, [f.text for f in files]) for t in (*ids, pad)),
        np.int32)
    train_tasks, _ = corpus_lib.split_tasks(corpus_lib.extract_tasks(files), seed=seed)
    convs = _encode(tokenizer, [chat_text(tokenizer, t) for t in train_tasks])
    convs = [ids + [pad] for ids in convs if len(ids) < size.seq_len]
    chat = np.fromiter((t for ids in convs for t in ids), np.int32)
    starts = np.cumsum([0] + [len(ids) for ids in convs[:-1]]).astype(np.int64)
    return source, chat, starts if convs else np.zeros((0,), np.int64), len(train_tasks)


# ----------------------------------------------------------------------------- training


def make_optimizer(size: DemoSize, steps: int) -> optax.GradientTransformation:
    warmup = min(max(1, round(size.warmup_frac * steps)), steps - 1) if steps > 1 else 0
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, size.learning_rate, warmup, max(steps, warmup + 1), size.learning_rate * 0.1)

    def decay_mask(params):  # decay matrices, not norms
        return jax.tree.map(lambda p: p.ndim >= 2, params)

    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, b1=0.9, b2=0.95,
                                   weight_decay=size.weight_decay, mask=decay_mask))


@functools.lru_cache(maxsize=4)
def make_train_step(cfg: model.ModelConfig, size: DemoSize, steps: int):
    """(optimizer, jitted step(params, opt_state, tokens [B, T + 1]) -> (params, opt_state,
    loss)); cached, so equal settings reuse the compiled step."""
    opt = make_optimizer(size, steps)
    compute_dtype = jnp.dtype(size.compute_dtype)

    def loss_fn(params, tokens):  # tokens [B, T + 1]
        cast = jax.tree.map(lambda p: p.astype(compute_dtype), params)
        logits = model.forward(cast, cfg, tokens[:, :-1]).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return opt, jax.jit(step, donate_argnums=(0, 1))


def train(params, cfg, size: DemoSize, batches: Batches, steps: int, progress: bool):
    """Run `steps` optimizer steps; returns (params, list of per-step losses)."""
    from tqdm.auto import tqdm

    opt, step = make_train_step(cfg, size, steps)
    opt_state = opt.init(params)
    losses, pending = [], []
    bar = tqdm(total=steps, desc="demo target", unit="step", disable=not progress)
    try:
        for i in range(steps):
            params, opt_state, loss = step(params, opt_state, batches.next())
            pending.append(loss)
            if len(pending) == 10 or i == steps - 1:
                losses += [float(x) for x in pending]
                pending = []
                bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
            bar.update(1)
    finally:
        bar.close()
    return params, losses


# ----------------------------------------------------------------------------- builders


def build_demo_target(out_dir: str | os.PathLike, size: str | DemoSize = "cpu", seed: int = 0,
                      steps: int | None = None, progress: bool = True) -> Path:
    """Build (or find cached) the demo target at out_dir; returns the checkpoint directory.

    size: a DEMO_SIZES name or a DemoSize. steps: optimizer steps (default size.steps).
    """
    if isinstance(size, str):
        if size not in DEMO_SIZES:
            raise ValueError(f"unknown demo size {size!r}; expected one of {sorted(DEMO_SIZES)}")
        size = DEMO_SIZES[size]
    steps = size.steps if steps is None else int(steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    files = corpus_lib.collect_sources(max_total_bytes=size.max_corpus_bytes, seed=seed)
    fields = {k: v for k, v in dataclasses.asdict(size).items()
              if k != "model_extra" or v}  # without model_extra, the hash of older builds
    settings = {"kind": "demo", "version": BUILD_VERSION, "size": fields,
                "seed": seed, "steps": steps, "corpus": corpus_lib.corpus_fingerprint(files)}

    def build(staging: Path) -> dict:
        t0 = time.perf_counter()
        tokenizer = build_tokenizer((f.text for f in files), size.vocab_size)
        source, chat, starts, n_tasks = _prepare_data(size, files, tokenizer, seed)
        cfg = _model_config(**{k: v for k, v in dataclasses.asdict(size).items()
                               if k in MODEL_FIELDS}, **dict(size.model_extra))
        params = _init_params(cfg, jax.random.key(seed), jnp.float32)
        batches = Batches(source, chat, starts, size, seed)
        params, losses = train(params, cfg, size, batches, steps, progress)
        if not all(math.isfinite(x) for x in losses):
            raise FloatingPointError("demo target training diverged (non-finite loss)")
        _save(params, cfg, staging, tokenizer, jnp.dtype(size.save_dtype))
        return {"final_loss": float(np.mean(losses[-10:])), "first_loss": losses[0],
                "seconds": round(time.perf_counter() - t0, 1),
                "corpus_files": len(files), "corpus_tokens": int(len(source)),
                "chat_tasks": int(len(starts)), "train_tasks": n_tasks,
                "tokens_seen": steps * size.batch_size * size.seq_len}

    return _cached_build(out_dir, settings, build)


def build_random_target(out_dir: str | os.PathLike, seed: int = 0, **sizes) -> Path:
    """A tiny random-weight Qwen3 target with the demo tokenizer (trained on a small corpus
    slice); `sizes` override RANDOM_DEFAULTS (any ModelConfig field). Cached like the demo."""
    fields = MODEL_FIELDS - {"arch", "qk_norm", "rope_scaling"}
    unknown = sorted(set(sizes) - fields)
    if unknown:
        raise ValueError(f"build_random_target: unknown size argument(s) {unknown}; "
                         f"expected ModelConfig fields {sorted(fields)}")
    sizes = {**RANDOM_DEFAULTS, **sizes}
    files = corpus_lib.collect_sources(max_total_bytes=RANDOM_CORPUS_BYTES, seed=seed)
    settings = {"kind": "random", "version": BUILD_VERSION, "sizes": sizes, "seed": seed,
                "corpus": corpus_lib.corpus_fingerprint(files)}

    def build(staging: Path) -> dict:
        tokenizer = build_tokenizer((f.text for f in files), sizes["vocab_size"])
        cfg = _model_config(**sizes)
        if len(tokenizer) > cfg.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens > vocab_size "
                             f"{cfg.vocab_size}")
        params = _init_params(cfg, jax.random.key(seed), jnp.float32)
        _save(params, cfg, staging, tokenizer, jnp.float32)
        return {"corpus_files": len(files)}

    return _cached_build(out_dir, settings, build)
