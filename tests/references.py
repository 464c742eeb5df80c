"""Independent references shared by the tests.

`greedy_reference` is brute-force greedy decoding of the target: every new token is the argmax of
a fresh causal forward over the whole sequence (no cache, no rollback), so it shares nothing with
the cached speculative decoder under test but the model's forward.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import numpy as np

from dpace_jax import model


@functools.lru_cache
def full_logits(cfg: model.ModelConfig):
    """A jitted `(params, tokens [B, T]) -> logits [B, T, V]` causal forward of the target."""
    return jax.jit(lambda params, tokens: model.forward(params, cfg, tokens).logits)


def greedy_reference(params, cfg: model.ModelConfig, prompts: Sequence[Sequence[int]],
                     max_new: int, stop_ids=(), *, rows: int | None = None,
                     width: int | None = None) -> list[list[int]]:
    """Per prompt, the greedy continuation: up to and including the first token in stop_ids, at
    most max_new tokens. The batch is padded to `rows` rows of `width` positions (default: the
    prompts, the longest rounded up to 128) so that callers can share one compiled forward."""
    stops = set(stop_ids)
    rows = rows or len(prompts)
    need = max(len(p) for p in prompts) + max_new
    width = width or 128 * -(-need // 128)
    assert len(prompts) <= rows and need <= width, (len(prompts), rows, need, width)
    seqs = np.zeros((rows, width), np.int32)
    lens = np.ones(rows, np.int64)
    for b, p in enumerate(prompts):
        seqs[b, : len(p)] = p
        lens[b] = len(p)
    out = [[] for _ in prompts]
    live = [True] * len(prompts)
    for _ in range(max_new):
        logits = np.asarray(full_logits(cfg)(params, seqs))
        nxt = np.argmax(logits[np.arange(rows), lens - 1], axis=-1)
        seqs[np.arange(rows), lens] = nxt
        lens += 1
        for b in range(len(prompts)):
            if live[b]:
                out[b].append(int(nxt[b]))
                live[b] = int(nxt[b]) not in stops
        if not any(live):
            break
    return out
