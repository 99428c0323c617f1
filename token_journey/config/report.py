"""What the HTML report shows and how much evaluation data it reads to build feature dashboards."""

from __future__ import annotations

from dataclasses import dataclass

from token_journey.errors import TokenJourneyError


@dataclass(frozen=True, kw_only=True)
class ExplainerConfig:
    """Optional feature explanations written by a local causal LM and scored by detection (`report.explainer`)."""

    model: str
    """A prepared model folder, or a `conf/model/` option name whose prepared folder sits beside
    `paths.base_model`; empty turns explanations off (the default, so the report's time is unchanged)."""
    n_features: int
    """Features explained per SAE page: the first ones in the page's order."""
    n_examples: int
    """Top activating contexts shown to the explainer (at most `report.top_k`)."""
    n_heldout: int
    """Held-out activating contexts scored by detection per feature, and as many non-activating ones."""
    window: int
    """Tokens on each side of the activating token in explainer and detection contexts."""
    max_new_tokens: int
    """Longest explanation generated (greedy decoding)."""
    cache: str
    """JSON file of past results, keyed by SAE weights, feature, explainer model and prompt version;
    outside every DVC output so that a rebuild reuses it."""

    def __post_init__(self) -> None:
        for name in ("n_examples", "n_heldout", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise TokenJourneyError(f"report.explainer.{name}={getattr(self, name)} must be at least 1")
        for name in ("n_features", "window"):
            if getattr(self, name) < 0:
                raise TokenJourneyError(f"report.explainer.{name}={getattr(self, name)} must not be negative")
        if self.model and not self.cache:
            raise TokenJourneyError("report.explainer.cache is empty; give a JSON file path for the explanations")


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
    max_index_rows: int
    """Rows of the page's table of alive features: all of them up to this many, else the this-many
    that fire most often. A Gemma-Scope-wide SAE (16k-1M latents) would otherwise spend most of the
    report's time and size on that one table."""
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
    explainer: ExplainerConfig
    """Optional LLM-written explanations of the first features of each page (off when `explainer.model` is empty)."""
    workers: int
    """Processes rendering pages at once (pages are independent); 0 = one per CPU core. One with the
    explainer or on a GPU, which each page would otherwise load or share."""

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise TokenJourneyError(f"report.workers={self.workers} must be >= 0 (0 = one per CPU core)")
        for name in ("max_tokens", "batch_size", "top_k", "hist_bins", "n_logit_tokens", "search_features", "max_index_rows"):
            if getattr(self, name) < 1:
                raise TokenJourneyError(f"report.{name}={getattr(self, name)} must be at least 1")
        for name in ("n_index", "n_random", "n_strongest", "n_dense", "n_quantile_contexts", "window"):
            if getattr(self, name) < 0:
                raise TokenJourneyError(f"report.{name}={getattr(self, name)} must not be negative")
        if not 0.0 < self.dense_threshold < 1.0:
            raise TokenJourneyError(f"report.dense_threshold={self.dense_threshold} must be between 0 and 1 (exclusive)")
        if self.explainer.model and self.explainer.n_examples > self.top_k:
            raise TokenJourneyError(
                f"report.explainer.n_examples={self.explainer.n_examples} exceeds report.top_k={self.top_k}, the top contexts kept per feature"
            )
