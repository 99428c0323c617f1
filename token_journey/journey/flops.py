"""Where the compute goes: FLOP counts per step, and sums per layer and for the whole pass.

Conventions (stated once, used by every step):
- a product of an activation `[T, n_in]` with a weight `[n_in, n_out]` costs `2·T·n_in·n_out`
  (one multiply, one add per term); attention's two products cost `2·H·T·T·head_dim` each,
  computed densely over the full `T×T` square as the eager kernel does;
- element-wise work counts one FLOP per element per arithmetic operation: RMSNorm 4 per element
  (square, mean, scale, weight), RoPE 3 (two multiplies, one add), softmax 3 (exp, sum, divide),
  SiLU 4 (negate, exp, add, divide, folded with the multiply), tanh-GELU 8, soft-capping 3
  (divide, tanh, multiply), residual add and mask add 1;
- lookups, reshapes and the grouped-query copy of K/V heads cost nothing.
The `matmul` steps alone reproduce the classic estimate `2·N·T + 4·L·H·T²·head_dim`, which the
tests check against the model's own parameter tensors.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from token_journey.journey.steps import Step

ACT_FLOPS = {"silu": 4, "gelu_tanh": 8, "gelu": 8}
"""FLOPs per element of each activation function."""


def linear(tokens: int, n_in: int, n_out: int) -> int:
    """FLOPs of `[tokens, n_in] @ [n_in, n_out]`."""
    return 2 * tokens * n_in * n_out


def rms_norm(tokens: int, width: int) -> int:
    """FLOPs of an RMSNorm over `[tokens, width]`."""
    return 4 * tokens * width


def per_layer(steps: Iterable[Step]) -> dict[int | None, dict[str, int]]:
    """{layer: {"params", "flops"}} with None for the steps outside the decoder layers."""
    sums: dict[int | None, dict[str, int]] = defaultdict(lambda: {"params": 0, "flops": 0})
    for step in steps:
        sums[step.layer]["params"] += step.params
        sums[step.layer]["flops"] += step.flops
    return dict(sums)


def totals(steps: Iterable[Step]) -> dict[str, int]:
    """Parameters and FLOPs of the whole pass, and the FLOPs of the weight/attention products alone."""
    steps = list(steps)
    return {
        "params": sum(s.params for s in steps),
        "flops": sum(s.flops for s in steps),
        "matmul_flops": sum(s.flops for s in steps if s.kind == "matmul"),
    }


def human(n: float) -> str:
    """1234567 -> '1.23M' for tables."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))
