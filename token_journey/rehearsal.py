"""Rehearsal models: random weights in the exact architecture of a real target model.

The headline runs (Llama 3.2 1B, Aitana-2B-S) need gated or large downloads and a GPU. Their
*shapes* alone decide memory, bytes per token on disk and speed, so a model with the same
architecture and random weights rehearses every stage on any machine, offline. The weights are
drawn from a seeded generator, so two prepares of one shape write identical files; they carry no
learned features, and their name ends in ``-rehearsal`` so no figure from them is mistaken for
the real model's.

The tokenizer is a packaged one (SmolLM2's, ids < 49,152), which fits inside the larger
vocabularies: the rows above the tokenizer's ids are simply never used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from token_journey.errors import TokenJourneyError

INIT_STD = 0.02
"""Standard deviation of every weight matrix (Llama's `initializer_range`); norms start at 1."""

INIT_CHUNK = 1 << 24
"""Elements drawn per generator call: bounds the float32 scratch to 64 MiB whatever the model size."""


@dataclass(frozen=True, kw_only=True)
class RehearsalShape:
    """The architecture numbers of a Llama-family model, as its Hugging Face config states them."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_mlp: int
    vocab_size: int
    rope_theta: float
    rope_scaling: dict[str, Any] | None = None
    """Llama 3 style frequency scaling (`rope_type: llama3`), or None for plain RoPE."""
    max_position_embeddings: int
    tie_word_embeddings: bool
    rms_norm_eps: float = 1e-5
    seed: int = 0
    """Seed of the weight generator: fixed per shape so a prepare is reproducible bit for bit."""
    source: str = field(default="")
    """Where the numbers come from, for the manifest and the reader."""


SHAPES: dict[str, RehearsalShape] = {
    # meta-llama/Llama-3.2-1B config.json.
    "llama-3.2-1b": RehearsalShape(
        n_layers=16,
        d_model=2048,
        n_heads=32,
        n_kv_heads=8,
        head_dim=64,
        d_mlp=8192,
        vocab_size=128256,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        source="meta-llama/Llama-3.2-1B config.json",
    ),
    # gplsi/Aitana-2B-S: Llama architecture, untied embeddings (numbers as the project's issue 13 states them).
    "aitana-2b-s": RehearsalShape(
        n_layers=24,
        d_model=2048,
        n_heads=16,
        n_kv_heads=4,
        head_dim=128,
        d_mlp=5440,
        vocab_size=256000,
        rope_theta=10000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        source="gplsi/Aitana-2B-S (issue 13)",
    ),
}


def rehearsal_shape(name: str) -> RehearsalShape:
    """The shape called `name` (model.id of a `source: rehearsal` config), or one clear error."""
    if name not in SHAPES:
        raise TokenJourneyError(f"model.id={name!r} is not a rehearsal shape; choose one of {', '.join(SHAPES)}")
    return SHAPES[name]


def llama_config(shape: RehearsalShape, tokenizer: Any) -> Any:
    """The transformers `LlamaConfig` of `shape`, with the special-token ids of `tokenizer`."""
    from transformers import LlamaConfig

    if len(tokenizer) > shape.vocab_size:
        raise TokenJourneyError(f"the tokenizer has {len(tokenizer)} ids but the rehearsal vocabulary is {shape.vocab_size}")
    rope = {"rope_type": "default", "rope_theta": shape.rope_theta}
    if shape.rope_scaling:
        rope = {**shape.rope_scaling, "rope_theta": shape.rope_theta}
    return LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.d_model,
        intermediate_size=shape.d_mlp,
        num_hidden_layers=shape.n_layers,
        num_attention_heads=shape.n_heads,
        num_key_value_heads=shape.n_kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_position_embeddings,
        rms_norm_eps=shape.rms_norm_eps,
        rope_theta=shape.rope_theta,
        rope_scaling=rope,
        tie_word_embeddings=shape.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


@torch.no_grad()
def fill_seeded(model: torch.nn.Module, seed: int, std: float = INIT_STD) -> None:
    """Overwrite every parameter: matrices ~ N(0, std²) from one seeded generator, vectors (norms) = 1.

    Parameters are visited in name order and drawn in float32 chunks of `INIT_CHUNK` elements,
    then cast, so the result depends only on (shape, seed), never on the dtype's own sampler,
    and the scratch memory stays bounded. Tied weights are one parameter and filled once.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for _, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if param.dim() == 1:
            param.fill_(1.0)
            continue
        flat = param.view(-1)
        for start in range(0, flat.numel(), INIT_CHUNK):
            part = flat[start : start + INIT_CHUNK]
            draw = torch.randn(part.numel(), generator=generator, dtype=torch.float32)
            part.copy_(draw.mul_(std))


def build_rehearsal(shape: RehearsalShape, tokenizer: Any, dtype: torch.dtype) -> Any:
    """A random-weight `LlamaForCausalLM` of `shape` in `dtype`, on the CPU, in eval mode.

    The module is built on the meta device (no allocation, no default initialisation), then
    materialised directly in `dtype` and filled by `fill_seeded`; its RoPE buffers are computed
    afresh from the config, since `to_empty` leaves buffers uninitialised.
    """
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = llama_config(shape, tokenizer)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)  # casting on meta is free: memory is allocated once, in dtype
    model = model.to_empty(device="cpu")
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config)
    model.tie_weights()
    fill_seeded(model, shape.seed)
    return model.eval()
