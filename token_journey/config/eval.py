"""How the `evaluate` stage measures the SAEs of one layer on held-out tokens."""

from __future__ import annotations

from dataclasses import dataclass

from token_journey.errors import TokenJourneyError

DTYPES = ("", "float32", "float16", "bfloat16")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    max_tokens: int
    """Eval tokens per layer: the first max_tokens // context_size sequences of the eval split (at least one)."""
    batch_size: int
    """Sequences per forward pass; each pass holds [batch_size, context_size, vocab] logits."""
    extra_saes: tuple[str, ...]
    """More SAE folders (ours, SAELens, Gemma Scope, sparsify) evaluated beside the pipeline's own for this layer."""
    dense_threshold: float
    """A latent active on more than this fraction of eval tokens counts as dense."""
    dtype: str
    """Dtype the model computes in; empty = the prepared model's dtype."""
    saebench: bool
    """Also measure feature absorption, sparse probing and decoder geometry (`token_journey.eval.saebench`)."""
    saebench_rows: int
    """Harvested eval rows (the first ones) those metrics use: the probing tasks and, one row per token id, the first-letter task."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1 or self.batch_size < 1:
            raise TokenJourneyError(f"eval.max_tokens={self.max_tokens} and eval.batch_size={self.batch_size} must each be at least 1")
        if not 0.0 < self.dense_threshold < 1.0:
            raise TokenJourneyError(f"eval.dense_threshold={self.dense_threshold} must be between 0 and 1 (exclusive)")
        if self.saebench_rows < 100:
            raise TokenJourneyError(f"eval.saebench_rows={self.saebench_rows} must be at least 100 (the probes need rows of each class)")
        if self.dtype not in DTYPES:
            raise TokenJourneyError(f"eval.dtype={self.dtype!r} is not one of float32, float16, bfloat16 (or empty)")
