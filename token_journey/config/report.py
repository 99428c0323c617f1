"""What the HTML report shows and how much evaluation data it reads to build feature dashboards."""

from __future__ import annotations

from dataclasses import dataclass

from token_journey.errors import TokenJourneyError


@dataclass(frozen=True, kw_only=True)
class ReportConfig:
    n_index: int
    """Dashboards for the alive, non-dense features of lowest id (the same ids on every page)."""
    n_random: int
    """Dashboards for this many alive, non-dense features drawn at random (seeded)."""
    n_strongest: int
    """Dashboards for this many alive, non-dense features of largest maximum activation."""
    n_dense: int
    """Dashboards for this many of the densest latents, listed apart from the readable ones."""
    dense_threshold: float
    """A latent firing on more than this fraction of streamed tokens is dense (as eval.dense_threshold)."""
    search_features: int
    """Features kept per token in the page's token search (those with the largest activation on it)."""
    max_tokens: int
    """Eval-split activation rows streamed through each SAE to compute feature statistics."""
    batch_size: int
    """Activation rows encoded at once while streaming."""
    top_k: int
    """Top activating contexts kept per feature (a bounded top-k merge over the stream)."""
    n_quantile_contexts: int
    """Contexts sampled from activation quantiles (one per quantile bin) per dashboard."""
    window: int
    """Tokens shown on each side of the activating token."""
    n_logit_tokens: int
    """Top promoted and suppressed tokens listed per feature."""
    hist_bins: int
    """Bins of the activation and firing-density histograms."""

    def __post_init__(self) -> None:
        for name in ("max_tokens", "batch_size", "top_k", "hist_bins", "n_logit_tokens", "search_features"):
            if getattr(self, name) < 1:
                raise TokenJourneyError(f"report.{name}={getattr(self, name)} must be at least 1")
        for name in ("n_index", "n_random", "n_strongest", "n_dense", "n_quantile_contexts", "window"):
            if getattr(self, name) < 0:
                raise TokenJourneyError(f"report.{name}={getattr(self, name)} must not be negative")
        if not 0.0 < self.dense_threshold < 1.0:
            raise TokenJourneyError(f"report.dense_threshold={self.dense_threshold} must be between 0 and 1 (exclusive)")
