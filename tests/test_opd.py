"""On-policy post-training: replay blocks on hand-made rows, replay against the rollout that
produced it, the OPD objective of a replay batch against dense logits, and the loop (rounds,
resume after a kill mid-rollout and mid-training, bad input)."""

import dataclasses
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references
from drafter_fixtures import CFG, TARGET, random_like

from dpace_jax.config import default_config
from dpace_jax.demo.prepare import prepare
from dpace_jax.drafters import dflash as drafter_lib
from dpace_jax.drafters import hf as drafter_hf
from dpace_jax.infer import decode
from dpace_jax.infer import generation as gen_lib
from dpace_jax.loss import opd as opd_loss
from dpace_jax.targets import model as model_lib
from dpace_jax.train import loop as trainer
from dpace_jax.train import step as step_lib
from dpace_jax.train.opd import objective as opd_step
from dpace_jax.train.opd import replay, rollout
from dpace_jax.train.settings import OpdConfig

ROOT = Path(__file__).resolve().parents[1]

# prompt of 3 tokens, response of 7, block size 4: the prefill emits 10; step 0 (anchor 3)
# accepts one draft (11), emits the target's 12 and rejected the draft 98 at offset 2; step 1
# (anchor 5) accepts all three drafts (13, 14, 15) and emits 16 (past its block).
ROW = {"prompt": [5, 6, 7], "response": [10, 11, 12, 13, 14, 15, 16], "first_logp": -0.5,
       "anchors": [3, 5], "emitted": [2, 4], "realized_logp": [[-0.1, -0.2], [-1, -2, -3, -4]],
       "rejected": [98, -1], "rejected_logp": [-7.0, 0.0]}


def test_replay_blocks_of_a_hand_made_row():
    assert replay.blocks(ROW, 4) == [replay.Block(2, (-0.5,)),
                                     replay.Block(3, (-0.1, -0.2), 98, -7.0),
                                     replay.Block(5, (-1.0, -2.0, -3.0))]
    batch, dropped = replay.replay_batch([ROW], block_size=4, seq_len=12, num_blocks=4)
    assert dropped == 0
    np.testing.assert_array_equal(batch["input_ids"][0], [5, 6, 7, 10, 11, 12, 13, 14, 15, 16,
                                                          0, 0])
    np.testing.assert_array_equal(batch["anchors"][0], [2, 3, 5, 0])
    np.testing.assert_array_equal(batch["keep"][0], [1, 1, 1, 0])
    np.testing.assert_array_equal(batch["real_mask"][0].astype(int),
                                  [[0, 1, 0, 0], [0, 1, 1, 0], [0, 1, 1, 1], [0, 0, 0, 0]])
    np.testing.assert_allclose(batch["logp_real"][0, 2], [0, -1, -2, -3])
    np.testing.assert_array_equal(batch["rej_mask"][0], [0, 1, 0, 0])
    assert batch["rej_token"][0, 1] == 98 and batch["rej_offset"][0, 1] == 2
    assert batch["logp_rej"][0, 1] == np.float32(-7.0)
    # cut at S = 8 (tokens up to 14) and at 2 blocks: the last block loses its third position...
    batch, dropped = replay.replay_batch([ROW], block_size=4, seq_len=8, num_blocks=3)
    np.testing.assert_array_equal(batch["real_mask"][0, 2].astype(int), [0, 1, 1, 0])
    # ... and a row with more blocks than N keeps its first N
    batch, dropped = replay.replay_batch([ROW], block_size=4, seq_len=12, num_blocks=2)
    assert dropped == 1 and batch["anchors"][0].tolist() == [2, 3]
    # a block anchored at S - 1 or later has no position to supervise: dropped as well
    kept, dropped = replay.kept_blocks(ROW, 4, seq_len=4, num_blocks=8)
    assert [blk.anchor for blk in kept] == [2] and dropped == 2


@pytest.mark.parametrize("field,value,match", [
    ("anchors", [3, 6], "step 1 .*anchor 5 expected"),
    ("response", list(range(10, 18)), "the steps emit 7 tokens, the response has 8"),
    ("realized_logp", [[-0.1], [-1, -2, -3, -4]], "step 0"),
    ("rejected", [98], "field 'rejected' has 1 entries for 2 steps"),
    ("rejected", [98, 97], "step 1 rejects a draft after accepting every one"),
])
def test_replay_refuses_inconsistent_rows(field, value, match):
    with pytest.raises(ValueError, match=match):
        replay.blocks({**ROW, field: value}, 4, "rollouts.jsonl:3")
    with pytest.raises(ValueError, match=r"rollouts.jsonl:3: missing field\(s\) \['emitted'\]"):
        replay.blocks({k: v for k, v in ROW.items() if k != "emitted"}, 4, "rollouts.jsonl:3")


def _step_cfg():
    c = default_config()
    c.train.compute_dtype, c.train.loss, c.train.loss_chunk_size = "float32", "opd", 16
    return step_lib.StepConfig.from_config(c, 10)


@pytest.mark.slow
@pytest.mark.parametrize("dpace", [False, True])
def test_replay_reproduces_the_rollout_drafts_and_the_objective_matches_dense_logits(dpace):
    """Replayed at the rollout's anchors, the drafter's training forward drafts what the cached
    decoder drafted (accepted drafts = realized tokens, then the rejected one), so the blocks sit
    at the right boundaries with the right context; the OPD loss of the batch equals opd_loss
    on log-probs taken from the dense logits."""
    target = random_like(model_lib.init_params, TARGET, 0, 0.3)
    params = random_like(drafter_lib.init_drafter_params, CFG, 1, 0.3)
    rs = np.random.RandomState(0)
    prompts = [list(rs.randint(0, 90, n)) for n in (5, 9, 3)]
    cfg = _step_cfg()
    opd = OpdConfig.from_config(default_config().opd, dpace_weights=dpace)
    _, batch, logits, checked, _ = references.replay_of_a_rollout(
        target, TARGET, params, CFG, prompts, max_new=15, seq_len=32, step_cfg=cfg)
    assert checked >= 10
    loss, aux = opd_step.opd_loss_fn(params, target, jax.tree.map(jnp.asarray, batch), None,
                                     target_cfg=TARGET, drafter_cfg=CFG, cfg=cfg, opd=opd)
    logq = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    labels = np.take_along_axis(batch["input_ids"], np.minimum(
        batch["anchors"][..., None] + np.arange(CFG.block_size), 31).reshape(3, -1), 1)
    logq_real = np.take_along_axis(logq, labels.reshape(3, 16, -1)[..., None], -1)[..., 0]
    at = np.take_along_axis(logq, batch["rej_offset"][..., None, None], 2)[:, :, 0]
    logq_rej = np.take_along_axis(at, batch["rej_token"][..., None], -1)[..., 0]
    want, _ = opd_loss.opd_loss(logq_real, batch["logp_real"], batch["real_mask"], logq_rej,
                                batch["logp_rej"], batch["rej_offset"], batch["rej_mask"],
                                dpace_alpha=0.5 if dpace else None)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
    assert int(aux["num_blocks"]) == int(batch["keep"].sum())


def test_rollout_file_is_completed_not_duplicated_and_refuses_another_drafter(tmp_path):
    target = random_like(model_lib.init_params, TARGET, 0, 0.3)
    params = random_like(drafter_lib.init_drafter_params, CFG, 1, 0.3)
    gen = gen_lib.Generator(target, TARGET, [3], 0, 10, 2)
    drafter = decode.dflash_drafter(params, CFG, TARGET)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14], [15, 16]]
    key, meta = jax.random.PRNGKey(3), {"drafter": "a"}
    path = tmp_path / "round-0.jsonl"
    rows = rollout.rollout(path, gen, drafter, prompts, key=key, meta=meta)
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["prompt"] for r in rows] == prompts
    for row in rows:
        assert len(replay.blocks(row, CFG.block_size)) == len(row["acceptance"]) + 1
    whole = path.read_text()
    assert rollout.rollout(path, gen, drafter, prompts, key=key, meta=meta) == rows
    # a crash inside the third row's batch: two rows and a torn line
    lines = whole.splitlines(keepends=True)
    path.write_text("".join(lines[:3]) + lines[3][:20])
    assert rollout.rollout(path, gen, drafter, prompts, key=key, meta=meta) == rows
    assert path.read_text() == whole
    with pytest.raises(ValueError, match=r"round-0.jsonl was written by another drafter, target "
                                         r"or setting .*\['drafter'\] differ"):
        rollout.rollout(path, gen, drafter, prompts, key=key, meta={"drafter": "b"})
    with pytest.raises(ValueError, match="holds 5 rows for 4 prompts"):
        rollout.rollout(path, gen, drafter, prompts[:4], key=key, meta=meta)
    with pytest.raises(ValueError, match="no prompts to roll out"):
        rollout.rollout(path, gen, drafter, [], key=key, meta=meta)


# ----------------------------------------------------------------------------- the loop


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """A tiny SFT run (configs/tiny.py, shorter): the starting drafter, target and data."""
    root = tmp_path_factory.mktemp("opd")
    c = runpy.run_path(str(ROOT / "configs" / "tiny.py"))["get_config"]()
    c.workdir, c.train.max_steps, c.train.progress = str(root / "sft"), 20, False
    trainer.run(prepare(c))
    return root


OPD_SETTINGS = {  # configs/tiny.py's fields a tiny on-policy run changes
    "train.mode": "opd", "train.max_steps": -1, "train.log_every": 1, "train.save_every": 100,
    "train.lr": 1e-3, "train.batch_size": 4, "train.num_anchors": 24, "train.progress": False,
    "opd.rounds": 2, "opd.prompts_per_round": 8, "opd.max_new_tokens": 16,
    "opd.rollout_batch_size": 4, "opd.max_prompt_length": 300, "data.max_length": 320}


def _opd_settings(sft, name) -> dict:
    return {**OPD_SETTINGS, "workdir": str(sft / name),
            "target.path": str(sft / "sft" / "target"),
            "data.paths": (str(sft / "sft" / "data" / "demo.jsonl"),),
            "drafter.init_from": str(sft / "sft")}


def _opd_config(sft, name, **fields):
    c = runpy.run_path(str(ROOT / "configs" / "tiny.py"))["get_config"]()
    settings = _opd_settings(sft, name)
    settings.update({k.replace("__", "."): v for k, v in fields.items()})
    for key, value in settings.items():
        *sections, field = key.split(".")
        setattr(c[sections[0]] if sections else c, field, value)
    return c


def _outputs(workdir: Path) -> dict:
    files = sorted(workdir.glob("rollouts/*.jsonl")) + [workdir / "rounds.jsonl"]
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:
        m.pop("tokens_per_s")
    return {"files": {f.name: f.read_text() for f in files}, "metrics": metrics,
            "weights": drafter_hf.import_drafter(workdir / "hf")[0]}


@pytest.mark.slow
@pytest.mark.xdist_group("opd_runs")
def test_opd_rounds_resume_after_kills_mid_rollout_and_mid_training(sft, monkeypatch):
    summary = trainer.run(_opd_config(sft, "straight"))
    assert summary["finished"] and summary["steps"] == 4  # 2 rounds x 8 prompts / batch 4
    straight = _outputs(sft / "straight")
    rounds = [json.loads(r) for r in straight["files"]["rounds.jsonl"].splitlines()]
    assert [r["round"] for r in rounds] == [0, 1] and all(r["rows"] == 8 for r in rounds)
    assert all(r["blocks"] > 8 and r["blocks_dropped"] == 0 for r in rounds)
    assert all(1.0 <= r["on_policy_tau"] <= 8 for r in rounds)
    # train.py on the finished run: it resumes at the end, re-exports and reports the rounds
    flags = [f"--config.{k}={v!r}" if isinstance(v, tuple) else f"--config.{k}={v}"
             for k, v in _opd_settings(sft, "straight").items()]
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config",
                          str(ROOT / "configs" / "tiny.py"), *flags], capture_output=True,
                         text=True, timeout=300, cwd=ROOT, env=dict(os.environ,
                                                                   JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-3000:]
    taus = ", ".join(f"{r['on_policy_tau']:.2f}" for r in rounds)
    assert f"on-policy tau per round: {taus}" in out.stdout
    assert "drafter (DFlash HF format)" in out.stdout

    # killed in round 1's rollout, after its first batch was written (a torn line after it)
    real_append = rollout.append_rows

    def die_in_round_1(path, rows):
        real_append(path, rows)
        if path.name == "round-1.jsonl":
            with path.open("a") as f:
                f.write('{"prompt": [1, 2')
            raise KeyboardInterrupt

    monkeypatch.setattr(rollout, "append_rows", die_in_round_1)
    with pytest.raises(KeyboardInterrupt):
        trainer.run(_opd_config(sft, "killed"))
    monkeypatch.setattr(rollout, "append_rows", real_append)
    # killed in round 1's training (after its first step), then run to the end
    trainer.run(_opd_config(sft, "killed", train__stop_at=3))
    trainer.run(_opd_config(sft, "killed"))
    killed = _outputs(sft / "killed")
    assert killed["files"] == straight["files"] and killed["metrics"] == straight["metrics"]
    jax.tree.map(np.testing.assert_array_equal, killed["weights"], straight["weights"])


@pytest.mark.slow
@pytest.mark.xdist_group("opd_runs")
def test_a_damaged_rollout_of_a_trained_round_is_rolled_out_again(sft, capsys):
    """Restored inside round 1 whose rollout file is damaged: the run goes back to the round's
    start checkpoint, rolls the round out again and ends as an uninterrupted run (issue 26)."""
    if not (sft / "straight" / "hf").is_dir():
        trainer.run(_opd_config(sft, "straight"))
    trainer.run(_opd_config(sft, "damaged", train__stop_at=3))
    path = sft / "damaged" / "rollouts" / "round-1.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "{garbled", *lines[2:]]) + "\n")
    trainer.run(_opd_config(sft, "damaged"))
    err = capsys.readouterr().err
    assert f"warning: {path}:2: not a JSON line" in err
    assert "going back to the checkpoint of step 2 to make it again" in err
    damaged, straight = _outputs(sft / "damaged"), _outputs(sft / "straight")
    assert damaged["files"] == straight["files"] and damaged["metrics"] == straight["metrics"]
    jax.tree.map(np.testing.assert_array_equal, damaged["weights"], straight["weights"])
    assert [p.name.split("-")[0] for p in (sft / "damaged" / "checkpoints-unusable").iterdir()
            ] == ["3"]


@pytest.mark.slow
@pytest.mark.xdist_group("opd_runs")
def test_opd_bad_input_names_it(sft, tmp_path):
    with pytest.raises(ValueError, match="set drafter.init_from"):
        trainer.check_config(_opd_config(sft, "x", drafter__init_from=""))
    # prompts longer than opd.max_prompt_length: none left
    with pytest.raises(ValueError, match="no prompt .*opd.max_prompt_length=2"):
        trainer.run(_opd_config(sft, "short", opd__max_prompt_length=2))
    # a drafter for another target (hidden size)
    dcfg = dataclasses.replace(drafter_hf.import_drafter(sft / "sft" / "hf")[1], hidden_size=16,
                               num_heads=2, num_kv_heads=1, head_dim=8, intermediate_size=32)
    drafter_hf.export_drafter(drafter_lib.init_drafter_params(dcfg, jax.random.PRNGKey(0)),
                              dcfg, tmp_path / "wrong")
    with pytest.raises(ValueError, match="hidden_size=16 .*does not match the target"):
        trainer.run(_opd_config(sft, "wrong", drafter__init_from=str(tmp_path / "wrong")))


@pytest.mark.slow
@pytest.mark.xdist_group("opd_runs")
def test_opd_teacher_stream_and_tv_options_run(sft):
    """Each new option trains to the end from the same rollouts' kind of data: the verify teacher
    with the rejected suffix (every draft after the first rejection supervised), and TV with the
    greedy verify teacher (no target forward) and with the softmax teacher (from the target's
    hidden states), per block; and the tempered verify teacher of sampled rollouts."""
    runs = {"suffix": dict(opd__teacher="verify", opd__rejected_stream="suffix"),
            "tv": dict(train__loss="tv", opd__teacher="verify"),
            "tv-softmax": dict(train__loss="tv", opd__teacher="softmax", opd__tv_reduce="block"),
            # sampled rollouts: the tempered teacher, recorded (opd) or from the target (tv)
            "verify-T": dict(opd__teacher="verify", opd__temperature=0.8),
            "tv-verify-T": dict(train__loss="tv", opd__teacher="verify", opd__temperature=0.8)}
    for name, fields in runs.items():
        assert trainer.run(_opd_config(sft, name, **fields))["finished"], name
        metrics = [json.loads(line) for line in (sft / name / "metrics.jsonl").read_text()
                   .splitlines()]
        assert all(np.isfinite(m["loss"]) for m in metrics)
        if name == "suffix":
            assert sum(m["n_suffix"] for m in metrics) > 0 and metrics[0]["p_real"] == 1.0
        elif name == "verify-T":
            assert all(0.0 < m["p_real"] < 1.0 for m in metrics)
        else:
            assert all(0.0 <= m["tv"] <= 1.0 for m in metrics)


@pytest.mark.parametrize("fields,match", [
    (dict(opd__teacher="greedy"), r"opd.teacher='greedy'; expected one of \('softmax', 'verify'"),
    (dict(opd__rejected_stream="all"), r"opd.rejected_stream='all'; expected one of"),
    (dict(opd__tv_reduce="sum"), r"opd.tv_reduce='sum'; expected one of"),
    (dict(train__loss="tv", opd__dpace_weights=True), r"opd.dpace_weights=True .*train.loss=tv"),
    (dict(train__loss="tv", opd__rejected_stream="suffix"),
     r"opd.rejected_stream=suffix is not available with train.loss=tv"),
    (dict(train__loss="kl"), r"train.loss='kl' is not an objective of train.mode=opd; expected "
                             r"one of \('opd', 'tv'\)"),
])
def test_opd_option_errors_name_the_field(fields, match, tmp_path):
    c = _opd_config(tmp_path, "x", **fields)
    with pytest.raises(ValueError, match=match):
        trainer.check_config(c)
