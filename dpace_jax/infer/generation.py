"""Generation shared by evaluation and data regeneration: prompts rendered with the chat
template, stop tokens, drafters loaded and checked against the target, and batched decoding.

`Generator` decodes token prompts with fixed settings through `dpace_jax.infer.decode`;
`load_drafter` reads a DFlash HF directory or a training run directory (its latest Orbax checkpoint,
else its `hf/` export) and `check_drafter` refuses, naming the field, a drafter that cannot serve
the target.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpace_jax.data.chat import TEMPLATE_KWARGS
from dpace_jax.drafters import dflash as drafter_lib
from dpace_jax.drafters import drafter_family
from dpace_jax.drafters import hf as drafter_hf
from dpace_jax.infer import decode
from dpace_jax.infer.sampling import GREEDY, Sampling
from dpace_jax.targets import hf as convert
from dpace_jax.targets.model import ModelConfig
from dpace_jax.train.checkpoint import checksums

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


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (sorted, stable): a batch is padded to its
    longest prompt, so sorted batches pad little."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


WINDOW_BATCHES = 8  # regeneration and rollouts sort this many batches of prompts at a time


def windows(num_items: int, batch_size: int, done: int = 0,
            window_batches: int | None = None) -> list[range]:
    """The items from the window holding item `done` on, in windows of window_batches *
    batch_size consecutive items: regeneration and rollouts sort each window into length
    batches (length_batches) and write its rows in the input's order, so that a file still
    grows in order and resumes at a window's start."""
    size = batch_size * (WINDOW_BATCHES if window_batches is None else window_batches)
    return [range(start, min(start + size, num_items))
            for start in range(done - done % size, num_items, size)]


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


def _restore_params(manager, step: int, dcfg: drafter_lib.DrafterConfig):
    """The drafter params of a checkpoint step, verified against the step's checksums."""
    import orbax.checkpoint as ocp

    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"params": jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=sharding),
        drafter_family(dcfg.arch).schema.abstract(dcfg))}
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True),
        meta=ocp.args.JsonRestore()))
    params, want = restored["state"]["params"], restored["meta"].get("checksums") or {}
    got = {".params" + k: v for k, v in checksums(params).items()}
    bad = sorted(k for k in got if k in want and want[k] != got[k])
    if bad:
        raise ValueError(f"checksum mismatch in {bad[:3]}")
    return params


def _restore_checkpoint(ckpt_dir: Path, dcfg: drafter_lib.DrafterConfig):
    """(step, drafter params) of the newest step that restores (a damaged step is named in a
    warning and skipped, never changed), or None when there is none."""
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(ckpt_dir.absolute(),
                                    options=ocp.CheckpointManagerOptions(create=False))
    try:
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                return step, _restore_params(manager, step, dcfg)
            except Exception as e:  # Orbax / tensorstore / JSON errors share no base class
                print(f"warning: {ckpt_dir / str(step)}: cannot restore ({type(e).__name__}: "
                      f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}); "
                      "trying an older checkpoint", file=sys.stderr)
        return None
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


def as_decoder(loaded: LoadedDrafter, target_cfg: ModelConfig, dtype, *,
               selector: bool = True) -> decode.Drafter:
    """The decoder's drafter of `loaded`, its weights in `dtype` (`selector=False`: a DFlash 2
    drafter drafts its unary argmax instead of walking its candidate selector)."""
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), loaded.params)
    return decode.dflash_drafter(params, loaded.config, target_cfg, source=loaded.source,
                                 selector=selector)


def open_target(target: str, drafter, dtype, *, max_new_tokens: int, batch_size: int,
                sampling: Sampling = GREEDY, selector: bool = True):
    """What evaluation and regeneration decode with: the target (HF directory or hub id) in
    `dtype` behind a Generator, its tokenizer, and the drafter at `drafter` (None: none), loaded
    and checked before the target's weights are read -> (target_dir, tokenizer, generator,
    LoadedDrafter or None, decode.Drafter or None)."""
    target_dir = convert.resolve_checkpoint(target)
    tokenizer = convert.load_tokenizer(target_dir)
    target_cfg = convert.load_config(target_dir)
    loaded = spec = None
    if drafter:
        loaded = load_drafter(drafter)
        check_drafter(loaded, target_cfg, tokenizer, max_new_tokens=max_new_tokens)
        spec = as_decoder(loaded, target_cfg, dtype, selector=selector)
    target_params, _ = convert.load_target(target_dir, dtype=dtype)
    gen = Generator(target_params, target_cfg, stop_token_ids(tokenizer),  # BUCKET read now
                    int(tokenizer.pad_token_id or 0), max_new_tokens, batch_size, sampling,
                    bucket=BUCKET)
    return target_dir, tokenizer, gen, loaded, spec


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
    sampling: Sampling = GREEDY
    bucket: int = BUCKET
    warm: set = dataclasses.field(default_factory=set)

    def _call(self, drafter, prompts, lengths, key, max_new):
        out = decode.decode(self.target_params, self.target_cfg, drafter, prompts, lengths,
                            max_new_tokens=max_new, sampling=self.sampling,
                            stop_token_ids=self.stop_ids,
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
