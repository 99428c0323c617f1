"""The circuits branch: which prompt is traced, how the graph is pruned, and the per-layer transcoders."""

from __future__ import annotations

from dataclasses import dataclass

from token_journey.config.sae import SAEConfig
from token_journey.errors import TokenJourneyError
from token_journey.sae.registry import is_transcoder

DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True, kw_only=True)
class CircuitsConfig:
    text: str
    """The prompt whose next token is traced."""
    prepend_bos: bool
    """Start the prompt with BOS (as circuit-tracer does); its position is then constant, not nodes."""
    max_prompt_tokens: int
    """Longest prompt accepted, BOS included."""
    max_n_logits: int
    """At most this many logit targets."""
    desired_logit_prob: float
    """Logit targets: the most probable tokens until their probabilities sum to this."""
    node_threshold: float
    """Pruning keeps the nodes carrying this fraction of the influence on the logits."""
    edge_threshold: float
    """Then the edges carrying this fraction of the edge influence."""
    interventions: int
    """Most influential latents ablated in the real model to test the graph (0 = none)."""
    batch_size: int
    """At most this many targets per pass of the replacement model's transpose."""
    max_feature_nodes: int | None
    """At most this many latents become nodes (the most influential); the others fold into the error nodes. None: all."""
    loss_tokens: int
    """Tokens of the branch's eval slice on which each layer's spliced delta loss is measured (0 = not measured)."""
    layers: tuple[int, ...]
    """Decoder layers that get a transcoder (every layer, for a graph)."""
    train_tokens: int
    """The branch's harvest budget: tokens of the corpus's train split."""
    eval_tokens: int
    """And of its eval split."""
    dtype: str
    """Storage dtype of the branch's activations."""
    transcoder: SAEConfig
    """The recipe of every layer's transcoder."""

    def __post_init__(self) -> None:
        if not self.text or not self.text.strip():
            raise TokenJourneyError("circuits.text is empty; set circuits.text='The capital of France is'")
        if self.loss_tokens < 0:
            raise TokenJourneyError(f"circuits.loss_tokens={self.loss_tokens} must be >= 0 (0 = no spliced delta loss)")
        if self.max_feature_nodes is not None and self.max_feature_nodes < 1:
            raise TokenJourneyError(f"circuits.max_feature_nodes={self.max_feature_nodes} must be >= 1, or null for every active latent")
        if self.interventions < 0:
            raise TokenJourneyError(f"circuits.interventions={self.interventions} must be >= 0 (0 = none)")
        for name in ("max_prompt_tokens", "max_n_logits", "batch_size", "train_tokens", "eval_tokens"):
            if getattr(self, name) < 1:
                raise TokenJourneyError(f"circuits.{name}={getattr(self, name)} must be at least 1")
        for name in ("desired_logit_prob", "node_threshold", "edge_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise TokenJourneyError(f"circuits.{name}={getattr(self, name)} must be between 0 and 1")
        if not self.layers or any(layer < 0 for layer in self.layers) or len(set(self.layers)) != len(self.layers):
            raise TokenJourneyError(f"circuits.layers={list(self.layers)} must list distinct layers >= 0, e.g. every layer of the model")
        if self.dtype not in DTYPES:
            raise TokenJourneyError(f"circuits.dtype={self.dtype!r} is not one of {', '.join(DTYPES)}")
        if not is_transcoder(self.transcoder.architecture):
            raise TokenJourneyError(
                f"circuits.transcoder.architecture={self.transcoder.architecture!r} is not a transcoder; "
                "use jumprelu_skip_transcoder (circuit-tracer loads JumpReLU ones)"
            )
