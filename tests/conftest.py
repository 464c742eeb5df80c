"""Test session set-up: a persistent XLA compilation cache shared by the test processes and the
train.py / evaluate.py subprocesses they start, so that a program compiled by one process is not
compiled again by the next (the cache hands back the same executable: results are unchanged).
DPACE_TEST_COMPILE_CACHE=0 turns it off. This runs before any test module imports JAX."""

import os
import tempfile

if os.environ.get("DPACE_TEST_COMPILE_CACHE", "1") != "0":
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
        tempfile.gettempdir(), f"dpace-jax-tests-xla-cache-{os.getuid()}"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
