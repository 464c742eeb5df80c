"""DFlash 2's convolution and candidate selector (dpace_jax.drafters.dflash2.conv / .selector)
against float64 NumPy written from the published formulas, against the installed z-lab `dflash`
PyTorch modules, and their identity initialisations."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpace_jax.drafters.dflash2 import conv as C
from dpace_jax.drafters.dflash2 import selector as S

RTOL, ATOL = 1e-5, 1e-5


def rng(seed=0):
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------------------------
# float64 references, from the formulas (HF layouts: projection weights are [out, in])


def np_conv(x, base, d):
    """x [..., K, D], base [W, D], d [..., K, W, G]: sum_s (base[s] + d[t, s, g]) x[t - s]."""
    k, dim = x.shape[-2:]
    groups = d.shape[-1]
    out = np.zeros(x.shape)
    for t in range(k):
        for s in range(base.shape[0]):
            if t - s >= 0:  # before the block's first position: zero
                coef = base[s] + np.repeat(d[..., t, s, :], dim // groups, axis=-1)
                out[..., t, :] += coef * x[..., t - s, :]
    return out


def np_prepare_finish(x, y, base_hf, proj_hf):
    """(prepare(x), d, finish(y, d)) with the flattened projection output read as (2, W, G)."""
    taps = base_hf.shape[1]
    c = (x @ proj_hf.T).reshape(*x.shape[:-1], 2, taps, -1)
    d_out = c[..., 1, :, :]
    return np_conv(x, base_hf[0], c[..., 0, :, :]), d_out, np_conv(y, base_hf[1], d_out)


def np_scores(h, wp_hf, pred_cb, succ_cb, pred, cand_ids, cand_u):
    """u[c] + <pred_cb[p] * (W_p h), succ_cb[c]> for one position: h [D], cand [Z]."""
    return cand_u + (pred_cb[pred] * (wp_hf @ h)) @ succ_cb[cand_ids].T


def np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def small_selector(seed, dim=8, vocab=40, rank=4, succ_scale=1.0):
    r = rng(seed)
    wp = r.normal(size=(rank, dim))  # HF [R, D]
    pred_cb = r.normal(size=(vocab, rank))
    succ_cb = succ_scale * r.normal(size=(vocab, rank))
    params = S.from_hf(*(jnp.asarray(a, jnp.float32) for a in (wp, pred_cb, succ_cb)))
    return params, (wp, pred_cb, succ_cb)


# --------------------------------------------------------------------------------------------
# convolution


@jax.jit
def _prepare_finish(x, y, p):
    out, d = C.prepare(x, p)
    return out, d, C.finish(y, d, p)


@pytest.mark.parametrize("taps", [1, 2, 3])
def test_conv_matches_numpy(taps):
    r = rng(taps)
    b, n, k, dim = 2, 3, 4, 16
    x = r.normal(size=(b, n, k, dim))
    y = r.normal(size=(b, n, k, dim))
    for group_size in (1, 4, 16):
        groups = dim // group_size
        base_hf = r.normal(size=(2, taps, dim))
        proj_hf = 0.3 * r.normal(size=(2 * taps * groups, dim))
        p = C.from_hf(jnp.asarray(base_hf, jnp.float32), jnp.asarray(proj_hf, jnp.float32))
        assert C.shape_of(p) == (taps, dim, groups)
        out, d, fin = _prepare_finish(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), p)
        ref_out, ref_d, ref_fin = np_prepare_finish(x, y, base_hf, proj_hf)
        np.testing.assert_allclose(np.asarray(out), ref_out, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(np.asarray(d), ref_d, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(np.asarray(fin), ref_fin, rtol=RTOL, atol=ATOL)
        assert C.to_hf(p)["kernel_projection.weight"].shape == proj_hf.shape


def test_conv_stays_inside_its_block():
    r = rng(7)
    taps, dim, groups = 3, 8, 2
    x = r.normal(size=(1, 2, 4, dim)).astype(np.float32)
    base = jnp.asarray(r.normal(size=(taps, dim)), jnp.float32)
    d = jnp.asarray(r.normal(size=(1, 2, 4, taps, groups)), jnp.float32)
    out = np.asarray(C.conv(jnp.asarray(x), base, d))
    # block position 0 sees only itself: the taps before it read zeros, not the previous block
    coef0 = np.asarray(base[0]) + np.repeat(np.asarray(d[..., 0, 0, :]), dim // groups, -1)
    np.testing.assert_allclose(out[..., 0, :], coef0 * x[..., 0, :], rtol=RTOL, atol=ATOL)
    x2 = x.copy()
    x2[:, 0] += 100.0  # change block 0: block 1 must not move
    out2 = np.asarray(C.conv(jnp.asarray(x2), base, d))
    np.testing.assert_array_equal(out2[:, 1], out[:, 1])
    # a longer kernel than the block is allowed: its extra taps only read zeros
    x3 = jnp.asarray(x[..., :2, :])
    ref3 = np_conv(x[..., :2, :], np.asarray(base), np.asarray(d[..., :2, :, :]))
    np.testing.assert_allclose(np.asarray(C.conv(x3, base, d[..., :2, :, :])), ref3, rtol=RTOL,
                               atol=ATOL)


def test_conv_identity_init_is_exact():
    x = jnp.asarray(rng(3).normal(size=(2, 3, 5, 32)), jnp.bfloat16)
    for taps in (1, 2, 3):
        p = C.init(32, taps, 8, jnp.bfloat16)
        y, d, fin = _prepare_finish(x, x * 3, p)
        assert y.dtype == x.dtype and d.shape == (2, 3, 5, taps, 4)
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
        assert not np.any(np.asarray(d, np.float32))
        np.testing.assert_array_equal(np.asarray(fin), np.asarray(x * 3))


def test_conv_matches_dflash_torch():
    dm = pytest.importorskip("dflash.model")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    b, n, k, dim, taps, group_size = 2, 3, 5, 32, 3, 8
    mod = dm.GroupedDynamicCausalConv(dim, taps, group_size)
    with torch.no_grad():
        mod.base_kernel.normal_()
        mod.kernel_projection.weight.normal_(std=0.2)
    x = torch.randn(b * n, k, dim)  # one block per torch "sequence"
    y = torch.randn(b * n, k, dim)
    with torch.no_grad():
        t_out, t_d = mod.prepare(x)
        t_fin = mod.finish(y, t_d)
    p = C.from_hf(mod.base_kernel.detach().numpy(), mod.kernel_projection.weight.detach().numpy())
    out, d = C.prepare(jnp.asarray(x.numpy().reshape(b, n, k, dim)), p)
    fin = C.finish(jnp.asarray(y.numpy().reshape(b, n, k, dim)), d, p)
    np.testing.assert_allclose(np.asarray(out).reshape(b * n, k, dim), t_out.numpy(),
                               rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(d).reshape(t_d.shape), t_d.numpy(), rtol=RTOL,
                               atol=ATOL)
    np.testing.assert_allclose(np.asarray(fin).reshape(b * n, k, dim), t_fin.numpy(),
                               rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------------------------
# selector


def test_unary_scores_and_transition_scores():
    r = rng(11)
    dim, vocab, z = 8, 40, 5
    h = r.normal(size=(2, 3, dim))
    head = r.normal(size=(dim, vocab))
    logits = np.asarray(S.unary_logits(jnp.asarray(h, jnp.float32),
                                       jnp.asarray(head, jnp.float32), 0.3, 2.0))
    np.testing.assert_allclose(logits, 2.0 * np.tanh(0.3 * (h @ head) / 2.0), rtol=RTOL,
                               atol=ATOL)
    cand = S.top_candidates(jnp.asarray(logits), z)
    ref_ids = np.argsort(-logits, axis=-1, kind="stable")[..., :z]
    np.testing.assert_array_equal(np.asarray(cand.ids), ref_ids)
    params, (wp, pred_cb, succ_cb) = small_selector(12, dim, vocab)
    pred = r.integers(0, vocab, size=(2, 3))
    got = np.asarray(S.transition_scores(params, jnp.asarray(h, jnp.float32), jnp.asarray(pred),
                                         cand.ids, cand.scores))
    for i in np.ndindex(2, 3):
        ref = np_scores(h[i], wp, pred_cb, succ_cb, pred[i], ref_ids[i],
                        np.take(logits[i], ref_ids[i]))
        np.testing.assert_allclose(got[i], ref, rtol=RTOL, atol=ATOL)


def test_top_candidates_ties_and_gold():
    logits = jnp.asarray([[1.0, 3.0, 3.0, 0.5, 3.0]])
    cand = S.top_candidates(logits, 3, gold=jnp.asarray([4]))
    np.testing.assert_array_equal(np.asarray(cand.ids), [[1, 2, 4]])  # ties: lower id first
    assert bool(cand.gold_in[0]) and int(cand.gold_index[0]) == 2
    miss = S.top_candidates(logits, 3, gold=jnp.asarray([0]))
    assert not bool(miss.gold_in[0]) and int(miss.gold_index[0]) == -1


def _walk_inputs(seed, b, positions, dim, vocab, z, scale=1.0):
    r = rng(seed)
    h = r.normal(size=(b, positions, dim))
    logits = scale * r.normal(size=(b, positions, vocab))
    anchors = r.integers(0, vocab, size=(b,))
    cand = S.top_candidates(jnp.asarray(logits, jnp.float32), z)
    return h, logits, anchors, cand


def test_greedy_walk_matches_numpy():
    b, positions, dim, vocab, z = 3, 5, 8, 40, 6
    params, (wp, pred_cb, succ_cb) = small_selector(21, dim, vocab, succ_scale=2.0)
    h, logits, anchors, cand = _walk_inputs(22, b, positions, dim, vocab, z)
    walk = S.greedy_walk(params, jnp.asarray(h, jnp.float32), jnp.asarray(anchors), cand.ids,
                         cand.scores)
    ids = np.asarray(cand.ids)
    moved = 0
    for i in range(b):
        prev = anchors[i]
        for t in range(positions):
            sc = np_scores(h[i, t], wp, pred_cb, succ_cb, prev, ids[i, t], logits[i, t][ids[i, t]])
            c = int(np.argmax(sc))
            assert int(walk.index[i, t]) == c
            prev = ids[i, t, c]
            assert int(walk.tokens[i, t]) == prev
            moved += c != 0
    assert moved > 0  # the transition scores did change some choices


def test_greedy_tie_takes_lowest_candidate_index():
    params = S.SelectorParams(jnp.zeros((2, 1)), jnp.zeros((5, 1)), jnp.zeros((5, 1)))
    ids = jnp.asarray([[[3, 1, 4]]], jnp.int32)
    walk = S.greedy_walk(params, jnp.zeros((1, 1, 2)), jnp.asarray([0]), ids,
                         jnp.asarray([[[2.0, 2.0, 2.0]]]))
    assert int(walk.index[0, 0]) == 0 and int(walk.tokens[0, 0]) == 3


def test_fresh_selector_walks_to_unary_argmax():
    b, positions, dim, vocab, z = 2, 4, 8, 40, 5
    params = S.init(jax.random.PRNGKey(0), dim, vocab, 4)
    h, logits, anchors, cand = _walk_inputs(31, b, positions, dim, vocab, z)
    walk = S.greedy_walk(params, jnp.asarray(h, jnp.float32), jnp.asarray(anchors), cand.ids,
                         cand.scores)
    np.testing.assert_array_equal(np.asarray(walk.tokens), np.argmax(logits, -1))


def test_sampled_walk_distribution_and_frequencies():
    chi2 = pytest.importorskip("scipy.stats").chi2
    dim, vocab, z, temp, draws = 8, 30, 4, 1.3, 20000
    params, (wp, pred_cb, succ_cb) = small_selector(41, dim, vocab, succ_scale=0.7)
    h1, logits1, anchors1, _ = _walk_inputs(42, 1, 2, dim, vocab, z, scale=0.5)
    # `draws` identical rows: one call draws them independently.
    h = jnp.asarray(np.broadcast_to(h1, (draws, 2, dim)), jnp.float32)
    logits = np.broadcast_to(logits1, (draws, 2, vocab))
    cand = S.top_candidates(jnp.asarray(logits, jnp.float32), z)
    walk = S.sampled_walk(jax.random.PRNGKey(5), params, h, jnp.full((draws,), anchors1[0]),
                          cand.ids, cand.scores, temp, vocab)
    ids = np.asarray(cand.ids[0])
    tokens, index = np.asarray(walk.tokens), np.asarray(walk.index)
    probs, q = np.asarray(walk.probs), np.asarray(walk.q)
    np.testing.assert_array_equal(tokens, np.take_along_axis(np.asarray(cand.ids), index[..., None],
                                                             -1)[..., 0])
    # each returned distribution is the softmax at T of the scores given the drawn predecessor
    p1 = np_softmax(np_scores(h1[0, 0], wp, pred_cb, succ_cb, anchors1[0], ids[0],
                              logits1[0, 0][ids[0]]) / temp)
    p2 = np.stack([np_softmax(np_scores(h1[0, 1], wp, pred_cb, succ_cb, ids[0, i], ids[1],
                                        logits1[0, 1][ids[1]]) / temp) for i in range(z)])
    np.testing.assert_allclose(probs[:, 0], np.broadcast_to(p1, (draws, z)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probs[:, 1], p2[index[:, 0]], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(q[:, :, ids[0]][:, 0], probs[:, 0], atol=1e-7)
    np.testing.assert_allclose(q.sum(-1), 1.0, atol=1e-5)
    assert np.count_nonzero(q[0, 1]) == z
    # chi-square of the joint (position 1, position 2) counts against p1(i) p2(j | i): 15 degrees
    # of freedom; a correct sampler exceeds the threshold with probability 1e-6.
    expected = draws * p1[:, None] * p2
    assert expected.min() > 5  # the test's own precondition for the chi-square approximation
    counts = np.zeros((z, z))
    np.add.at(counts, (index[:, 0], index[:, 1]), 1)
    stat = ((counts - expected) ** 2 / expected).sum()
    assert stat < chi2.isf(1e-6, z * z - 1), stat


def test_selector_loss_stats_hand_made():
    # V = 6, Z = 3, R = 2, D = 2, one block of K = 4; projection = identity.
    params = S.SelectorParams(
        jnp.eye(2),
        jnp.asarray([[1, 0], [0, 1], [1, 1], [2, 0], [0, 2], [1, -1]], jnp.float32),
        jnp.asarray([[0, 1], [1, 0], [-1, 1], [0.5, 0.5], [1, 2], [2, -1]], jnp.float32))
    hidden = jnp.asarray([[[[0.0, 0.0], [1.0, 0.5], [0.2, 0.3], [-1.0, 2.0]]]])
    logits = jnp.asarray([[[[0, 0, 0, 0, 0, 0],
                            [2.0, 1.5, 1.0, 0.0, -1.0, 0.5],
                            [0.0, 0.1, 3.0, 2.0, 1.0, -2.0],
                            [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]]]])
    targets = jnp.asarray([[[5, 2, 0, 2]]])  # anchor 5; gold 2 (in), 0 (out), 2 (in)
    mask = jnp.asarray([[[0, 1, 1, 1]]])
    cand = S.top_candidates(logits, 3, gold=targets)
    stats = jax.jit(S.selector_loss_stats)(params, hidden, targets, mask, cand)
    pred_cb = np.asarray(params.predecessor_codebook)
    succ_cb = np.asarray(params.successor_codebook)
    lg, hid = np.asarray(logits)[0, 0], np.asarray(hidden)[0, 0]
    exp_ce, exp_correct = [0.0, 0.0, 0.0, 0.0], [False] * 4
    for k, (pred, gold, top) in {1: (5, 2, [0, 1, 2]), 3: (0, 2, [0, 1, 2])}.items():
        sc = lg[k][top] + (pred_cb[pred] * hid[k]) @ succ_cb[top].T
        exp_ce[k] = np.log(np.exp(sc).sum()) - sc[top.index(gold)]
        exp_correct[k] = top[int(np.argmax(sc))] == gold
    np.testing.assert_allclose(np.asarray(stats.ce)[0, 0], exp_ce, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(stats.covered)[0, 0], [False, True, False, True])
    np.testing.assert_array_equal(np.asarray(stats.correct)[0, 0], exp_correct)
    assert sum(exp_correct) == 1  # the hand-made case has one right and one wrong choice
    np.testing.assert_allclose(float(stats.recall), 2 / 3)
    np.testing.assert_allclose(float(stats.accuracy), 1 / 2)
    # stop_gradient leaves gradients to the selector's own parameters only
    def total(h, p, stop):
        c = cand._replace(scores=cand.scores + 0 * h.sum())
        return S.selector_loss_stats(p, h, targets, mask, c, stop_gradient=stop).ce.sum()
    grads = jax.jit(jax.grad(total, (0, 1)), static_argnums=2)
    g_h, g_p = grads(hidden, params, True)
    assert not np.any(np.asarray(g_h)) and np.any(np.asarray(g_p.successor_codebook))
    assert np.any(np.asarray(grads(hidden, params, False)[0]))


def test_chunked_top_candidates_equal_unchunked():
    r = rng(51)
    dim, vocab, z = 8, 50, 4
    hidden = jnp.asarray(r.normal(size=(2, 3, 4, dim)), jnp.float32)
    head = jnp.asarray(r.normal(size=(dim, vocab)), jnp.float32)
    gold = jnp.asarray(r.integers(0, vocab, size=(2, 3, 4)))
    kw = dict(output_multiplier=0.5, softcap=3.0)
    full = S.top_candidates(S.unary_logits(hidden, head, **kw), z, gold)
    chunked = S.top_candidates_from_hidden(hidden, head, z, gold, chunk_size=5, **kw)  # 24 rows
    np.testing.assert_array_equal(np.asarray(chunked.ids), np.asarray(full.ids))
    np.testing.assert_allclose(np.asarray(chunked.scores), np.asarray(full.scores), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(chunked.gold_in), np.asarray(full.gold_in))
    np.testing.assert_array_equal(np.asarray(chunked.gold_index), np.asarray(full.gold_index))
    assert 0 < int(full.gold_in.sum()) < full.gold_in.size
    g_full = jax.jit(jax.grad(
        lambda h: S.top_candidates(S.unary_logits(h, head, **kw), z).scores.sum()))
    g_chunk = jax.jit(jax.grad(lambda h: S.top_candidates_from_hidden(h, head, z, chunk_size=5,
                                                                      **kw).scores.sum()))
    np.testing.assert_allclose(np.asarray(g_chunk(hidden)), np.asarray(g_full(hidden)),
                               rtol=1e-5, atol=1e-6)


def test_selector_alpha_schedule():
    a = [float(S.selector_alpha(s, 1000, 2.0, 0.01, 0.02)) for s in (0, 9, 10, 19, 29, 500)]
    np.testing.assert_allclose(a, [0.0, 0.0, 0.1, 1.0, 2.0, 2.0])
    assert float(S.selector_alpha(0, 1000, 1.5)) == 1.5


def test_selector_matches_dflash_torch():
    dm = pytest.importorskip("dflash.model")
    torch = pytest.importorskip("torch")
    torch.manual_seed(1)
    b, positions, dim, vocab, rank, z = 3, 5, 16, 60, 8, 6
    cfg = SimpleNamespace(vocab_size=vocab, hidden_size=dim,
                          dflash_config={"selector_rank": rank, "selector_top_k": z,
                                         "output_multiplier": 0.7,
                                         "final_logit_softcapping": 4.0})
    sel = dm.CandidateSelector(cfg)
    head = torch.nn.Linear(dim, vocab, bias=False)
    hidden = torch.randn(b, positions, dim)
    anchors = torch.randint(0, vocab, (b,))
    with torch.no_grad():
        sel.successor_codebook.weight.mul_(3.0)  # large enough to move the walk
        t_logits = dm.DFlashDraftModel.compute_logits(SimpleNamespace(config=cfg), hidden, head)
        t_path, _, _ = sel.select(hidden, t_logits, anchors, 0.0)
        torch.manual_seed(2)
        s_path, s_cands, s_q = sel.select(hidden, t_logits, anchors, 0.8)
    params = S.from_hf(sel.hidden_projection.weight.detach().numpy(),
                       sel.predecessor_codebook.weight.detach().numpy(),
                       sel.successor_codebook.weight.detach().numpy())
    h = jnp.asarray(hidden.numpy())
    logits = S.unary_logits(h, jnp.asarray(head.weight.detach().numpy().T), 0.7, 4.0)
    np.testing.assert_allclose(np.asarray(logits), t_logits.numpy(), rtol=RTOL, atol=ATOL)
    cand = S.top_candidates(logits, z)
    walk = S.greedy_walk(params, h, jnp.asarray(anchors.numpy()), cand.ids, cand.scores)
    np.testing.assert_array_equal(np.asarray(walk.tokens), t_path.numpy())
    assert np.any(np.asarray(walk.index) != 0)
    # the sampled walk's distribution: score the torch path's own predecessors and candidates
    path = s_path.numpy()
    pred = np.concatenate([anchors.numpy()[:, None], path[:, :-1]], 1)
    ids = jnp.asarray(s_cands.numpy().astype(np.int32))
    u = jnp.take_along_axis(logits, ids, -1)
    probs = jax.nn.softmax(S.transition_scores(params, h, jnp.asarray(pred), ids, u) / 0.8, -1)
    np.testing.assert_allclose(np.asarray(probs), s_q.numpy(), rtol=1e-5, atol=1e-6)
    q = S.scatter_to_vocab(ids, probs, vocab)
    t_q = torch.zeros(b, positions, vocab).scatter(-1, s_cands, s_q)
    np.testing.assert_allclose(np.asarray(q), t_q.numpy(), rtol=1e-5, atol=1e-6)
