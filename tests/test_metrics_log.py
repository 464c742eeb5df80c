"""dpace_jax.train.metrics: metrics.jsonl as before, TensorBoard event files read back by
TensorBoard's own reader (and by protobuf with TensorBoard's message layout), W&B through a fake
module; resumes without duplicate steps."""

import json
import os
import shutil
import sys
import types

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from dpace_jax.io import storage
from dpace_jax.train import metrics as M


def _row(step, loss, **extra):
    return {"step": step, "loss": loss, "accuracy": 0.5, "lr": 1e-4, "tokens_per_s": 1000.0,
            "skipped_steps": 0, "finite": True, "weight_per_position": [0.0, 1.0, 0.25],
            "q_per_position": [1.0, 0.5, 0.125], **extra}


def _accumulate(directory):
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea.EventAccumulator(str(directory))
    acc.Reload()
    return acc


def _series(acc, tag):
    return [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)]


def _events_pb():
    """Event / Summary / SessionLog classes from TensorBoard's field numbers (event.proto,
    summary.proto), built with protobuf alone: a decoder that shares no code with ours."""
    f = descriptor_pb2.FileDescriptorProto(name="ev.proto", package="t", syntax="proto3")
    T = descriptor_pb2.FieldDescriptorProto
    specs = {"Value": [("tag", 1, T.TYPE_STRING, None), ("simple_value", 2, T.TYPE_FLOAT, None)],
             "Summary": [("value", 1, T.TYPE_MESSAGE, ".t.Value")],
             "SessionLog": [("status", 1, T.TYPE_INT32, None)],
             "Event": [("wall_time", 1, T.TYPE_DOUBLE, None), ("step", 2, T.TYPE_INT64, None),
                       ("file_version", 3, T.TYPE_STRING, None),
                       ("summary", 5, T.TYPE_MESSAGE, ".t.Summary"),
                       ("session_log", 7, T.TYPE_MESSAGE, ".t.SessionLog")]}
    for name, fields in specs.items():
        m = f.message_type.add(name=name)
        for fname, number, ftype, tname in fields:
            label = T.LABEL_REPEATED if fname == "value" else T.LABEL_OPTIONAL
            fd = m.field.add(name=fname, number=number, type=ftype, label=label)
            if tname:
                fd.type_name = tname
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("t.Event"))


def test_the_message_layout_is_tensorboards():
    pb = pytest.importorskip("tensorboard.compat.proto.event_pb2")
    summary = pytest.importorskip("tensorboard.compat.proto.summary_pb2")
    ours = _events_pb().DESCRIPTOR
    for theirs, name in ((pb.Event.DESCRIPTOR, "Event"), (pb.SessionLog.DESCRIPTOR, "SessionLog"),
                         (summary.Summary.DESCRIPTOR, "Summary"),
                         (summary.Summary.Value.DESCRIPTOR, "Value")):
        mine = ours.file.message_types_by_name[name]
        for field in mine.fields:
            assert theirs.fields_by_name[field.name].number == field.number, (name, field.name)
    assert pb.SessionLog.START == 1
    record = M.encode_event(12.5, 7, session_start=True)
    assert pb.Event.FromString(record).session_log.status == pb.SessionLog.START


def _records(directory):
    out = []
    for name in sorted(os.listdir(directory)):
        records, damaged = M.read_records((directory / name).read_bytes())
        assert damaged is None
        out += records
    return out


def test_crc32c_matches_the_standard_and_tensorboards():
    assert M.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    pw = pytest.importorskip("tensorboard.compat.tensorflow_stub.pywrap_tensorflow")
    for data in (b"", b"\x00" * 8, bytes(range(256)) * 3):
        assert M.masked_crc(data) == pw.masked_crc32c(data)


def test_jsonl_is_repaired_on_resume_as_before(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": 1.0}) for s in (10, 20, 30)]
    path.write_text(rows[0] + "\n" + '{"step": 2' + "\n" + rows[1] + "\n\x00\x01garbage\n"
                    + rows[2] + "\n")
    log = M.MetricsLog(tmp_path, resume_step=20, tensorboard=False)
    assert [json.loads(r)["step"] for r in path.read_text().splitlines()] == [10, 20]
    assert f"{path}:2: damaged metrics row dropped" in caplog.text
    assert f"{path}:4: damaged metrics row dropped" in caplog.text
    log.write({"step": 30, "loss": 0.5})
    log.close()
    assert [json.loads(r) for r in path.read_text().splitlines()][-1] == {"step": 30, "loss": 0.5}


def test_tensorboard_reads_every_metric_round_and_eval(tmp_path):
    log = M.MetricsLog(tmp_path, resume_step=0)
    log.log_round({"round": 0, "step": 0, "on_policy_tau": 2.5, "rows": 8, "blocks_dropped": 0})
    for step in (10, 20):
        log.write(_row(step, 1.0 / step, note="text is not a scalar"))
    log.log_eval(20, "gsm8k", 3.25)
    log.close()
    acc = _accumulate(tmp_path / "tensorboard")
    assert sorted(acc.Tags()["scalars"]) == sorted(
        ["loss", "accuracy", "lr", "tokens_per_s", "skipped_steps", "finite", "opd/rows",
         "opd/on_policy_tau", "opd/blocks_dropped", "eval/gsm8k/tau"]
        + [f"{n}_per_position/pos_{k}" for n in ("weight", "q") for k in range(3)])
    assert _series(acc, "loss") == [(10, 0.1), (20, 0.05)]
    assert _series(acc, "q_per_position/pos_2") == [(10, 0.125), (20, 0.125)]
    assert _series(acc, "finite") == [(10, 1.0), (20, 1.0)]
    assert _series(acc, "opd/on_policy_tau") == [(0, 2.5)]
    assert _series(acc, "eval/gsm8k/tau") == [(20, 3.25)]


def test_event_records_decode_with_tensorboards_message_layout(tmp_path):
    Event = _events_pb()
    M.MetricsLog(tmp_path, resume_step=0).write(_row(10, 0.5))
    (tmp_path / "tensorboard").rename(tmp_path / "first")
    M.MetricsLog(tmp_path, resume_step=10).write(_row(20, 0.25))
    first = [Event.FromString(r) for r in _records(tmp_path / "first")]
    events = [Event.FromString(r) for r in _records(tmp_path / "tensorboard")]
    assert first[0].file_version == events[0].file_version == "brain.Event:2"
    assert first[1].step == 10 and {v.tag: v.simple_value for v in first[1].summary.value}[
        "weight_per_position/pos_1"] == 1.0
    start = events[1]  # after the file version: START at the resumed step
    assert (start.step, start.session_log.status, len(start.summary.value)) == (10, 1, 0)
    assert [e.step for e in events[2:]] == [10, 20]  # the kept row of step 10, then new ones
    assert events[3].wall_time > 1e9


def test_a_resume_shows_each_step_once_with_the_new_runs_values(tmp_path):
    first = M.MetricsLog(tmp_path, resume_step=0)
    for step in (10, 20, 30, 40, 50):
        first.write(_row(step, 1.0))
    first.close()  # killed after step 50; the last checkpoint was step 30
    second = M.MetricsLog(tmp_path, resume_step=30)
    for step in (40, 50, 60):
        second.write(_row(step, 2.0))
    second.close()
    acc = _accumulate(tmp_path / "tensorboard")
    assert _series(acc, "loss") == [(10, 1.0), (20, 1.0), (30, 1.0), (40, 2.0), (50, 2.0),
                                    (60, 2.0)]
    # every reader: each (tag, step) once across the files
    events = map(_events_pb().FromString, _records(tmp_path / "tensorboard"))
    seen = [(v.tag, e.step) for e in events for v in e.summary.value]
    assert len(seen) == len(set(seen))
    steps = [json.loads(r)["step"] for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30, 40, 50, 60]


def test_tensorboards_own_purge_drops_orphaned_steps_of_uncut_files(tmp_path, monkeypatch):
    first = M.MetricsLog(tmp_path, resume_step=0)
    for step in (10, 20, 30):
        first.write(_row(step, 1.0))
    monkeypatch.setattr(M, "cut_event_files", lambda *a: None)  # e.g. a reader already had them
    second = M.MetricsLog(tmp_path, resume_step=10)
    second.write(_row(20, 2.0))
    assert _series(_accumulate(tmp_path / "tensorboard"), "loss") == [(10, 1.0), (20, 2.0)]


def test_a_damaged_event_file_tail_is_cut_with_a_warning(tmp_path, caplog):
    log = M.MetricsLog(tmp_path, resume_step=0)
    log.write(_row(10, 1.0))
    log.write(_row(20, 1.0))
    (name,) = os.listdir(tmp_path / "tensorboard")
    path = tmp_path / "tensorboard" / name
    path.write_bytes(path.read_bytes()[:-7])  # killed in the middle of a record
    M.MetricsLog(tmp_path, resume_step=20).write(_row(30, 3.0))
    assert f"{path}: damaged event record at byte" in caplog.text
    # step 20's row is written again from metrics.jsonl (it is the resumed step)
    assert _series(_accumulate(tmp_path / "tensorboard"), "loss") == [(10, 1.0), (20, 1.0),
                                                                      (30, 3.0)]


def test_other_processes_write_nothing(tmp_path):
    log = M.MetricsLog(tmp_path, resume_step=0, is_main=False, wandb={"project": "p"})
    log.write(_row(10, 1.0))
    log.log_round({"round": 0, "step": 0, "on_policy_tau": 1.0})
    log.log_eval(10, "x", 2.0)
    log.close()
    assert os.listdir(tmp_path) == []


class _FakeWandb(types.ModuleType):
    def __init__(self, history_step=0):
        super().__init__("wandb")
        self.inits, self.runs, self.history_step = [], [], history_step

    def init(self, **kwargs):
        outer = self
        self.inits.append(kwargs)

        class Run:
            step = outer.history_step
            logged, finished, preempting = [], None, False

            def log(self, values, step):
                self.logged.append((step, values))

            def finish(self, exit_code=0):
                self.finished = exit_code

            def mark_preempting(self):
                self.preempting = True

        self.runs.append(Run())
        return self.runs[-1]


def test_wandb_gets_the_same_scalars_and_resumes_its_run(tmp_path, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    log = M.MetricsLog(tmp_path, 0, wandb={"project": "dpace", "mode": "offline"})
    log.write(_row(10, 1.0))
    log.log_round({"round": 1, "step": 10, "on_policy_tau": 3.0})
    log.close()
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    assert fake.inits == [{"id": run_id, "resume": "allow", "dir": str(tmp_path),
                           "project": "dpace", "mode": "offline"}]
    (step, values), (round_step, round_values) = fake.runs[0].logged
    assert step == 10 and values == M.scalars_of(_row(10, 1.0))
    assert values["weight_per_position/pos_1"] == 1.0 and "step" not in values
    assert (round_step, round_values) == (10, {"opd/on_policy_tau": 3.0})
    assert fake.runs[0].finished == 0 and not fake.runs[0].preempting

    fake.history_step = 21  # W&B holds steps up to 20 from the killed run
    log = M.MetricsLog(tmp_path, 10, wandb={"project": "dpace"})
    for step in (20, 30):
        log.write(_row(step, 2.0))
    log.close(exit_code=143, preempted=True)
    assert fake.inits[1]["id"] == run_id and fake.inits[1]["resume"] == "allow"
    assert [s for s, _ in fake.runs[1].logged] == [30]  # W&B only takes increasing steps
    assert fake.runs[1].finished == 143 and fake.runs[1].preempting


def test_wandb_asked_for_but_not_installed_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ValueError, match=r"^logging.wandb is set but the wandb package is not "
                                         r"installed: pip install wandb, or unset logging.wandb$"):
        M.MetricsLog(tmp_path, 0, wandb={"project": "p"}, wandb_field="logging.wandb")
    M.check_wandb(None)  # not asked for: fine
    M.MetricsLog(tmp_path, 0, wandb=None).close()


def test_object_store_files_are_rewritten_whole_and_throttled(tmp_path):
    now = [0.0]
    with storage.fake_object_store("gs") as fs:
        workdir = storage.resolve("gs://bucket/run")
        storage.write_text(workdir / "metrics.jsonl", json.dumps(_row(10, 1.0)) + "\n"
                           + json.dumps(_row(20, 9.0)) + "\n")
        log = M.MetricsLog(workdir, 10, flush_every_s=30, clock=lambda: now[0])
        log.write(_row(20, 2.0))
        assert storage.read_text(workdir / "metrics.jsonl").count("\n") == 1  # not yet
        now[0] = 31.0
        log.write(_row(30, 3.0))  # due: metrics.jsonl and the event file rewritten whole
        assert [json.loads(r)["loss"] for r in
                storage.read_text(workdir / "metrics.jsonl").splitlines()] == [1.0, 2.0, 3.0]
        log.write(_row(40, 4.0))
        log.close()
        local = tmp_path / "tb"
        local.mkdir()
        for name in storage.listdir(workdir / "tensorboard"):
            (local / name).write_bytes(storage.read_bytes(workdir / "tensorboard" / name))
        assert all(not k.endswith(".tmp") for k in fs.store)
    assert _series(_accumulate(local), "loss") == [(10, 1.0), (20, 2.0), (30, 3.0), (40, 4.0)]
    shutil.rmtree(local)
