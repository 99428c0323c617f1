"""Shard writer, verified reader and the shuffling loader, on synthetic activations (no model)."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
import torch

from token_journey.data.loader import ShuffledLoader, prefetched
from token_journey.data.shards import ShardWriter, open_activations, write_manifest
from token_journey.errors import TokenJourneyError
from token_journey.layout import activations_folder

D = 8


def _write(root, n_shards, rows_per_shard=64, dtype="float32", row_group_rows=16, seq_len=16):
    """Shards whose activation[:, 0] is the global row number, so every row is identifiable."""
    folder = activations_folder(root, "resid_post", 3)
    writer = ShardWriter(folder, D, dtype, run_key="k", row_group_rows=row_group_rows)
    row = 0
    for shard in range(n_shards):
        ids = torch.arange(row, row + rows_per_shard)
        acts = torch.randn(rows_per_shard, D, generator=torch.Generator().manual_seed(shard))
        acts[:, 0] = ids.float()
        writer.add(acts.to(getattr(torch, dtype)), ids % 300, ids // seq_len, ids % seq_len, {"special": 1})
        writer.finish(shard)
        row += rows_per_shard
    write_manifest(folder, n_shards, {"site": "resid_post", "layer": 3, "d_model": D, "dtype": dtype})
    return folder


def test_manifest_statistics_match_the_rows(tmp_path):
    _write(tmp_path, 3)
    acts = open_activations(tmp_path, "resid_post", 3, verify=True)
    x = acts.tensor().double()
    assert acts.rows == 192 and acts.d_model == D and len(acts.manifest["shards"]) == 3
    assert np.allclose(acts.manifest["mean"], x.mean(0).numpy())
    assert acts.manifest["mean_sq_norm"] == pytest.approx(float((x * x).sum(1).mean()))
    assert acts.manifest["excluded_counts"] == {"special": 3}
    table = acts.read_all(["token_id", "sequence_id", "position"])
    assert table.num_rows == 192 and table.column("position").to_pylist()[:3] == [0, 1, 2]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_storage_round_trips(tmp_path, dtype):
    _write(tmp_path, 2, dtype=dtype)
    acts = open_activations(tmp_path, "resid_post", 3)
    x = acts.tensor()
    expected = torch.cat([torch.randn(64, D, generator=torch.Generator().manual_seed(s)) for s in range(2)])
    expected[:, 0] = torch.arange(128).float()
    assert x.dtype == torch.float32
    assert torch.equal(x, expected.to(getattr(torch, dtype)).float())
    batch = next(ShuffledLoader(acts, 32, seed=0).batches())
    assert batch.shape == (32, D) and batch.dtype == torch.float32


def test_loader_is_a_deterministic_resumable_shuffle(tmp_path):
    _write(tmp_path, 10)
    acts = open_activations(tmp_path, "resid_post", 3)
    loader = ShuffledLoader(acts, batch_size=48, seed=7, buffer_rows=160)
    stream = loader.batches()
    first = [next(stream) for _ in range(30)]  # 1440 rows: more than two epochs of 640
    rows = torch.cat(first)[:, 0].long()
    for epoch in (0, 1):  # every epoch is a permutation of all rows, each in a new order
        assert sorted(rows[epoch * 640 : (epoch + 1) * 640].tolist()) == list(range(640))
    assert rows[:640].tolist() != rows[640:1280].tolist()
    assert rows[:640].tolist() != list(range(640))
    for start in (1, 13, 14, 27):  # inside a window, at epoch boundaries and past them
        resumed = loader.batches(start_batch=start)
        for i in range(start, 30):
            assert torch.equal(next(resumed), first[i])
    again = [b for _, b in zip(range(5), ShuffledLoader(acts, 48, seed=7, buffer_rows=160).batches())]
    assert all(torch.equal(a, b) for a, b in zip(again, first))
    other = next(ShuffledLoader(acts, 48, seed=8, buffer_rows=160).batches())
    assert not torch.equal(other, first[0])


def test_a_loader_whose_epoch_is_one_window_reads_the_shards_once(tmp_path):
    """Every epoch then reads the same rows: they are decoded once, and the batches stay those of a fresh reader."""
    from token_journey import storage

    _write(tmp_path, 4)  # 256 rows in 16 row groups
    acts = open_activations(tmp_path, "resid_post", 3)
    before = storage.BYTES_READ.total
    loader = ShuffledLoader(acts, batch_size=48, seed=7, buffer_rows=256)
    stream = loader.batches()
    batches = [next(stream) for _ in range(22)]  # 1056 rows: four epochs and a bit
    first_epoch = storage.BYTES_READ.total - before
    assert first_epoch > 0
    rows = torch.cat(batches)[:, 0].long()
    for epoch in range(4):  # each epoch all rows, each in a new order
        assert sorted(rows[epoch * 256 : (epoch + 1) * 256].tolist()) == list(range(256))
    assert rows[:256].tolist() != rows[256:512].tolist()
    for start in (6, 17):  # a fresh loader started there reads its rows from the shards: the same batches
        fresh = ShuffledLoader(acts, batch_size=48, seed=7, buffer_rows=256).batches(start)
        assert all(torch.equal(next(fresh), batches[i]) for i in range(start, 22))
    reads = storage.BYTES_READ.total
    more = [next(stream) for _ in range(11)]  # two more epochs from the kept rows: nothing read
    assert storage.BYTES_READ.total == reads and len(more) == 11
    small = ShuffledLoader(acts, batch_size=48, seed=7, buffer_rows=64)  # four windows an epoch: read as they come
    before = storage.BYTES_READ.total
    for _, _b in zip(range(11), small.batches()):
        pass
    assert storage.BYTES_READ.total - before > first_epoch


def test_prefetched_batches_are_the_loaders_batches(tmp_path):
    """The background thread hands over exactly the loader's batches, in order, from any start."""
    _write(tmp_path, 4)
    loader = ShuffledLoader(open_activations(tmp_path, "resid_post", 3), batch_size=48, seed=7, buffer_rows=64)
    for start in (0, 9):
        plain, ahead = loader.batches(start), prefetched(loader.batches(start), depth=3)
        for _ in range(20):  # several epochs of 256 rows, several windows each
            assert torch.equal(next(ahead), next(plain))
        ahead.close()


def test_prefetched_raises_the_producers_error_in_place_and_stops_when_closed():
    import threading
    import time

    def items():
        yield 1
        yield 2
        raise TokenJourneyError("shard 3 is damaged")

    got = []
    with pytest.raises(TokenJourneyError, match="shard 3 is damaged"):
        for item in prefetched(items()):
            got.append(item)
    assert got == [1, 2]
    produced = []

    def endless():
        while True:
            produced.append(1)
            yield len(produced)

    ahead = prefetched(endless(), depth=2)
    assert [next(ahead) for _ in range(3)] == [1, 2, 3]
    ahead.close()
    time.sleep(0.5)
    count = len(produced)
    time.sleep(0.3)
    assert len(produced) == count <= 3 + 2 + 1  # stopped: at most depth (+ the one it was offering) ahead
    assert not any(t.name == "prefetch" and t.is_alive() for t in threading.enumerate())

    def slow():  # the producer is busy with an item when the consumer stops
        while True:
            time.sleep(0.3)
            yield 0

    busy = prefetched(slow(), depth=1)
    next(busy)
    busy.close()  # returns only once the thread has ended: one still running at exit aborts the process
    assert not any(t.name == "prefetch" and t.is_alive() for t in threading.enumerate())


def test_a_batch_mixes_many_shards_and_sequences(tmp_path):
    _write(tmp_path, 10)
    acts = open_activations(tmp_path, "resid_post", 3)
    batch = next(ShuffledLoader(acts, batch_size=64, seed=0, buffer_rows=320).batches())
    row = batch[:, 0].long()
    assert len(set((row // 64).tolist())) >= 5  # shards
    assert len(set((row // 16).tolist())) >= 15  # sequences (16 rows each)


def _peak_bytes(root, n_shards):
    acts = open_activations(root, "resid_post", 3)
    tracemalloc.start()
    for _, _batch in zip(range(3 * n_shards), ShuffledLoader(acts, 64, seed=0, buffer_rows=2048).batches()):
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_loader_memory_does_not_grow_with_the_number_of_shards(tmp_path):
    _write(tmp_path / "few", 4, rows_per_shard=1024, row_group_rows=256)
    _write(tmp_path / "many", 40, rows_per_shard=1024, row_group_rows=256)
    few, many = _peak_bytes(tmp_path / "few", 4), _peak_bytes(tmp_path / "many", 40)
    buffer_bytes = 2048 * D * 4
    assert many < 1.5 * few + 64 * 1024, (few, many)
    assert many < 4 * buffer_bytes + 256 * 1024, (many, buffer_bytes)


def test_reader_rejects_damaged_or_missing_data(tmp_path):
    folder = _write(tmp_path, 3)
    with pytest.raises(TokenJourneyError, match="layer 4 .* was not harvested"):
        open_activations(tmp_path, "resid_post", 4)
    manifest = json.loads((folder / "manifest.json").read_text())
    bad = dict(manifest, shards=[dict(manifest["shards"][0], rows=63)] + manifest["shards"][1:])
    (folder / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(TokenJourneyError, match="has 64 rows but"):
        open_activations(tmp_path, "resid_post", 3)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    data = bytearray((folder / "shard-00001.parquet").read_bytes())
    data[200] ^= 0xFF  # inside the data pages: the footer still reads
    (folder / "shard-00001.parquet").write_bytes(bytes(data))
    with pytest.raises(TokenJourneyError, match="shard-00001.parquet is damaged .*sha256 differs.*delete it and rerun harvest"):
        open_activations(tmp_path, "resid_post", 3)
    acts = open_activations(tmp_path, "resid_post", 3, verify=False)  # row counts alone cannot see it
    with pytest.raises(TokenJourneyError, match="shard-00001.parquet is damaged .*delete it and rerun harvest"):
        list(acts.iter_tables())  # the page checksum still catches it on read
    (folder / "shard-00001.parquet").write_bytes(bytes(data[:100]))
    with pytest.raises(TokenJourneyError, match="shard-00001.parquet is damaged .*unreadable footer"):
        open_activations(tmp_path, "resid_post", 3, verify=False)
    (folder / "shard-00002.parquet").unlink()
    with pytest.raises(TokenJourneyError, match=r"missing \['shard-00002.parquet'\]"):
        open_activations(tmp_path, "resid_post", 3)
    (folder / "manifest.json").unlink()
    with pytest.raises(TokenJourneyError, match="has no manifest"):
        open_activations(tmp_path, "resid_post", 3)


def test_a_flipped_byte_anywhere_in_a_shard_stops_the_next_reader(tmp_path):
    """20 random offsets (seeded), one bit each: a stage's open-and-read stops each time, naming the shard."""
    import random

    folder = _write(tmp_path, 2, rows_per_shard=256, row_group_rows=64)
    path = folder / "shard-00001.parquet"
    clean = path.read_bytes()
    rng = random.Random(0)
    caught = 0
    for _ in range(20):
        data = bytearray(clean)
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
        with pytest.raises(TokenJourneyError, match="shard-00001.parquet is damaged"):
            acts = open_activations(tmp_path, "resid_post", 3)
            for _batch, _ in zip(ShuffledLoader(acts, 64, seed=0, buffer_rows=128).batches(), range(8)):
                pass  # 8 batches of 64 = every row of both shards once
        caught += 1
    assert caught == 20
    path.write_bytes(clean)
    assert open_activations(tmp_path, "resid_post", 3, verify=True).rows == 512
