"""Test session set-up, before any test module imports JAX (the environment also reaches the
train.py / evaluate.py subprocesses that tests start): a persistent XLA compilation cache shared
by the test processes and their subprocesses, so that a program compiled by one process is not
compiled again by the next (the cache hands back the same executable: results are unchanged).
DPACE_TEST_COMPILE_CACHE=0 turns it off. And the order in which the two workers take the tests:
the heaviest first (HEAVIEST)."""

import os
import tempfile

if os.environ.get("DPACE_TEST_COMPILE_CACHE", "1") != "0":
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
        tempfile.gettempdir(), f"dpace-jax-tests-xla-cache-{os.getuid()}"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


# The modules whose tests take longest (measured with --durations, heaviest first). Two workers
# share the suite by xdist groups; a long test that starts last leaves the other worker idle, so
# these start first (pyproject's --no-loadscope-reorder keeps this order instead of sorting the
# groups by their number of tests). A module missing here only runs later.
HEAVIEST = ("test_preemptible_runs.py", "test_train_cli.py", "test_opd.py",
            "test_trained_crosscheck.py", "test_spd_draft.py", "test_qwen3_5_target.py",
            "test_robustness.py", "test_block_attention.py", "test_spd.py", "test_train_step.py",
            "test_full_disk.py", "test_bench_smoke.py", "test_data.py", "test_dflash2.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(HEAVIEST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(HEAVIEST)))  # stable
