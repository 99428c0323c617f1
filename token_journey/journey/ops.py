"""The elementary operations of the recomputation, written from their formulas.

Each follows the dtype path of transformers' implementation (norms and softmax in float32, then
back to the model's dtype), so a bfloat16 model is recomputed as it really runs, not as an
idealised float32 version of it.
"""

from __future__ import annotations

import math

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) · w   (Gemma: · (1 + w), multiplied before the cast back)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return (normed * (1.0 + weight.float())).to(x.dtype)
    return weight * normed.to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ Wᵀ (+ b), with `weight [out, in]` as nn.Linear stores it."""
    y = x @ weight.T
    return y + bias if bias is not None else y


def activation(x: torch.Tensor, name: str) -> torch.Tensor:
    """SiLU x·σ(x), tanh-GELU ½x(1 + tanh(√(2/π)(x + 0.044715x³))) or exact GELU ½x(1 + erf(x/√2))."""
    if name == "silu":
        return x * torch.sigmoid(x)
    if name == "gelu_tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap · tanh(x / cap): squashes values smoothly into (-cap, cap)."""
    return torch.tanh(x / cap) * cap


def allowed_positions(seq_len: int, window: int | None, device: torch.device | None = None) -> torch.Tensor:
    """Bool `[seq, seq]`: query i may attend key j when j ≤ i (and i - j < window for sliding layers)."""
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= j > i - window
    return allowed


def softmax(x: torch.Tensor) -> torch.Tensor:
    """exp(x - max) / Σ exp(x - max) over the last dimension, in float32, cast back."""
    x32 = x.float()
    e = torch.exp(x32 - x32.amax(-1, keepdim=True))
    return (e / e.sum(-1, keepdim=True)).to(x.dtype)
