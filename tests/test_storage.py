"""dpace_jax.io.storage: workdir strings to paths (or one-line refusals), run-file helpers on a
local directory and on an in-memory object store reached through etils.epath's gs:// path."""

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from etils import epath

from dpace_jax.io import storage


def test_local_workdirs_are_absolute_user_expanded_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert storage.resolve("runs/a") == tmp_path / "runs" / "a"
    assert storage.resolve("~/r") == tmp_path / "home" / "r"
    assert storage.resolve(f"file://{tmp_path}/x") == tmp_path / "x"
    assert storage.resolve("name:with-colon") == tmp_path / "name:with-colon"  # a legal file name
    assert isinstance(storage.resolve("runs/a"), Path)
    assert not storage.is_object_store(storage.resolve("runs/a"))


@pytest.mark.parametrize("workdir, message", [
    ("hdfs://nn/x", r"workdir='hdfs://nn/x': unsupported storage scheme hdfs:// \(supported: "
                    r"local paths, gs://, s3://\)"),
    ("gs:/bucket/x", r"workdir='gs:/bucket/x': a gs:// URL has two slashes after the scheme: "
                     r"gs://bucket/x"),
    ("s3:bucket/x", r"a s3:// URL has two slashes"),
    ("gs://", r"workdir='gs://' names no bucket: write gs://BUCKET/PATH"),
    ("", r"workdir is empty"),
])
def test_unusable_workdirs_are_one_line_errors(workdir, message):
    with pytest.raises(storage.StorageError, match=message) as e:
        storage.resolve(workdir)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("scheme, package", [("gs", "gcsfs"), ("s3", "s3fs")])
def test_a_missing_filesystem_package_is_named(scheme, package, monkeypatch):
    real = storage.importlib.util.find_spec
    monkeypatch.setattr(storage.importlib.util, "find_spec",
                        lambda name: None if name in (package, "tensorflow") else real(name))
    with pytest.raises(storage.StorageError, match=(
            rf"^run.workdir='{scheme}://b/x' needs the {package} package for {scheme}:// paths "
            rf"\(etils.epath's filesystem\): pip install {package}$")):
        storage.resolve(f"{scheme}://b/x", field="run.workdir")


def test_bucket_urls_are_epath_paths_that_orbax_takes():
    with storage.fake_object_store("s3"):
        path = storage.resolve("s3://bucket/run/")
    assert isinstance(path, epath.Path) and os.fspath(path) == "s3://bucket/run"
    assert os.fspath(path / "checkpoints") == "s3://bucket/run/checkpoints"
    assert storage.is_object_store(path) and storage.is_object_store("gs://b/x")
    assert not storage.is_object_store("/gs/b")


@pytest.fixture(params=["local", "object store"])
def root(request, tmp_path):
    if request.param == "local":
        yield storage.resolve(tmp_path / "run")
        return
    with storage.fake_object_store("gs"):
        yield storage.resolve("gs://bucket/run")


def test_run_file_helpers(root):
    storage.mkdir(root)
    assert storage.listdir(root) == [] and storage.listdir(root / "absent") == []
    storage.write_text(root / "a.json", "{}")
    storage.write_text(root / "a.json", '{"v": 2}')
    assert storage.read_text(root / "a.json") == '{"v": 2}'
    storage.append_text(root / "h.jsonl", "1\n")
    storage.append_text(root / "h.jsonl", "2\n")
    assert storage.read_text(root / "h.jsonl") == "1\n2\n"
    storage.move(root / "a.json", root / "b.json")
    assert not storage.exists(root / "a.json") and storage.read_text(root / "b.json")
    storage.write_bytes(root / "d" / "x.bin", b"\x00\x01")
    storage.move(root / "d", root / "e")
    assert storage.read_bytes(root / "e" / "x.bin") == b"\x00\x01"
    with pytest.raises(FileExistsError, match="exists: not moving"):
        storage.move(root / "b.json", root / "h.jsonl")
    storage.remove(root / "b.json")
    storage.remove(root / "b.json")  # missing_ok
    assert storage.listdir(root) == ["e", "h.jsonl"]  # no temporary file left behind


def test_the_fake_object_store_behaves_like_one():
    from etils.epath import backend

    routing, missing = type(backend.fsspec_backend).fs, storage._missing_backend
    with storage.fake_object_store("gs") as fs:
        path = storage.resolve("gs://bucket/x")
        with pytest.raises(NotImplementedError, match="cannot append"):
            (path / "f").open("a")
        f = (path / "g").open("w")
        f.write("partial")
        assert not (path / "g").exists()  # an object appears when its upload completes
        f.close()
        assert (path / "g").read_text() == "partial"
        assert list(fs.store) == ["/bucket/x/g"]
    assert (type(backend.fsspec_backend).fs, storage._missing_backend) == (routing, missing)


def test_local_writes_are_atomic_and_get_the_umask_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        storage.write_text(tmp_path / "f", "x")
        assert storage.process_umask() == 0o027
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o640
    failing = tmp_path / "g"
    failing.write_text("old")
    with pytest.raises(TypeError):
        storage.write_bytes(failing, "not bytes")  # fails inside the write
    assert failing.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f", "g"]


def test_process_umask_does_not_change_the_umask_under_threads():
    # os.umask(0) then os.umask(mask) would let a thread create a file with mask 0 meanwhile;
    # process_umask must read /proc (or the value read at import) without setting anything.
    calls = []
    real = os.umask
    os.umask = lambda m: calls.append(m) or real(m)
    try:
        results = []
        threads = [threading.Thread(target=lambda: results.append(storage.process_umask()))
                   for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        os.umask = real
    assert calls == [] and len(set(results)) == 1
    assert results[0] == int(subprocess.run(["sh", "-c", "umask"], capture_output=True,
                                            text=True).stdout, 8)


@pytest.mark.skipif(sys.platform != "linux", reason="/proc/self/status")
def test_process_umask_reads_proc():
    assert storage._umask_from_proc() is not None


def test_atomic_writes_read_the_umask_without_setting_it(tmp_path, monkeypatch):
    """dpace_jax.io.atomic (exports, caches, run files) never sets the umask, not even for a
    moment: Orbax's writer threads may create files meanwhile (issue 26, item 9)."""
    from dpace_jax.io import atomic

    calls = []
    real = os.umask
    monkeypatch.setattr(os, "umask", lambda m: calls.append(m) or real(m))
    with atomic.atomic_path(tmp_path / "f") as tmp:
        tmp.write_text("x")
    assert calls == []
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o666 & ~storage.process_umask()
