"""wandb in one place: offline by default, disabled in tests, names from DVC experiments.

`start_run` returns a wandb run (log with `run.log(metrics, step=...)`, end with `run.finish()`)
or None when tracking is disabled, so callers write `if run: run.log(...)`. The environment
variable WANDB_MODE (set to `disabled` by the tests) wins over the config. Job scripts often leave it
set but empty, which wandb itself rejects with a validation traceback: an empty one is dropped with a
warning (the config decides), and a value wandb would not run here stops the stage with one line.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from token_journey.config.tracking import MODES, TrackingConfig
from token_journey.errors import TokenJourneyError

log = logging.getLogger(__name__)

ALIASES = {"dryrun": "offline", "run": "online"}
"""wandb's older names for its modes, still accepted in WANDB_MODE."""


def run_mode(cfg: TrackingConfig) -> str:
    """The effective mode: $WANDB_MODE when set (one of MODES, or an alias), else the config.

    An empty or blank WANDB_MODE is removed from the environment with a warning, since wandb would fail on it.
    """
    env = os.environ.get("WANDB_MODE")
    if env is None:
        return cfg.mode
    mode = ALIASES.get(env.strip().lower(), env.strip().lower())
    if not mode:
        log.warning("WANDB_MODE is set but empty; ignoring it, tracking.mode=%s decides", cfg.mode)
        del os.environ["WANDB_MODE"]
        return cfg.mode
    if mode not in MODES:
        raise TokenJourneyError(
            f"WANDB_MODE={env!r} is not one of {', '.join(MODES)}; set one of those, or unset it so that tracking.mode ({cfg.mode}) decides"
        )
    os.environ["WANDB_MODE"] = mode  # what wandb reads, in the form it accepts
    return mode


def has_credentials() -> bool:
    """Whether wandb can log in without asking: $WANDB_API_KEY, or the api.wandb.ai entry `wandb login` writes to ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1].split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def start_run(cfg_dict: dict[str, Any], tracking_cfg: TrackingConfig, job_type: str, group: str = "", name: str = "") -> Any:
    """Start a wandb run with the whole config, or return None when tracking is disabled.

    Group: `tracking.group`, else `group` (e.g. the Hydra sweep folder), else, under `dvc exp run`,
    `dvc-<baseline commit>`, which every experiment queued from that commit shares.
    Name: $DVC_EXP_NAME (plus `name`) when DVC runs an experiment, else `name`.
    """
    mode = run_mode(tracking_cfg)
    if mode == "disabled":
        return None
    if mode == "online" and not has_credentials():
        log.warning(
            "tracking=online but no wandb credentials (WANDB_API_KEY or `wandb login`); logging offline "
            "instead: upload later with `wandb sync %s/wandb/offline-run-*`",
            tracking_cfg.dir,
        )
        mode = "offline"
    import wandb

    exp = os.environ.get("DVC_EXP_NAME", "")
    baseline = os.environ.get("DVC_EXP_BASELINE_REV", "")
    dvc_group = f"dvc-{baseline[:8]}" if baseline else ""
    run_name = "-".join(p for p in (exp, name) if p) or None
    run = wandb.init(
        project=tracking_cfg.project,
        entity=tracking_cfg.entity or None,
        dir=tracking_cfg.dir,
        mode=mode,
        config=cfg_dict,
        job_type=job_type,
        group=tracking_cfg.group or group or dvc_group or None,
        name=run_name,
        reinit="create_new",  # a family trains its SAEs side by side, one run each
    )
    log.info("wandb run %s (%s) in %s", run.name, mode, tracking_cfg.dir)
    return run
