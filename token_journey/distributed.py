"""Which process of a multi-process run this is, and which device it computes on, in one place.

Launchers describe a run through environment variables. torchrun and `accelerate launch` set
WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; Slurm's `srun` sets SLURM_NTASKS,
SLURM_PROCID, SLURM_LOCALID and the node list instead, which `slurm_environment` translates (so
`srun python stages/train_sae.py` on 2 tasks is process 0 and 1 of 2, not twice process 0 of 1).
We join the process group they describe (gloo on the CPU, NCCL on GPUs); a plain `python` run is
process 0 of 1 and never touches torch.distributed. Each process takes the GPU of its LOCAL_RANK.

Leaving is as deliberate as joining (`leave_processes`, called by every stage on its way out). A
process that closes its connections while another is still inside a collective makes that one fail
("Connection closed by peer" under gloo; a hang under NCCL), even after a barrier: the barrier's last
message can be read after the peer's close. So the processes meet once more through the launcher's
key-value store, not through a collective, and process 0 (where a plain launch keeps the store) goes
last. A process that fails writes its one-line error to the store before it leaves; the others, whose
next collective then fails, print that line instead of the transport's.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from token_journey.errors import TokenJourneyError

T = TypeVar("T")

DEFAULT_PORT = 29500
"""MASTER_PORT under srun when the job does not set one (torchrun's default too)."""
LEAVE_TIMEOUT_S = 600.0
"""How long a finished process waits for the others at the exit before it stops with one line."""
_ARRIVED, _RELEASED, _FAILED = "token_journey/arrived", "token_journey/released", "token_journey/failed"
_TRANSPORT_ERRORS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL", "gloo")


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

    def share(self, value: T) -> T:
        """Process 0's `value`, on every process (the others pass anything, e.g. None; they wait for it).

        For decisions every process must take alike from state that changes under them, such as which
        shards exist while process 0 is already writing the next ones."""
        if self.count == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


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


def _store(procs: Processes) -> dist.Store | None:
    """The key-value store the launcher's rendezvous made, for a run of several processes (None with
    one process, or where torch hides it)."""
    getter = getattr(dist.distributed_c10d, "_get_default_store", None)
    if procs.count == 1 or getter is None:
        return None
    try:
        return getter()
    except (RuntimeError, ValueError):
        return None


def _count(store: dist.Store, key: str) -> int:
    return int(store.add(key, 0))


def _peer_failure(store: dist.Store) -> str | None:
    """The line a failed process left in the store, if any."""
    if store.check([_FAILED]):
        return store.get(_FAILED).decode("utf-8", "replace")
    return None


def _wait_for(store: dist.Store, key: str, count: int, timeout_s: float) -> None:
    """Wait until `key` counts `count`; stop with the failed process's line, or after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while _count(store, key) < count:
        failure = _peer_failure(store)
        if failure:
            raise TokenJourneyError(f"stopped because {failure}")
        if time.monotonic() > deadline:
            raise TokenJourneyError(
                f"the other processes did not finish within {timeout_s:.0f} s of this one; look for their errors above (or in the launcher's logs)"
            )
        time.sleep(0.01)


def leave_processes(timeout_s: float = LEAVE_TIMEOUT_S) -> None:
    """Leave the process group after a success, all processes together (no-op without one).

    Every process announces in the store that it is done and waits for the others; then all but process 0
    leave, and process 0 leaves once they have. A failure one of them left in the store stops the wait
    with that line.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    procs = current_processes()
    store = _store(procs)
    try:
        if store is not None:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()  # NCCL collectives run on streams: finish them before leaving
            store.add(_ARRIVED, 1)
            _wait_for(store, _ARRIVED, procs.count, timeout_s)
            if procs.is_main:
                _wait_for(store, _RELEASED, procs.count - 1, timeout_s)
            else:
                store.add(_RELEASED, 1)
    finally:
        dist.destroy_process_group()


def abandon_processes(failure: str | None) -> None:
    """Leave the process group at once after a failure (no-op without one).

    `failure`, this process's one-line error, goes to the store first (None when another process failed
    first), so the others print it. Leaving closes this process's connections: the others' pending
    collectives fail now instead of waiting out a timeout.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    procs = current_processes()
    store = _store(procs)
    try:
        if store is not None and failure is not None and not store.check([_FAILED]):
            store.set(_FAILED, f"process {procs.index} of {procs.count} failed: {failure}")
    except (RuntimeError, dist.DistError):
        pass  # the store went with the process that held it: the others still see the closed connections
    finally:
        dist.destroy_process_group()


def is_transport_error(exc: BaseException) -> bool:
    """Whether `exc` is a collective failing because another process of the run stopped."""
    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in _TRANSPORT_ERRORS)


def peer_failure_line(exc: BaseException) -> str:
    """One line for a collective that failed under this process: the failed process's own line when it
    left one in the store, else the transport's first line."""
    procs = current_processes()
    store = _store(procs)
    if store is not None:
        try:
            failure = _peer_failure(store)
        except (RuntimeError, dist.DistError):
            failure = None
        if failure:
            return f"process {procs.index} of {procs.count} stopped because {failure}"  # the line names both
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"process {procs.index} of {procs.count} stopped: another process of the run left ({first[:200]}); its own error is above"
