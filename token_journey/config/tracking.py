"""Experiment tracking with wandb (the `tracking` config group)."""

from __future__ import annotations

from dataclasses import dataclass

from token_journey.errors import TokenJourneyError

MODES = ("offline", "online", "disabled")


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    mode: str
    """offline (default: logs under wandb/, `wandb sync` uploads later) | online | disabled."""
    project: str
    """wandb project name."""
    entity: str
    """wandb entity (team or user); empty = your default."""
    dir: str
    """Where the wandb/ run folder goes."""
    group: str
    """Run group; empty = $DVC_EXP_NAME or the Hydra sweep folder, so sweep members group together."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise TokenJourneyError(f"tracking.mode={self.mode!r} is not one of {', '.join(MODES)}")
