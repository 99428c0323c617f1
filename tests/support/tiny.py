"""Tiny random-weight models of each supported family, with a small byte-level tokenizer.

They prove plumbing (shapes, hooks, splicing, the DVC DAG) in seconds, not learned features.
`save_tiny(family, folder)` writes a Hugging Face folder that `model=local model.id=<folder>`
loads like any real checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

FAMILIES = ("llama", "gemma2", "gemma3")

_TRAINING_TEXT = (
    "In the beginning was the word, and the word travelled through every layer of the network. "
    "The capital of France is Paris. Sparse autoencoders find features in the residual stream. "
    "Attention mixes information across positions; the MLP transforms each position on its own."
)


def tiny_tokenizer(vocab_size: int = 320) -> Any:
    """A byte-level BPE tokenizer trained on a fixed paragraph, with BOS/EOS/pad tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<bos>", "<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator([_TRAINING_TEXT] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def tiny_config(family: str, vocab_size: int = 320, **overrides: Any) -> Any:
    """A 3-layer config with GQA (4 query / 2 KV heads); Llama gets llama3 RoPE scaling as in Llama 3.2."""
    from transformers import Gemma2Config, Gemma3TextConfig, LlamaConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    if family == "llama":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        config = LlamaConfig(**common, rope_scaling=rope, tie_word_embeddings=True)
    elif family == "gemma2":
        config = Gemma2Config(**common, sliding_window=4, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    elif family == "gemma3":
        config = Gemma3TextConfig(**common, sliding_window=4)
    else:
        raise ValueError(f"unknown tiny family {family!r}; choose from {FAMILIES}")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def tiny_model(family: str, seed: int = 0, **overrides: Any) -> Any:
    """A random-weight causal LM of `family` in float32, eval mode, with eager attention."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def save_tiny(family: str, folder: Path | str, seed: int = 0) -> Path:
    """Write a tiny model and its tokenizer as a Hugging Face folder (safetensors)."""
    folder = Path(folder)
    tiny_model(family, seed=seed).save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer().save_pretrained(folder)
    return folder
