"""Which process of a multi-process run this is (torchrun / `accelerate launch`), in one place.

Launchers set WORLD_SIZE, RANK and LOCAL_RANK; we join the process group they describe (gloo on
the CPU, NCCL on GPUs). A plain `python` run is process 0 of 1 and never touches torch.distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


def current_processes() -> Processes:
    """This process's place in the process group already joined; process 0 of 1 when there is none."""
    if dist.is_available() and dist.is_initialized():
        return Processes(index=dist.get_rank(), count=dist.get_world_size())
    return Processes()


def join_processes(device: torch.device) -> Processes:
    """Join the launcher's process group if there is one; gloo for CPU, NCCL for CUDA."""
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return Processes()
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return current_processes()
