"""A full disk during a checkpoint save, the tokenization cache write and the export loses
nothing already written, and each is said in one line (issue 26, item 5): a real ENOSPC from
small tmpfs mounts (tests/full_disk.py in an unprivileged user + mount namespace)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _namespaces_work() -> bool:
    if sys.platform != "linux" or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs "
                            "/mnt 2>/dev/null || mount -t tmpfs -o size=64k tmpfs /tmp"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _namespaces_work(), reason="needs unshare -rm and tmpfs mounts")
def test_a_full_disk_in_save_cache_write_and_export_loses_nothing(tmp_path):
    from dpace_jax.demo import data as demo_data
    from dpace_jax.demo import target as demo_target

    target = demo_target.build_random_target(tmp_path / "target")
    data = demo_data.write_demo_conversations(tmp_path / "demo.jsonl", num_samples=32)
    out = subprocess.run(["unshare", "-rm", sys.executable, str(ROOT / "tests/full_disk.py"),
                          str(tmp_path), str(target), str(data)], capture_output=True, text=True,
                         timeout=1800, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads((tmp_path / "report.json").read_text())
    disk = tmp_path / "disk"

    # the cache write: a warning, the run goes on; what was in the cache directory stays
    assert r["first"]["rc"] == 0, r["first"]
    assert any("tokenization cache" in w and " not written (" in w and "KB free there); "
               "training goes on" in w for w in r["first"]["warnings"]), r["first"]
    assert r["cache_after"] == r["cache_before"]

    # the save: one line naming the step and the intact older step; those bytes unchanged
    assert r["save"]["rc"] == 1 and r["save"]["stderr"] == [
        f"error: saving checkpoint step 4 to {disk}/run/checkpoints failed (No space left on "
        "device [errno 28]); the steps saved before it are intact: [2]"], r["save"]
    assert r["checkpoints_kept"]
    assert r["resumed"]["rc"] == 0, r["resumed"]  # ... and it resumes from them

    # the export: one line; the previous export unchanged, no staging directory left
    assert r["export"]["rc"] == 1 and r["export"]["stderr"] == [
        f"error: exporting the drafter to {disk}/run/hf failed (No space left on device "
        "[errno 28]); the "
        "checkpoint of step 4 is intact: run the same command again to export it"], r["export"]
    assert r["hf_kept"] and r["leftovers"] == []
    assert r["again"]["rc"] == 0 and r["hf_same"]
