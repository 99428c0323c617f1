"""The SAE training loop shared by every architecture.

What it does, once for all architectures: scale inputs by one scalar so E||x||^2 = 1 (folded back
into the saved weights at the end), start b_dec from the data (and keep it there with
`train_b_dec=false`), a TopK warm start for a JumpReLU trained to a target L0, Adam with lr warmup then linear
decay, a sparsity coefficient warmed up linearly, gradient clipping, unit-norm decoder rows with
the gradient component parallel to each row removed, dead-latent tracking over a token window,
checkpoints every N steps that resume exactly, and a refusal to go on (or save) after a
non-finite loss. Data is any `batches(start_batch) -> iterator of [batch, d_in]` tensors, so the
Parquet shard loader and synthetic test data plug in the same way; a transcoder's batches are
[batch, 2 d_in], its input beside its target (`PairedLoader`), each half scaled by its own scalar. With torch.distributed
initialised, each rank takes its slice of every global batch and gradients are averaged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from token_journey.config.sae import SAEConfig
from token_journey.distributed import current_processes
from token_journey.errors import TokenJourneyError
from token_journey.preemption import Preempted, StopRequest, stop_requests
from token_journey.sae.base import SAE, SAESpec
from token_journey.sae.member import Member
from token_journey.sae.registry import USES_K, USES_PREFIXES, build_sae, encoder_of, prefix_sizes

log = logging.getLogger(__name__)

Batches = Callable[[int], Iterator[torch.Tensor]]


@dataclass(frozen=True)
class DataStats:
    """Training-data statistics from the shard manifest. `mean` [d_in]."""

    mean: torch.Tensor
    mean_sq_norm: float

    @classmethod
    def from_rows(cls, rows: torch.Tensor, outlier_ratio: float = 10.0) -> DataStats:
        """Statistics of rows [N, d_in] as the harvest would record them: rows whose norm exceeds
        `outlier_ratio` x the median row norm are left out (0 keeps all). This is the harvest's rule
        (`data.corpus.drop_norm_outliers`) with all rows as one sequence, written out here so that
        training does not import the corpus machinery (the train_sae stage would then depend on it).

        For activations that did not go through the harvest's outlier rule (loose tensors): SmolLM2's
        position-0 rows (norm ~30,000 against a median of 171, 0.8% of rows) hold ~99% of E||x||^2, and
        a scale taken from them shrinks every ordinary row to ~1/12 of unit norm, where Adam's steps on
        the biases outweigh the rows themselves and all but a few latents die.
        """
        rows = rows.float()
        norms = rows.norm(dim=1)
        kept = rows[norms <= outlier_ratio * norms.median()] if outlier_ratio > 0 else rows
        return cls(kept.mean(0), float(kept.pow(2).sum(1).mean()))

    @property
    def scale(self) -> float:
        """The scalar C with E||C x||^2 = 1."""
        if not math.isfinite(self.mean_sq_norm) or self.mean_sq_norm <= 0:
            raise TokenJourneyError(f"manifest mean_sq_norm={self.mean_sq_norm} must be a positive number; re-run harvest")
        return 1.0 / math.sqrt(self.mean_sq_norm)


def geometric_median(x: torch.Tensor, iterations: int = 50) -> torch.Tensor:
    """Weiszfeld's algorithm on rows of x [N, d] -> [d]; robust to the outlier tokens."""
    median = x.mean(0)
    for _ in range(iterations):
        weights = 1.0 / (x - median).norm(dim=1).clamp_min(1e-8)
        median = (weights[:, None] * x).sum(0) / weights.sum()
    return median


def new_sae(
    cfg: SAEConfig, d_in: int, stats: DataStats, seed: int, first_batch: torch.Tensor | None = None, device: torch.device | str = "cpu", **meta: Any
) -> SAE:
    """An initialised SAE for normalised inputs on `device` (meta: name, model, site, layer).

    The initial weights are drawn on the CPU, so they do not depend on the device. For a transcoder
    `stats` and `first_batch` [N, d_in] describe its target (the MLP output), where b_dec lives.
    """
    prefixes = prefix_sizes(cfg.prefixes, cfg.width) if cfg.architecture in USES_PREFIXES else ()
    sae_cfg = SAESpec(
        cfg.architecture, d_in, cfg.width, k=cfg.k if cfg.architecture in USES_K else 0, prefixes=prefixes, name=meta.pop("name", cfg.name), **meta
    )
    sae = build_sae(sae_cfg, device)
    scale = stats.scale
    if cfg.b_dec_init == "mean":
        b_dec = stats.mean.float() * scale
    elif cfg.b_dec_init == "geometric_median":
        if first_batch is None:
            raise ValueError("sae.b_dec_init=geometric_median needs the first training batch (first_batch)")
        b_dec = geometric_median(first_batch.float() * scale)
    else:
        b_dec = None
    sae.init_weights(torch.Generator(device="cpu").manual_seed(seed), b_dec)
    sae.b_dec.requires_grad_(cfg.train_b_dec)
    if encoder_of(sae.architecture) == "jumprelu":
        with torch.no_grad():
            sae.threshold.fill_(cfg.threshold_init)
    if cfg.center_encoder_input:
        sae.apply_b_dec_to_input = True  # until Member.finish folds it into b_enc
    return sae


def to_device(batches: Iterator[torch.Tensor], device: torch.device, rank: int, world: int) -> Iterator[torch.Tensor]:
    """This process's slice of each CPU batch, on `device`, one batch ahead.

    On CUDA the slice is pinned and copied on a side stream while the previous step computes;
    the compute stream waits for the copy before using it. On the CPU the slice is yielded as is.
    """
    slices = (batch.chunk(world)[rank] for batch in batches)
    if device.type != "cuda":
        yield from (x.to(device) for x in slices)
        return
    copier = torch.cuda.Stream(device)

    def start(x: torch.Tensor) -> torch.Tensor:
        with torch.cuda.stream(copier):
            return x.pin_memory(device).to(device, non_blocking=True)

    ahead = start(next(slices))
    for x in slices:
        current, ahead = ahead, start(x)
        torch.cuda.current_stream(device).wait_stream(copier)
        current.record_stream(torch.cuda.current_stream(device))
        yield current


def train(
    sae: SAE,
    batches: Batches,
    stats: DataStats,
    cfg: SAEConfig,
    *,
    in_stats: DataStats | None = None,
    checkpoint_dir: Path | None = None,
    tracker: Any = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train `sae` (already initialised for normalised inputs) for `cfg.steps` steps, then fold the scale in.

    A transcoder needs `in_stats`, the statistics of its input, besides `stats` of its target.
    Resumes from `checkpoint_dir` when it holds a checkpoint of the same config. `stop_after`
    ends early after that many steps without folding (to simulate a killed run in tests).
    On SIGTERM/SIGUSR1 (`token_journey.preemption`) every process finishes the step under way, a
    checkpoint of it is written (with `checkpoint_dir`) and `Preempted` is raised: no finished step is lost.
    Returns training figures: steps, tokens, tokens_per_s, last losses, train L0 and dead fraction.
    """
    processes = current_processes()
    with stop_requests() as stop:
        member = Member(
            sae,
            stats,
            cfg,
            in_stats=in_stats,
            checkpoint_dir=checkpoint_dir,
            tracker=tracker,
            stop_after=stop_after,
            rank=processes.index,
            world=processes.count,
        )
        return train_members([member], batches, stop)[0]


def train_members(members: list[Member], batches: Batches, stop: StopRequest) -> list[dict[str, Any]]:
    """Train every member from one read of `batches`: each batch goes to every member due to train on it.

    Members share the batch size (one stream of batches) and may differ in everything else; one that
    resumes from a later checkpoint than another skips the batches it has already trained on. Per step
    there is one collective for all members (which latents fired, and whether to stop). Returns each
    member's training figures, in order.
    """
    sizes = {m.cfg.batch_size for m in members}
    if len(sizes) != 1:
        raise TokenJourneyError(f"members trained from one read of the shards need one batch size, got {sorted(sizes)}; train them apart")
    rank, world = members[0].rank, members[0].world
    first = min(m.start for m in members)
    data = to_device(batches(first), members[0].device, rank, world)
    names = ", ".join(m.name for m in members)
    bar = tqdm(range(first, max(m.reads_until for m in members)), desc=f"train {names}", disable=rank != 0, initial=first)
    stop.at(first)
    for step in bar:
        x = next(data).float()
        training = [m for m in members if m.trains_at(step)]
        outs = [m.step(x, step) for m in training]
        fired, stopping = _agree([out.fired for out in outs], stop.requested, world, members[0].device)
        stop.at(step + 1)  # a signal from here on is seen after the next step
        for m, out, latents in zip(training, outs, fired):
            m.count(step, latents, _mean_over(out.l0, world, m.device) if m.cfg.target_l0 else out.l0)
        for m in members:
            if m.end <= step < m.reads_until:
                m.keep_for_calibration(x)
        if training and step % training[0].cfg.log_every == 0:
            bar.set_postfix_str("  ".join(f"{m.name}: loss {m.last['loss']:.4f} L0 {m.last['l0']:.1f}" for m in training))
        for m in training:
            if m.checkpoint_due(step + 1, stopping):
                m.save(step + 1)
        unfinished = [m for m in training if step + 1 < m.end]
        if stopping and unfinished:
            why = f"{stop.signal} came after step {stop.done}" if stop.signal else "another process was asked to stop"
            where = "; ".join(m.saves.where(step + 1) for m in unfinished)  # each checkpoint folder names its SAE
            raise Preempted(f"{', '.join(m.name for m in unfinished)}: {why}; {where}; rerun the same command to resume")
    return [m.finish() for m in members]


def _agree(fired: list[torch.Tensor], stop: bool, world: int, device: torch.device) -> tuple[list[torch.Tensor], bool]:
    """Which latents fired on any process (per member), and whether any process was asked to stop, in one all-reduce.

    Every process must stop after the same step, or the others would wait in the next step's collectives. On the
    steps where no member trains (calibration rows only) `fired` is empty and the flag alone travels, on `device`
    (the members' device: NCCL reduces only CUDA tensors).
    """
    if world == 1:
        return fired, stop
    both = torch.cat([f.to(torch.uint8) for f in fired] + [torch.tensor([stop], dtype=torch.uint8, device=device)])
    torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
    return list(both[:-1].split([f.numel() for f in fired])), bool(both[-1])


def _mean_over(value: float, world: int, device: torch.device) -> float:
    """The mean of a per-process figure over all processes (the value itself with one process)."""
    if world == 1:
        return value
    total = torch.tensor(value, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total)
    return float(total) / world
