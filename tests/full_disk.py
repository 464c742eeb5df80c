"""The full-disk scenario of tests/test_full_disk.py, run inside a private user and mount
namespace (`unshare -rm python tests/full_disk.py OUT TARGET DATA`) so that it can mount small
tmpfs file systems without privileges: the workdir on one (8 MB), the tokenization cache on a
smaller one (16 KB). A filler file takes the space a checkpoint save, then an export, needs.
Prints one JSON object: per phase, train.py's exit status and its own stderr lines, and what was
on the disks before and after. The mounts vanish with the namespace; OUT (outside them) keeps
the JSON."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT, TARGET, DATA = (Path(a) for a in sys.argv[1:4])


def mount(path: Path, size_kb: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                   check=True)
    return path


def fill(path: Path, leave_kb: int) -> None:
    st = os.statvfs(path)
    with open(path / "filler", "wb") as f:
        f.write(b"\0" * max(st.f_bavail * st.f_frsize - leave_kb * 1024, 0))


def files(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != "filler"}


def train(workdir: Path, cache: Path, *args) -> dict:
    out = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/tiny.py"),
         f"--config.workdir={workdir}", f"--config.target.path={TARGET}",
         f"--config.data.paths=('{DATA}',)", f"--config.data.cache_dir={cache}",
         "--config.train.max_steps=4", "--config.train.save_every=2",
         "--config.train.log_every=1", "--config.train.progress=False", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    lines = [line for line in out.stderr.splitlines() if line.strip()
             and not re.match(r"^[IW]\d{4} ", line)]
    return {"rc": out.returncode, "stderr": lines,
            "warnings": [line for line in out.stderr.splitlines() if line.startswith("W")]}


def main() -> None:
    work, cache = mount(OUT / "disk" / "run", 8192), mount(OUT / "disk" / "cache", 16)
    (cache / "older-cache.txt").write_text("written before this run\n")
    report = {"cache_before": files(cache)}
    report["first"] = train(work, cache, "--config.train.stop_at=2")  # cache write: disk full
    report["cache_after"] = files(cache)
    saved = files(work / "checkpoints" / "2")
    fill(work, 160)  # room for run files and metrics rows, not for a checkpoint
    report["save"] = train(work, cache)
    report["checkpoints_kept"] = files(work / "checkpoints" / "2") == saved
    (work / "filler").unlink()
    report["resumed"] = train(work, cache)
    exported = files(work / "hf")
    fill(work, 64)  # not enough for the export's staging directory
    report["export"] = train(work, cache)
    report["hf_kept"] = files(work / "hf") == exported
    report["leftovers"] = sorted(p.name for p in work.iterdir() if p.name.startswith("."))
    (work / "filler").unlink()
    report["again"] = train(work, cache)
    report["hf_same"] = files(work / "hf") == exported
    (OUT / "report.json").write_text(json.dumps(report, indent=1))


main()
