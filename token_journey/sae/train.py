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
import time
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
from token_journey.sae.base import SAE, SAESpec, StepContext
from token_journey.sae.checkpoint import load_checkpoint, save_checkpoint
from token_journey.sae.registry import USES_K, USES_PREFIXES, build_sae, encoder_of, is_transcoder, prefix_sizes
from token_journey.sae.target_l0 import CALIBRATION_ROWS, calibrate_thresholds, next_coefficient

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


def lr_at(cfg: SAEConfig, step: int) -> float:
    """Linear warmup from 0.1 * lr, flat, then linear decay to 0 over the last `lr_decay_fraction`."""
    warm = cfg.lr_warmup_steps
    if step < warm:
        return cfg.lr * (0.1 + 0.9 * step / warm)
    decay_steps = int(cfg.steps * cfg.lr_decay_fraction)
    decay_start = cfg.steps - decay_steps
    if decay_steps > 0 and step >= decay_start:
        return cfg.lr * (cfg.steps - step) / decay_steps
    return cfg.lr


def sparsity_at(cfg: SAEConfig, step: int, coefficient: float | None = None) -> float:
    """The sparsity coefficient warmed up linearly from 0 (`coefficient`: the target_l0 controller's, else the config's)."""
    weight = cfg.sparsity_coefficient if coefficient is None else coefficient
    if cfg.sparsity_warmup_steps <= 0:
        return weight
    return weight * min(1.0, step / cfg.sparsity_warmup_steps)


def threshold_weight_at(cfg: SAEConfig, step: int) -> float:
    """Weight of step's batch in BatchTopK's inference threshold.

    An exponential mean (weight 0.01) until the final quarter of the steps, so checkpoints always
    hold a usable threshold; then 1/(steps into the quarter + 1), a plain mean over the final
    quarter. A long exponential mean lags the cut, which falls as training goes on, and a
    threshold that is too high gives far fewer latents per token than k at inference.
    """
    start = cfg.steps - max(1, cfg.steps // 4)
    return 0.01 if step < start else 1.0 / (step - start + 1)


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
    return sae


@torch.no_grad()
def _constrain_grad(sae: SAE) -> None:
    """Remove the gradient component parallel to each unit-norm decoder row."""
    g = sae.W_dec.grad
    if g is not None:
        g -= (g * sae.W_dec).sum(1, keepdim=True) * sae.W_dec


@torch.no_grad()
def _after_step(sae: SAE) -> None:
    if sae.unit_norm_decoder:
        sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    if encoder_of(sae.architecture) == "jumprelu":
        sae.threshold.clamp_(min=0.0)


@torch.no_grad()
def match_grad_layout(module: torch.nn.Module) -> None:
    """Give every gradient its parameter's memory layout (W_enc is a transposed view).

    torch's fused CPU Adam pairs parameter and gradient elements by memory position, so a
    gradient laid out unlike its parameter silently updates the wrong elements (torch 2.13).
    """
    for p in module.parameters():
        if p.grad is not None and p.grad.stride() != p.stride():
            p.grad = torch.empty_like(p).copy_(p.grad)


def _sync_grads(sae: SAE, world: int) -> None:
    if world == 1:
        return
    for p in sae.parameters():
        if not p.requires_grad:  # b_dec with sae.train_b_dec=false
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad)
        p.grad /= world


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
    with stop_requests() as stop:
        return _train(sae, batches, stats, cfg, in_stats, checkpoint_dir, tracker, stop_after, stop)


def _train(
    sae: SAE,
    batches: Batches,
    stats: DataStats,
    cfg: SAEConfig,
    in_stats: DataStats | None,
    checkpoint_dir: Path | None,
    tracker: Any,
    stop_after: int | None,
    stop: StopRequest,
) -> dict[str, Any]:
    """`train`'s loop, under the stop request `stop`."""
    processes = current_processes()
    rank, world = processes.index, processes.count
    if cfg.batch_size % world:
        raise TokenJourneyError(f"sae.batch_size={cfg.batch_size} must divide evenly over {world} processes")
    scale = stats.scale
    paired = is_transcoder(sae.architecture)
    if paired and in_stats is None:
        raise TokenJourneyError(f"{sae.architecture} needs the statistics of its input (in_stats) to train")
    in_scale = in_stats.scale if paired and in_stats is not None else scale
    d_in = sae.cfg.d_in
    # The fused Adam kernel is ~5x faster than the foreach one on CPU (one pass per tensor).
    fused = sae.W_enc.device.type in ("cpu", "cuda")
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=fused, foreach=not fused)
    device = sae.W_enc.device
    since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=device)
    start, resumed_from = 0, None
    loop = {"coefficient": cfg.sparsity_coefficient}  # what the loop carries besides tensors (target_l0's controller)
    if checkpoint_dir is not None:
        resumed = load_checkpoint(checkpoint_dir, sae, opt, since_fired, fingerprint(cfg, sae), loop)
        if resumed is not None:
            start, resumed_from = resumed, checkpoint_dir
            log.info("resumed %s from step %d (%s)", sae.cfg.name, start, checkpoint_dir)
    data = to_device(batches(start), device, rank, world)
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    extra = {"auxk_alpha": cfg.auxk_alpha, "k_aux": float(cfg.k_aux)}
    last: dict[str, float] = {}
    seconds, tokens = 0.0, 0
    bar = tqdm(range(start, end), desc=f"train {sae.cfg.name}", disable=rank != 0, initial=start, total=cfg.steps)
    saves = Checkpoints(checkpoint_dir, cfg, rank, resumed_from)
    stop.at(start)
    for step in bar:
        t0 = time.perf_counter()
        x = next(data).float()
        if x.shape[0] * world != cfg.batch_size:
            raise TokenJourneyError(f"data gave a batch of {x.shape[0] * world} rows, expected sae.batch_size={cfg.batch_size}")
        ctx = StepContext(
            sparsity_at(cfg, step, loop["coefficient"]),
            since_fired >= cfg.dead_window_tokens,
            cfg.bandwidth,
            threshold_weight_at(cfg, step),
            extra,
            cfg.target_l0 if step < cfg.topk_warmup_steps else 0.0,
        )
        if paired:  # [input | target]
            out = sae.training_step(x[:, :d_in] * in_scale, ctx, x[:, d_in:] * scale)
        else:
            out = sae.training_step(x * scale, ctx)
        if not torch.isfinite(out.loss.detach()):
            raise TokenJourneyError(
                f"loss became {float(out.loss.detach())} at step {step}; nothing saved. Last good checkpoint: "
                f"{saves.last or 'none'}. Lower sae.lr or check the activations for inf/NaN"
            )
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        _sync_grads(sae, world)
        if sae.unit_norm_decoder:
            _constrain_grad(sae)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip, foreach=True)
        lr = lr_at(cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr
        match_grad_layout(sae)
        opt.step()
        _after_step(sae)
        fired, stopping = _agree(out.fired, stop.requested, world)
        stop.at(step + 1)  # a signal from here on is seen after the next step
        if cfg.target_l0:
            loop["coefficient"] = next_coefficient(loop["coefficient"], _mean_over(out.l0, world, device), cfg.target_l0, cfg.target_l0_gain)
        since_fired += cfg.batch_size
        since_fired[fired.bool()] = 0
        seconds += time.perf_counter() - t0
        tokens += cfg.batch_size
        last = {
            "loss": float(out.loss.detach()),
            "mse": float(out.mse),
            "aux": float(out.aux),
            "l0": out.l0,
            "lr": lr,
            "dead_fraction": float((since_fired >= cfg.dead_window_tokens).float().mean()),
            "sparsity_coefficient": ctx.sparsity_coefficient,
            "tokens_per_s": tokens / max(seconds, 1e-9),
        }
        if step % cfg.log_every == 0 or step == end - 1:
            bar.set_postfix(loss=f"{last['loss']:.4f}", l0=f"{out.l0:.1f}")
            if tracker is not None and rank == 0:
                tracker.log({f"train/{k}": v for k, v in last.items()}, step=step)
        if saves.due(step + 1) or (stopping and step + 1 < end):
            saves.save(step + 1, sae, opt, since_fired, fingerprint(cfg, sae), loop)
        if stopping and step + 1 < end:
            why = f"{stop.signal} came after step {stop.done}" if stop.signal else "another process was asked to stop"
            raise Preempted(f"{sae.cfg.name}: {why}; {saves.where(step + 1)}; rerun the same command to resume")
    calibration = {}
    if stop_after is None and cfg.target_l0:
        rows = [next(data).float()[:, :d_in] * in_scale for _ in range(-(-CALIBRATION_ROWS // cfg.batch_size))]
        calibration = {"threshold_scale": calibrate_thresholds(sae, rows, cfg.target_l0, world)}
        log.info(
            "%s: thresholds x%.4f so that L0 = %g on %d training rows", sae.cfg.name, calibration["threshold_scale"], cfg.target_l0, len(rows) * cfg.batch_size
        )
    if stop_after is None:
        if paired:
            sae.fold_scale(scale, in_scale)
        else:
            sae.fold_scale(scale)
    return {
        "steps": end,
        "train_tokens": end * cfg.batch_size,
        "tokens_per_s": tokens / max(seconds, 1e-9),
        "processes": world,
        **calibration,
        **{f"final_{k}": v for k, v in last.items() if k != "tokens_per_s"},
    }


class Checkpoints:
    """When to write the training checkpoint: every `checkpoint_every` steps and every `checkpoint_minutes` of
    wall time (whichever comes first), never after the last step. Process 0 alone writes it."""

    def __init__(self, folder: Path | None, cfg: SAEConfig, rank: int, last: Path | None) -> None:
        self.folder, self.cfg, self.rank, self.last = folder, cfg, rank, last
        self.saved_at = time.monotonic()

    def due(self, done: int) -> bool:
        """Whether a checkpoint is due after `done` steps."""
        if self.folder is None or done >= self.cfg.steps:
            return False
        by_steps = bool(self.cfg.checkpoint_every) and done % self.cfg.checkpoint_every == 0
        by_time = self.cfg.checkpoint_minutes > 0 and time.monotonic() - self.saved_at >= 60 * self.cfg.checkpoint_minutes
        return by_steps or by_time

    def save(self, done: int, sae: SAE, opt: torch.optim.Optimizer, since_fired: torch.Tensor, fingerprint: dict[str, Any], loop: dict[str, float]) -> None:
        if self.folder is None:
            return
        if self.rank == 0:
            save_checkpoint(self.folder, done, sae, opt, since_fired, fingerprint, loop)
        self.last, self.saved_at = self.folder, time.monotonic()

    def where(self, done: int) -> str:
        """What a stop after `done` steps leaves behind, for its message."""
        if self.folder is None:
            return f"stopped after step {done} of {self.cfg.steps} with no checkpoint folder (nothing saved)"
        return f"checkpoint after step {done} of {self.cfg.steps} in {self.folder}"


def _agree(fired: torch.Tensor, stop: bool, world: int) -> tuple[torch.Tensor, bool]:
    """Which latents fired on any process, and whether any process was asked to stop, in one all-reduce.

    Every process must stop after the same step, or the others would wait in the next step's collectives.
    """
    if world == 1:
        return fired, stop
    both = torch.cat([fired.to(torch.uint8), torch.tensor([stop], dtype=torch.uint8, device=fired.device)])
    torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
    return both[:-1], bool(both[-1])


def _mean_over(value: float, world: int, device: torch.device) -> float:
    """The mean of a per-process figure over all processes (the value itself with one process)."""
    if world == 1:
        return value
    total = torch.tensor(value, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total)
    return float(total) / world


CADENCE_KEYS = ("checkpoint_every", "checkpoint_minutes", "log_every")
"""Config keys that say how often to save or log, never what is trained: a run resumes across a change of them."""


def fingerprint(cfg: SAEConfig, sae: SAE) -> dict[str, Any]:
    """What a checkpoint must match to be resumed (the training config but its cadence keys, and the SAE shape)."""
    from dataclasses import asdict

    trained = {k: v for k, v in asdict(cfg).items() if k not in CADENCE_KEYS}
    return {"sae": trained, "d_in": sae.cfg.d_in, "architecture": sae.architecture}
