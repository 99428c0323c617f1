"""The schedules of SAE training, pure functions of the step (so a resumed run follows them exactly)."""

from __future__ import annotations

from token_journey.config.sae import SAEConfig


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
