"""Seeded sampling of a continuation, written out: temperature, top-k, top-p, then a draw.

The model supplies the logits of each next position (one ordinary forward pass per new token,
no cache: the journey is for reading, not speed); the choice of token is ours.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from token_journey.config.journey import GenerationConfig


def filter_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Sampling distribution `[vocab]` from `logits [vocab]`.

    temperature 0 means greedy (all mass on the argmax); top_k keeps the k most likely tokens
    (0 = all); top_p keeps the smallest set of most likely tokens whose mass reaches top_p.
    """
    logits = logits.float()
    if temperature == 0:
        probs = torch.zeros_like(logits)
        probs[logits.argmax()] = 1.0
        return probs
    probs = torch.softmax(logits / temperature, dim=-1)
    order = probs.argsort(descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    sorted_probs = probs[order]
    n_keep = probs.numel() if top_k <= 0 else min(top_k, probs.numel())
    if top_p < 1.0:
        # Mass before each token < top_p: the token is needed to reach top_p.
        before = sorted_probs.cumsum(0) - sorted_probs
        n_keep = min(n_keep, int((before < top_p).sum()))
    keep[order[: max(n_keep, 1)]] = True
    probs = torch.where(keep, probs, torch.zeros_like(probs))
    return probs / probs.sum()


@dataclass(frozen=True)
class Generated:
    """A sampled continuation: the new ids, and the probability each had when drawn."""

    token_ids: list[int]
    probs: list[float]


@torch.inference_mode()
def generate(model: nn.Module, input_ids: torch.Tensor, cfg: GenerationConfig, seed: int, eos_id: int | None, max_len: int | None = None) -> Generated:
    """Sample up to `cfg.max_new_tokens` tokens after `input_ids [1, T]`, reproducibly for a `seed`.

    Stops early at `eos_id` or when the sequence reaches the context length `max_len`.
    """
    gen = torch.Generator().manual_seed(seed)
    ids, new, chosen = input_ids, [], []
    steps = cfg.max_new_tokens if max_len is None else min(cfg.max_new_tokens, max_len - input_ids.shape[1])
    for _ in range(max(steps, 0)):
        logits = model(input_ids=ids, use_cache=False).logits[0, -1]
        probs = filter_probs(logits, cfg.temperature, cfg.top_k, cfg.top_p).cpu()
        token = int(torch.multinomial(probs, 1, generator=gen))
        new.append(token)
        chosen.append(float(probs[token]))
        ids = torch.cat([ids, torch.tensor([[token]], device=ids.device)], dim=1)
        if eos_id is not None and token == eos_id:
            break
    return Generated(new, chosen)
