"""Each launcher really splits the work: torchrun, `accelerate launch` and `srun` (simulated here by
its environment variables, since Slurm is absent) each start 2 gloo processes that see themselves
as processes 0 and 1 of 2, exchange data, and agree on BatchTopK's batch cut and threshold.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

WORKER = REPO / "tests/support/launch_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") and not k.startswith("SLURM_")}
    return dict(env, PYTHONPATH=f"{REPO}:{REPO / 'tests'}", OMP_NUM_THREADS="1", **extra)


def _results(cwd: Path) -> list[dict]:
    """What each process wrote (`result-<rank>.json`), in rank order."""
    return sorted((json.loads(p.read_text()) for p in cwd.glob("result-*.json")), key=lambda r: r["rank"])


def _run(cmd: list[str], env: dict[str, str], cwd: Path) -> list[dict]:
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return _results(cwd)


def _srun(env: dict[str, str], cwd: Path) -> list[dict]:
    """What `srun --ntasks 2 python worker.py` does on one node: two tasks told only SLURM_* variables."""
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER)],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(env, SLURM_NTASKS="2", SLURM_PROCID=str(i), SLURM_LOCALID=str(i), SLURM_STEP_NODELIST="localhost", SLURM_JOB_ID="77"),
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    return _results(cwd)


@pytest.fixture(scope="module")
def alone(tmp_path_factory) -> dict:
    (result,) = _run([sys.executable, str(WORKER)], _env(), tmp_path_factory.mktemp("alone"))
    return result


LAUNCHERS = ["torchrun", "accelerate", "srun"]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_launcher_splits_the_work_over_two_processes(launcher, alone, tmp_path):
    port = str(_free_port())
    if launcher == "torchrun":
        results = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port, str(WORKER)], _env(), tmp_path)
    elif launcher == "accelerate":
        # `--multi_gpu` is what makes accelerate start several processes (through torchrun); with
        # `--cpu` it starts exactly one, whatever --num_processes says. Without GPUs they run on gloo.
        results = _run(
            [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--multi_gpu",
                "--num_processes",
                "2",
                "--num_machines",
                "1",
                "--main_process_port",
                port,
                str(WORKER),
            ],
            _env(),
            tmp_path,
        )
    else:
        results = _srun(_env(MASTER_PORT=port), tmp_path)
    assert [(r["rank"], r["world"], r["local_rank"]) for r in results] == [(0, 2, 0), (1, 2, 1)]
    assert all(r["sum_of_ranks"] == 3.0 and r["device"] == "cpu" for r in results)
    # Each process saw half the batch, yet both took the whole batch's exact k*n-th largest value.
    assert all(r["cut"] == r["exact_cut"] for r in results)
    # The BatchTopK threshold and the weights are the same on every process...
    assert results[0]["threshold"] == results[1]["threshold"] and results[0]["w_dec"] == results[1]["w_dec"]
    # After one step the threshold is the whole batch's smallest kept value, as for one process on
    # whole batches. Later steps differ slightly: each process normalises its loss by its own slice.
    assert results[0]["first_threshold"] == pytest.approx(alone["first_threshold"], rel=1e-6)
    assert results[0]["threshold"] == pytest.approx(alone["threshold"], rel=0.02)
    assert alone["world"] == 1 and alone["cut"] == alone["exact_cut"]
