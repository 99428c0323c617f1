"""Run the prepared model over the corpus and store the activations of every configured
(site, layer) from ONE forward pass per batch (see `token_journey.data.shards` for the layout).

Shard k of a split always holds the rows of the same sequences, [k*S, (k+1)*S) with
S = shard_rows // context_size, so resuming is simple: shards already complete (renamed into
place, same run key) are kept, and the pass restarts at the first shard any (site, layer)
lacks; nothing is lost or written twice. The run key hashes everything that decides a
shard's content (model, corpus file, dtypes, batch size, shard size, exclusion rule), so
shards of a different configuration are never mixed in.

On SIGTERM/SIGUSR1 (`token_journey.preemption`) the pass stops after the batch under way: the shards
already renamed into place stay, the shard in flight is dropped (it was never written), and the rerun
resumes from it.

Before its first forward pass, harvest estimates the bytes it will write (`planned_bytes`) and stops
with one line when the target's free space cannot hold them, before writing anything.
"""

from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from token_journey import storage
from token_journey.config.harvest import HarvestConfig
from token_journey.data.corpus import drop_norm_outliers, read_sequences, row_mask, special_ids
from token_journey.data.shards import MANIFEST, ShardWriter, complete_shards, write_manifest
from token_journey.distributed import Processes, join_processes
from token_journey.errors import TokenJourneyError
from token_journey.layout import Location, activations_folder, corpus_file, location, sha256_file, short_hash
from token_journey.lm import LoadedModel, torch_dtype
from token_journey.locks import exclusive
from token_journey.preemption import Preempted, stop_requests
from token_journey.sites import capture, check_point

log = logging.getLogger(__name__)

Point = tuple[str, int]
LOCK = ".harvest.lock"
"""Held in each (site, layer) folder while a harvest writes it."""


def exclusion_rule(cfg: HarvestConfig) -> dict[str, Any]:
    """The recorded rule deciding which tokens become rows (evaluation must apply the same)."""
    return {
        "special_tokens": "excluded (BOS, EOS, pad and every tokenizer special id)",
        "exclude_first": cfg.exclude_first,
        "exclude_first_means": "the first N real (non-special) tokens of each sequence are dropped (attention sink)",
        "max_norm_ratio": cfg.max_norm_ratio,
        "max_norm_ratio_means": "rows with norm > ratio x the median norm of their sequence's rows are dropped; 0 = off",
    }


def _rows_of(acts: torch.Tensor, mask: torch.Tensor, ratio: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Select rows: `acts` [batch, seq, d_model], `mask` [batch, seq] -> (rows [n, d_model], keep (CPU), n_norm_dropped).

    The rows stay on the model's device; the shard writer sums them there and copies them over.
    """
    keep = drop_norm_outliers(acts, mask, ratio)
    return acts[keep].to(dtype), keep.cpu(), int(mask.sum() - keep.sum())


def harvest_split(
    lm: LoadedModel, cfg: HarvestConfig, sequences_path: Path, root: Location, split: str, device: torch.device, procs: Processes = Processes()
) -> dict[Point, dict]:
    """Harvest one split of the corpus into `<root>/<site>/layer_<L>[/eval]`; returns the manifests.

    With several processes (torchrun, `accelerate launch`), process r writes the shards k with
    k % n_processes == r; once all are done the main process writes the manifests and the others
    return an empty dict. Shard contents do not depend on the number of processes.
    """
    seqs = read_sequences(sequences_path)
    n_seq, context = seqs.input_ids.shape
    points: list[Point] = [(site, layer) for layer in cfg.layers for site in cfg.sites]
    for site, layer in points:
        check_point(lm.model, site, layer)
    special = special_ids(lm.tokenizer)
    d_model = lm.model.config.get_text_config().hidden_size
    per_shard = max(1, cfg.shard_rows // context)
    n_shards = -(-n_seq // per_shard)
    identity = {
        "model_fingerprint": lm.manifest["fingerprint"],
        "corpus_sha256": sha256_file(sequences_path),
        "harvest": {k: v for k, v in asdict(cfg).items() if k not in ("layers", "sites")},
        "sequences_per_shard": per_shard,
        "special_ids": sorted(special),
    }
    run_key = short_hash(identity)
    folders = {p: activations_folder(root, p[0], p[1], split) for p in points}
    # The main process alone looks (and clears leftovers, so no process deletes another's temp file), and
    # every process takes its answer: a process that looked for itself could find shards the main process
    # has written meanwhile, split the remaining shards differently and leave one unwritten.
    done = procs.share({p: complete_shards(folders[p], run_key, n_shards) for p in points} if procs.is_main else None)
    todo = [k for k in range(n_shards) if any(k not in done[p] for p in points)]
    for p in points:  # a manifest must never describe shards that are about to change
        if todo and procs.is_main:
            storage.delete(folders[p] / MANIFEST, missing_ok=True)
    fresh = not todo
    todo = todo[procs.index :: procs.count]
    if procs.count > 1:
        log.info("%s: process %d of %d writes shards %s", split, procs.index, procs.count, todo)
    writers = {p: ShardWriter(folders[p], d_model, cfg.dtype, run_key, cfg.row_group_rows) for p in points}
    store = torch_dtype(cfg.dtype)
    if todo and todo[0] > 0:
        log.info("%s: resuming at shard %d of %d", split, todo[0], n_shards)
    total = sum(min(n_seq, (k + 1) * per_shard) - k * per_shard for k in todo) * context
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc=f"harvest {split}", disable=not procs.is_main)
    with stop_requests() as stop, bar:
        for shard in todo:
            lo, hi = shard * per_shard, min(n_seq, (shard + 1) * per_shard)
            for start in range(lo, hi, cfg.batch_size):
                ids = seqs.input_ids[start : min(hi, start + cfg.batch_size)]  # [batch, seq]
                _harvest_batch(
                    lm,
                    cfg,
                    ids,
                    seqs.sequence_ids[start : start + ids.shape[0]],
                    special,
                    points,
                    {p: writers[p] for p in points if shard not in done[p]},
                    store,
                    device,
                )
                bar.update(ids.numel())
                if stop.requested:  # the rows of this shard so far are dropped with the writers
                    raise Preempted(
                        f"harvest {split}: {stop.signal} during shard {shard} of {n_shards}; the complete shards "
                        "are kept and this one is dropped; rerun the same command to resume"
                    )
            for p in points:
                if shard not in done[p]:
                    writers[p].finish(shard)
    info = {
        "model": lm.manifest["name"],
        "model_fingerprint": lm.manifest["fingerprint"],
        "d_model": d_model,
        "dtype": cfg.dtype,
        "forward_dtype": cfg.forward_dtype,
        "split": split,
        "context_size": context,
        "sequences": n_seq,
        "run_key": run_key,
        "corpus_sha256": identity["corpus_sha256"],
        "exclusion": exclusion_rule(cfg),
    }
    procs.barrier()
    if not procs.is_main:
        return {}
    return {p: _manifest(folders[p], n_shards, dict(info, site=p[0], layer=p[1]), fresh=fresh) for p in points}


def _manifest(folder: Location, n_shards: int, info: dict[str, Any], fresh: bool) -> dict[str, Any]:
    """Reuse a manifest of this same run when nothing was rewritten; else aggregate the shards."""
    path = folder / MANIFEST
    if fresh and storage.is_file(path):
        old = json.loads(storage.read_bytes(path))
        if old.get("run_key") == info["run_key"] and len(old.get("shards", ())) == n_shards:
            return old
    return write_manifest(folder, n_shards, info)


def _harvest_batch(
    lm: LoadedModel,
    cfg: HarvestConfig,
    ids: torch.Tensor,
    seq_ids: torch.Tensor,
    special: set[int],
    points: list[Point],
    writers: dict[Point, ShardWriter],
    store: torch.dtype,
    device: torch.device,
) -> None:
    """One forward pass for every point; append the kept rows of each point to its writer."""
    if not writers:
        return
    captured = capture(lm.model, ids.to(device), points)
    mask = row_mask(ids, special, cfg.exclude_first)  # [batch, seq]
    real = int((~torch.isin(ids, torch.tensor(sorted(special)))).sum())
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    for point, writer in writers.items():
        rows, keep, dropped = _rows_of(captured[point], mask.to(device), cfg.max_norm_ratio, store)
        excluded = {"special": ids.numel() - real, "first_positions": real - int(mask.sum()), "max_norm": dropped}
        writer.add(rows, ids[keep], seq_ids[:, None].expand_as(ids)[keep], positions[keep], excluded)


BYTES_PER_VALUE = {"float32": 4, "float16": 2, "bfloat16": 2}
ID_BYTES = 4 + 8 + 4
"""The per-row id columns: token_id int32, sequence_id int64, position int32."""
SPLITS = ("train", "eval")


def planned_bytes(cfg: HarvestConfig, d_model: int, corpus_dir: Path) -> tuple[int, int]:
    """(bytes, tokens): what harvest writes for both splits, an upper bound, and the corpus tokens.

    tokens x (layers x sites) x (d_model x dtype size + id columns), plus Parquet's own bytes: per
    row group at most min(4 bytes a value, 1 MiB) (the dictionary page Parquet tries before it
    falls back to plain values; measured 0.3 to 0.7 MiB for SmolLM2-sized groups) and per shard
    a footer with its d_model-long statistics. Every token counts, as exclusions (special tokens,
    first positions, norm outliers) only remove rows. The token count comes from the corpus files'
    footers, before any forward pass; a missing split counts 0 (reading it reports it).
    """
    points = len(cfg.layers) * len(cfg.sites)
    row = d_model * BYTES_PER_VALUE[cfg.dtype] + ID_BYTES
    total = tokens = 0
    for split in SPLITS:
        path = corpus_file(corpus_dir, split)
        if not path.is_file():
            continue
        footer = pq.ParquetFile(path).metadata
        context = footer.schema.to_arrow_schema().field("input_ids").type.list_size
        per_shard = max(1, cfg.shard_rows // context)
        n_shards = -(-footer.num_rows // per_shard)
        group_rows = min(cfg.row_group_rows, per_shard * context)
        groups = -(-per_shard * context // group_rows)
        shard_extra = groups * min(4 * group_rows * d_model, 1 << 20) + 4096 + 24 * d_model
        tokens += footer.num_rows * context
        total += points * (footer.num_rows * context * row + n_shards * shard_extra)
    return total, tokens


def _kept_shard_bytes(root: Location, cfg: HarvestConfig) -> int:
    """Bytes of the shards already under `root` for these points: a resumed run keeps or replaces them."""
    total = 0
    for layer in cfg.layers:
        for site in cfg.sites:
            for split in SPLITS:
                folder = activations_folder(root, site, layer, split)
                total += sum(storage.file_size(folder / n) for n in storage.file_names(folder) if n.startswith("shard-"))
    return total


def check_space(cfg: HarvestConfig, d_model: int, corpus_dir: Path, root: Location) -> None:
    """Stop, before anything is written, when the estimate of `planned_bytes` cannot fit at `root`."""
    if not storage.is_local(root):
        log.info("%s is object storage: no free-space check before harvest", root)
        return
    needed, tokens = planned_bytes(cfg, d_model, corpus_dir)
    free = storage.free_bytes(root)
    kept = _kept_shard_bytes(root, cfg)
    what = (
        f"{needed:,} bytes ({needed / 1e9:.2f} GB) for {tokens:,} tokens x {len(cfg.layers)} layers x "
        f"{len(cfg.sites)} sites in {cfg.dtype}, an upper bound (exclusions only remove rows)"
    )
    if needed > free + kept:
        raise TokenJourneyError(
            f"harvest needs up to {what}, but {root} has {free:,} bytes ({free / 1e9:.2f} GB) free"
            + (f" plus {kept:,} in existing shards" if kept else "")
            + "; lower corpus.max_tokens, harvest.layers or harvest.dtype (float16 or bfloat16 halve float32), or free disk space"
        )
    log.info("harvest will write up to %s; %s bytes free at %s", what, f"{free:,}", root)


def harvest(lm: LoadedModel, cfg: HarvestConfig, corpus_dir: Path, root: Location | str, device: torch.device) -> dict[str, dict[Point, dict]]:
    """Harvest the train then the eval split; a complete (site, layer, split) is skipped cheaply.

    `root` is a local folder or an object-store URI (`s3://bucket/prefix`). Before any forward pass
    the free space is checked (`check_space`). Two harvests of the same (site, layer) into one local
    root take turns on its lock (`token_journey.locks`, taken in sorted order so two runs never hold one
    each): the second waits, then keeps the first's shards; other layers go on side by side."""
    root = location(root)
    for layer in cfg.layers:
        for site in cfg.sites:
            check_point(lm.model, site, layer)
    check_space(cfg, lm.model.config.get_text_config().hidden_size, Path(corpus_dir), root)
    result = {}
    # Several processes (torchrun / accelerate launch) split the shards; on the CPU they talk over gloo.
    procs = join_processes(device)
    with ExitStack() as held:
        if procs.is_main and storage.is_local(root):  # the others wait at harvest_split's first barrier
            for site, layer in sorted((site, layer) for layer in cfg.layers for site in cfg.sites):
                held.enter_context(exclusive(Path(activations_folder(root, site, layer)) / LOCK, f"{site} layer {layer}"))
        for split in SPLITS:
            result[split] = harvest_split(lm, cfg, corpus_file(corpus_dir, split), root, split, device, procs)
            rows = {f"{site}@{layer}": m["rows"] for (site, layer), m in result[split].items()}
            log.info("%s: wrote %s rows -> %s", split, rows, root)
    return result
