"""dpace_jax.train.preemption: SIGTERM / SIGINT / the clock become a save at a step boundary,
then a stop with the status a scheduler reads."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from dpace_jax.train import preemption as pre

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield saved
    for s, h in saved.items():
        signal.signal(s, h)


def test_sigterm_sets_a_flag_and_the_next_check_saves_and_stops(handlers):
    watch = pre.PreemptionWatch(process_count=1, process_index=0)
    assert signal.getsignal(signal.SIGTERM) == watch._handle
    assert watch.check(1) == pre.CONTINUE
    os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the next bytecode
    assert watch.signalled == "SIGTERM" and watch.signalled_at is not None
    decision = watch.check(2)
    assert decision == pre.Decision(save=True, stop=True, reason="SIGTERM", exit_code=143)
    os.kill(os.getpid(), signal.SIGTERM)  # a second one is ignored: the save is on its way
    assert watch.check(3).reason == "SIGTERM"
    watch.restore()
    assert signal.getsignal(signal.SIGTERM) is handlers[signal.SIGTERM]
    assert signal.getsignal(signal.SIGINT) is handlers[signal.SIGINT]


def test_first_ctrl_c_saves_and_stops_a_second_one_interrupts(handlers):
    with pre.PreemptionWatch(process_count=1, process_index=0) as watch:
        os.kill(os.getpid(), signal.SIGINT)
        assert watch.check(5) == pre.Decision(True, True, "SIGINT", pre.INTERRUPTED_EXIT_CODE)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100):  # delivered at a bytecode boundary
                pass
    assert signal.getsignal(signal.SIGINT) is handlers[signal.SIGINT]


def test_exit_codes_are_128_plus_the_signal():
    assert pre.PREEMPTED_EXIT_CODE == 143 == 128 + signal.SIGTERM
    assert pre.INTERRUPTED_EXIT_CODE == 130


def test_the_clock_trigger_saves_every_interval_from_the_last_save(handlers):
    now = [100.0]
    watch = pre.PreemptionWatch(save_every_minutes=2, process_count=1, process_index=0,
                                clock=lambda: now[0], signals=())
    now[0] = 219.0
    assert watch.check(10) == pre.CONTINUE
    now[0] = 220.0
    assert watch.check(11) == pre.Decision(save=True, stop=False, reason="clock")
    watch.note_saved(11)
    now[0] = 300.0
    assert watch.check(12) == pre.CONTINUE  # 80 s since that save
    now[0] = 340.0
    assert watch.check(13).reason == "clock"
    off = pre.PreemptionWatch(process_count=1, process_index=0, clock=lambda: 1e9, signals=())
    assert off.check(1) == pre.CONTINUE  # save_every_minutes=0: no clock saves


def test_multi_process_follows_jax_sync_point_and_leaves_sigterm_to_jax(handlers):
    calls = []

    def sync_point(step):
        calls.append(step)
        return step == 7

    watch = pre.PreemptionWatch(process_count=2, process_index=1, sync_point=sync_point,
                                jax_service=True, sync_every=1000, agree=lambda a: a[None])
    assert signal.getsignal(signal.SIGTERM) is handlers[signal.SIGTERM]  # JAX's C++ handler
    assert signal.getsignal(signal.SIGINT) == watch._handle
    assert [watch.check(s) for s in (5, 6)] == [pre.CONTINUE] * 2
    assert watch.check(7) == pre.Decision(True, True, "preemption notice", 143)
    assert calls == [5, 6, 7]  # at every step, by every process
    watch.restore()


def test_multi_process_agrees_on_signals_and_process_0s_clock(handlers):
    now, seen = [0.0], []
    others = {"signum": 0, "due": 0}  # process 1's row

    def agree(local):  # what process_allgather returns: row p is process p's
        seen.append(local.tolist())
        return np.stack([local, np.array([others["signum"], others["due"]], np.int32)])

    watch = pre.PreemptionWatch(save_every_minutes=1, process_count=2, process_index=0,
                                clock=lambda: now[0], sync_every=4, agree=agree,
                                jax_service=False, sync_point=lambda s: False)
    assert signal.getsignal(signal.SIGTERM) == watch._handle  # no JAX service: ours
    now[0] = 61.0
    assert watch.check(3) == pre.CONTINUE and seen == []  # not an agreement step
    assert watch.check(4) == pre.Decision(save=True, reason="clock")
    assert seen == [[0, 1]]
    watch.note_saved(4)
    others["due"] = 1  # another process's clock does not count
    assert watch.check(8) == pre.CONTINUE
    others["signum"] = int(signal.SIGTERM)  # signalled elsewhere: every process stops
    assert watch.check(12) == pre.Decision(True, True, "SIGTERM", 143)
    watch.restore()


def test_outside_the_main_thread_no_handler_is_installed(handlers, caplog):
    out = []
    t = threading.Thread(target=lambda: out.append(
        pre.PreemptionWatch(process_count=1, process_index=0)))
    t.start()
    t.join()
    assert out[0]._old == {} and "outside the main thread" in caplog.text
    assert signal.getsignal(signal.SIGTERM) is handlers[signal.SIGTERM]


def test_a_single_process_has_no_jax_preemption_service():
    assert pre.jax_preemption_service() is False


def test_a_terminated_loop_saves_prints_one_line_and_exits_143(tmp_path):
    """The trainer's pattern, in a child process that the test terminates like a scheduler."""
    code = textwrap.dedent("""
        import sys, time
        from dpace_jax.train import preemption as pre
        watch = pre.PreemptionWatch(process_count=1, process_index=0)
        print("ready", flush=True)
        saved = None
        try:
            for step in range(1, 10_000):
                time.sleep(0.01)  # one training step
                decision = watch.check(step)
                if decision.save:
                    saved = step  # checkpointer.save(step, ...)
                if decision.stop:
                    raise pre.Preempted(decision, saved)
        except pre.Preempted as e:
            # the loop's finally closes the checkpointer (waits for the save) first
            print(e, file=sys.stderr)
            raise
        finally:
            watch.restore()
    """)
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 143, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("preempted (SIGTERM) at step ")
    step = int(lines[0].split("at step ")[1].split(":")[0])
    assert lines[0] == (f"preempted (SIGTERM) at step {step}: checkpoint saved at step {step}; "
                        "run the same command to resume")
