"""What the recomputation needs to know about an architecture, read from its config.

Llama-family models (SmolLM2, Llama 3.x, Aitana) and Gemma 2/3 share one decoder shape; they
differ in a handful of switches, gathered here so the layer code reads as one formula with
options: Gemma multiplies embeddings by sqrt(d_model), scales norms by (1 + w), wraps attention
and MLP outputs in extra norms, soft-caps logits (Gemma 2), normalises queries/keys per head
(Gemma 3) and alternates sliding-window (local) and global layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from token_journey.errors import TokenJourneyError

LLAMA_TYPES = ("llama",)
GEMMA_TYPES = ("gemma2", "gemma3", "gemma3_text")
SUPPORTED_TYPES = LLAMA_TYPES + GEMMA_TYPES

ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu"}
"""transformers' activation names -> ours."""


@dataclass(frozen=True)
class Spec:
    """The architecture switches of one model."""

    family: str
    """llama | gemma2 | gemma3."""
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_mlp: int
    vocab_size: int
    eps: float
    """RMSNorm epsilon."""
    activation: str
    """silu | gelu_tanh | gelu."""
    scaling: float
    """Multiplier of q·k (1/sqrt(head_dim), or Gemma's query_pre_attn_scalar^-0.5)."""
    layer_types: tuple[str, ...]
    """full_attention | sliding_attention per layer."""
    sliding_window: int | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    max_positions: int | None = None
    attention_bias: bool = False
    mlp_bias: bool = False

    @property
    def gemma(self) -> bool:
        return self.family != "llama"

    @property
    def qk_norm(self) -> bool:
        return self.family == "gemma3"

    @property
    def n_rep(self) -> int:
        """Query heads sharing one K/V head (grouped-query attention)."""
        return self.n_heads // self.n_kv_heads


def text_config(model: Any) -> Any:
    """The language part of a config (multimodal Gemma 3 nests it)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def spec_of(model: Any) -> Spec:
    """Read the Spec of a transformers causal LM, or say which architecture is not supported."""
    config = text_config(model)
    model_type = getattr(config, "model_type", "?")
    if model_type not in SUPPORTED_TYPES:
        raise TokenJourneyError(
            f"architecture {model_type!r} is not supported by the journey recomputation "
            f"(supported: {', '.join(SUPPORTED_TYPES)}); the hooks' captures are shown instead"
        )
    if getattr(config, "use_bidirectional_attention", False):
        raise TokenJourneyError(f"{model_type} with use_bidirectional_attention=True is not supported; use a causal model")
    act_name = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
    if act_name not in ACTIVATIONS:
        raise TokenJourneyError(f"activation {act_name!r} is not recomputed; supported: {', '.join(ACTIVATIONS)}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    gemma = model_type in GEMMA_TYPES
    scalar = getattr(config, "query_pre_attn_scalar", None) if gemma else None
    layer_types = tuple(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)
    return Spec(
        family="llama" if not gemma else ("gemma2" if model_type == "gemma2" else "gemma3"),
        n_layers=config.num_hidden_layers,
        d_model=config.hidden_size,
        n_heads=config.num_attention_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim,
        d_mlp=config.intermediate_size,
        vocab_size=config.vocab_size,
        eps=config.rms_norm_eps,
        activation=ACTIVATIONS[act_name],
        scaling=(scalar if scalar else head_dim) ** -0.5,
        layer_types=layer_types,
        sliding_window=getattr(config, "sliding_window", None) if gemma else None,
        attn_softcap=getattr(config, "attn_logit_softcapping", None) if gemma else None,
        final_softcap=getattr(config, "final_logit_softcapping", None) if gemma else None,
        max_positions=getattr(config, "max_position_embeddings", None),
        attention_bias=bool(getattr(config, "attention_bias", False)),
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
    )
