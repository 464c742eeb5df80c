"""Rollout rows -> replay batches for on-policy training (Draft-OPD; docs/design.md §9).

A rollout row (one prompt decoded speculatively with `decode(record=True)`, see
`dpace_jax.train.opd.rollout`) holds the prompt and response token ids and, per verify step s, the
anchor, the number of tokens the step emitted, the target's log-probs of them, and the first
rejected draft token with its log-prob (-1 / 0 when the step rejected none).

Its blocks are anchored at the block boundaries the drafter itself induced: the last prompt
position (supervised on the prefill's token alone), then every step's anchor (the position of the
target's own token that ended the step before). A step's block is supervised on the tokens it
emitted, at offsets 1..min(emitted, K-1) (an all-accepted step's bonus token lies past the block),
and on its rejected draft at offset emitted (= acc + 1) when there is one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

FIELDS = ("prompt", "response", "first_logp", "anchors", "emitted", "realized_logp", "rejected",
          "rejected_logp")


@dataclasses.dataclass(frozen=True)
class Block:
    anchor: int
    realized_logp: tuple[float, ...]  # at offsets 1..len (the tokens anchor+1..)
    rejected: int = -1  # the rejected draft token at offset len(realized_logp), -1: none
    rejected_logp: float = 0.0


def blocks(row: dict, block_size: int, where: str = "rollout row") -> list[Block]:
    """The replay blocks of one rollout row; a row that is not self-consistent raises
    ValueError naming `where` and the field."""
    missing = [f for f in FIELDS if f not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")
    prompt, response = row["prompt"], row["response"]
    steps = len(row["anchors"])
    if not prompt or not response:
        raise ValueError(f"{where}: empty prompt or response")
    for f in ("emitted", "realized_logp", "rejected", "rejected_logp"):
        if len(row[f]) != steps:
            raise ValueError(f"{where}: field {f!r} has {len(row[f])} entries for {steps} steps")
    out = [Block(len(prompt) - 1, (float(row["first_logp"]),))]
    anchor = len(prompt)
    for s in range(steps):
        n, logps = int(row["emitted"][s]), row["realized_logp"][s]
        if int(row["anchors"][s]) != anchor or not 1 <= n <= block_size or len(logps) != n:
            raise ValueError(f"{where}: step {s} (anchor {row['anchors'][s]}, emitted {n}, "
                             f"{len(logps)} log-probs) does not continue the steps before it "
                             f"(anchor {anchor} expected, 1..{block_size} tokens)")
        rejected = int(row["rejected"][s])
        if rejected >= 0 and n > block_size - 1:
            raise ValueError(f"{where}: step {s} rejects a draft after accepting every one")
        out.append(Block(anchor, tuple(float(x) for x in logps[: block_size - 1]), rejected,
                         float(row["rejected_logp"][s]) if rejected >= 0 else 0.0))
        anchor += n
    if anchor != len(prompt) + len(response) - 1:
        raise ValueError(f"{where}: the steps emit {anchor - len(prompt) + 1} tokens, the "
                         f"response has {len(response)}")
    return out


def kept_blocks(row: dict, block_size: int, seq_len: int, num_blocks: int):
    """(the blocks of a row that a batch of S = seq_len positions and N = num_blocks blocks
    keeps, the number it drops): blocks anchored at or past S - 1, then all past the first N."""
    every = blocks(row, block_size)
    inside = [blk for blk in every if blk.anchor < seq_len - 1]
    return inside[:num_blocks], len(every) - min(len(inside), num_blocks)


def replay_batch(rows: Sequence[dict], *, block_size: int, seq_len: int, num_blocks: int,
                 pad_token_id: int = 0) -> tuple[dict[str, np.ndarray], int]:
    """Arrays of one train step from rollout rows -> (batch, blocks dropped).

    input_ids [B, S] (prompt + response, cut at S), anchors / keep [B, N] (kept blocks first),
    real_mask / logp_real [B, N, K], rej_token / rej_offset / logp_rej / rej_mask [B, N].
    Blocks past the first N of a row, and supervised positions at or past S, are dropped.
    """
    b_n, k = len(rows), block_size
    out = {
        "input_ids": np.full((b_n, seq_len), pad_token_id, np.int32),
        "anchors": np.zeros((b_n, num_blocks), np.int32),
        "keep": np.zeros((b_n, num_blocks), bool),
        "real_mask": np.zeros((b_n, num_blocks, k), bool),
        "logp_real": np.zeros((b_n, num_blocks, k), np.float32),
        "rej_token": np.zeros((b_n, num_blocks), np.int32),
        "rej_offset": np.ones((b_n, num_blocks), np.int32),
        "logp_rej": np.zeros((b_n, num_blocks), np.float32),
        "rej_mask": np.zeros((b_n, num_blocks), bool),
    }
    dropped = 0
    for b, row in enumerate(rows):
        tokens = [*row["prompt"], *row["response"]][:seq_len]
        out["input_ids"][b, : len(tokens)] = tokens
        kept, lost = kept_blocks(row, k, seq_len, num_blocks)
        dropped += lost
        for n, blk in enumerate(kept):
            real = np.asarray(blk.realized_logp[: seq_len - 1 - blk.anchor], np.float32)
            out["anchors"][b, n], out["keep"][b, n] = blk.anchor, True
            out["real_mask"][b, n, 1: 1 + len(real)] = True
            out["logp_real"][b, n, 1: 1 + len(real)] = real
            offset = len(blk.realized_logp)
            if blk.rejected >= 0 and blk.anchor + offset < seq_len:
                out["rej_token"][b, n], out["rej_offset"][b, n] = blk.rejected, offset
                out["logp_rej"][b, n], out["rej_mask"][b, n] = blk.rejected_logp, True
    return out, dropped


def rows_from_result(result, prompts: Sequence[Sequence[int]]) -> list[dict]:
    """Rollout rows (FIELDS plus `acceptance`, acc + 1 per step) from a `decode(record=True)`
    result on host arrays, for its first len(prompts) sequences."""
    r = result.records
    rows = []
    for b, prompt in enumerate(prompts):
        steps, n = int(result.num_steps[b]), int(result.num_tokens[b])
        emitted = [int(e) for e in r.emitted[b, :steps]]
        rows.append({
            "prompt": [int(t) for t in prompt],
            "response": [int(t) for t in result.tokens[b, :n]],
            "first_logp": float(r.first_logp[b]),
            "anchors": [int(a) for a in r.anchors[b, :steps]],
            "emitted": emitted,
            "realized_logp": [[float(x) for x in r.realized_logp[b, s, :e]]
                              for s, e in enumerate(emitted)],
            "rejected": [int(t) for t in r.rejected[b, :steps]],
            "rejected_logp": [float(x) for x in r.rejected_logp[b, :steps]],
            "acceptance": [int(a) for a in result.acceptance[b, :steps]],
        })
    return rows
