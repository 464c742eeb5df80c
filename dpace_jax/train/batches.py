"""Fixed-shape, deterministic, resumable, process-sliced batches of a tokenized dataset.

`Batches(dataset, batch_size, seq_len, seed=0, *, state=None, process_index=0, process_count=1,
pad_id=0, num_epochs=None)` yields `{"input_ids", "loss_mask", "attention_mask"}` int32
[b, seq_len] (right-padded with pad_id, truncated to seq_len) and `"length"` int32 [b], with
b = batch_size // process_count. Epoch e visits the samples in the order
`np.random.default_rng([seed, e]).permutation(len(dataset))`, `len(dataset) // batch_size` global
batches per epoch (the remainder is dropped); process p gets rows [p*b, (p+1)*b) of each global
batch. `.state()` is a JSON-able dict; `Batches(..., state=saved)` continues with exactly the
batch that would have come next.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from dpace_jax.data.conversations import TokenizedDataset


class Batches:
    """Deterministic, resumable, process-sliced iterator of fixed-shape numpy batches."""

    keys = ("input_ids", "loss_mask")  # what the train step takes (the trainer's batch source)

    def take(self, train_state=None) -> dict[str, np.ndarray]:
        return next(self)

    def save_due(self, step: int) -> bool:
        return False

    def __init__(
        self,
        dataset: TokenizedDataset,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        *,
        state: Mapping | None = None,
        process_index: int = 0,
        process_count: int = 1,
        pad_id: int = 0,
        num_epochs: int | None = None,
    ):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size={batch_size}, seq_len={seq_len}: must be >= 1")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        if batch_size % process_count:
            raise ValueError(
                f"batch_size={batch_size} (global) is not divisible by process_count="
                f"{process_count}"
            )
        if len(dataset) < batch_size:
            raise ValueError(
                f"dataset has {len(dataset)} samples, fewer than batch_size={batch_size}"
            )
        self.dataset, self.batch_size, self.seq_len = dataset, batch_size, seq_len
        self.seed, self.pad_id, self.num_epochs = int(seed), pad_id, num_epochs
        self.process_index, self.process_count = process_index, process_count
        self.local_batch_size = batch_size // process_count
        self.steps_per_epoch = len(dataset) // batch_size
        self.epoch, self.index = 0, 0
        if state is not None:
            self._restore(state)
        self._perm_epoch, self._perm = None, None

    def _restore(self, state: Mapping) -> None:
        n = len(self.dataset)
        expect = {"seed": self.seed, "batch_size": self.batch_size, "num_samples": n}
        for k, v in expect.items():
            if k in state and int(state[k]) != v:
                raise ValueError(f"data state has {k}={state[k]}, but this run has {k}={v}")
        try:
            epoch, index = int(state["epoch"]), int(state["index"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"data state {dict(state)!r}: expected integer 'epoch' and 'index'"
            ) from e
        if epoch < 0 or not 0 <= index <= self.steps_per_epoch:
            raise ValueError(f"data state epoch={epoch}, index={index} out of range")
        self.epoch, self.index = epoch, index

    def state(self) -> dict:
        """Position of the next batch, JSON-able."""
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_samples": len(self.dataset),
        }

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The sample order of an epoch (same for every process and every run)."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.index >= self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        if self._perm_epoch != self.epoch:
            self._perm_epoch, self._perm = self.epoch, self.epoch_order(self.epoch)
        start = self.index * self.batch_size + self.process_index * self.local_batch_size
        batch = self._collate(self._perm[start : start + self.local_batch_size])
        self.index += 1
        if self.index == self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        return batch

    def _collate(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        b, S = len(idx), self.seq_len
        ids = np.full((b, S), self.pad_id, np.int32)
        loss = np.zeros((b, S), np.int32)
        attn = np.zeros((b, S), np.int32)
        length = np.zeros((b,), np.int32)
        for r, i in enumerate(idx):
            s = self.dataset[int(i)]
            n = min(len(s["input_ids"]), S)
            ids[r, :n] = s["input_ids"][:n]
            loss[r, :n] = s["loss_mask"][:n]
            attn[r, :n] = 1
            length[r] = n
        return {"input_ids": ids, "loss_mask": loss, "attention_mask": attn, "length": length}
