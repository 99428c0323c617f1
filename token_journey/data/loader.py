"""A training loader that shuffles activation rows across shards with a bounded buffer.

The unit of reading is a Parquet row group (`harvest.row_group_rows` rows). Each epoch the
row groups of all shards are put in a seeded random order and cut into windows of at most
`buffer_rows` rows; a window is loaded (one row group at a time, into one preallocated array),
its rows are permuted, and batches are cut from that stream. So a batch mixes rows of many
row groups of many shards, memory stays at one window whatever the number of shards, and the
whole order is a pure function of (seed, row-group sizes): `batches(start_batch=n)` computes
where batch n starts from the footers alone and reads only from there on (resume).

`PairedLoader` does the same for a transcoder: rows of two sites of one layer (the MLP's input and
output) matched token by token, the input beside the target in each row.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

import numpy as np
import pyarrow as pa
import torch

from token_journey.data.shards import Activations, activation_tensor, read_shard
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
        self._kept: dict[int, np.ndarray] = {}

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

    def _read_group(self, index: int) -> np.ndarray:
        """The rows of one group `self.groups[index]` [rows, d_model] in the storage dtype (bfloat16 as uint16 bits)."""
        shard, group, rows = self.groups[index]
        column = read_shard(self.acts.paths[shard], ["activation"], group).column(0)
        return column.combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(rows, -1)

    def _group(self, index: int) -> np.ndarray:
        """`_read_group(index)`, decoded once when every epoch is one window.

        Then each epoch reads exactly the rows the last one did (in another group order) into the one
        window it holds anyway: keeping them decoded saves every pass after the first its Parquet reads
        (a transcoder of the circuits branch, 4 passes over one 65k-row shard per site: ~4 s each on 2
        cores) at no extra memory. Otherwise every window is read as it comes.
        """
        if len(self.groups) > 1 and self.epoch_rows > self.buffer_rows:
            return self._read_group(index)
        if index not in self._kept:
            self._kept[index] = self._read_group(index)
        return self._kept[index]

    def _load(self, window: list[int]) -> np.ndarray:
        """The rows of one window [rows, d_model] in the storage dtype, its groups in the window's order."""
        parts = [self._group(index) for index in window]
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

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


def _keys(table: pa.Table) -> np.ndarray:
    """One int64 per row naming its token: sequence_id * 2^20 + position (contexts are far below 2^20)."""
    return table.column("sequence_id").to_numpy() * (1 << 20) + table.column("position").to_numpy()


def pair_rows(table_in: pa.Table, table_out: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (into `table_in`, into `table_out`) of the tokens both tables hold, in token order.

    Each site's harvest drops its own norm outliers, so two sites of one shard can hold different
    tokens; pairing by (sequence_id, position) keeps exactly the tokens that are rows at both.
    """
    _, rows_in, rows_out = np.intersect1d(_keys(table_in), _keys(table_out), assume_unique=True, return_indices=True)
    return rows_in, rows_out


def _check_pairable(acts_in: Activations, acts_out: Activations) -> None:
    """Both sites must come from one harvest run (same shards of the same sequences, same dtype)."""
    a, b = acts_in.manifest, acts_out.manifest
    if a.get("run_key") != b.get("run_key") or len(a["shards"]) != len(b["shards"]) or acts_in.dtype != acts_out.dtype:
        raise TokenJourneyError(
            f"{acts_in.folder} and {acts_out.folder} were not harvested by the same run; harvest both "
            "sites together (harvest.sites lists both) and rerun harvest"
        )


def _paired_values(table: pa.Table, rows: np.ndarray) -> np.ndarray:
    """The activations of `rows` of a shard table [len(rows), d_model] in the storage dtype."""
    column = table.column("activation").combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(table), -1)[rows]


class PairedLoader(ShuffledLoader):
    """`ShuffledLoader` over the tokens two sites of one layer and split both hold (a transcoder's input and target).

    Yields float32 [batch_size, d_in + d_out]: the input row, then the target row, of one token. The
    unit of reading is a whole shard of both sites (pairs are matched per shard, `pair_rows`), and a
    window holds at most `buffer_rows // 2` pairs, so memory stays that of a `ShuffledLoader`.
    Resume (`batches(start_batch=n)`) works as there: the pair counts come from the id columns alone.
    """

    def __init__(self, acts_in: Activations, acts_out: Activations, batch_size: int, seed: int, buffer_rows: int = 262144) -> None:
        if batch_size < 1 or buffer_rows < 1:
            raise TokenJourneyError(f"batch_size={batch_size} and buffer_rows={buffer_rows} must be at least 1")
        _check_pairable(acts_in, acts_out)
        self.acts, self.acts_in = acts_out, acts_in
        self.batch_size, self.seed, self.buffer_rows = batch_size, seed, max(1, buffer_rows // 2)
        ids = ["sequence_id", "position"]
        counts = [len(pair_rows(read_shard(a, ids), read_shard(b, ids))[0]) for a, b in zip(acts_in.paths, acts_out.paths)]
        self.groups = [(shard, 0, n) for shard, n in enumerate(counts) if n > 0]
        self.epoch_rows = sum(counts)
        if self.epoch_rows == 0:
            raise TokenJourneyError(f"{acts_in.folder} and {acts_out.folder} share no token rows; rerun harvest with more tokens")
        self._kept = {}

    def _read_group(self, index: int) -> np.ndarray:
        """The pairs of one shard `self.groups[index]` [pairs, d_in + d_out] in the storage dtype."""
        shard = self.groups[index][0]
        columns = ["activation", "sequence_id", "position"]
        table_in, table_out = read_shard(self.acts_in.paths[shard], columns), read_shard(self.acts.paths[shard], columns)
        rows_in, rows_out = pair_rows(table_in, table_out)
        return np.concatenate([_paired_values(table_in, rows_in), _paired_values(table_out, rows_out)], axis=1)


def paired_tensors(acts_in: Activations, acts_out: Activations, max_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `max_rows` tokens both sites hold, in shard order: (input [N, d_in], target [N, d_out]) float32."""
    _check_pairable(acts_in, acts_out)
    xs, ys, have = [], [], 0
    columns = ["activation", "sequence_id", "position"]
    for path_in, path_out in zip(acts_in.paths, acts_out.paths):
        table_in, table_out = read_shard(path_in, columns), read_shard(path_out, columns)
        rows_in, rows_out = pair_rows(table_in, table_out)
        xs.append(activation_tensor(table_in.column("activation"), acts_in.dtype)[torch.from_numpy(rows_in)])
        ys.append(activation_tensor(table_out.column("activation"), acts_out.dtype)[torch.from_numpy(rows_out)])
        have += len(rows_in)
        if have >= max_rows:
            break
    return torch.cat(xs)[:max_rows], torch.cat(ys)[:max_rows]


def prefetched(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """`items` in the same order, produced up to `depth` ahead by a background thread.

    The loader's work (Parquet reads, page checksums, the shuffle's row gathers) then overlaps the
    training step that consumes the batches: in a JumpReLU run at the default 250k tokens it was a
    tenth of the loop, all of it on the step's critical path. Parquet, numpy and torch release the GIL
    for that work. An exception in the producer is raised here, at the item where it happened; closing
    this generator (or dropping it) stops the thread and waits for it.
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
        # Wait for the producer to see `stop` (it finishes the item in hand first): a thread still
        # inside torch or Arrow when the interpreter exits aborts the process ("terminate called").
        stop.set()
        thread.join()
