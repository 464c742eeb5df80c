"""What a rollout records for the verify teacher and the rejected suffix (decode.Records'
first_vlogp, realized_vlogp, drafts, draft_logp, draft_vlogp) against brute force in float64: for
every verify step, a full forward over the sequence up to its anchor followed by the step's whole
draft block (the branch the verification saw, rejected drafts included); and the rollout rows and
replay arrays made from them."""

import jax
import numpy as np
import pytest
import references
from test_decode import (
    CFG,
    NEW,
    REF_BATCH,
    REF_WIDTH,
    P,
    greedy_reference,
    mid_stop,
    random_target,
    script_drafter,
)
from test_sampling import np_filtered_probs

from dpace_jax.infer import decode
from dpace_jax.infer.sampling import Sampling
from dpace_jax.train.opd import replay


def _np_logp(logits):
    x = np.asarray(logits, np.float64)
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(
        -1, keepdims=True))


def _np_vlogp(logits, sampling: Sampling):
    """float64 log-probs of the decoding's distribution, p = 0 as decode.VLOGP_FLOOR."""
    if sampling.greedy:
        best = np.argmax(logits, -1)
        return np.where(np.arange(logits.shape[-1]) == best[..., None], 0.0, decode.VLOGP_FLOOR)
    p = np_filtered_probs(logits, sampling.temperature, sampling.top_k, sampling.top_p)
    with np.errstate(divide="ignore"):
        return np.maximum(np.log(p), decode.VLOGP_FLOOR)


def _forwards(params, seqs):
    """float64 logits of each token list (padded into REF_BATCH x REF_WIDTH calls)."""
    fn = references.full_logits(CFG)
    out = []
    for i in range(0, len(seqs), REF_BATCH):
        group = seqs[i: i + REF_BATCH]
        arr = np.zeros((REF_BATCH, REF_WIDTH), np.int32)
        for r, s in enumerate(group):
            arr[r, : len(s)] = s
        logits = np.asarray(fn(params, arr), np.float64)
        out += [logits[r, : len(s)] for r, s in enumerate(group)]
    return out


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(0.8, "dflash", top_k=6)],
                         ids=["greedy", "T0.8-top6"])
def test_records_of_every_draft_match_branch_forwards(sampling):
    batch, k_block, seed = 4, 5, 21
    rs = np.random.RandomState(seed)
    params = random_target(seed)
    lengths = rs.randint(1, P + 1, batch)
    prompts = rs.randint(0, CFG.vocab_size, (batch, P))
    ref = greedy_reference(params, prompts, lengths, NEW + k_block)
    drafter = script_drafter(prompts, lengths, ref, k_block, 0.3, seed)
    res = decode.decode(params, CFG, drafter, prompts, lengths, max_new_tokens=NEW,
                        stop_token_ids=mid_stop(ref[0, :NEW]), sampling=sampling,
                        rng=jax.random.PRNGKey(seed), record=True,
                        min_batch=batch)  # the scripted drafter's tables are per row
    rec = jax.tree.map(np.asarray, res.records)
    scripted = np.where(np.asarray(drafter.params["flip"]), (np.asarray(drafter.params["seq"]) + 1)
                        % CFG.vocab_size, np.asarray(drafter.params["seq"]))
    seqs, branches, where = [], [], []
    for b in range(batch):
        n = int(res.num_tokens[b])
        seqs.append([*prompts[b, : lengths[b]], *np.asarray(res.tokens)[b, :n]])
        a = lengths[b]
        for s in range(int(res.num_steps[b])):
            assert rec.anchors[b, s] == a
            block = rec.drafts[b, s]
            assert block[0] == seqs[b][a]  # the anchor's token, then the scripted drafts
            np.testing.assert_array_equal(block[1:], scripted[b, a + 1: a + k_block])
            branches.append([*seqs[b][: a + 1], *block[1:]])
            where.append((b, s, a))
            a += int(rec.emitted[b, s])
    full = _forwards(params, seqs)
    for b in range(batch):
        lp, vlp = _np_logp(full[b]), _np_vlogp(full[b], sampling)
        np.testing.assert_allclose(rec.first_vlogp[b], vlp[lengths[b] - 1, seqs[b][lengths[b]]],
                                   atol=1e-4)
    suffixes = 0
    for (b, s, a), branch, logits in zip(where, branches, _forwards(params, branches),
                                         strict=True):
        lp, vlp = _np_logp(logits), _np_vlogp(logits, sampling)
        j = np.arange(1, k_block)
        np.testing.assert_allclose(rec.draft_logp[b, s, 1:], lp[a + j - 1, branch[a + 1:]],
                                   atol=1e-4, err_msg=f"row {b} step {s}")
        np.testing.assert_allclose(rec.draft_vlogp[b, s, 1:], vlp[a + j - 1, branch[a + 1:]],
                                   atol=1e-4, rtol=1e-6, err_msg=f"row {b} step {s}")
        assert rec.draft_logp[b, s, 0] == 0 and rec.draft_vlogp[b, s, 0] == 0
        n = int(rec.emitted[b, s])
        seq_v = _np_vlogp(full[b], sampling)
        want = [seq_v[a + i, seqs[b][a + i + 1]] for i in range(n)]
        np.testing.assert_allclose(rec.realized_vlogp[b, s, :n], want, atol=1e-4, rtol=1e-6)
        suffixes += rec.rejected[b, s] >= 0 and n < k_block - 1
    assert suffixes >= 3

    rows = replay.rows_from_result(jax.tree.map(np.asarray, res), [
        list(prompts[b, : lengths[b]]) for b in range(batch)])
    for b, row in enumerate(rows):
        blocks = replay.blocks(row, k_block)
        assert blocks[0].realized_vlogp == (pytest.approx(float(rec.first_vlogp[b])),)
        for s, blk in enumerate(blocks[1:]):
            e = len(blk.realized_logp)
            if blk.rejected < 0:
                assert blk.suffix == () and blk.rejected_vlogp == 0
                continue
            assert blk.suffix == tuple(int(t) for t in rec.drafts[b, s, e + 1:])
            assert blk.suffix_logp == pytest.approx(rec.draft_logp[b, s, e + 1:].tolist())
            assert blk.suffix_vlogp == pytest.approx(rec.draft_vlogp[b, s, e + 1:].tolist())
            assert blk.rejected_vlogp == pytest.approx(float(rec.draft_vlogp[b, s, e]))


# prompt 3, response 7, block size 4, as tests/test_opd.py's ROW, with the extra fields: step 0
# rejects 98 at offset 2 and its suffix is 97 at offset 3; step 1 accepts every draft.
ROW = {"prompt": [5, 6, 7], "response": [10, 11, 12, 13, 14, 15, 16], "first_logp": -0.5,
       "anchors": [3, 5], "emitted": [2, 4], "realized_logp": [[-0.1, -0.2], [-1, -2, -3, -4]],
       "rejected": [98, -1], "rejected_logp": [-7.0, 0.0], "first_vlogp": 0.0,
       "realized_vlogp": [[0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], "rejected_vlogp": [-1e9, 0.0],
       "suffix": [[97], []], "suffix_logp": [[-6.0], []], "suffix_vlogp": [[0.0], []]}


def test_replay_arrays_of_the_suffix_and_the_verify_log_probs():
    batch, _ = replay.replay_batch([ROW], block_size=4, seq_len=12, num_blocks=4)
    assert batch["sfx_mask"][0].astype(int).tolist() == [[0] * 4, [0, 0, 0, 1], [0] * 4, [0] * 4]
    assert batch["sfx_token"][0, 1, 3] == 97 and batch["logp_sfx"][0, 1, 3] == -6.0
    assert batch["vlogp_rej"][0, 1] == np.float32(-1e9)
    assert batch["vlogp_real"][0, 2].tolist() == [0, 0, 0, 0] and batch["rej_offset"][0, 1] == 2
    # the suffix is cut where the sequence ends, as the first rejected draft is
    cut, _ = replay.replay_batch([ROW], block_size=4, seq_len=6, num_blocks=4)
    assert cut["rej_mask"][0, 1] and not cut["sfx_mask"][0].any()
    old = {k: v for k, v in ROW.items() if k not in replay.EXTRA_FIELDS}
    plain, _ = replay.replay_batch([old], block_size=4, seq_len=12, num_blocks=4)
    assert not plain["sfx_mask"].any() and plain["rej_mask"][0, 1]
    with pytest.raises(ValueError, match=r"rollouts.jsonl \(index 0\): missing field\(s\) "
                                         r"\['first_vlogp'.*opd.teacher=verify"):
        replay.replay_batch([old], block_size=4, seq_len=12, num_blocks=4, need_extra=True,
                            where="rollouts.jsonl")
    with pytest.raises(ValueError, match=r"row: missing field\(s\) \['suffix_vlogp'\]"):
        replay.blocks({k: v for k, v in ROW.items() if k != "suffix_vlogp"}, 4, "row")
    with pytest.raises(ValueError, match=r"step 0 .*suffix / suffix_logp / suffix_vlogp of "
                                         r"\(2, 1, 1\) entries \(1 expected"):
        replay.blocks({**ROW, "suffix": [[97, 96], []]}, 4, "row")
