"""Activation shards on disk: an atomic, resumable writer and a verified reader.

Each (site, layer, split) folder (see `token_journey.layout`) holds `shard-NNNNN.parquet` files
and a `manifest.json`. One row per token:
`activation` fixed_size_list<dtype>[d_model], `token_id` int32, `sequence_id` int64, `position` int32.
bfloat16 has no Arrow type, so bfloat16 activations are stored as their raw uint16 bits and the
manifest's `dtype` says how to read them; `activation_tensor` does it.

Every read is verified: `open_activations` checks each shard's sha256 against the manifest (all
shards hashed in parallel threads: about a second per GB per core), and shards are written with
Parquet page checksums, checked on every later read, so data damaged after opening still stops the
reader. A damaged shard is named in a one-line error with the fix.

The root may be a local folder or an object-store URI (`s3://bucket/prefix`): every read and write
goes through `token_journey.storage` (`pyarrow.fs`), which keeps local files exactly as before
(temporary name, then rename) and uploads each object whole under its final key.

A full local disk stops the harvest with one line (`token_journey.diskspace`): the shard being
written is removed, the shards already complete stay under their final names, and the manifest,
written last, is absent until every shard is; the rerun resumes at the first missing shard.

Each shard carries, in its Parquet footer metadata, its row count, the float64 sum of its
vectors, the sum of squared norms and its exclusion counts, so the manifest's mean and mean
squared norm are exact sums over complete shards even when a harvest was killed and resumed.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from token_journey import storage
from token_journey.diskspace import writing
from token_journey.errors import TokenJourneyError
from token_journey.layout import Location, activations_folder, location

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
META_KEY = b"token_journey"
_SHARD = re.compile(r"^shard-(\d{5})\.parquet$")
FOLDER_BYTES = 4096
"""What a new folder takes on disk (one block), for the error of a disk too full to make one."""
_ARROW = {"float32": pa.float32(), "float16": pa.float16(), "bfloat16": pa.uint16()}


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def activation_tensor(column: pa.ChunkedArray | pa.Array, dtype: str) -> torch.Tensor:
    """An `activation` column -> float32 tensor [rows, d_model], undoing the bfloat16 bit storage."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    d_model = column.type.list_size
    values = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, d_model)
    if dtype == "bfloat16":
        return torch.from_numpy(values.view(np.int16).copy()).view(torch.bfloat16).float()
    return torch.from_numpy(values.astype(np.float32, copy=True))  # Arrow memory is read-only


def _arrow_values(acts: torch.Tensor) -> pa.Array:
    """[rows, d_model] tensor in its storage dtype -> flat Arrow values (zero copy where possible)."""
    if acts.dtype == torch.bfloat16:
        return pa.array(acts.contiguous().view(torch.int16).numpy().view(np.uint16).reshape(-1))
    return pa.array(acts.contiguous().numpy().reshape(-1))


class ShardWriter:
    """Collects the rows of one (site, layer, split) for the current shard and writes it atomically.

    Rows are appended with `add`; `finish(index)` writes `shard-<index>.parquet` whole (locally under a
    temporary name, then renamed; on object storage as one upload) and starts the next shard. The
    per-shard statistics go into the footer.
    """

    def __init__(self, folder: Location | str, d_model: int, dtype: str, run_key: str, row_group_rows: int) -> None:
        self.folder, self.d_model, self.dtype = location(folder), d_model, dtype
        self.run_key, self.row_group_rows = run_key, row_group_rows
        with writing(self.folder, FOLDER_BYTES):  # a full disk (or inode table) stops here in one line too
            storage.make_folder(self.folder)
        self._reset()

    def _reset(self) -> None:
        self.parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.sum = torch.zeros(self.d_model, dtype=torch.float64, device="cpu")
        self.sum_sq_norm = 0.0
        self.excluded: dict[str, int] = {}

    def add(self, acts: torch.Tensor, token_ids: torch.Tensor, sequence_ids: torch.Tensor, positions: torch.Tensor, excluded: dict[str, int]) -> None:
        """Append rows: `acts` [rows, d_model] in the storage dtype, ids/positions [rows] (CPU).

        The float64 sums are taken where `acts` lives (on a GPU they would otherwise be the
        harvest's largest CPU cost), then the rows are copied to the CPU.
        """
        wide = acts.double()
        self.sum += wide.sum(dim=0).cpu()
        self.sum_sq_norm += float((wide * wide).sum())
        self.parts.append((acts.cpu(), token_ids.to(torch.int32), sequence_ids.to(torch.int64), positions.to(torch.int32)))
        for key, count in excluded.items():
            self.excluded[key] = self.excluded.get(key, 0) + int(count)

    def finish(self, index: int) -> Location:
        """Write the collected rows as shard `index` (whole: see `storage.write_parquet`) and reset."""
        acts = torch.cat([p[0] for p in self.parts]) if self.parts else torch.zeros(0, self.d_model)
        columns = [torch.cat([p[i] for p in self.parts]) if self.parts else torch.zeros(0) for i in (1, 2, 3)]
        meta = {
            "run_key": self.run_key,
            "rows": int(acts.shape[0]),
            "sum": self.sum.tolist(),
            "sum_sq_norm": self.sum_sq_norm,
            "excluded": self.excluded,
        }
        table = pa.table(
            {
                "activation": pa.FixedSizeListArray.from_arrays(_arrow_values(acts), self.d_model),
                "token_id": pa.array(columns[0].numpy().astype(np.int32)),
                "sequence_id": pa.array(columns[1].numpy().astype(np.int64)),
                "position": pa.array(columns[2].numpy().astype(np.int32)),
            }
        ).replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
        if table.column("activation").type.value_type != _ARROW[self.dtype]:
            raise TokenJourneyError(f"activations arrived as {acts.dtype}, expected {self.dtype}")
        final = self.folder / shard_name(index)
        storage.write_parquet(table, final, row_group_size=self.row_group_rows, compression="none", write_page_checksum=True)
        self._reset()
        return final


def _damaged(path: Location, what: str) -> TokenJourneyError:
    """The one-line error for a shard whose bytes are not what the harvest wrote."""
    return TokenJourneyError(f"shard {path} is damaged ({what}); delete it and rerun harvest (`dvc repro harvest`), which rewrites only the missing shards")


def read_shard(path: Location, columns: list[str] | None = None, row_group: int | None = None) -> pa.Table:
    """A shard (or one row group of it) with every data page's checksum verified.

    A store fault (unreachable, throttled, denied) is retried and raised as `storage.StorageError`,
    never reported as a damaged shard."""

    def read(source: pa.NativeFile) -> pa.Table:
        parquet = pq.ParquetFile(source, page_checksum_verification=True)
        table = parquet.read(columns=columns) if row_group is None else parquet.read_row_group(row_group, columns=columns)
        storage.BYTES_READ.add(_bytes_read(parquet.metadata, columns, row_group))
        return table

    try:
        return storage.read_with(path, read)
    except (pa.ArrowException, OSError) as exc:
        raise _damaged(path, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}") from exc


def _bytes_read(meta: pq.FileMetaData, columns: list[str] | None, row_group: int | None) -> int:
    """The bytes a read of `columns` (all: None) of `row_group` (all: None) takes from the file: its footer
    and the column chunks read (a list column's chunk is named `<column>.list.element`)."""
    groups = range(meta.num_row_groups) if row_group is None else [row_group]
    total = meta.serialized_size
    for g in groups:
        group = meta.row_group(g)
        for c in range(group.num_columns):
            chunk = group.column(c)
            if columns is None or chunk.path_in_schema.split(".")[0] in columns:
                total += chunk.total_compressed_size
    return total


def _footer(path: Location) -> pq.FileMetaData:
    """A shard's Parquet footer (reads only the footer; store faults retried, see `storage.read_with`)."""
    return storage.read_with(path, lambda source: pq.ParquetFile(source).metadata)


def shard_meta(path: Location) -> dict[str, Any]:
    """The statistics a shard carries in its footer (reads only the footer)."""
    try:
        metadata = _footer(path).metadata or {}
        return json.loads(metadata[META_KEY])
    except (pa.ArrowInvalid, OSError, KeyError, ValueError) as exc:
        raise TokenJourneyError(f"shard {path} is corrupted or not a token-journey shard ({type(exc).__name__}); rerun harvest") from exc


def complete_shards(folder: Location | str, run_key: str, n_shards: int) -> set[int]:
    """Indices of finished shards from this same run; deletes leftovers of killed or other runs.

    A shard exists under its final name only once complete (renamed into place, or uploaded
    whole), so a file that reads back with the same `run_key` needs no further work.
    """
    done: set[int] = set()
    folder = location(folder)
    for name in storage.file_names(folder):
        path = folder / name
        match = _SHARD.match(name)
        if name.startswith(".shard-") and ".tmp-" in name:  # see layout.temp_sibling
            storage.delete(path)  # a shard a killed run was writing
        elif match:
            index = int(match.group(1))
            try:
                same_run = shard_meta(path)["run_key"] == run_key
            except storage.StorageError:
                raise  # the store failed, not the shard: keep it
            except TokenJourneyError:
                same_run = False
            if same_run and index < n_shards:
                done.add(index)
            else:
                log.info("removing %s (from a different or damaged harvest)", path)
                storage.delete(path)
    return done


def write_manifest(folder: Location | str, n_shards: int, info: dict[str, Any]) -> dict[str, Any]:
    """Aggregate the shards' footer statistics (float64) into `manifest.json`, written atomically."""
    folder = location(folder)
    shards, total, sum_sq = [], None, 0.0
    excluded: dict[str, int] = {}
    for index in range(n_shards):
        path = folder / shard_name(index)
        meta = shard_meta(path)
        shards.append({"file": path.name, "rows": meta["rows"], "sha256": storage.sha256(path)})
        vec = np.asarray(meta["sum"], dtype=np.float64)
        total = vec if total is None else total + vec
        sum_sq += meta["sum_sq_norm"]
        for key, count in meta["excluded"].items():
            excluded[key] = excluded.get(key, 0) + count
    rows = sum(s["rows"] for s in shards)
    if rows == 0:
        raise TokenJourneyError(f"harvest wrote no rows to {folder}; the corpus has no tokens left after exclusions")
    manifest = dict(info, rows=rows, shards=shards, mean=(total / rows).tolist(), mean_sq_norm=sum_sq / rows, excluded_counts=excluded)
    storage.write_bytes(folder / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode("utf-8"))
    return manifest


@dataclass
class Activations:
    """A verified view of one (site, layer, split): manifest facts plus readers of the shards."""

    folder: Location
    manifest: dict[str, Any]

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def rows(self) -> int:
        return int(self.manifest["rows"])

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def paths(self) -> list[Location]:
        return [self.folder / s["file"] for s in self.manifest["shards"]]

    def iter_tables(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """One Arrow table per shard, in shard order."""
        for path in self.paths:
            yield read_shard(path, columns)

    def read_all(self, columns: list[str] | None = None) -> pa.Table:
        """Every row in one table (for small data: eval splits, tests)."""
        return pa.concat_tables(list(self.iter_tables(columns)))

    def tensor(self, max_rows: int | None = None) -> torch.Tensor:
        """The first `max_rows` (or all) activations as float32 [rows, d_model]."""
        parts, have = [], 0
        for table in self.iter_tables(["activation"]):
            parts.append(activation_tensor(table.column("activation"), self.dtype))
            have += parts[-1].shape[0]
            if max_rows is not None and have >= max_rows:
                break
        return torch.cat(parts)[:max_rows]

    def verify(self) -> None:
        """Check every shard's sha256 against the manifest (what `open_activations(verify=True)` does on opening)."""
        _check_sha256(self.folder, self.manifest["shards"], self.folder / MANIFEST)

    def row_groups(self) -> list[tuple[int, int, int]]:
        """(shard index, row group index, rows) of every row group, from the footers only."""
        groups = []
        for shard, path in enumerate(self.paths):
            meta = _footer(path)
            groups.extend((shard, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups))
        return groups


def _check_sha256(folder: Location, shards: list[dict[str, Any]], manifest_path: Location) -> None:
    """Every shard's sha256 against the manifest, hashed in parallel (hashlib releases the GIL)."""
    if any("sha256" not in s for s in shards):
        raise TokenJourneyError(f"{manifest_path} records no sha256 for its shards; rerun harvest (or open with verify=False)")
    paths = [folder / s["file"] for s in shards]
    with ThreadPoolExecutor(max_workers=min(len(paths), os.cpu_count() or 1) or 1) as pool:
        digests = list(pool.map(storage.sha256, paths))
    for path, shard, digest in zip(paths, shards, digests):
        if digest != shard["sha256"]:
            raise _damaged(path, f"its sha256 differs from {manifest_path}")


def open_activations(root: Location | str, site: str, layer: int, split: str = "train", verify: bool = True) -> Activations:
    """Open a harvested (site, layer, split), checking the manifest against the files.

    Row counts are always checked (footers only); `verify=True` (the default) also checks every
    shard's sha256, so no damaged byte is ever read. Data pages are checked again on every read.
    """
    folder = activations_folder(root, site, layer, split)
    manifest_path = folder / MANIFEST
    names = storage.file_names(folder)
    if MANIFEST not in names:
        what = "was not harvested" if not storage.is_dir(folder) else "has no manifest (harvest incomplete)"
        raise TokenJourneyError(f"{site} layer {layer} ({split}) {what} at {folder}; add {layer} to harvest.layers and run `python stages/harvest.py`")
    try:
        manifest = json.loads(storage.read_bytes(manifest_path))
    except ValueError as exc:
        raise TokenJourneyError(f"{manifest_path} is not valid JSON; rerun harvest") from exc
    listed = {s["file"] for s in manifest["shards"]}
    on_disk = {name for name in names if _SHARD.match(name)}
    if listed != on_disk:
        raise TokenJourneyError(
            f"{manifest_path} does not match the files: missing {sorted(listed - on_disk)[:3]}, unlisted {sorted(on_disk - listed)[:3]}; rerun harvest"
        )
    for shard in manifest["shards"]:
        path = folder / shard["file"]
        try:
            rows = _footer(path).num_rows
        except (pa.ArrowInvalid, OSError) as exc:
            raise _damaged(path, f"unreadable footer: {exc}") from exc
        if rows != shard["rows"]:
            raise TokenJourneyError(f"shard {path} has {rows} rows but {manifest_path} says {shard['rows']}; rerun harvest")

    if verify:
        _check_sha256(folder, manifest["shards"], manifest_path)
    if sum(s["rows"] for s in manifest["shards"]) != manifest["rows"]:
        raise TokenJourneyError(f"{manifest_path}: shard rows do not add up to rows={manifest['rows']}; rerun harvest")
    return Activations(folder, manifest)
