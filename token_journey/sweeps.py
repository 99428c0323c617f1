"""Which values a sweep member changed: its SAE folder name and its wandb group.

Three tools start sweep members, and each says differently what it swept:

- Hydra multirun (`python stages/train_sae.py -m sae.k=16,32`): the member's overrides of the keys
  given with several values; the group is the sweep folder.
- DVC experiments (`dvc exp run [--queue] -S sae.lr=0.001,0.003`): DVC rewrites params.yaml and
  says only which commit the experiment started from ($DVC_EXP_BASELINE_REV). The member's values
  are the `sae` keys whose value differs from that commit's params.yaml; members queued from one
  commit share the group `dvc-<commit>`.
- wandb agents (`wandb agent ...` with conf/wandb-sweep.yaml): the agent passes the member's values as
  Hydra overrides and groups the runs itself, so they count as a plain run here.

Without distinct names, members writing the same layer folder would overwrite one another.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepMember:
    overrides: list[str]
    """`key=value` of every swept key, in a stable order (e.g. ["sae.lr=0.001"])."""
    group: str
    """The tracking group shared by the members of one sweep ("" for a plain run)."""


def sweep_name(name: str, overrides: list[str]) -> str:
    """`name` plus every swept `sae.<key>=<value>` whose value the name does not already show.

    `python stages/train_sae.py -m sae=topk,batchtopk sae.lr=0.001,0.003` gives each member its own folder.
    """
    parts = [name]
    for item in overrides:
        key, _, value = item.partition("=")
        if key.startswith("sae.") and key != "sae.name" and value and value not in name:
            parts.append(f"{key[4:].replace('_', '')}{value}")
    return "-".join(parts)


def hydra_member(argv: list[str]) -> SweepMember | None:
    """The member of a Hydra multirun this process is (None outside a multirun).

    A key counts as swept when the command line gives it several values (`a,b`) or a sweep
    function (`range(...)`, `choice(...)`).
    """
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if str(hc.mode) != "RunMode.MULTIRUN":
        return None
    swept = {a.split("=", 1)[0] for a in argv if "=" in a and ("," in a or "(" in a.split("=", 1)[1])}
    return SweepMember([o for o in hc.overrides.task if o.split("=", 1)[0] in swept], str(hc.sweep.dir))


def _flatten(section: dict[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in section.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed_keys(baseline: dict[str, Any], current: dict[str, Any], section: str) -> list[str]:
    """`section.key=value` for each key of `section` whose value in `current` differs from `baseline`.

    `name` is left out: it is derived from the other keys (e.g. `topk-w${.width}-k${.k}`).
    """
    before = _flatten(baseline.get(section) or {}, f"{section}.")
    after = _flatten(current.get(section) or {}, f"{section}.")
    return [f"{k}={v}" for k, v in sorted(after.items()) if k != f"{section}.name" and before.get(k) != v]


def dvc_member(current: dict[str, Any], section: str = "sae") -> SweepMember | None:
    """The DVC experiment this process runs in (None outside `dvc exp run`).

    The baseline's params.yaml is read with git from the project root DVC names ($DVC_ROOT); if
    that fails, the member keeps the plain name and a warning says why.
    """
    rev = os.environ.get("DVC_EXP_BASELINE_REV", "")
    if not rev:
        return None
    import yaml

    group = f"dvc-{rev[:8]}"
    root = os.environ.get("DVC_ROOT") or "."
    try:
        text = subprocess.run(["git", "-C", root, "show", f"{rev}:params.yaml"], capture_output=True, text=True, check=True, timeout=60).stdout
        baseline = yaml.safe_load(text) or {}
    except (OSError, subprocess.SubprocessError, yaml.YAMLError) as exc:
        log.warning("could not read the baseline params.yaml of DVC experiment %s (%s); the folder name shows no swept values", rev[:8], exc)
        return SweepMember([], group)
    return SweepMember(changed_keys(baseline, current, section), group)


def current_member(config: dict[str, Any], argv: list[str] | None = None) -> SweepMember:
    """This process's sweep membership: Hydra multirun, else DVC experiment, else a plain run."""
    return hydra_member(sys.argv[1:] if argv is None else argv) or dvc_member(config) or SweepMember([], "")
