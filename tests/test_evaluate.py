"""evaluate(): the R.json schema and its numbers against brute-force greedy decoding (a full
forward per token, no cache), the two-turn flow, drafter loading from a run directory, and
drafter/target mismatches failing before anything is decoded."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references
from hf_fixtures import make_tiny_hf_target

from dpace_jax.config import default_config
from dpace_jax.data import prompt_sets as bl
from dpace_jax.demo.prepare import prepare
from dpace_jax.drafters import dflash as drafter_lib
from dpace_jax.drafters import hf as drafter_hf
from dpace_jax.infer import decode, evaluation, generation
from dpace_jax.targets import hf as convert

MAX_NEW = 8


def greedy_reference(params, cfg, prompt, max_new, stop_ids):
    """Brute force (tests/references.py) for one prompt."""
    return references.greedy_reference(params, cfg, [prompt], max_new, stop_ids)[0]


def make_drafter(target_cfg, out_dir, *, block_size=4, mask=259, seed=0, **overrides):
    dcfg = drafter_lib.DrafterConfig.for_target(target_cfg, num_layers=1, block_size=block_size,
                                                mask_token_id=mask, target_layer_ids=(0, 1))
    params = drafter_lib.init_drafter_params(dcfg, jax.random.PRNGKey(seed))
    drafter_hf.export_drafter(params, dcfg, out_dir)
    if overrides:
        cfg_path = out_dir / "config.json"
        hf = json.loads(cfg_path.read_text())
        for key, value in overrides.items():
            if key in ("mask_token_id", "target_layer_ids"):
                hf["dflash_config"][key] = value
            else:
                hf[key] = value
        cfg_path.write_text(json.dumps(hf))
    return out_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    target_dir, _ = make_tiny_hf_target(root / "target", tokenizer=True, seed=3)
    target_cfg = convert.load_config(target_dir)
    drafter_dir = make_drafter(target_cfg, root / "drafter")
    gsm = root / "gsm.jsonl"
    gsm.write_text("".join(json.dumps({"question": q}) + "\n" for q in ("1+2?", "3*4?", "7-5?")))
    mt = root / "mt.jsonl"
    mt.write_text(json.dumps({"turns": ["Hi.", "More?"]}) + "\n"
                  + json.dumps({"turns": ["Color?"]}) + "\n")
    return root, target_dir, target_cfg, drafter_dir, gsm, mt


def eval_config(target_dir, drafter_dir, *, benchmarks=(), batch_size=2, workdir=""):
    c = default_config()
    c.workdir = str(workdir)
    c.target.path = str(target_dir) if target_dir else ""
    c.target.dtype = "float32"
    c.eval.drafter = str(drafter_dir) if drafter_dir else ""
    c.eval.benchmarks = tuple(benchmarks)
    c.eval.num_samples = 2
    c.eval.max_new_tokens = MAX_NEW
    c.eval.batch_size = batch_size
    return c


@pytest.mark.slow
def test_evaluate_results_schema_and_numbers(setup, monkeypatch):
    monkeypatch.setattr(generation, "BUCKET", 128)  # one prompt width: 4 compilations in all
    root, target_dir, target_cfg, drafter_dir, gsm, mt = setup
    out = root / "R.json"
    config = eval_config(target_dir, drafter_dir, benchmarks=(f"gsm8k={gsm}", f"mt-bench={mt}"))
    evaluation.evaluate(config, output=str(out), progress=False)
    report = json.loads(out.read_text())
    assert set(report["benchmarks"]) == {"gsm8k", "mt-bench"}
    assert report["block_size"] == 4 and report["temperature"] == 0.0
    assert "device" in report and "config" in report

    tokenizer = convert.load_tokenizer(target_dir)
    stops = generation.stop_token_ids(tokenizer)
    assert stops == [256, 258]  # <|endoftext|>, <|im_end|> (eos)
    params, _ = convert.load_target(target_dir, dtype=jnp.float32)
    for name, r in report["benchmarks"].items():
        for key in ("tau", "histogram", "spec_tokens_per_s", "ar_tokens_per_s", "speedup",
                    "samples"):
            assert key in r, (name, key)
        lengths = [n for s in r["samples"] for n in s["acceptance_lengths"]]
        assert r["tau"] == pytest.approx(np.mean(lengths))
        assert 1 <= r["tau"] <= 4
        assert len(r["histogram"]) == 5 and r["histogram"][0] == 0
        assert sum(r["histogram"]) == len(lengths) == r["num_steps"]
        assert r["histogram"] == np.bincount(lengths, minlength=5).tolist()
        assert r["spec_tokens_per_s"] > 0 and r["ar_tokens_per_s"] > 0
        assert r["speedup"] == pytest.approx(r["spec_tokens_per_s"] / r["ar_tokens_per_s"])
        assert r["mismatches"] == 0
        assert r["spec_tokens"] == sum(len(s["output_ids"]) - 1 for s in r["samples"])
        for s in r["samples"]:
            want = greedy_reference(params, target_cfg, s["prompt_ids"], MAX_NEW, stops)
            assert s["output_ids"] == want == s["ar_output_ids"], (name, s["id"])
            # every step emits its acceptance length in tokens, except that the last step may
            # be cut short by a stop token or max_new (the first token comes from the prefill)
            acc = s["acceptance_lengths"]
            if acc:
                assert 1 <= len(s["output_ids"]) - 1 - sum(acc[:-1]) <= acc[-1]

    gsm_samples = report["benchmarks"]["gsm8k"]["samples"]
    assert len(gsm_samples) == 2  # num_samples
    want_prompt = generation.render_prompt(
        tokenizer, [{"role": "user", "content": "1+2?" + bl.MATH_SUFFIX}])
    assert gsm_samples[0]["prompt_ids"] == want_prompt

    # mt-bench: the second turn is asked after the model's own first answer
    mt_samples = report["benchmarks"]["mt-bench"]["samples"]
    assert [(s["id"], s["turn"]) for s in mt_samples] == [("mt-bench/0", 0), ("mt-bench/0", 1),
                                                          ("mt-bench/1", 0)]
    first = generation.answer_text(tokenizer, mt_samples[0]["output_ids"], stops)
    conv = bl.conversation(bl.Sample("x", ("Hi.", "More?")), [first])
    assert mt_samples[1]["prompt_ids"] == generation.render_prompt(tokenizer, conv)


def test_generator_batches_match_single_rows(setup):
    """Rows decoded in a filled-up batch equal rows decoded alone (padding is invisible)."""
    _, target_dir, target_cfg, drafter_dir, _, _ = setup
    tokenizer = convert.load_tokenizer(target_dir)
    params, _ = convert.load_target(target_dir, dtype=jnp.float32)
    stops = generation.stop_token_ids(tokenizer)
    gen = generation.Generator(params, target_cfg, stops, 256, MAX_NEW, batch_size=2)
    prompts = [generation.render_prompt(tokenizer, [{"role": "user", "content": q}])
               for q in ("Hello there, model.", "x")]
    key = jax.random.PRNGKey(0)
    both, _ = gen.generate(None, prompts, key)
    for p, g in zip(prompts, both, strict=True):
        alone, _ = gen.generate(None, [p], key)
        assert alone[0].output_ids == g.output_ids
        assert g.output_ids == greedy_reference(params, target_cfg, p, MAX_NEW, stops)
    assert evaluation.length_batches([5, 1, 3, 1], 2) == [[1, 3], [2, 0]]
    # regeneration and rollouts: windows of whole batches, resumed at the window holding `done`
    assert generation.windows(11, 2, window_batches=2) == [range(0, 4), range(4, 8), range(8, 11)]
    assert generation.windows(11, 2, done=5, window_batches=2) == [range(4, 8), range(8, 11)]
    assert generation.windows(12, 2, done=12, window_batches=2) == []


def test_drafter_from_run_directory(setup, tmp_path):
    """A run directory: the latest Orbax checkpoint's params (via run_config.json), else hf/."""
    import orbax.checkpoint as ocp

    _, target_dir, target_cfg, drafter_dir, _, _ = setup
    params, dcfg = drafter_hf.import_drafter(drafter_dir)
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text(json.dumps({"drafter": drafter_hf.config_to_hf(dcfg)}))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        generation.load_drafter(run)
    shutil.copytree(drafter_dir, run / "hf")
    loaded = generation.load_drafter(run)
    assert loaded.source == str(run / "hf") and loaded.expected is not None

    state = {"step": jnp.asarray(7), "params": jax.tree.map(lambda x: x + 1.0, params),
             "opt_state": {"mu": jax.tree.map(jnp.zeros_like, params)}}
    manager = ocp.CheckpointManager(run / "checkpoints")
    manager.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            meta=ocp.args.JsonSave({})))
    manager.wait_until_finished()
    manager.close()
    loaded = generation.load_drafter(run)
    assert loaded.source.endswith("step 7")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b) + 1.0),
                 loaded.params, params)
    generation.check_drafter(loaded, target_cfg, convert.load_tokenizer(target_dir))

    # a stale hf/ export whose block size differs from the run's record is refused
    shutil.rmtree(run / "checkpoints")
    hf = json.loads((run / "hf" / "config.json").read_text())
    hf["block_size"] = 8
    (run / "hf" / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=r"block_size=8 but the run .* has block_size=4"):
        generation.check_drafter(generation.load_drafter(run), target_cfg)


@pytest.mark.parametrize("case, overrides, message", [
    ("hidden size", None, r"hidden_size=32 \(target hidden_size=64\)"),
    ("layer ids", dict(num_target_layers=8, target_layer_ids=[1, 6]), "num_target_layers=8"),
    ("mask ordinary", dict(mask_token_id=65), "mask_token_id=65 is the ordinary token"),
    ("mask stop", dict(mask_token_id=258), "mask_token_id=258 is a stop token"),
    ("mask vocab", dict(mask_token_id=400), "mask_token_id=400 is outside the vocabulary"),
    ("block size", dict(block_size=1020), r"block_size=1020 \+ max_new_tokens=8 exceeds"),
])
def test_mismatched_drafter_fails_before_decoding(setup, tmp_path, monkeypatch, case,
                                                  overrides, message):
    _, target_dir, target_cfg, _, gsm, _ = setup
    if overrides is None:  # a drafter built for a narrower target
        narrow = drafter_lib.DrafterConfig.for_target(
            target_cfg, block_size=4, mask_token_id=259, target_layer_ids=(0, 1))
        import dataclasses

        narrow = dataclasses.replace(narrow, hidden_size=32, num_heads=2, num_kv_heads=1)
        drafter_hf.export_drafter(
            drafter_lib.init_drafter_params(narrow, jax.random.PRNGKey(0)), narrow,
            tmp_path / "d")
        path = tmp_path / "d"
    else:
        path = make_drafter(target_cfg, tmp_path / "d", **overrides)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoding started")

    monkeypatch.setattr(decode, "decode", no_decoding)
    monkeypatch.setattr(convert, "load_target", no_decoding)
    with pytest.raises(ValueError, match=message):
        evaluation.evaluate(eval_config(target_dir, path, benchmarks=(f"gsm8k={gsm}",)),
                            progress=False)


def test_bad_benchmark_and_missing_target(setup, tmp_path):
    _, target_dir, _, drafter_dir, _, _ = setup
    with pytest.raises(ValueError, match="known benchmarks: humaneval, gsm8k"):
        evaluation.evaluate(eval_config(target_dir, drafter_dir, benchmarks=("nope",)))
    no_target = eval_config("", drafter_dir, benchmarks=("humaneval",), workdir=tmp_path)
    with pytest.raises(ValueError, match="target.path='' names the embedded demo"):
        evaluation.evaluate(no_target)
    with pytest.raises(FileNotFoundError, match="target.*does not exist.*train first"):
        prepare(no_target, build=False)  # what evaluate.py does first
