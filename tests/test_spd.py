"""SPD (dpace_jax.infer.spd.pipeline) on a 4-device CPU mesh, against the target's own greedy
decoding and its exact sampling distribution. One subprocess (XLA_FLAGS must be set before JAX
starts) runs every decode and saves the results; the tests below check them."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import spd_fixtures as F
from test_decode import chi_square_z, exact_conditionals

from dpace_jax.infer import decode
from dpace_jax.infer.spd import draft as spd_draft
from dpace_jax.infer.spd import pipeline as spd
from dpace_jax.targets.model import ModelConfig

TESTS = Path(__file__).resolve().parent
B, PLEN, NEW = 3, 8, 20
LENGTHS = [8, 5, 6]
# positions whose draft is wrong (per sequence): consecutive, isolated, right after the prompt
WRONG = {0: [10, 11, 15, 27], 1: [6, 7, 20], 2: [9, 18, 19, 20]}
SCFG = ModelConfig(vocab_size=6, hidden_size=16, intermediate_size=32, num_layers=4,
                   num_heads=2, num_kv_heads=1, head_dim=8, rope_theta=10000.0)
SPROMPT = [3, 1, 4, 1, 5]
TILT = [1.5, -1.0, 0.0, 0.5, -0.5, 1.0]
SAMPLING_CASES = {"dflash_n2": (2, "dflash", 1.0, 0, 1.0),  # both rules, both depths
                  "spec_n4_filtered": (4, "speculative", 0.7, 4, 0.9)}
SAMPLES = 6000
# (target, stages) of the scripted greedy runs: the dense target at both depths; a Qwen3-MoE and
# a Qwen3.5 target (recurrent layers, rolled back through their state rings) at 2
GREEDY_CASES = [("dense", 2), ("dense", 4), ("qwen3_moe", 2), ("qwen3_5", 2)]

# one worker runs the whole module, so that the subprocess fixture runs once
pytestmark = pytest.mark.xdist_group("spd")


def prompts():
    rs = np.random.RandomState(0)
    return rs.randint(0, F.CFG.vocab_size, (B, PLEN)).astype(np.int32)


def wrong_mask():
    mask = np.zeros((B, 64), bool)
    for b, positions in WRONG.items():
        mask[b, positions] = True
    return mask


SCRIPT = """
import json, sys
import jax, numpy as np
sys.path.insert(0, {tests!r})
import spd_fixtures as F, test_spd as T
from dpace_jax.drafters import dflash
from dpace_jax.infer.spd import draft as spd_draft, pipeline as spd
from dpace_jax.infer.sampling import Sampling
out = {{}}
for name, n in T.GREEDY_CASES:
    cfg = F.TARGETS[name]
    tparams = F.random_target(cfg, 1)
    res = spd.decode(tparams, cfg, F.oracle_drafter(tparams, cfg, T.wrong_mask()), T.prompts(),
                     T.LENGTHS, num_stages=n, max_new_tokens=T.NEW)
    out[f"oracle_{{name}}_n{{n}}"] = {{k: np.asarray(v).tolist()
                                    for k, v in res._asdict().items()}}
params = F.random_target(F.CFG, 1)
dcfg = spd_draft.draft_config(F.CFG, 4)
module = spd_draft.spd_drafter(dflash.init_drafter_params(dcfg, jax.random.PRNGKey(4)), dcfg)
res = spd.decode(params, F.CFG, module, T.prompts(), T.LENGTHS, num_stages=4,
                 max_new_tokens=T.NEW)
out["module_n4"] = {{k: np.asarray(v).tolist() for k, v in res._asdict().items()}}
res = spd.decode(params, F.CFG, F.oracle_drafter(params, F.CFG, T.wrong_mask()), T.prompts(),
                 T.LENGTHS, num_stages=4, max_new_tokens=T.NEW, stop_token_ids=T.stops(params))
out["oracle_stops"] = {{k: np.asarray(v).tolist() for k, v in res._asdict().items()}}
sparams = F.random_target(T.SCFG, 11, scale=0.5)
for name, (n, rule, temp, top_k, top_p) in T.SAMPLING_CASES.items():
    res = spd.decode(sparams, T.SCFG, F.tilted_drafter(sparams, T.SCFG, np.array(T.TILT)),
                     np.tile(T.SPROMPT, (T.SAMPLES, 1)), [len(T.SPROMPT)] * T.SAMPLES,
                     num_stages=n, max_new_tokens=3, sampling=Sampling(temp, rule, top_k, top_p),
                     rng=jax.random.PRNGKey(7))
    out[name] = {{k: np.asarray(v).tolist() for k, v in res._asdict().items()}}
json.dump(out, open({path!r}, "w"))
print("SPD_OK")
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    path = tmp_path_factory.mktemp("spd") / "out.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
    script = SCRIPT.format(tests=str(TESTS), path=str(path))
    result = subprocess.run([sys.executable, "-c", script], env=env, text=True,
                            capture_output=True, timeout=300, cwd=TESTS.parent)
    assert result.returncode == 0 and "SPD_OK" in result.stdout, result.stderr[-3000:]
    return {k: {f: np.asarray(a) for f, a in v.items()} for k, v in
            json.loads(path.read_text()).items()}


@pytest.mark.parametrize("name,n", GREEDY_CASES)
def test_greedy_equals_the_targets_greedy_decoding(runs, name, n):
    """A drafter that is right except at scripted positions: the output is the target's greedy
    continuation, exactly the scripted drafts are rejected, and the pipeline takes one step per
    verification plus n - 1 refill steps after the start and after every rejection but one of
    the last token (dense, Qwen3-MoE and Qwen3.5 targets)."""
    cfg = F.TARGETS[name]
    params = F.random_target(cfg, 1)
    ref = np.asarray(decode.decode(params, cfg, None, prompts(), LENGTHS,
                                   max_new_tokens=NEW).tokens)
    res = runs[f"oracle_{name}_n{n}"]
    np.testing.assert_array_equal(res["tokens"], ref)
    # every generated position after the first is verified once; drafts at WRONG are rejected
    rejected = [sum(LENGTHS[b] < p < LENGTHS[b] + NEW for p in WRONG[b]) for b in range(B)]
    np.testing.assert_array_equal(res["verified"], [NEW - 1] * B)
    np.testing.assert_array_equal(res["verified"] - res["accepted"], rejected)
    # (a rejection of the last token needs no refill)
    refills = [1 + sum(LENGTHS[b] < p < LENGTHS[b] + NEW - 1 for p in WRONG[b]) for b in range(B)]
    np.testing.assert_array_equal(res["steps"], NEW - 1 + (n - 1) * np.array(refills))


def stops(params):
    """Two stop tokens: the greedy tokens 9 of sequence 0 and 5 of sequence 2."""
    ref = np.asarray(decode.decode(params, F.CFG, None, prompts(), LENGTHS,
                                   max_new_tokens=NEW).tokens)
    return [int(ref[0, 9]), int(ref[2, 5])]


def test_stop_tokens_end_generation_like_the_target(runs):
    """With stop tokens, SPD's tokens and counts are those of the target's greedy decoding
    with the same stops (the stop token kept, zeros after it)."""
    params = F.random_target(F.CFG, 1)
    ref = decode.decode(params, F.CFG, None, prompts(), LENGTHS, max_new_tokens=NEW,
                        stop_token_ids=stops(params))
    res = runs["oracle_stops"]
    assert np.asarray(ref.num_tokens).min() < NEW  # some sequence stops early
    np.testing.assert_array_equal(res["num_tokens"], np.asarray(ref.num_tokens))
    np.testing.assert_array_equal(res["tokens"], np.asarray(ref.tokens))


@pytest.mark.parametrize("n", [4])
def test_greedy_with_the_draft_module_equals_the_targets(runs, n):
    """The draft module of dpace_jax.infer.spd.draft (random weights) in the 4-stage pipeline: the
    target's greedy continuation, every token verified once. (Its decoding hooks equal its
    training forward at 2 and 4 stages: tests/test_spd_draft.py.)"""
    params = F.random_target(F.CFG, 1)
    ref = np.asarray(decode.decode(params, F.CFG, None, prompts(), LENGTHS,
                                   max_new_tokens=NEW).tokens)
    res = runs[f"module_n{n}"]
    np.testing.assert_array_equal(res["tokens"], ref)
    np.testing.assert_array_equal(res["verified"], [NEW - 1] * B)


@pytest.mark.parametrize("case", list(SAMPLING_CASES))
def test_sampling_follows_the_targets_distribution(runs, case):
    """The first three sampled tokens after SPROMPT follow the target's exact (filtered)
    conditionals (Pearson chi-square over the V^3 cells), and drafts are both accepted and
    rejected."""
    n, rule, temp, top_k, top_p = SAMPLING_CASES[case]
    params = F.random_target(SCFG, 11, scale=0.5)
    p0, p1, p2 = exact_conditionals(params, temp, top_k, top_p, cfg=SCFG, prompt=SPROMPT)
    res = runs[case]
    v = SCFG.vocab_size
    t = res["tokens"]
    counts = np.bincount(t[:, 0] * v * v + t[:, 1] * v + t[:, 2], minlength=v**3)
    exact = (p0[:, None, None] * p1[:, :, None] * p2).reshape(-1)
    assert counts[exact == 0].sum() == 0
    assert chi_square_z(counts, exact) < 3.5
    rate = res["accepted"].sum() / res["verified"].sum()
    assert res["verified"].sum() == 2 * SAMPLES and 0.1 < rate < 0.95


def test_bad_input_is_refused():
    params = F.random_target(F.CFG, 1)
    drafter = F.oracle_drafter(params, F.CFG, wrong_mask())
    with pytest.raises(ValueError, match="num_stages=3 does not divide"):
        spd.decode(params, F.CFG, drafter, prompts(), LENGTHS, num_stages=3, max_new_tokens=4)
    with pytest.raises(ValueError, match="num_stages must be an integer >= 2"):
        spd.decode(params, F.CFG, drafter, prompts(), LENGTHS, num_stages=1, max_new_tokens=4)
    with pytest.raises(ValueError, match="needs as many devices"):
        spd.stage_mesh(2, devices=[object()])
    with pytest.raises(ValueError, match="lengths must lie in 4"):
        spd.decode(params, F.CFG, drafter, prompts(), [8, 3, 6], num_stages=4, max_new_tokens=4)
    module = spd_draft.draft_config(F.CFG, 2)
    with pytest.raises(ValueError, match=r"num_stages=4 needs block_size 4, target_layer_ids "
                                         r"\[0, 1, 2, 3\]"):
        spd.decode(params, F.CFG, spd_draft.spd_drafter(None, module), prompts(), LENGTHS,
                   num_stages=4, max_new_tokens=4)
    common = {f.name: getattr(F.CFG, f.name) for f in dataclasses.fields(F.CFG)
              if f.name not in ("arch", "family_cfg")}
    mixed = ModelConfig.make(**common, arch="qwen3_moe", num_experts=2, num_experts_per_tok=1,
                             moe_intermediate_size=8, mlp_only_layers=(0,))
    with pytest.raises(ValueError, match="mixes layers with and without experts"):
        spd.check_stages(mixed, 2)
