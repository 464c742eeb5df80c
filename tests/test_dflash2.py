"""DFlash 2 drafters inside the training and decoding forwards: a fresh one computes what the
DFlash drafter of the same backbone computes; a random one drafts, packed in training, what it
drafts block by block in decoding; its walks keep sampled decoding lossless under both rules; the
selector's term weights its positions as a NumPy loop does.

(The convolution and the selector alone: tests/test_dflash2_ops.py; the HF layout and a trained
drafter decoded by z-lab's reference: tests/test_dflash2_hf.py, tests/test_trained_crosscheck.py.)
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from drafter_fixtures import CFG, TARGET, S, random_like
from test_decode import (
    SCFG,
    SPROMPT,
    _no_cache,
    _no_extend,
    chi_square_z,
    exact_conditionals,
    random_target,
)

from dpace_jax.drafters import dflash as dflash_lib
from dpace_jax.drafters import dflash2
from dpace_jax.drafters.dflash2 import selector as selector_lib
from dpace_jax.infer import decode
from dpace_jax.infer.sampling import Sampling
from dpace_jax.targets import model

D2 = dflash2.DFlash2Config(conv_kernel_size=2, conv_group_size=16, selector_rank=8,
                           selector_top_k=5)
CFG2 = dataclasses.replace(CFG, arch="dflash2", family_cfg=D2)
ANCHORS = jnp.array([[0, 3, 7, 20], [5, 11, 12, 0]])  # row 1: unsorted + a padding anchor


@pytest.fixture(scope="module")
def setup():
    target_params = random_like(model.init_params, TARGET, 0, 0.5)
    rng = np.random.default_rng(2)
    features = jnp.asarray(rng.standard_normal((2, S, CFG.feature_size)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 96, (2, S)), jnp.int32)
    return target_params, features, tokens


def fresh_over(backbone, cfg2=CFG2, seed=3):
    """A freshly initialized DFlash 2 drafter whose DFlash parameters are `backbone`'s."""
    fresh = dflash_lib.init_drafter_params(cfg2, jax.random.PRNGKey(seed))
    layers = dataclasses.replace(fresh.layers, **{
        f.name: getattr(backbone.layers, f.name)
        for f in dataclasses.fields(backbone.layers)})
    return dataclasses.replace(fresh, fc=backbone.fc, hidden_norm=backbone.hidden_norm,
                               final_norm=backbone.final_norm, layers=layers)


def test_fresh_dflash2_computes_what_dflash_computes(setup):
    """Identity convolutions and a zero successor codebook: the same hidden states in training
    (bitwise), the same greedy blocks in decoding, the walk equal to the unary argmax."""
    target_params, features, tokens = setup
    backbone = random_like(dflash_lib.init_drafter_params, CFG, 1, 0.15)
    params2 = fresh_over(backbone)
    train = jax.jit(dflash_lib.train_forward, static_argnums=1)
    h1 = train(backbone, CFG, target_params, features, tokens, ANCHORS)
    h2 = train(params2, CFG2, target_params, features, tokens, ANCHORS)
    np.testing.assert_array_equal(np.asarray(h2), np.asarray(h1))
    # the selector parameters are live (random predecessor codebook) but the walk is the argmax
    assert np.abs(np.asarray(params2.selector.predecessor_codebook)).max() > 0
    ext = jax.jit(dflash_lib.extend_cache, static_argnums=1)
    cache1 = ext(backbone, CFG, model.KVCache.zeros(CFG, 2, S, jnp.float32),
                                     features, jnp.zeros(2, jnp.int32))
    cache2 = ext(params2, CFG2, model.KVCache.zeros(CFG2, 2, S, jnp.float32),
                                     features, jnp.zeros(2, jnp.int32))
    greedy = Sampling()
    propose1 = jax.jit(decode.dflash_drafter(backbone, CFG).propose, static_argnums=(1, 7))
    propose2 = jax.jit(decode.dflash_drafter(params2, CFG2).propose, static_argnums=(1, 7))
    for a in (4, 9, 17):
        anchors, anchor_tokens = jnp.array([a, a - 2]), tokens[:, a]
        b1, _ = propose1(backbone, CFG, target_params, cache1, anchor_tokens, anchors, None,
                         greedy)
        b2, q = propose2(params2, CFG2, target_params, cache2, anchor_tokens, anchors, None,
                         greedy)
        assert q is None
        np.testing.assert_array_equal(np.asarray(b2), np.asarray(b1))


def test_packed_training_equals_decoding_block_by_block(setup):
    """A random DFlash 2 drafter (live convolutions and selector): each packed training block's
    unary logits and greedy walk equal the same block drafted alone against a cache of its
    context, whose stale rows past the anchor hold garbage."""
    target_params, features, tokens = setup
    sliding = dataclasses.replace(CFG2, layer_types=("sliding_attention", "full_attention"),
                                  sliding_window=5)
    for cfg in (CFG2, sliding):
        params = random_like(dflash_lib.init_drafter_params, cfg, 4, 0.15)
        # transition scores as large as the unary ones, so that the walk leaves the argmax
        params = dataclasses.replace(params, selector=jax.tree.map(lambda x: 8 * x,
                                                                   params.selector))
        hidden = jax.jit(dflash_lib.train_forward, static_argnums=1)(
            params, cfg, target_params, features, tokens, ANCHORS)
        packed = np.asarray(dflash_lib.head_logits(target_params, hidden, cfg))
        cand = selector_lib.top_candidates(jnp.asarray(packed[..., 1:, :]), D2.selector_top_k)
        walks = selector_lib.greedy_walk(params.selector, hidden[..., 1:, :],
                                         tokens[jnp.arange(2)[:, None], ANCHORS], cand.ids,
                                         cand.scores)
        garbage = 3.0 * jax.random.normal(jax.random.PRNGKey(9), (S, CFG.feature_size))
        ext = jax.jit(dflash_lib.extend_cache, static_argnums=1)
        draft = jax.jit(dflash_lib.draft_logits, static_argnums=1)
        propose = jax.jit(dflash2.propose, static_argnums=(1, 7))
        changed = 0
        for b in range(2):
            for n in range(ANCHORS.shape[1]):
                a = int(ANCHORS[b, n])
                context = jnp.where(jnp.arange(S)[:, None] < a, features[b], garbage)[None]
                cache = ext(params, cfg, model.KVCache.zeros(cfg, 1, S, jnp.float32), context,
                            jnp.array([0]))
                logits = draft(params, cfg, target_params, cache, tokens[b:b + 1, a],
                               jnp.array([a]))
                np.testing.assert_allclose(logits[0], packed[b, n], atol=1e-4, rtol=1e-5)
                block, _ = propose(params, cfg, target_params, cache, tokens[b:b + 1, a],
                                   jnp.array([a]), None, Sampling())
                np.testing.assert_array_equal(np.asarray(block[0, 1:]),
                                              np.asarray(walks.tokens[b, n]))
                changed += bool(np.any(np.asarray(block[0, 1:]) != packed[b, n, 1:].argmax(-1)))
        assert np.abs(packed[0, 1] - packed[0, 2]).max() > 1e-2  # the blocks differ
        assert changed > 0  # the walk is not the unary argmax, so it is compared for real


# ---------------------------------------------------------------------------------------------
# sampled walks stay lossless

def _walk_table_propose(params, config, target_params, cache, anchor_tokens, anchors, key,
                        sampler):
    """DFlash 2's walk over hidden states and unary scores looked up by the anchor token."""
    return dflash2.walk_block(params["selector"], params["hidden"][anchor_tokens],
                              params["unary"][anchor_tokens], anchor_tokens, config, key, sampler)


def walk_table_drafter(p1, p2, seed, top_k=3):
    """Block size 3 over SCFG's vocabulary: unary scores near log p(t1 | t0), log p(t2 | t0) with
    noise (as test_decode's near-target drafter), a random selector (rank 4) and hidden states:
    the walk's second draft depends on its first, and the top-Z cut leaves tokens undraftable."""
    rs = np.random.RandomState(seed)
    v, dim = p1.shape[0], 6
    unary = np.zeros((v, 2, v))
    unary[:, 0] = np.log(p1 + 1e-3)
    unary[:, 1] = np.log(np.einsum("ab,abc->ac", p1, p2) + 1e-3)
    unary += rs.standard_normal(unary.shape)
    sel = selector_lib.SelectorParams(*(jnp.asarray(rs.standard_normal(s), jnp.float32)
                                        for s in ((dim, 4), (v, 4), (v, 4))))
    params = {"unary": jnp.asarray(unary, jnp.float32), "selector": sel,
              "hidden": jnp.asarray(rs.standard_normal((v, 2, dim)), jnp.float32)}
    return decode.Drafter(params, top_k, _no_cache, _no_extend, _walk_table_propose, 3)


@pytest.mark.slow
@pytest.mark.parametrize("rule,temperature,top_k,top_p", [("dflash", 1.0, 0, 1.0),
                                                           ("speculative", 1.0, 0, 1.0),
                                                           ("speculative", 0.7, 4, 0.9)])
def test_sampled_walk_is_lossless(rule, temperature, top_k, top_p):
    """The first three tokens of sampled speculative decoding with a DFlash 2 walk follow the
    target's exact filtered conditionals (Pearson chi-square over the V^3 cells): under the
    speculative rule the walk is sampled and its q verifies it; under DFlash's match rule the
    greedy walk drafts. Both accepting and rejecting happen."""
    params = random_target(11, SCFG, scale=0.5)
    v, n = SCFG.vocab_size, 12000
    p0, p1, p2 = exact_conditionals(params, temperature, top_k, top_p)
    res = decode.decode(params, SCFG, walk_table_drafter(p1, p2, seed=3),
                        np.tile(SPROMPT, (n, 1)), [len(SPROMPT)] * n, max_new_tokens=3,
                        sampling=Sampling(temperature, rule, top_k, top_p),
                        rng=jax.random.PRNGKey(5))
    tokens = np.asarray(res.tokens)
    assert np.all(np.asarray(res.num_tokens) == 3)
    counts = np.bincount(tokens[:, 0] * v * v + tokens[:, 1] * v + tokens[:, 2], minlength=v**3)
    exact = (p0[:, None, None] * p1[:, :, None] * p2).reshape(-1)
    assert counts[exact == 0].sum() == 0
    assert chi_square_z(counts, exact) < 3.5
    hist = decode.acceptance_histogram(res, 3)
    assert hist[1] > 0.05 * hist.sum() and hist[2:].sum() > 0.05 * hist.sum()


# ---------------------------------------------------------------------------------------------
# the training loss


def np_selector_ce(h, logits, labels, m, sel, z):
    """Per position, the selector's CE over the top-z of the unary `logits` [..., K, V] with the
    gold predecessor (the label before; the anchor token at position 1), and whether the label is
    among the candidates (covered), at the positions of mask m; float64 loops."""
    wp, pred_cb, succ_cb = (np.asarray(x, np.float64) for x in sel)
    sel_ce, covered = np.zeros(m.shape), np.zeros(m.shape, bool)
    for idx in np.ndindex(m.shape):
        row = np.asarray(logits[idx], np.float64)
        top = list(np.argsort(-row, kind="stable")[:z])
        if not m[idx] or labels[idx] not in top:
            continue
        covered[idx] = True
        pred = labels[idx[:-1] + (idx[-1] - 1,)]
        sc = row[top] + (pred_cb[pred] * (h[idx] @ wp)) @ succ_cb[top].T
        sel_ce[idx] = np.log(np.exp(sc - sc.max()).sum()) + sc.max() - sc[top.index(labels[idx])]
    return sel_ce, covered


def np_step_loss(hidden, head, labels, mask, sel, loss, alpha_sel, weights_mode, *, z,
                 multiplier, softcap, alpha=0.5, gamma=4.0):
    """The DFlash 2 training loss in float64 loops from the drafter's hidden states: the base
    objective on the transformed unary logits, plus alpha_sel times the selector's CE over the
    top-z unary candidates at the loss positions whose label is among them (predecessor: the label
    before, the anchor token at position 1), weighted by the base objective's weights ("base") or
    1 ("uniform"), over the base objective's denominator."""
    from test_loss import ref_weights

    h, head = np.asarray(hidden, np.float64), np.asarray(head, np.float64)
    logits = multiplier * (h @ head)
    logits = softcap * np.tanh(logits / softcap)
    m = np.asarray(mask) != 0
    ce = np.zeros(m.shape)
    for idx in np.ndindex(m.shape):
        row = logits[idx]
        ce[idx] = np.log(np.exp(row - row.max()).sum()) + row.max() - row[labels[idx]]
    sel_ce, covered = np_selector_ce(h, logits, labels, m, sel, z)
    if loss == "dflash":
        w = np.broadcast_to([np.exp(-(k - 1) / gamma) for k in range(m.shape[-1])], m.shape)
        den = (m * w).sum()
    else:
        w, den = ref_weights(np.exp(-ce), m, alpha, loss), m.shape[0]
    base = (m * w * ce).sum() / den
    ws = w if weights_mode == "base" else np.ones(m.shape)
    return base + alpha_sel * (covered * ws * sel_ce).sum() / den, covered


@pytest.mark.parametrize("loss,weights_mode", [("dpace", "base"), ("dflash", "uniform")])
def test_step_loss_matches_numpy(setup, loss, weights_mode):
    """train.step.loss_fn of a random DFlash 2 drafter (output multiplier, softcap, a live
    selector) against the float64 loop, with a loss chunk that splits the blocks' positions."""
    from dpace_jax.config import default_config
    from dpace_jax.train import anchors as anchor_lib
    from dpace_jax.train import step as step_lib

    target_params, _, _ = setup
    cfg = dataclasses.replace(CFG2, family_cfg=dataclasses.replace(
        D2, output_multiplier=0.7, final_logit_softcapping=4.0))
    params = random_like(dflash_lib.init_drafter_params, cfg, 5, 0.15)
    params = dataclasses.replace(params, selector=jax.tree.map(lambda x: 4 * x, params.selector))
    c = default_config()
    c.train.loss, c.train.num_anchors, c.train.loss_chunk_size = loss, 4, 6
    c.train.gamma = 4.0
    c.train.selector_loss_alpha, c.train.selector_weights = 0.5, weights_mode
    c.train.selector_warmup_ratio = c.train.selector_ramp_ratio = 0.2
    c.train.compute_dtype = "float32"
    scfg = step_lib.StepConfig.from_config(c, 100)
    rng = np.random.default_rng(6)
    tokens = jnp.asarray(rng.integers(0, 96, (2, S)), jnp.int32)
    loss_mask = jnp.asarray(np.arange(S)[None] >= np.array([[6], [10]]), jnp.int32)
    batch, key = {"input_ids": tokens, "loss_mask": loss_mask}, jax.random.PRNGKey(7)
    loss_fn = jax.jit(lambda p, step: step_lib.loss_fn(
        p, target_params, batch, key, target_cfg=TARGET, drafter_cfg=cfg, cfg=scfg, step=step))
    anchors, keep = anchor_lib.sample_anchors(key, loss_mask, 4, cfg.block_size)
    hidden, head = jax.jit(lambda p: step_lib.drafter_hidden(
        p, target_params, tokens, anchors, target_cfg=TARGET, drafter_cfg=cfg, cfg=scfg))(params)
    labels, mask = anchor_lib.block_labels(tokens, loss_mask, anchors, keep, cfg.block_size)
    sel = (params.selector.hidden_projection, params.selector.predecessor_codebook,
           params.selector.successor_codebook)
    # warm-up steps 0-19 (alpha 0), then alpha * (step - 19) / 20 up to step 39, then alpha
    for step, alpha_sel in ((10, 0.0), (30, 0.5 * 11 / 20), (60, 0.5)):
        got, aux = loss_fn(params, step)
        want, covered = np_step_loss(hidden, head, np.asarray(labels), mask, sel, loss,
                                     alpha_sel, weights_mode, z=D2.selector_top_k,
                                     multiplier=0.7, softcap=4.0, gamma=4.0)
        np.testing.assert_allclose(float(got), want, rtol=2e-5)
        np.testing.assert_allclose(float(aux["selector_alpha"]), alpha_sel, rtol=1e-6)
    n_loss = (np.asarray(mask) != 0).sum()
    assert 0 < covered.sum() < n_loss  # some labels fall outside the top-Z
    np.testing.assert_allclose(float(aux["topk_recall"]), covered.sum() / n_loss, rtol=1e-6)


@pytest.mark.slow
def test_on_policy_rollouts_replay_the_walk_and_train_the_selector():
    """train.mode=opd with a DFlash 2 drafter: its rollouts record the walk's drafts (replayed at
    the rollout's boundaries, the training forward's greedy walk reproduces every accepted and
    rejected draft, and the walk differs from the unary argmax in some blocks), and the OPD
    objective is Draft-OPD's loss on the transformed unary log-probs (dense) plus the selector's
    CE over the realized positions (float64 loop), uniformly weighted."""
    import references

    from dpace_jax.config import default_config
    from dpace_jax.loss import opd as opd_loss
    from dpace_jax.train import step as step_lib
    from dpace_jax.train.opd import objective as opd_step
    from dpace_jax.train.settings import OpdConfig

    cfg = dataclasses.replace(CFG2, family_cfg=dataclasses.replace(
        D2, output_multiplier=0.7, final_logit_softcapping=4.0))
    target = random_like(model.init_params, TARGET, 0, 0.3)
    params = random_like(dflash_lib.init_drafter_params, cfg, 1, 0.3)
    params = dataclasses.replace(params, selector=jax.tree.map(lambda x: 4 * x, params.selector))
    rs = np.random.RandomState(0)
    prompts = [list(rs.randint(0, 90, n)) for n in (5, 9, 3)]
    c = default_config()
    c.train.compute_dtype, c.train.loss, c.train.loss_chunk_size = "float32", "opd", 16
    step_cfg = step_lib.StepConfig.from_config(c, 10)
    _, batch, logits, checked, _ = references.replay_of_a_rollout(
        target, TARGET, params, cfg, prompts, max_new=15, seq_len=32, step_cfg=step_cfg)
    assert checked >= 10
    hidden, _ = jax.jit(lambda p, t, a: step_lib.drafter_hidden(
        p, target, t, a, target_cfg=TARGET, drafter_cfg=cfg, cfg=step_cfg))(
        params, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["anchors"]))
    anchor_tokens = np.take_along_axis(batch["input_ids"], batch["anchors"], 1)
    cand = selector_lib.top_candidates(jnp.asarray(logits[:, :, 1:]), D2.selector_top_k)
    walk = np.asarray(selector_lib.greedy_walk(params.selector, hidden[:, :, 1:],
                                               jnp.asarray(anchor_tokens), cand.ids,
                                               cand.scores).tokens)
    kept = batch["keep"].astype(bool)
    assert np.any((walk != logits[:, :, 1:].argmax(-1)).any(-1) & kept)
    opd = OpdConfig.from_config(default_config().opd, dpace_weights=False)
    loss, aux = jax.jit(lambda p, b: opd_step.opd_loss_fn(
        p, target, b, None, target_cfg=TARGET, drafter_cfg=cfg, cfg=step_cfg, opd=opd))(
        params, jax.tree.map(jnp.asarray, batch))
    logq = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    labels = np.take_along_axis(batch["input_ids"], np.minimum(
        batch["anchors"][..., None] + np.arange(cfg.block_size), 31).reshape(3, -1), 1)
    labels = labels.reshape(3, 16, -1)
    logq_real = np.take_along_axis(logq, labels[..., None], -1)[..., 0]
    at = np.take_along_axis(logq, batch["rej_offset"][..., None, None], 2)[:, :, 0]
    logq_rej = np.take_along_axis(at, batch["rej_token"][..., None], -1)[..., 0]
    base, _ = opd_loss.opd_loss(logq_real, batch["logp_real"], batch["real_mask"], logq_rej,
                                batch["logp_rej"], batch["rej_offset"], batch["rej_mask"])
    real = batch["real_mask"] & kept[..., None]
    sel = (params.selector.hidden_projection, params.selector.predecessor_codebook,
           params.selector.successor_codebook)
    sel_ce, covered = np_selector_ce(np.asarray(hidden, np.float64), logits, labels, real, sel,
                                     D2.selector_top_k)
    assert 0 < covered.sum() < real.sum()
    np.testing.assert_allclose(float(loss), float(base) + sel_ce.sum() / real.sum(), rtol=1e-5)
    np.testing.assert_allclose(float(aux["topk_recall"]), covered.sum() / real.sum(), rtol=1e-6)
