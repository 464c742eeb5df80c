"""train.py with a kill -9 at a chosen point, for the fault-injection test.

`FAULT=save:N`: the process kills itself (SIGKILL) when the Nth checkpoint step of this process
is about to be committed: its arrays and meta are written into Orbax's temporary directory, the
rename that makes the step visible has not happened.
`FAULT=delete:N`: when the Nth old checkpoint step is being deleted (keep_checkpoints exceeded),
half of it (its `state/`) is removed, then the process kills itself.
Any other arguments are train.py's.
"""

import os
import runpy
import shutil
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KIND, _, NTH = os.environ.get("FAULT", "").partition(":")
_seen = [0]


def _nth() -> bool:
    _seen[0] += 1
    return _seen[0] == int(NTH)


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _step_dir(path) -> bool:
    path = Path(path)
    return path.parent.name == "checkpoints" and path.name.split(".")[0].isdigit()


_rename, _rmtree = os.rename, shutil.rmtree


def _killing_rename(src, dst, *args, **kwargs):
    if str(src).endswith(".orbax-checkpoint-tmp") and _step_dir(src) and _nth():
        _kill()
    return _rename(src, dst, *args, **kwargs)


def _killing_rmtree(path, *args, **kwargs):
    if _step_dir(path) and _nth():
        _rmtree(Path(path) / "state")
        _kill()
    return _rmtree(path, *args, **kwargs)


if KIND == "save":
    os.rename = _killing_rename
elif KIND == "delete":
    shutil.rmtree = _killing_rmtree
elif KIND:
    raise SystemExit(f"FAULT={os.environ['FAULT']!r}: expected save:N or delete:N")

sys.argv = [str(ROOT / "train.py"), *sys.argv[1:]]
runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
