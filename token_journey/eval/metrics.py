"""SAE evaluation metrics, each defined once, with its formula.

Notation: `x` [N, d_in] are the true activations of N eval tokens, `x_hat` [N, d_in] the SAE
reconstructions, `f` [N, d_sae] the latents. A latent is *active* on a token when it is not
exactly zero (every architecture here outputs exact zeros when off). For the language-model
side, `logits` [M, vocab] are next-token logits at the M counted positions and `targets` [M]
the tokens they predict.

Reconstruction metrics stream: `ReconstructionTally` keeps additive sums over batches and
turns them into metrics through the same functions the one-shot forms use, so evaluating a
million tokens in batches gives the number a single giant batch would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

DENSE_THRESHOLD = 0.1
"""A latent active on more than this fraction of eval tokens counts as dense."""

LOG10_DENSITY_EDGES = tuple(x / 4 for x in range(-28, 1))
"""Histogram bin edges of log10 firing density: -7, -6.75, ..., 0 (dead latents counted apart)."""


def active_counts(f: torch.Tensor) -> torch.Tensor:
    """Per-token number of active latents, ||f_n||_0.  `f` [N, d_sae] -> [N] (int64)."""
    return (f != 0).sum(dim=-1)


def l0(f: torch.Tensor) -> float:
    """L0 = (1/N) sum_n ||f_n||_0: the mean number of active latents per token."""
    return active_counts(f).double().mean().item()


def fvu_from_sums(sq_err: float, sum_x: torch.Tensor, sum_sq_norm: float, n: int) -> float:
    """FVU from additive sums over N tokens.

    FVU = sum_n ||x_n - x_hat_n||^2 / sum_n ||x_n - mean(x)||^2, and the denominator equals
    sum_n ||x_n||^2 - ||sum_n x_n||^2 / N (the total variance times N). Sums are float64, so
    the subtraction keeps ~1e-12 relative precision for activation-sized numbers.
    `sq_err` = sum_n ||x_n - x_hat_n||^2, `sum_x` [d_in] = sum_n x_n, `sum_sq_norm` = sum_n ||x_n||^2.
    """
    total_var = sum_sq_norm - float(sum_x.double().pow(2).sum()) / n
    return sq_err / total_var if total_var > 0 else math.nan


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained, sum_n ||x_n - x_hat_n||^2 / sum_n ||x_n - mean(x)||^2.

    0 is perfect; 1 is no better than predicting the mean activation. See `fvu_from_sums`.
    """
    x, x_hat = x.double(), x_hat.double()
    return fvu_from_sums(float((x - x_hat).pow(2).sum()), x.sum(0), float(x.pow(2).sum()), x.shape[0])


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """MSE = sum_n ||x_n - x_hat_n||^2 / (N * d_in): the mean squared error per element."""
    return (x.double() - x_hat.double()).pow(2).mean().item()


def token_cosine(x: torch.Tensor, x_hat: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-token cosine similarity <x_n, x_hat_n> / (||x_n|| ||x_hat_n||) -> [N] (0 when x_hat_n = 0)."""
    x, x_hat = x.double(), x_hat.double()
    return (x * x_hat).sum(-1) / (x.norm(dim=-1) * x_hat.norm(dim=-1)).clamp_min(eps)


def cosine(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Mean cosine similarity, (1/N) sum_n cos(x_n, x_hat_n)."""
    return token_cosine(x, x_hat).mean().item()


def token_relative_norm(x: torch.Tensor, x_hat: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-token norm ratio ||x_hat_n|| / ||x_n|| -> [N]; 1 means the SAE neither shrinks nor inflates."""
    return x_hat.double().norm(dim=-1) / x.double().norm(dim=-1).clamp_min(eps)


def relative_norm(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Mean relative norm, (1/N) sum_n ||x_hat_n|| / ||x_n||."""
    return token_relative_norm(x, x_hat).mean().item()


def firing_density(fire_counts: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Per-latent firing density, d_j = #{n : f_nj != 0} / N.  `fire_counts` [d_sae] -> [d_sae] float64."""
    return fire_counts.double() / n_tokens


def dead_fraction(density: torch.Tensor) -> float:
    """Fraction of latents never active on the eval tokens, #{j : d_j = 0} / d_sae."""
    return (density == 0).double().mean().item()


def dense_fraction(density: torch.Tensor, threshold: float = DENSE_THRESHOLD) -> float:
    """Fraction of latents active on more than `threshold` of tokens, #{j : d_j > threshold} / d_sae."""
    return (density > threshold).double().mean().item()


def density_histogram(density: torch.Tensor, edges: tuple[float, ...] = LOG10_DENSITY_EDGES) -> dict:
    """Histogram of log10 d_j over live latents (d_j > 0), plus the dead count.

    Returns {"log10_edges": edges, "counts": [len(edges) - 1], "dead": int}; densities below the
    first edge land in the first bin, so counts + dead always sum to d_sae.
    """
    live = density[density > 0]
    logs = live.log10().clamp(edges[0], edges[-1])
    counts = torch.histogram(logs.double().cpu(), bins=torch.tensor(edges, dtype=torch.float64, device="cpu")).hist
    return {"log10_edges": list(edges), "counts": [int(c) for c in counts], "dead": int((density == 0).sum())}


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities log softmax(logits) in float32.  [M, V] -> [M, V]."""
    return torch.log_softmax(logits.float(), dim=-1)


def token_cross_entropy(log_p: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position next-token loss, H_m = -log p_m[targets_m] in nats.  `log_p` [M, V], `targets` [M] -> [M]."""
    return -log_p.gather(-1, targets[:, None])[:, 0]


def token_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-position KL(p || q) = sum_v p_v (log p_v - log q_v) in nats, p the clean distribution.

    Takes log-probabilities [M, V] (see `log_probs`) so the clean ones are computed once per batch. -> [M]
    """
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def loss_recovered(ce_clean: float, ce_sae: float, ce_zero: float) -> float:
    """Loss recovered = (H_zero - H_sae) / (H_zero - H_clean).

    1 means splicing the SAE costs nothing; 0 means it is as bad as zero-ablating the site.
    NaN when zero ablation does not change the loss (the ratio is then meaningless).
    """
    gap = ce_zero - ce_clean
    return (ce_zero - ce_sae) / gap if gap != 0 else math.nan


def pareto_front(costs: list[float], errors: list[float]) -> list[bool]:
    """Which points are Pareto-optimal when both coordinates are to be minimised (e.g. L0 and FVU).

    Point i is on the front iff no j has cost_j <= cost_i and error_j <= error_i with one strict;
    NaN points are never on it.
    """
    points = list(zip(costs, errors))

    def dominated(i: int) -> bool:
        ci, ei = points[i]
        return any(cj <= ci and ej <= ei and (cj, ej) != (ci, ei) for cj, ej in points)

    return [not (math.isnan(c) or math.isnan(e)) and not dominated(i) for i, (c, e) in enumerate(points)]


@dataclass
class ReconstructionTally:
    """Additive sums over eval batches for the reconstruction and sparsity metrics of one SAE.

    `update` adds one batch; `result` applies the metric formulas above to the totals, so
    streaming over batches equals the one-shot formulas on the concatenated tokens.
    `context_size` sizes the per-position error sums.
    """

    d_sae: int
    context_size: int
    n: int = 0
    sq_err: float = 0.0
    sum_sq_norm: float = 0.0
    sum_active: int = 0
    sum_cosine: float = 0.0
    sum_relative_norm: float = 0.0
    sum_x: torch.Tensor | None = None
    fire_counts: torch.Tensor = field(init=False)
    pos_sq_err: torch.Tensor = field(init=False)
    pos_sq_norm: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.fire_counts = torch.zeros(self.d_sae, dtype=torch.int64, device="cpu")
        self.pos_sq_err = torch.zeros(self.context_size, dtype=torch.float64, device="cpu")
        self.pos_sq_norm = torch.zeros(self.context_size, dtype=torch.float64, device="cpu")

    def update(self, x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor, positions: torch.Tensor) -> None:
        """Add a batch: `x`, `x_hat` [N, d_in], `f` [N, d_sae], `positions` [N] (index within its sequence)."""
        x, x_hat = x.double(), x_hat.double()
        err = (x - x_hat).pow(2).sum(-1)  # (N,)
        norm = x.pow(2).sum(-1)  # (N,)
        self.n += x.shape[0]
        self.sq_err += float(err.sum())
        self.sum_sq_norm += float(norm.sum())
        self.sum_x = x.sum(0).cpu() if self.sum_x is None else self.sum_x + x.sum(0).cpu()
        self.sum_active += int(active_counts(f).sum())
        self.sum_cosine += float(token_cosine(x, x_hat).sum())
        self.sum_relative_norm += float(token_relative_norm(x, x_hat).sum())
        self.fire_counts += (f != 0).sum(0).cpu()
        positions = positions.cpu()
        self.pos_sq_err.index_add_(0, positions, err.cpu())
        self.pos_sq_norm.index_add_(0, positions, norm.cpu())

    def result(self, dense_threshold: float = DENSE_THRESHOLD) -> dict:
        """The reconstruction/sparsity metrics of everything added so far (JSON-ready)."""
        density = firing_density(self.fire_counts, self.n)
        seen = self.pos_sq_norm > 0
        by_position = torch.where(seen, self.pos_sq_err / self.pos_sq_norm.clamp_min(1e-300), torch.nan)
        return {
            "l0": self.sum_active / self.n,
            "fvu": fvu_from_sums(self.sq_err, self.sum_x, self.sum_sq_norm, self.n),
            "mse": self.sq_err / (self.n * self.sum_x.numel()),
            "cosine": self.sum_cosine / self.n,
            "relative_norm": self.sum_relative_norm / self.n,
            "dead_fraction": dead_fraction(density),
            "dense_fraction": dense_fraction(density, dense_threshold),
            "density_hist": density_histogram(density),
            "error_by_position": [None if math.isnan(v) else v for v in by_position.tolist()],
        }


@torch.no_grad()
def sae_reconstruction(sae: Any, x: torch.Tensor, chunk: int = 4096, latents: int = 0, target: torch.Tensor | None = None) -> dict[str, float]:
    """FVU, MSE, L0 and dead fraction of `sae` (anything with `encode`/`decode` and `W_dec`
    [d_sae, d_in]) on held-out rows `x` [N, d_in], moved to the SAE's device chunk by chunk and
    streamed through `ReconstructionTally` so the figures are the ones the evaluate stage defines.
    Used for the quick check that ends training.

    `latents` > 0 keeps only the first `latents` latents (the others set to 0 after encoding): the
    figures of that prefix as an SAE of its own, which is what Matryoshka training optimises.
    `target` [N, d_out] is what the output is scored against when it is not x (a transcoder's MLP
    output); the output is then `sae.output(f, x)`, which adds a skip transcoder's linear term.
    """
    width = int(sae.W_dec.shape[0])
    kept = latents or width
    tally = ReconstructionTally(kept, context_size=1)
    targets = x.split(chunk) if target is None else target.split(chunk)
    for part, want in zip(x.split(chunk), targets):
        part = part.to(sae.W_dec.device).float()
        f = sae.encode(part)
        if kept < width:
            f[:, kept:] = 0
        out = sae.decode(f) if target is None else sae.output(f, part)
        tally.update(want.to(part.device).float(), out, f[:, :kept], torch.zeros(part.shape[0], dtype=torch.long, device=part.device))
    result = tally.result()
    return {**{key: result[key] for key in ("fvu", "mse", "l0", "dead_fraction")}, "eval_tokens": tally.n}
