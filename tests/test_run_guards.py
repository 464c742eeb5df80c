"""The run's guards against bad input and failing storage (issue 26), in-process and fast: one
run per workdir, NaN target weights, token ids outside the vocabulary, a damaged or unwritable
tokenization cache, a failed export or checkpoint save that loses nothing already written, the
run history's torn last line, and the settings checked before any work."""

import errno
import json
import runpy
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dpace_jax.data import conversations as data_lib
from dpace_jax.drafters import hf as drafter_hf
from dpace_jax.io import digest
from dpace_jax.io import lock as lock_lib
from dpace_jax.io.storage import StorageError
from dpace_jax.targets import hf as convert
from dpace_jax.train import checkpoint as ckpt_lib
from dpace_jax.train import loop as trainer
from dpace_jax.train import nonfinite, resume

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.xdist_group("run_guards")  # one worker builds the target once


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from dpace_jax.demo import data as demo_data
    from dpace_jax.demo import target as demo_target

    root = tmp_path_factory.mktemp("guards")
    target = demo_target.build_random_target(root / "target")
    data = demo_data.write_demo_conversations(root / "demo.jsonl", num_samples=16)
    return root, target, data


def _config(workdir, target, data, **train):
    c = runpy.run_path(str(ROOT / "configs" / "tiny.py"))["get_config"]()
    c.workdir, c.target.path, c.data.paths = str(workdir), str(target), (str(data),)
    c.train.progress = False
    for k, v in train.items():
        setattr(c.train, k, v)
    return c


def _copy_target(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_a_second_start_on_a_held_workdir_is_refused_before_any_work(built, tmp_path):
    _, target, data = built
    with lock_lib.WorkdirLock(tmp_path / "w", heartbeat_s=0):
        with pytest.raises(lock_lib.WorkdirLockError,
                           match=r"w is in use by another run: this process, last heartbeat"):
            trainer.setup(_config(tmp_path / "w", target, data))
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == []  # nothing written


def test_a_nan_target_tensor_is_named_at_load_and_the_lock_is_released(built, tmp_path):
    root, target, data = built
    bad = _copy_target(target, tmp_path / "nan_target")
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = np.nan
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"nan_target: tensor model.layers.1.mlp.up_proj.weight "
                                         r"holds NaN or inf; a target's weights must be finite"):
        convert.load_target(bad, dtype=jnp.float32)
    c = _config(tmp_path / "w", bad, data, nan_policy="skip-step")
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight holds NaN"):
        trainer.setup(c)  # never a run that skips every step and exports its initial drafter
    assert not (tmp_path / "w" / "run.lock").exists()
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_token_ids_outside_the_vocabulary_are_named_before_the_target_loads(built, tmp_path):
    _, target, data = built
    small = _copy_target(target, tmp_path / "small_vocab")
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "vocab_size": 400}))
    with pytest.raises(ValueError, match=r"the tokenized training data: token id \d+ at position "
                                         r"\d+ is outside the target's vocabulary \[0, 400\) "
                                         r"\(\d+ such ids\); the tokenizer of .*small_vocab does "
                                         r"not fit .*delete it to tokenize again"):
        trainer.setup(_config(tmp_path / "w", small, data))
    with pytest.raises(ValueError, match=r"prompts: token id -1 at position 2 "):
        data_lib.check_token_ids(np.array([1, 2, -1]), 10, "prompts")


def _tokenize(convs, tokenizer, cache):
    return data_lib.tokenize_conversations(convs, tokenizer, max_length=256, block_size=8,
                                           cache_dir=cache)


def test_the_tokenization_cache_is_verified_and_a_failed_write_keeps_the_data(
        built, tmp_path, monkeypatch, caplog):
    _, target, data = built
    tokenizer = convert.load_tokenizer(target)
    convs, _ = data_lib.load_conversations([data])
    fresh, stats = _tokenize(convs, tokenizer, tmp_path / "cache")
    [cached] = list((tmp_path / "cache").iterdir())
    assert set(json.loads((cached / "meta.json").read_text())["sha256"]) == {
        "tokens", "loss_mask", "offsets"}
    # a damaged array is found by its checksum: tokenized again (and the cache rewritten)
    tokens = np.load(cached / "tokens.npy")
    tokens[7] += 1
    np.save(cached / "tokens.npy", tokens)
    again, stats = _tokenize(convs, tokenizer, tmp_path / "cache")
    assert stats["cache"] == "miss" and "tokens.npy differs from its checksum" in caplog.text
    np.testing.assert_array_equal(again.tokens, fresh.tokens)
    assert _tokenize(convs, tokenizer, tmp_path / "cache")[1]["cache"] == "hit"

    # a full disk while writing the cache: the tokenization is used, nothing half-written stays
    real_save = np.save

    def full(path, array, *a, **k):
        if str(path).endswith("loss_mask.npy"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(path, array, *a, **k)

    monkeypatch.setattr(np, "save", full)
    ds, stats = _tokenize(convs, tokenizer, tmp_path / "full")
    np.testing.assert_array_equal(ds.tokens, fresh.tokens)
    assert stats["cache"] == "miss" and "not written (No space left on device; " in caplog.text
    assert list((tmp_path / "full").iterdir()) == []  # the staging directory is gone


def test_a_failed_export_keeps_the_previous_export_whole(tmp_path, monkeypatch):
    from drafter_fixtures import CFG

    from dpace_jax.drafters.dflash import init_drafter_params

    out = drafter_hf.export_drafter(init_drafter_params(CFG, jax.random.PRNGKey(0)), CFG,
                                    tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert digest.verify_sums(out)

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(drafter_hf, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        drafter_hf.export_drafter(init_drafter_params(CFG, jax.random.PRNGKey(1)), CFG, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no staging left behind
    (out / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"hf/config.json is damaged: its SHA-256 differs"):
        digest.verify_sums(out)


def _state(seed):
    return {"w": jax.random.normal(jax.random.PRNGKey(seed), (64,)),
            "step": jnp.asarray(seed, jnp.int32)}


def test_a_failed_checkpoint_save_is_one_error_and_older_steps_stay(tmp_path, monkeypatch):
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as json_handler

    real = json_handler.JsonCheckpointHandler._save_fn

    async def full_at_step_2(self, item, directory):
        if item.get("data") == 2:  # in Orbax's background commit, as a full disk would be
            raise OSError(errno.ENOSPC, "No space left on device", str(directory / "metadata"))
        return await real(self, item, directory)

    monkeypatch.setattr(json_handler.JsonCheckpointHandler, "_save_fn", full_at_step_2)
    ckpt = ckpt_lib.Checkpointer(tmp_path / "checkpoints", keep=1)
    ckpt.save(1, _state(1), {"data": 1})
    ckpt.save(2, _state(2), {"data": 2})  # keep=1 would delete step 1 once step 2 commits
    with pytest.raises(ckpt_lib.CheckpointError, match=r"saving checkpoint step 2 to .*checkpoints"
                                                       r" failed \(No space left on device "
                                                       r"\[errno 28\]\); the steps saved before "
                                                       r"it are intact: \[1\]"):
        ckpt.close()
    monkeypatch.setattr(json_handler.JsonCheckpointHandler, "_save_fn", real)
    again = ckpt_lib.Checkpointer(tmp_path / "checkpoints")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    step, state, meta = again.restore_latest(ckpt_lib.abstract_like(
        _state(0), jax.tree.map(lambda _: rep, _state(0))))
    again.close()
    assert step == 1 and meta["data"] == 1
    np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(_state(1)["w"]))


def test_the_run_history_survives_a_torn_last_line(tmp_path, caplog):
    resume.record_start(tmp_path, 0, {})
    with open(tmp_path / "run_history.jsonl", "a") as f:
        f.write('{"time": "2026-')  # a crash in the middle of an append
    resume.record_start(tmp_path, 40, {"lr": [1, 2]})
    rows = resume.read_history(tmp_path)
    assert [r["start_step"] for r in rows] == [0, 40]
    assert "run_history.jsonl:2: damaged record skipped" in caplog.text


def test_a_run_of_skipped_steps_longer_than_the_limit_stops_the_run():
    t = nonfinite.start()
    for step, finite in enumerate([True, False, False, True, False, False, False], 1):
        t = nonfinite.track(t, jnp.bool_(finite), step, jnp.int32(2))
    with pytest.raises(FloatingPointError, match=r"steps 5 to 7 all had a non-finite loss .*"
                                                 r"more than train.max_skipped_steps=2 in a row"):
        nonfinite.check(t, "skip-step", 2, saved=4)
    assert nonfinite.check(nonfinite.track(nonfinite.start(), jnp.bool_(False), 1, -1),
                           "skip-step", -1, 0) == 1


@pytest.mark.parametrize("field,value,message", [
    ("mesh.shape", (0, -1, 1), r"mesh.shape=\(0, -1, 1\): expected \(data, fsdp, tensor\)"),
    ("seed", -1, r"seed=-1 must be >= 0"),
    ("train.save_every_minutes", -5.0, r"train.save_every_minutes=-5.0 must be >= 0"),
    ("train.max_skipped_steps", -2, r"train.max_skipped_steps=-2 must be >= 0, or -1"),
    ("logging.wandb.entity", "me", r"logging.wandb: \['entity'\] set but logging.wandb.project"),
    ("workdir", "gs:/bucket/run", r"workdir='gs:/bucket/run': a gs:// URL has two slashes"),
    ("workdir", "hdfs://nn/run", r"unsupported storage scheme hdfs://"),
])
def test_bad_settings_are_one_line_before_any_work(tmp_path, field, value, message):
    c = _config(tmp_path / "w", "unused", "unused")
    *sections, name = field.split(".")
    node = c
    for section in sections:
        node = node[section]
    setattr(node, name, value)
    with pytest.raises(ValueError, match=message):
        trainer.check_config(c)
    assert not (tmp_path / "w").exists()


def test_a_workdir_that_is_a_file_or_a_bucket_without_its_package_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"workdir='.*file' is a file; name a run directory"):
        trainer.check_config(_config(tmp_path / "file", "t", "d"))
    with pytest.raises(StorageError, match=r"needs the s3fs package for s3:// paths"):
        trainer.check_config(_config("s3://bucket/run", "t", "d"))


def test_damaged_data_and_benchmark_files_are_one_line_naming_them(tmp_path):
    from dpace_jax.data import chat, prompt_sets

    (tmp_path / "bench.jsonl.gz").write_text('{"prompt": "x"}\n')  # not gzip
    with pytest.raises(ValueError, match=r"bench.jsonl.gz: cannot be read as jsonl \(gzip\): "
                                         r"BadGzipFile"):
        prompt_sets.read_rows(tmp_path / "bench.jsonl.gz")
    (tmp_path / "train.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match=r"train.parquet: cannot be read as Parquet: "):
        chat.load_conversations([str(tmp_path / "train.parquet")])
    (tmp_path / "latin1.jsonl").write_bytes('{"x": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.jsonl: not UTF-8 text"):
        chat.load_conversations([str(tmp_path / "latin1.jsonl")])
