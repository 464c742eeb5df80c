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
# What the verification-matched teacher (opd.teacher=verify) and the rejected suffix
# (opd.rejected_stream=suffix) read; rows rolled out before they existed lack them ("vlogp": the
# log-prob under the rollout's own decoding distribution, decode.Records).
EXTRA_FIELDS = ("first_vlogp", "realized_vlogp", "rejected_vlogp", "suffix", "suffix_logp",
                "suffix_vlogp")


@dataclasses.dataclass(frozen=True)
class Block:
    anchor: int
    realized_logp: tuple[float, ...]  # at offsets 1..len (the tokens anchor+1..)
    rejected: int = -1  # the rejected draft token at offset len(realized_logp), -1: none
    rejected_logp: float = 0.0
    realized_vlogp: tuple[float, ...] = ()  # () when the row has no EXTRA_FIELDS
    rejected_vlogp: float = 0.0
    suffix: tuple[int, ...] = ()  # the drafts after the rejected one, at offsets len + 1..
    suffix_logp: tuple[float, ...] = ()
    suffix_vlogp: tuple[float, ...] = ()


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
    extra = any(f in row for f in EXTRA_FIELDS)
    if extra and not all(f in row for f in EXTRA_FIELDS):
        raise ValueError(f"{where}: missing field(s) {[f for f in EXTRA_FIELDS if f not in row]}")
    per_step = ("emitted", "realized_logp", "rejected", "rejected_logp")
    for f in per_step + (EXTRA_FIELDS[1:] if extra else ()):
        if len(row[f]) != steps:
            raise ValueError(f"{where}: field {f!r} has {len(row[f])} entries for {steps} steps")
    out = [Block(len(prompt) - 1, (float(row["first_logp"]),),
                 realized_vlogp=(float(row["first_vlogp"]),) if extra else ())]
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
        blk = Block(anchor, tuple(float(x) for x in logps[: block_size - 1]), rejected,
                    float(row["rejected_logp"][s]) if rejected >= 0 else 0.0)
        if extra:
            blk = _with_extra(blk, row, s, n, block_size, where)
        out.append(blk)
        anchor += n
    if anchor != len(prompt) + len(response) - 1:
        raise ValueError(f"{where}: the steps emit {anchor - len(prompt) + 1} tokens, the "
                         f"response has {len(response)}")
    return out


def _with_extra(blk: Block, row: dict, s: int, n: int, block_size: int, where: str) -> Block:
    """blk with step s's EXTRA_FIELDS; the suffix must fill the block after the rejected draft."""
    vlogps, suffix = row["realized_vlogp"][s], [int(t) for t in row["suffix"][s]]
    want = block_size - 1 - n if blk.rejected >= 0 else 0
    sizes = (len(suffix), len(row["suffix_logp"][s]), len(row["suffix_vlogp"][s]))
    if len(vlogps) != n or sizes != (want,) * 3:
        raise ValueError(f"{where}: step {s} has {len(vlogps)} realized_vlogp for {n} tokens and "
                         f"suffix / suffix_logp / suffix_vlogp of {sizes} entries ({want} "
                         "expected: the drafts after the rejected one)")
    return dataclasses.replace(
        blk, realized_vlogp=tuple(float(x) for x in vlogps[: block_size - 1]),
        rejected_vlogp=float(row["rejected_vlogp"][s]) if blk.rejected >= 0 else 0.0,
        suffix=tuple(suffix), suffix_logp=tuple(float(x) for x in row["suffix_logp"][s]),
        suffix_vlogp=tuple(float(x) for x in row["suffix_vlogp"][s]))


def kept_blocks(row: dict, block_size: int, seq_len: int, num_blocks: int):
    """(the blocks of a row that a batch of S = seq_len positions and N = num_blocks blocks
    keeps, the number it drops): blocks anchored at or past S - 1, then all past the first N."""
    every = blocks(row, block_size)
    inside = [blk for blk in every if blk.anchor < seq_len - 1]
    return inside[:num_blocks], len(every) - min(len(inside), num_blocks)


def replay_batch(rows: Sequence[dict], *, block_size: int, seq_len: int, num_blocks: int,
                 pad_token_id: int = 0, need_extra: bool = False,
                 where: str = "rollout row") -> tuple[dict[str, np.ndarray], int]:
    """Arrays of one train step from rollout rows -> (batch, blocks dropped).

    input_ids [B, S] (prompt + response, cut at S), anchors / keep [B, N] (kept blocks first),
    real_mask / logp_real / vlogp_real [B, N, K], rej_token / rej_offset / logp_rej / vlogp_rej /
    rej_mask [B, N], and the rejected suffix sfx_token / logp_sfx / vlogp_sfx / sfx_mask
    [B, N, K] (the draft at block offset j in column j). Blocks past the first N of a row, and
    supervised positions at or past S, are dropped. The vlogp and suffix arrays are zeros /
    unmasked for rows without EXTRA_FIELDS; `need_extra` makes such a row an error instead.
    """
    b_n, k = len(rows), block_size
    per_block = (b_n, num_blocks, k)
    out = {
        "input_ids": np.full((b_n, seq_len), pad_token_id, np.int32),
        "anchors": np.zeros((b_n, num_blocks), np.int32),
        "keep": np.zeros((b_n, num_blocks), bool),
        "real_mask": np.zeros(per_block, bool),
        "logp_real": np.zeros(per_block, np.float32),
        "vlogp_real": np.zeros(per_block, np.float32),
        "rej_token": np.zeros((b_n, num_blocks), np.int32),
        "rej_offset": np.ones((b_n, num_blocks), np.int32),
        "logp_rej": np.zeros((b_n, num_blocks), np.float32),
        "vlogp_rej": np.zeros((b_n, num_blocks), np.float32),
        "rej_mask": np.zeros((b_n, num_blocks), bool),
        "sfx_token": np.zeros(per_block, np.int32),
        "logp_sfx": np.zeros(per_block, np.float32),
        "vlogp_sfx": np.zeros(per_block, np.float32),
        "sfx_mask": np.zeros(per_block, bool),
    }
    dropped = 0
    for b, row in enumerate(rows):
        if need_extra and not all(f in row for f in EXTRA_FIELDS):
            raise ValueError(f"{where} (index {row.get('index', b)}): missing field(s) "
                             f"{[f for f in EXTRA_FIELDS if f not in row]}, which opd.teacher="
                             "verify and opd.rejected_stream=suffix read (rolled out by an "
                             "older version: delete the rollout file to roll out again)")
        tokens = [*row["prompt"], *row["response"]][:seq_len]
        out["input_ids"][b, : len(tokens)] = tokens
        kept, lost = kept_blocks(row, k, seq_len, num_blocks)
        dropped += lost
        for n, blk in enumerate(kept):
            _fill_block(out, b, n, blk, seq_len)
    return out, dropped


def _fill_block(out: dict, b: int, n: int, blk: Block, seq_len: int) -> None:
    real = np.asarray(blk.realized_logp[: seq_len - 1 - blk.anchor], np.float32)
    out["anchors"][b, n], out["keep"][b, n] = blk.anchor, True
    out["real_mask"][b, n, 1: 1 + len(real)] = True
    out["logp_real"][b, n, 1: 1 + len(real)] = real
    if blk.realized_vlogp:
        out["vlogp_real"][b, n, 1: 1 + len(real)] = blk.realized_vlogp[: len(real)]
    offset = len(blk.realized_logp)
    if blk.rejected < 0 or blk.anchor + offset >= seq_len:
        return
    out["rej_token"][b, n], out["rej_offset"][b, n] = blk.rejected, offset
    out["logp_rej"][b, n], out["rej_mask"][b, n] = blk.rejected_logp, True
    out["vlogp_rej"][b, n] = blk.rejected_vlogp
    # the suffix obeys the same cut as the first rejected draft: offsets inside the sequence
    j = np.arange(offset + 1, offset + 1 + len(blk.suffix))
    inside = blk.anchor + j < seq_len
    j = j[inside]
    out["sfx_token"][b, n, j] = np.asarray(blk.suffix, np.int32)[inside]
    out["logp_sfx"][b, n, j] = np.asarray(blk.suffix_logp, np.float32)[inside]
    out["vlogp_sfx"][b, n, j] = np.asarray(blk.suffix_vlogp, np.float32)[inside]
    out["sfx_mask"][b, n, j] = True


def rows_from_result(result, prompts: Sequence[Sequence[int]]) -> list[dict]:
    """Rollout rows (FIELDS, EXTRA_FIELDS and `acceptance`, acc + 1 per step) from a
    `decode(record=True)` result on host arrays, for its first len(prompts) sequences."""
    r = result.records
    k = r.drafts.shape[-1]
    rows = []
    for b, prompt in enumerate(prompts):
        steps, n = int(result.num_steps[b]), int(result.num_tokens[b])
        emitted = [int(e) for e in r.emitted[b, :steps]]
        # the rejected suffix: the drafts after the first rejected one (offset e), when one was
        sfx = [range(e + 1, k) if r.rejected[b, s] >= 0 else range(0)
               for s, e in enumerate(emitted)]
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
            "first_vlogp": float(r.first_vlogp[b]),
            "realized_vlogp": [[float(x) for x in r.realized_vlogp[b, s, :e]]
                               for s, e in enumerate(emitted)],
            "rejected_vlogp": [float(r.draft_vlogp[b, s, e]) if r.rejected[b, s] >= 0 else 0.0
                               for s, e in enumerate(emitted)],
            "suffix": [[int(r.drafts[b, s, j]) for j in js] for s, js in enumerate(sfx)],
            "suffix_logp": [[float(r.draft_logp[b, s, j]) for j in js] for s, js in enumerate(sfx)],
            "suffix_vlogp": [[float(r.draft_vlogp[b, s, j]) for j in js]
                             for s, js in enumerate(sfx)],
        })
    return rows
