"""train.py with a kill -9 at a chosen point, for the fault-injection test.

`FAULT=save:N`: the process kills itself (SIGKILL) when the Nth checkpoint step of this process
is about to be committed: its arrays and meta are written into Orbax's temporary directory, the
rename that makes the step visible has not happened.
`FAULT=delete:N`: when the Nth old checkpoint step is being deleted (keep_checkpoints exceeded),
half of it (its `state/`) is removed, then the process kills itself.
`FAULT=sigterm:N`: the process sends itself SIGTERM at the end of step N (in a multi-process
run only the process with `--config.process_id=$FAULT_PROCESS`, default 1).
`FAULT=pause:N`: at the end of step N the process waits (for a signal from the test) until the
file `$FAULT_GATE` exists.
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


def _at_step(action):
    """Run `action` when the loop's preemption check sees step NTH (before the check, so that a
    signal sent meanwhile is seen at that very step)."""
    from dpace_jax.train import preemption

    check = preemption.PreemptionWatch.check

    def hooked(self, step):
        if step == int(NTH):
            action()
        return check(self, step)

    preemption.PreemptionWatch.check = hooked


def _sigterm() -> None:
    me = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config.process_id=")),
              None)
    if me is None or me == os.environ.get("FAULT_PROCESS", "1"):
        os.kill(os.getpid(), signal.SIGTERM)


def _pause() -> None:
    import time

    print(f"paused at step {NTH}", file=sys.stderr, flush=True)
    while not Path(os.environ["FAULT_GATE"]).exists():
        time.sleep(0.1)


if KIND == "save":
    os.rename = _killing_rename
elif KIND == "delete":
    shutil.rmtree = _killing_rmtree
elif KIND == "sigterm":
    _at_step(_sigterm)
elif KIND == "pause":
    _at_step(_pause)
elif KIND:
    raise SystemExit(f"FAULT={os.environ['FAULT']!r}: expected save:N, delete:N, sigterm:N or "
                     "pause:N")

sys.argv = [str(ROOT / "train.py"), *sys.argv[1:]]
runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
