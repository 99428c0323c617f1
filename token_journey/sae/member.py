"""One SAE in training: its own weights, optimiser, schedules, counters, controller and checkpoints.

The training loop (`token_journey.sae.train`) reads each batch once and hands it to every `Member`
of a layer's family; everything that differs between members lives here, so a member trained beside
others goes through exactly the operations it would go through alone, and comes out the same bytes.
A member reads the batches `[start, end)` to train and, with a target L0, the next
`calibration_batches` to fit its threshold scale (`token_journey.sae.target_l0`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from token_journey.config.sae import SAEConfig
from token_journey.errors import TokenJourneyError
from token_journey.sae.base import SAE, StepContext, StepOutput
from token_journey.sae.checkpoint import load_checkpoint, save_checkpoint
from token_journey.sae.registry import encoder_of, is_transcoder
from token_journey.sae.schedules import lr_at, sparsity_at, threshold_weight_at
from token_journey.sae.target_l0 import CALIBRATION_ROWS, calibrate_thresholds, next_coefficient

log = logging.getLogger(__name__)

CADENCE_KEYS = ("checkpoint_every", "checkpoint_minutes", "log_every")
"""Config keys that say how often to save or log, never what is trained: a run resumes across a change of them."""


def fingerprint(cfg: SAEConfig, sae: SAE) -> dict[str, Any]:
    """What a checkpoint must match to be resumed (the training config but its cadence keys, and the SAE shape)."""
    trained = {k: v for k, v in asdict(cfg).items() if k not in CADENCE_KEYS}
    return {"sae": trained, "d_in": sae.cfg.d_in, "architecture": sae.architecture}


class Member:
    """One SAE's training state, stepped by the shared loop with the batches it is due.

    `stats` describe the SAE's input (a transcoder's target; `in_stats` its input). `stop_after` ends the
    member after that many steps from where it resumed, without calibrating or folding the scale (a
    killed run, in tests). `world` processes each hold a slice of every batch.
    """

    def __init__(
        self,
        sae: SAE,
        stats: Any,
        cfg: SAEConfig,
        *,
        in_stats: Any = None,
        checkpoint_dir: Path | None = None,
        tracker: Any = None,
        stop_after: int | None = None,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        if cfg.batch_size % world:
            raise TokenJourneyError(f"sae.batch_size={cfg.batch_size} must divide evenly over {world} processes")
        self.paired = is_transcoder(sae.architecture)
        if self.paired and in_stats is None:
            raise TokenJourneyError(f"{sae.architecture} needs the statistics of its input (in_stats) to train")
        self.sae, self.cfg, self.tracker, self.rank, self.world = sae, cfg, tracker, rank, world
        self.name = sae.cfg.name
        self.scale = stats.scale
        self.in_scale = in_stats.scale if self.paired else self.scale
        self.d_in = sae.cfg.d_in
        self.device = sae.W_enc.device
        # The fused Adam kernel is ~5x faster than the foreach one on CPU (one pass per tensor).
        fused = self.device.type in ("cpu", "cuda")
        self.opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=fused, foreach=not fused)
        self.since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=self.device)
        self.loop = {"coefficient": cfg.sparsity_coefficient}  # what the loop carries besides tensors (target_l0's controller)
        self.start, resumed_from = 0, None
        if checkpoint_dir is not None:
            resumed = load_checkpoint(checkpoint_dir, sae, self.opt, self.since_fired, fingerprint(cfg, sae), self.loop)
            if resumed is not None:
                self.start, resumed_from = resumed, checkpoint_dir
                log.info("resumed %s from step %d (%s)", self.name, self.start, checkpoint_dir)
        self.end = cfg.steps if stop_after is None else min(cfg.steps, self.start + stop_after)
        self.finishes = stop_after is None
        calibrates = self.finishes and bool(cfg.target_l0)
        # No more calibration rows than the run trains on: at a tiny budget at the true shapes (the rehearsal's 1,024
        # tokens at width 16k) 65,536 rows cost more than the training itself.
        self.calibration_batches = -(-min(CALIBRATION_ROWS, cfg.train_tokens) // cfg.batch_size) if calibrates else 0
        self.calibration_rows: list[torch.Tensor] = []
        self.saves = Checkpoints(checkpoint_dir, cfg, rank, resumed_from)
        self.extra = {
            "auxk_alpha": cfg.auxk_alpha,
            "k_aux": float(cfg.k_aux),
            "pre_act_coefficient": cfg.pre_act_coefficient,
            "pre_act_moves_encoder": float(cfg.pre_act_moves_encoder),
        }
        self.last: dict[str, float] = {}
        self.seconds, self.tokens = 0.0, 0

    @property
    def reads_until(self) -> int:
        """The first batch this member does not read (training, then calibration rows)."""
        return self.end + self.calibration_batches

    def trains_at(self, step: int) -> bool:
        return self.start <= step < self.end

    def step(self, x: torch.Tensor, step: int) -> StepOutput:
        """One optimiser step on this process's slice `x` of batch `step` (raw activations)."""
        t0 = time.perf_counter()
        cfg, sae = self.cfg, self.sae
        if x.shape[0] * self.world != cfg.batch_size:
            raise TokenJourneyError(f"data gave a batch of {x.shape[0] * self.world} rows, expected sae.batch_size={cfg.batch_size}")
        ctx = StepContext(
            sparsity_at(cfg, step, self.loop["coefficient"]),
            self.since_fired >= cfg.dead_window_tokens,
            cfg.bandwidth,
            threshold_weight_at(cfg, step),
            self.extra,
            cfg.target_l0 if step < cfg.topk_warmup_steps else 0.0,
            cfg.warmup_architecture == "batchtopk",
            step == cfg.topk_warmup_steps - 1,
        )
        if self.paired:  # [input | target]
            out = sae.training_step(x[:, : self.d_in] * self.in_scale, ctx, x[:, self.d_in :] * self.scale)
        else:
            out = sae.training_step(x * self.scale, ctx)
        if not torch.isfinite(out.loss.detach()):
            raise TokenJourneyError(
                f"{self.name}: loss became {float(out.loss.detach())} at step {step}; nothing saved. Last good checkpoint: "
                f"{self.saves.last or 'none'}. Lower sae.lr or check the activations for inf/NaN"
            )
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        _sync_grads(sae, self.world)
        if sae.unit_norm_decoder:
            _constrain_grad(sae)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip, foreach=True)
        lr = lr_at(cfg, step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        match_grad_layout(sae)
        self.opt.step()
        _after_step(sae)
        self.last = {"loss": float(out.loss.detach()), "mse": float(out.mse), "aux": float(out.aux), "l0": out.l0, "lr": lr}
        self.last["sparsity_coefficient"] = ctx.sparsity_coefficient
        self.seconds += time.perf_counter() - t0
        return out

    def count(self, step: int, fired: torch.Tensor, mean_l0: float) -> None:
        """After step `step`: the latents that fired on any process, and the L0 averaged over processes."""
        t0 = time.perf_counter()
        cfg = self.cfg
        if cfg.target_l0:
            self.loop["coefficient"] = next_coefficient(self.loop["coefficient"], mean_l0, cfg.target_l0, cfg.target_l0_gain)
        self.since_fired += cfg.batch_size
        self.since_fired[fired.bool()] = 0
        self.seconds += time.perf_counter() - t0
        self.tokens += cfg.batch_size
        self.last["dead_fraction"] = float((self.since_fired >= cfg.dead_window_tokens).float().mean())
        self.last["tokens_per_s"] = self.tokens / max(self.seconds, 1e-9)
        if (step % cfg.log_every == 0 or step == self.end - 1) and self.tracker is not None and self.rank == 0:
            self.tracker.log({f"train/{k}": v for k, v in self.last.items()}, step=step)

    def checkpoint_due(self, done: int, stopping: bool) -> bool:
        return self.saves.due(done) or (stopping and done < self.end)

    def save(self, done: int) -> None:
        self.saves.save(done, self.sae, self.opt, self.since_fired, fingerprint(self.cfg, self.sae), self.loop)

    def keep_for_calibration(self, x: torch.Tensor) -> None:
        """Rows of a batch after the last step, which the threshold scale is fit on."""
        self.calibration_rows.append(x[:, : self.d_in] * self.in_scale)

    def finish(self) -> dict[str, Any]:
        """Calibrate the thresholds (target L0), fold the input scale into the weights, and return the training figures."""
        calibration = {}
        if self.calibration_batches:
            scale = calibrate_thresholds(self.sae, self.calibration_rows, self.cfg.target_l0, self.world)
            calibration = {"threshold_scale": scale}
            rows = len(self.calibration_rows) * self.cfg.batch_size
            log.info("%s: thresholds x%.4f so that L0 = %g on %d training rows", self.name, scale, self.cfg.target_l0, rows)
            self.calibration_rows = []
        if self.finishes:
            if self.cfg.center_encoder_input:
                self.sae.stop_centering_input()
            if self.paired:
                self.sae.fold_scale(self.scale, self.in_scale)
            else:
                self.sae.fold_scale(self.scale)
        return {
            "steps": self.end,
            "train_tokens": self.end * self.cfg.batch_size,
            "tokens_per_s": self.tokens / max(self.seconds, 1e-9),
            "processes": self.world,
            **calibration,
            **{f"final_{k}": v for k, v in self.last.items() if k != "tokens_per_s"},
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
