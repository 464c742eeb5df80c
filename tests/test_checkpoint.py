"""Orbax checkpoints of the train state: round trip, keep-last-N, interrupted saves."""

import os

import jax
import jax.numpy as jnp
import numpy as np

from dpace_jax import sharding as shard_lib
from dpace_jax.train import checkpoint as ckpt_lib


def _state(seed):
    k = jax.random.PRNGKey(seed)
    return {"params": {"fc": jax.random.normal(k, (8, 4)), "final_norm": jnp.ones((4,))},
            "step": jnp.asarray(seed, jnp.int32), "rng": jax.random.PRNGKey(seed + 100)}


def _abstract(state):
    mesh = shard_lib.make_mesh((1, 1, 1), jax.devices()[:1])
    shardings = jax.tree.map(lambda _: shard_lib.replicated(mesh), state)
    return ckpt_lib.abstract_like(state, shardings)


def _assert_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_round_trip_and_keep_last(tmp_path):
    ckpt = ckpt_lib.Checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, _state(step), {"data": {"epoch": 0, "index": step}})
    ckpt.close()
    ckpt = ckpt_lib.Checkpointer(tmp_path, keep=2)
    assert ckpt.latest_step() == 3
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["2", "3"]
    state, meta = ckpt.restore(3, _abstract(_state(0)))
    _assert_equal(state, _state(3))
    assert meta["data"] == {"epoch": 0, "index": 3}
    assert meta["checksums"] == ckpt_lib.checksums(_state(3))


def test_interrupted_save_is_not_restorable(tmp_path):
    ckpt = ckpt_lib.Checkpointer(tmp_path, keep=3)
    ckpt.save(1, _state(1), {"data": {"index": 1}})
    ckpt.save(2, _state(2), {"data": {"index": 2}})
    ckpt.close()
    # A crash between writing step 2 and committing it leaves only the temporary directory
    # (Orbax commits a step by renaming it into place), with some files missing.
    os.rename(tmp_path / "2", tmp_path / "2.orbax-checkpoint-tmp")
    for f in sorted((tmp_path / "2.orbax-checkpoint-tmp").rglob("*"))[-3:]:
        if f.is_file():
            f.unlink()
    ckpt = ckpt_lib.Checkpointer(tmp_path, keep=3)
    assert ckpt.latest_step() == 1
    state, meta = ckpt.restore(1, _abstract(_state(0)))
    _assert_equal(state, _state(1))
    assert meta["data"] == {"index": 1}
