"""Documents -> fixed-length token sequences, split into train and eval by document.

Output of `collect_corpus`: `<out>/train.parquet` and `<out>/eval.parquet` with columns
`sequence_id` int64 (0-based within the split), `doc_id` int64 (the document the sequence starts
in) and `input_ids` fixed_size_list<int32>[context_size]; and `stats.json`.

- BOS: prepended to every sequence when the model's tokenizer adds one itself (Llama 3,
  Gemma); SmolLM2 adds none, so its sequences start with a real token.
- pack: documents are joined with EOS between them and cut into full sequences (the
  remainder is dropped); truncate: one sequence per document, cut or right-padded with pad.
- Split: a document goes to eval when a hash of (seed, doc_id) falls below `eval_fraction`,
  so no document contributes to both splits and the split does not depend on reading order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from token_journey.config.corpus import CorpusConfig
from token_journey.data.sources import documents
from token_journey.diskspace import writing
from token_journey.errors import TokenJourneyError
from token_journey.layout import corpus_file, sha256_file, temp_sibling

log = logging.getLogger(__name__)

SPLITS = ("train", "eval")
_WRITE_EVERY = 1024  # sequences per Parquet row group


class Sequences(NamedTuple):
    """One split of a corpus: `input_ids` [n_seq, context_size], `sequence_ids` and `doc_ids` [n_seq]."""

    input_ids: torch.Tensor
    sequence_ids: torch.Tensor
    doc_ids: torch.Tensor


def special_ids(tokenizer: Any) -> set[int]:
    """Every id the tokenizer calls special (BOS, EOS, pad, chat markers): never activation rows."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None)
    return ids


def expects_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer itself puts BOS first (then the model was trained to see it)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def row_mask(input_ids: torch.Tensor, special: Iterable[int], exclude_first: int) -> torch.Tensor:
    """Which positions of `input_ids` [batch, seq] become activation rows -> Bool [batch, seq].

    Special tokens never do; nor do the first `exclude_first` real tokens of each sequence,
    whose residual norm is ~100x the rest in SmolLM2 (the attention sink). Harvest and
    evaluation call this same function, so both see the same rows.
    """
    special_t = torch.tensor(sorted(set(special)), dtype=input_ids.dtype, device=input_ids.device)
    real = ~torch.isin(input_ids, special_t)
    rank = real.cumsum(dim=1)  # 1-based count of real tokens so far, [batch, seq]
    return real & (rank > exclude_first)


def drop_norm_outliers(acts: torch.Tensor, rows: torch.Tensor, ratio: float) -> torch.Tensor:
    """`rows` [batch, seq] without the positions whose activation norm exceeds `ratio` x the
    median norm of the same sequence's rows; `acts` [batch, seq, d_model]. `ratio` 0 keeps all.

    Some tokens past the first (often the first newline of a sequence) carry "massive
    activations": in SmolLM2 layer 15, 0.02% of rows held 79% of the squared norm, which would
    decide FVU and the training loss alone. The median is per sequence, so the rule gives the
    same rows however sequences are batched, and harvest and evaluation can share it.
    """
    if ratio <= 0:
        return rows
    norms = acts.float().norm(dim=-1).masked_fill(~rows, float("nan"))
    median = norms.nanmedian(dim=1, keepdim=True).values  # NaN for a sequence with no rows
    return rows & (norms <= ratio * median)


def doc_in_eval(doc_id: int, seed: int, eval_fraction: float) -> bool:
    """Deterministic document-level split: hash (seed, doc_id) to [0, 1)."""
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


@dataclass
class _Packer:
    """Turns one split's token streams into sequences until its budget of sequences is met."""

    context_size: int
    max_sequences: int
    bos: int | None
    eos: int | None
    pad: int | None
    pack: bool
    tokens: list[int] = field(default_factory=list)
    token_docs: list[int] = field(default_factory=list)
    out_ids: list[list[int]] = field(default_factory=list)
    out_docs: list[int] = field(default_factory=list)
    n_sequences: int = 0
    documents: int = 0

    @property
    def full(self) -> bool:
        return self.n_sequences >= self.max_sequences

    def add(self, doc_id: int, ids: list[int]) -> None:
        body = self.context_size - (self.bos is not None)
        prefix = [] if self.bos is None else [self.bos]
        if self.full or not ids:
            return
        self.documents += 1
        if not self.pack:
            seq = prefix + ids[:body]
            self._emit(seq + [self.pad] * (self.context_size - len(seq)), doc_id)
            return
        ids = ids + ([self.eos] if self.eos is not None else [])
        self.tokens.extend(ids)
        self.token_docs.extend([doc_id] * len(ids))
        while len(self.tokens) >= body and not self.full:
            self._emit(prefix + self.tokens[:body], self.token_docs[0])
            del self.tokens[:body], self.token_docs[:body]

    def _emit(self, seq: list[int], doc_id: int) -> None:
        self.out_ids.append(seq)
        self.out_docs.append(doc_id)
        self.n_sequences += 1

    def take(self) -> tuple[list[list[int]], list[int]]:
        """The sequences made since the last call (so the writer can flush them)."""
        ids, docs = self.out_ids, self.out_docs
        self.out_ids, self.out_docs = [], []
        return ids, docs


def _sequence_table(ids: list[list[int]], docs: list[int], first_id: int, context_size: int) -> pa.Table:
    flat = pa.array(np.asarray(ids, dtype=np.int32).reshape(-1))
    return pa.table(
        {
            "sequence_id": pa.array(np.arange(first_id, first_id + len(ids), dtype=np.int64)),
            "doc_id": pa.array(np.asarray(docs, dtype=np.int64)),
            "input_ids": pa.FixedSizeListArray.from_arrays(flat, context_size),
        }
    )


def _token_batches(ds: Any, tokenizer: Any, batch_docs: int = 64) -> Iterator[tuple[int, list[int]]]:
    """(doc_id, token ids without special tokens) for each document, tokenized in batches."""
    batch: list[dict[str, Any]] = []

    def flush() -> Iterator[tuple[int, list[int]]]:
        encoded = tokenizer([r["text"] or "" for r in batch], add_special_tokens=False, verbose=False)["input_ids"]
        yield from ((int(r["doc_id"]), ids) for r, ids in zip(batch, encoded))

    for row in ds:
        batch.append(row)
        if len(batch) == batch_docs:
            yield from flush()
            batch = []
    if batch:
        yield from flush()


def collect_corpus(cfg: CorpusConfig, tokenizer: Any, max_positions: int | None, out_dir: Path, seed: int) -> dict[str, Any]:
    """Read, tokenize, pack and split the configured documents; write both splits and stats.json.

    Everything goes to temporary files first, renamed only when both splits are complete and
    non-empty, so a failed run leaves an earlier corpus untouched (and no temporary file; a full
    disk stops with one line, see `token_journey.diskspace`).
    """
    if max_positions is not None and cfg.context_size > max_positions:
        raise TokenJourneyError(f"corpus.context_size={cfg.context_size} exceeds the model's maximum of {max_positions} positions; lower it")
    bos = tokenizer.bos_token_id if expects_bos(tokenizer) else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if not cfg.packing == "pack" and pad is None:
        raise TokenJourneyError("corpus.packing=truncate needs a pad or EOS token, and this tokenizer has neither; use pack")
    budgets = {"train": cfg.max_tokens // cfg.context_size, "eval": cfg.eval_tokens // cfg.context_size}
    packers = {s: _Packer(cfg.context_size, budgets[s], bos, tokenizer.eos_token_id, pad, cfg.packing == "pack") for s in SPLITS}
    out_dir = Path(out_dir)
    tmp = {s: temp_sibling(corpus_file(out_dir, s)) for s in SPLITS}
    stats_tmp = temp_sibling(out_dir / "stats.json")
    needed = sum(budgets.values()) * (cfg.context_size * 4 + 16)  # int32 ids and two int64 ids a sequence
    with writing(out_dir, needed, *tmp.values(), stats_tmp):  # a full disk: one line, and no temporaries left
        out_dir.mkdir(parents=True, exist_ok=True)
        schema = _sequence_table([[0] * cfg.context_size], [0], 0, cfg.context_size).schema
        writers = {s: pq.ParquetWriter(tmp[s], schema, write_page_checksum=True) for s in SPLITS}
        total = sum(budgets.values())
        truncated = dict.fromkeys(SPLITS, 0)
        try:
            with tqdm(total=total * cfg.context_size, unit="tok", unit_scale=True, desc="corpus") as bar:
                for doc_id, ids in _token_batches(documents(cfg, seed), tokenizer):
                    split = "eval" if doc_in_eval(doc_id, seed, cfg.eval_fraction) else "train"
                    if cfg.max_doc_tokens and len(ids) > cfg.max_doc_tokens:
                        ids = ids[: cfg.max_doc_tokens]
                        truncated[split] += 1
                    before = packers[split].n_sequences
                    packers[split].add(doc_id, ids)
                    bar.update((packers[split].n_sequences - before) * cfg.context_size)
                    for s in SPLITS:
                        if len(packers[s].out_ids) >= _WRITE_EVERY:
                            _flush(packers[s], writers[s], cfg.context_size)
                    if all(p.full for p in packers.values()):
                        break
            for s in SPLITS:
                _flush(packers[s], writers[s], cfg.context_size)
                writers[s].close()
            for s in SPLITS:
                if packers[s].n_sequences == 0:
                    raise TokenJourneyError(
                        f"corpus {cfg.name!r} gave no {s} sequences of {cfg.context_size} tokens; give more text "
                        f"(check corpus.path / corpus.parts) or lower corpus.context_size"
                    )
            # Readers check both splits against these (`read_sequences`).
            stats = {**_stats(cfg, packers, bos, pad, seed, truncated), "sha256": {s: sha256_file(tmp[s]) for s in SPLITS}}
            stats_tmp.write_text(json.dumps(stats, indent=2) + "\n")
            for s in SPLITS:
                os.replace(tmp[s], corpus_file(out_dir, s))
            os.replace(stats_tmp, out_dir / "stats.json")
        finally:
            for s in SPLITS:
                writers[s].close()
                tmp[s].unlink(missing_ok=True)
    log.info("wrote %s: %s", out_dir, json.dumps(stats["sequences"]))
    return stats


def _flush(packer: _Packer, writer: pq.ParquetWriter, context_size: int) -> None:
    ids, docs = packer.take()
    if ids:
        first = packer.n_sequences - len(ids)
        writer.write_table(_sequence_table(ids, docs, first, context_size))


def _stats(cfg: CorpusConfig, packers: dict[str, _Packer], bos: int | None, pad: int | None, seed: int, truncated: dict[str, int]) -> dict[str, Any]:
    return {
        "name": cfg.name,
        "source": cfg.source,
        "parts": list(cfg.parts) if cfg.source == "offline" else [cfg.path],
        "seed": seed,
        "context_size": cfg.context_size,
        "packing": cfg.packing,
        "bos_token_id": bos,
        "pad_token_id": pad,
        "max_doc_tokens": cfg.max_doc_tokens,
        "documents": {s: p.documents for s, p in packers.items()},
        "documents_truncated": truncated,
        "sequences": {s: p.n_sequences for s, p in packers.items()},
        "tokens": {s: p.n_sequences * cfg.context_size for s, p in packers.items()},
        "budget_met": {s: p.full for s, p in packers.items()},
    }


def _recorded_sha256(path: Path) -> str | None:
    """The sha256 that collect_corpus recorded for this split in the stats.json beside it, if any."""
    stats = path.parent / "stats.json"
    if not stats.is_file():
        return None
    try:
        return json.loads(stats.read_text()).get("sha256", {}).get(path.stem)
    except ValueError:
        return None


def read_sequences(path: Path | str) -> Sequences:
    """Read one split written by `collect_corpus` into tensors (input_ids [n_seq, context_size])."""
    path = Path(path)
    if not path.is_file():
        raise TokenJourneyError(f"no corpus split at {path}; run `python stages/collect_corpus.py` first")
    recorded = _recorded_sha256(path)
    if recorded is not None and sha256_file(path) != recorded:
        raise TokenJourneyError(
            f"corpus file {path} is damaged (its sha256 differs from {path.parent / 'stats.json'}); rerun collect_corpus (`dvc repro -f collect_corpus`)"
        )
    try:
        table = pq.read_table(path, columns=["sequence_id", "doc_id", "input_ids"], page_checksum_verification=True)
    except (pa.ArrowException, OSError, KeyError) as exc:
        raise TokenJourneyError(f"corpus file {path} is unreadable or has the wrong columns ({exc}); rerun collect_corpus") from exc
    col = table.column("input_ids").combine_chunks()
    context = col.type.list_size
    ids = torch.from_numpy(col.flatten().to_numpy().astype(np.int64).reshape(-1, context))
    return Sequences(
        ids,
        torch.from_numpy(table.column("sequence_id").to_numpy().copy()),
        torch.from_numpy(table.column("doc_id").to_numpy().copy()),
    )
