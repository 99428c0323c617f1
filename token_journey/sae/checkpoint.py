"""Resumable training checkpoints: tensors in safetensors, everything else in JSON.

A checkpoint folder holds `state-<step>.safetensors` (SAE weights, Adam moments, tokens since each latent
fired, torch RNG state) and `state.json` (step, Adam scalars and param groups, the config
fingerprint). Schedules are pure functions of the step and the data loader restarts at
`batches(start_batch=step)`, so these suffice to continue bit for bit. Each save writes its
tensors to a new file, then replaces `state.json` (which names that file) in one rename, then
deletes the older files: a kill at any instant leaves a complete checkpoint, and nothing outside
the folder. A full disk (`token_journey.diskspace`) stops the save with one line, after removing
what it had written: the previous checkpoint, still named by `state.json`, is kept whole, and the
rerun resumes from it. No pickle anywhere.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from token_journey.diskspace import writing
from token_journey.errors import TokenJourneyError
from token_journey.layout import atomic_write_text
from token_journey.sae.base import SAE

log = logging.getLogger(__name__)

TENSORS = "state.safetensors"  # the tensors file of checkpoints whose state.json names none
STATE = "state.json"


def save_checkpoint(
    folder: Path, step: int, sae: SAE, opt: torch.optim.Optimizer, since_fired: torch.Tensor, fingerprint: dict[str, Any], loop: dict[str, float] | None = None
) -> None:
    """Write the full training state after `step` steps to `folder` (replacing the previous one).

    `loop`: scalars the training loop carries from step to step (the target_l0 controller's coefficient).
    """
    bad = [n for n, p in sae.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise TokenJourneyError(f"step {step}: non-finite weights in {', '.join(bad)}; checkpoint not written")
    tensors = {f"sae.{k}": v for k, v in sae.tensors().items()}
    tensors["since_fired"] = since_fired.cpu().contiguous()
    tensors["rng"] = torch.get_rng_state()
    state = opt.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, slot in state["state"].items():
        for name, value in slot.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[f"opt.{idx}.{name}"] = value.cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = float(value)
    folder = Path(folder)
    # Replacing the whole folder (delete, then rename a new one in) left no checkpoint at all to a
    # kill between the two, and a stray temp folder beside it; state.json is the one commit point.
    name = f"state-{step}.safetensors"
    part = folder / f"{name}.part"
    with writing(folder / name, lambda: tensor_bytes(tensors), part):
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(part))
        os.replace(part, folder / name)
    meta = {"step": step, "tensors": name, "opt_scalars": scalars, "param_groups": state["param_groups"], "fingerprint": fingerprint, "loop": loop or {}}
    # A failed state.json leaves the previous one, naming the previous (kept) tensors: drop the new ones.
    uncommitted = () if _committed(folder) == name else (folder / name,)
    with writing(folder / STATE, 0, *uncommitted):
        atomic_write_text(folder / STATE, json.dumps(meta))
    for stale in folder.iterdir():
        if stale.name in (STATE, name):
            continue
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()
    log.info("checkpoint at step %d -> %s", step, folder)


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """About the size of a safetensors file of `tensors`: their bytes plus a header line per tensor."""
    return sum(t.numel() * t.element_size() + 128 for t in tensors.values())


def _committed(folder: Path) -> str | None:
    """The tensors file that `folder`'s state.json names, or None without a readable one."""
    try:
        return json.loads((folder / STATE).read_text()).get("tensors", TENSORS)
    except (OSError, ValueError):
        return None


def load_checkpoint(
    folder: Path, sae: SAE, opt: torch.optim.Optimizer, since_fired: torch.Tensor, fingerprint: dict[str, Any], loop: dict[str, float] | None = None
) -> int | None:
    """Restore the state saved in `folder` into `sae`, `opt`, `since_fired` and `loop`; the step, or None if none."""
    folder = Path(folder)
    if not (folder / STATE).is_file():
        return None
    meta = json.loads((folder / STATE).read_text())
    if meta["fingerprint"] != json.loads(json.dumps(fingerprint)):
        raise TokenJourneyError(f"checkpoint {folder} was made with a different config; delete it to start over or restore that config")
    tensors = load_file(str(folder / meta.get("tensors", TENSORS)))
    sae.load_tensors({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
    since_fired.copy_(tensors["since_fired"])
    torch.set_rng_state(tensors["rng"])
    params = list(sae.parameters())
    state: dict[int, dict[str, Any]] = {}
    for idx, param in enumerate(params):
        # Scalars start on the CPU; the optimizer moves each to where its kind of Adam keeps it.
        slot: dict[str, Any] = {k: torch.tensor(v, device="cpu") for k, v in meta["opt_scalars"].get(str(idx), {}).items()}
        for name in ("exp_avg", "exp_avg_sq"):
            key = f"opt.{idx}.{name}"
            if key in tensors:
                slot[name] = torch.empty_like(param).copy_(tensors[key])  # keep the parameter's strides
        if slot:
            state[idx] = slot
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    if loop is not None:
        loop.update(meta.get("loop", {}))
    return int(meta["step"])
