"""Issue 26's storage and hub handling, fast: object-store workdirs on a local fake, hub ids
announced and offline mode, evaluate.py's checks before work, evaluations in the run's
TensorBoard."""

import json
import os
from pathlib import Path

import jax
import pytest
from test_run_guards import ROOT, _config

from dpace_jax.io.storage import StorageError
from dpace_jax.targets import hf as convert
from dpace_jax.train import checkpoint as ckpt_lib
from dpace_jax.train import loop as trainer
from dpace_jax.train import resume


def test_hub_ids_are_announced_and_offline_forbids_downloads(tmp_path, monkeypatch, capsys):
    from dpace_jax.io import hub

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "mine").mkdir()
    assert hub.looks_like_hub_id("Qwen/Qwen3-4B") and not hub.looks_like_hub_id("runs/mine")
    assert not hub.looks_like_hub_id("data/train.jsonl") and not hub.looks_like_hub_id("/a/b")
    hub.announce([("target.path", "Qwen/Qwen3-4B"), ("data.paths", "runs/mine")], False)
    assert capsys.readouterr().err == (
        "notice: target.path='Qwen/Qwen3-4B' is not a local path: fetched from the HF hub "
        "(--config.offline=True: from the cache only)\n")
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    hub.go_offline()
    assert convert.hub_offline() and huggingface_hub.constants.HF_HUB_OFFLINE is True
    with pytest.raises(FileNotFoundError, match=r"'nobody-dpace/missing' is neither a local "
                                                r"directory nor found in the HF cache"):
        convert.resolve_checkpoint("nobody-dpace/missing", cache_dir=tmp_path / "hf-cache")

@pytest.mark.slow
def test_evaluate_refuses_a_directory_output_and_an_offline_hub_drafter_before_work(tmp_path):
    import subprocess
    import sys

    def evaluate(*args):
        return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--config",
                               str(ROOT / "configs" / "tiny.py"),
                               f"--config.workdir={tmp_path}", *args], capture_output=True,
                              text=True, timeout=300, cwd=ROOT)

    out = evaluate(f"--output={tmp_path}")
    assert out.returncode == 1 and out.stderr.strip() == (
        f"error: --output={str(tmp_path)!r} is a directory; name the results file")
    out = evaluate("--config.offline=True", "--config.eval.drafter=nobody-dpace/missing")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 2, out.stderr
    assert lines[0] == ("notice: eval.drafter='nobody-dpace/missing' is not a local path: read "
                        "from the HF cache only (offline)")
    assert lines[1].startswith("error: 'nobody-dpace/missing' is neither a local directory nor "
                               "found in the HF cache (HF_HUB_OFFLINE is set)")

def test_object_store_workdirs_on_a_local_fake(tmp_path, monkeypatch):
    """gs:// through the same path API as production (storage.fake_object_store): bucket paths
    stay bucket paths for Orbax, run files and the export land in the bucket (the export's
    checksum file last), the tokenization cache stays local, and what needs local files in
    the workdir is refused in one line."""
    import orbax.checkpoint as ocp
    from drafter_fixtures import CFG

    from dpace_jax.drafters.dflash import init_drafter_params
    from dpace_jax.io import storage
    from dpace_jax.train import guards, sft

    given = []

    class Recorder:
        def __init__(self, directory, options):
            given.append((directory, options.temporary_path_class))

    monkeypatch.setattr(ocp, "CheckpointManager", Recorder)
    with storage.fake_object_store("gs") as fs, storage.fake_object_store("s3"):
        c = _config("gs://bucket/run", "/local/target", "/local/data.jsonl")
        s = trainer.check_config(c)
        workdir = storage.resolve(s.workdir)
        ckpt_lib.Checkpointer(workdir / "checkpoints")
        ckpt_lib.Checkpointer("s3://bucket/run/checkpoints")
        assert [(os.fspath(d), cls) for d, cls in given] == [
            ("gs://bucket/run/checkpoints", None),
            ("s3://bucket/run/checkpoints", ocp.path.atomicity.CommitFileTemporaryPath)]

        resume.record_start(workdir, 0, {})
        resume.record_start(workdir, 30, {})
        assert [r["start_step"] for r in resume.read_history(workdir)] == [0, 30]
        out = guards.export(init_drafter_params(CFG, jax.random.PRNGKey(0)), CFG, workdir, 7)
        assert out == "gs://bucket/run/hf"
        written = [k.rsplit("/", 1)[1] for k in fs.store if k.startswith("/bucket/run/hf/")]
        assert written[-1] == "checksums.sha256" and sorted(written) == [
            "checksums.sha256", "config.json", "model.safetensors"]
        local = sft.cache_dir(s.data, workdir)
        assert isinstance(local, Path) and local.is_relative_to(Path.home())

        for field, value, what in [("train.mode", "opd", "train.mode=opd"),
                                   ("data.regenerate", True, "data.regenerate=True")]:
            bad = _config("gs://bucket/run", "/local/target", "/local/data.jsonl",
                          max_steps=-1)
            bad.drafter.init_from = "/local/sft"
            section, name = field.split(".")
            setattr(bad[section], name, value)
            with pytest.raises(StorageError, match=rf"workdir='gs://bucket/run' is on an object "
                                                   rf"store, but {what} writes local files"):
                trainer.check_config(bad)
        with pytest.raises(StorageError, match=r"but target.path='' \(a target built in "):
            trainer.check_config(_config("gs://bucket/run", "", "/local/data.jsonl"))

def test_an_evaluation_of_a_run_goes_to_its_tensorboard_at_the_checkpoints_step(tmp_path):
    from dpace_jax.train import eval_log, metrics

    assert eval_log.log_evaluation(tmp_path, {"benchmarks": {}}) is None  # not a run
    (tmp_path / "run_config.json").write_text(json.dumps({"total_steps": 60}))
    for drafter, tau in ((f"{tmp_path}/checkpoints step 30", 2.5), (f"{tmp_path}/hf", 3.0),
                         (f"{tmp_path}/checkpoints step 30", 2.75)):  # 30 again: replaced
        eval_log.log_evaluation(tmp_path, {"drafter": drafter, "benchmarks": {
            "humaneval": {"tau": tau}}})
    seen = []
    for f in sorted((tmp_path / "tensorboard" / "eval").iterdir()):
        for record in metrics.read_records(f.read_bytes())[0]:
            fields = metrics.event_fields(record)
            if 5 in fields:
                seen.append(fields[2])
    assert sorted(seen) == [30, 60]  # step 30 once: its re-evaluation replaced the first
