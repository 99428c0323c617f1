"""A training loader that shuffles activation rows across shards with a bounded buffer.

The unit of reading is a Parquet row group (`harvest.row_group_rows` rows). Each epoch the
row groups of all shards are put in a seeded random order and cut into windows of at most
`buffer_rows` rows; a window is loaded (one row group at a time, into one preallocated array),
its rows are permuted, and batches are cut from that stream. So a batch mixes rows of many
row groups of many shards, memory stays at one window whatever the number of shards, and the
whole order is a pure function of (seed, row-group sizes): `batches(start_batch=n)` computes
where batch n starts from the footers alone and reads only from there on (resume).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

import numpy as np
import torch

from token_journey.data.shards import Activations, read_shard
from token_journey.errors import TokenJourneyError

T = TypeVar("T")


class ShuffledLoader:
    """Infinite, deterministic token-level shuffle over one harvested (site, layer, split).

    `batches()` yields float32 tensors [batch_size, d_model]; epochs follow each other without a
    gap (a batch may straddle two epochs), each in a fresh order.
    """

    def __init__(self, acts: Activations, batch_size: int, seed: int, buffer_rows: int = 262144) -> None:
        if batch_size < 1 or buffer_rows < 1:
            raise TokenJourneyError(f"batch_size={batch_size} and buffer_rows={buffer_rows} must be at least 1")
        self.acts, self.batch_size, self.seed, self.buffer_rows = acts, batch_size, seed, buffer_rows
        self.groups = [g for g in acts.row_groups() if g[2] > 0]
        self.epoch_rows = sum(g[2] for g in self.groups)
        if self.epoch_rows == 0:
            raise TokenJourneyError(f"{acts.folder} holds no rows to load; rerun harvest with more tokens")

    def windows(self, epoch: int) -> list[list[int]]:
        """Indices into `self.groups` for each window of `epoch`, in reading order."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.groups))
        windows: list[list[int]] = []
        rows = 0
        for index in order.tolist():
            size = self.groups[index][2]
            if not windows or rows + size > self.buffer_rows:
                windows.append([])
                rows = 0
            windows[-1].append(index)
            rows += size
        return windows

    def _load(self, window: list[int]) -> np.ndarray:
        """The rows of one window [rows, d_model] in the storage dtype (bfloat16 as uint16 bits)."""
        total = sum(self.groups[i][2] for i in window)
        out: np.ndarray | None = None
        at = 0
        for index in window:
            shard, group, rows = self.groups[index]
            column = read_shard(self.acts.paths[shard], ["activation"], group).column(0)
            values = column.combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(rows, -1)
            if out is None:
                out = np.empty((total, values.shape[1]), dtype=values.dtype)
            out[at : at + rows] = values
            at += rows
        assert out is not None
        return out

    def _stream(self, start_row: int) -> Iterator[np.ndarray]:
        """Row blocks of the infinite shuffled stream, starting `start_row` rows in."""
        epoch, offset = divmod(start_row, self.epoch_rows)
        while True:
            for w, window in enumerate(self.windows(epoch)):
                rows = sum(self.groups[i][2] for i in window)
                if offset >= rows:
                    offset -= rows
                    continue
                data = self._load(window)
                perm = np.random.default_rng([self.seed, epoch, w, 1]).permutation(rows)
                for at in range(offset, rows, self.batch_size):
                    yield data[perm[at : at + self.batch_size]]
                offset = 0
            epoch += 1

    def _to_float(self, block: np.ndarray) -> torch.Tensor:
        if self.acts.dtype == "bfloat16":
            return torch.from_numpy(block.view(np.int16)).view(torch.bfloat16).float()
        return torch.from_numpy(block).float()

    def batches(self, start_batch: int = 0) -> Iterator[torch.Tensor]:
        """Float32 batches [batch_size, d_model]; `start_batch=n` resumes exactly at batch n."""
        pending: list[np.ndarray] = []
        have = 0
        for block in self._stream(start_batch * self.batch_size):
            pending.append(block)
            have += block.shape[0]
            while have >= self.batch_size:
                joined = np.concatenate(pending) if len(pending) > 1 else pending[0]
                yield self._to_float(joined[: self.batch_size])
                rest = joined[self.batch_size :]
                pending, have = ([rest] if rest.shape[0] else []), rest.shape[0]


def prefetched(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """`items` in the same order, produced up to `depth` ahead by a background thread.

    The loader's work (Parquet reads, page checksums, the shuffle's row gathers) then overlaps the
    training step that consumes the batches: in a JumpReLU run at the default 250k tokens it was a
    tenth of the loop, all of it on the step's critical path. Parquet, numpy and torch release the GIL
    for that work. An exception in the producer is raised here, at the item where it happened; closing
    this generator (or dropping it) stops the thread.
    """
    box: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def offer(entry: tuple) -> bool:
        """Queue `entry` unless the consumer has stopped; whether it was queued."""
        while not stop.is_set():
            try:
                box.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer((item, None)):
                    return
            offer((done, None))
        except BaseException as exc:  # handed to the consumer, which raises it
            offer((done, exc))

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = box.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
