"""Which process of a multi-process run this is, and which device it computes on, in one place.

Launchers describe a run through environment variables. torchrun and `accelerate launch` set
WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; Slurm's `srun` sets SLURM_NTASKS,
SLURM_PROCID, SLURM_LOCALID and the node list instead, which `slurm_environment` translates (so
`srun python stages/train_sae.py` on 2 tasks is process 0 and 1 of 2, not twice process 0 of 1).
We join the process group they describe (gloo on the CPU, NCCL on GPUs); a plain `python` run is
process 0 of 1 and never touches torch.distributed. Each process takes the GPU of its LOCAL_RANK.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from token_journey.errors import TokenJourneyError

DEFAULT_PORT = 29500
"""MASTER_PORT under srun when the job does not set one (torchrun's default too)."""


@dataclass(frozen=True)
class Processes:
    """This process's index and the number of processes in the run."""

    index: int = 0
    count: int = 1

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def barrier(self) -> None:
        """Wait until every process gets here (no-op for a single process)."""
        if self.count > 1:
            dist.barrier()


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: `gpu[03-05,07],cpu1` -> `gpu03`, `a,b` -> `a`."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise TokenJourneyError(f"cannot read the Slurm node list {nodelist!r}; set MASTER_ADDR to the first node's host name")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def slurm_environment(env: Mapping[str, str]) -> dict[str, str]:
    """torch.distributed's variables for a process started by `srun` (empty when not needed).

    Nothing is translated when WORLD_SIZE is already set (torchrun or accelerate inside srun
    describe the run themselves) or when the Slurm step has a single task.
    """
    if "WORLD_SIZE" in env or int(env.get("SLURM_NTASKS", "1")) <= 1:
        return {}
    missing = [k for k in ("SLURM_PROCID", "SLURM_LOCALID") if k not in env]
    if missing:
        raise TokenJourneyError(f"srun set SLURM_NTASKS but not {', '.join(missing)}; start the stage with `srun`, not `sbatch` alone")
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "localhost"
    return {
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "RANK": env["SLURM_PROCID"],
        "LOCAL_RANK": env["SLURM_LOCALID"],
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodes),
        "MASTER_PORT": env.get("MASTER_PORT") or str(DEFAULT_PORT),
    }


def adopt_launcher_environment() -> None:
    """Set torch.distributed's variables from Slurm's when `srun` started this process (else nothing)."""
    os.environ.update(slurm_environment(os.environ))


def select_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple MPS, then CPU; any other value is passed to torch.

    Under a launcher, `auto` and a bare `cuda` mean this process's own GPU (LOCAL_RANK).
    """
    adopt_launcher_environment()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise TokenJourneyError(f"device={name!r} is not a torch device; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TokenJourneyError(f"device={name!r} but torch sees no CUDA GPU; use device=auto or device=cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def current_processes() -> Processes:
    """This process's place in the process group already joined; process 0 of 1 when there is none."""
    if dist.is_available() and dist.is_initialized():
        return Processes(index=dist.get_rank(), count=dist.get_world_size())
    return Processes()


def join_processes(device: torch.device) -> Processes:
    """Join the launcher's process group if there is one; gloo for CPU, NCCL for CUDA."""
    adopt_launcher_environment()
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return Processes()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return current_processes()
