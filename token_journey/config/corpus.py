"""Which text to read, and how to cut it into fixed-length token sequences."""

from __future__ import annotations

from dataclasses import dataclass

from token_journey.errors import TokenJourneyError

SOURCES = ("offline", "hub", "local")
PACKINGS = ("pack", "truncate")
BAD_FILES = ("stop", "skip")

FIXED_PARTS = ("kjv", "python_topics", "stdlib_docstrings")


@dataclass(frozen=True, kw_only=True)
class CorpusConfig:
    name: str
    """Short name used in the output path `data/corpus/<name>/`."""
    source: str
    """offline (text shipped in installed packages) | hub (a datasets hub id, streamed) | local (a file glob)."""
    context_size: int
    """Tokens per sequence, BOS included when the model expects one."""
    max_tokens: int
    """Train token budget: reading stops once this many train tokens are packed."""
    eval_tokens: int
    """Eval token budget, taken from held-out documents."""
    eval_fraction: float
    """Share of documents assigned to eval (by a seeded hash of the document id)."""
    max_doc_tokens: int
    """Keep at most this many tokens of each document (0 = all), so that a few very long documents
    cannot fill a split on their own (the offline corpus has module docstrings of 30k+ tokens)."""
    packing: str
    """pack: documents joined with EOS and cut into sequences; truncate: one padded sequence per document."""
    parts: tuple[str, ...]
    """Offline texts (source=offline): kjv | python_topics | stdlib_docstrings | docstrings:<installed package>."""
    path: str
    """Hub dataset id (source=hub) or a glob of .txt/.jsonl/.json/.parquet files (source=local)."""
    subset: str
    """Hub dataset configuration name, e.g. sample-10BT (source=hub)."""
    split: str
    """Dataset split to read (source=hub)."""
    text_column: str
    """Column holding the document text (hub, jsonl, parquet)."""
    shuffle_buffer: int
    """Documents held by the streaming shuffle (source=hub); files are shuffled in full."""
    bad_files: str
    """stop | skip: what a local .txt file that is not UTF-8 text does (source=local)."""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise TokenJourneyError(f"corpus.source={self.source!r} is not one of {', '.join(SOURCES)}")
        if self.bad_files not in BAD_FILES:
            raise TokenJourneyError(f"corpus.bad_files={self.bad_files!r} is not one of {', '.join(BAD_FILES)}")
        if self.packing not in PACKINGS:
            raise TokenJourneyError(f"corpus.packing={self.packing!r} is not one of {', '.join(PACKINGS)}")
        if self.context_size < 2:
            raise TokenJourneyError(f"corpus.context_size={self.context_size} is too small; use at least 2")
        if self.max_tokens < self.context_size or self.eval_tokens < self.context_size:
            raise TokenJourneyError(
                f"corpus.max_tokens={self.max_tokens} and corpus.eval_tokens={self.eval_tokens} must each be >= corpus.context_size={self.context_size}"
            )
        if self.max_doc_tokens < 0:
            raise TokenJourneyError(f"corpus.max_doc_tokens={self.max_doc_tokens} must be >= 0 (0 keeps whole documents)")
        if not 0.0 < self.eval_fraction < 1.0:
            raise TokenJourneyError(f"corpus.eval_fraction={self.eval_fraction} must be between 0 and 1 (exclusive)")
        unknown = [p for p in self.parts if p not in FIXED_PARTS and not (p.startswith("docstrings:") and len(p) > 11)]
        if self.source == "offline" and (unknown or not self.parts):
            raise TokenJourneyError(f"corpus.parts={list(self.parts)} must be a non-empty list of {', '.join(FIXED_PARTS)}, docstrings:<package>")
        if self.source in ("hub", "local") and not self.path:
            raise TokenJourneyError(f"corpus.source={self.source} needs corpus.path (a hub dataset id or a file glob)")
        if not self.name or "/" in self.name:
            raise TokenJourneyError(f"corpus.name={self.name!r} must be a non-empty name without '/'")
