"""A SIGKILLed `stages/train_sae.py` resumes through the stage to the same SAE, bit for bit.

The real entry point, on real harvested activations of a tiny Llama (Parquet shards read by the
shuffling loader, several row groups per buffer window and several epochs), with its checkpoint
folder `.<name>.ckpt/` next to the SAE folder. Each test trains once uninterrupted, then starts the
same command again, SIGKILLs it once its checkpoints have passed a step drawn from a fixed seed,
reruns the same command to completion and compares the saved tensors (torch.equal) and train.json.
The same for a 2-process run (`torchrun --nproc_per_node 2`, gloo on the CPU): the whole process
group (launcher and workers) is killed.

SIGTERM (a scheduler's preemption) instead: the stage finishes the step under way, checkpoints it, says so
in one line and exits with status 75; the rerun resumes from that very step to the same SAE. The moments
come from seeds, `TOKEN_JOURNEY_TEST_SEEDS` (default "0"; benchmarks/stress.py sets ten).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from support import torchrun
from support.configs import make
from support.tiny_corpus import tiny_llama_with_corpus

# The package's own code makes the inputs (kept together here: modules may move).
from token_journey.config.harvest import HarvestConfig
from token_journey.data.harvest import harvest

REPO = Path(__file__).resolve().parents[1]
LAYER, NAME = 1, "topk-w64-k4"
BATCH, STEPS, EVERY = 64, 60, 3
SEEDS = [int(s) for s in os.environ.get("TOKEN_JOURNEY_TEST_SEEDS", "0").split(",")]
PREEMPTED = 75


@pytest.fixture(scope="module")
def acts_root(tmp_path_factory) -> Path:
    """resid_post of layer 1 of a tiny Llama, harvested by the project's code (64-row row groups)."""
    root = tmp_path_factory.mktemp("resume")
    lm = tiny_llama_with_corpus(root, n_docs=60, max_tokens=1024)
    harvest(
        lm,
        make(HarvestConfig, layers=(LAYER,), sites=("resid_post",), batch_size=8, shard_rows=256, row_group_rows=64),
        root / "corpus",
        root / "acts",
        torch.device("cpu"),
    )
    return root / "acts"


def _cmd(acts: Path, out: Path, launcher: list[str]) -> list[str]:
    # ~950 rows per epoch against 60 x 64: four epochs, each in 4+ buffer windows.
    return [
        *launcher,
        str(REPO / "stages/train_sae.py"),
        f"paths.activations={acts}",
        f"paths.saes={out / 'saes'}",
        f"layer={LAYER}",
        "site=resid_post",
        "model.name=tiny",
        "device=cpu",
        "tracking=disabled",
        "family=none",
        "sae=topk",
        "sae.width=64",
        "sae.k=4",
        "sae.k_aux=16",
        f"sae.batch_size={BATCH}",
        f"sae.train_tokens={BATCH * STEPS}",
        "sae.eval_tokens=256",
        "sae.buffer_rows=256",
        "sae.lr_warmup_steps=5",
        "sae.dead_window_tokens=1024",
        f"sae.checkpoint_every={EVERY}",
        f"hydra.run.dir={out / 'hydra'}",
    ]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", WANDB_MODE="disabled")


def _train(cmd: list[str], cwd: Path) -> str:
    done = subprocess.run(cmd, check=False, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def _checkpoint_step(ckpt: Path) -> int:
    try:
        return int(json.loads((ckpt / "state.json").read_text())["step"])
    except (FileNotFoundError, NotADirectoryError, ValueError, KeyError):
        return 0  # none yet, or replaced at this instant


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) of every process, from /proc."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        table[int(stat.parent.name)] = (int(fields[1]), fields[0])
    return table


def _tree(root: int) -> list[int]:
    """`root` and all its descendants."""
    table, found = _processes(), [root]
    for pid in found:
        found.extend(child for child, (parent, _) in table.items() if parent == pid)
    return found


def _kill_tree(root: int) -> None:
    """SIGKILL `root`, every descendant and their process groups: a machine going down.

    torchrun starts each worker in a session of its own, so killing the launcher's group alone
    leaves the workers running (they would go on and save the SAE).
    """
    pids = _tree(root)
    for sig in (signal.SIGSTOP, signal.SIGKILL):  # freeze them all first: none outlives another by a step
        for pid in pids:
            try:
                os.killpg(os.getpgid(pid), sig)
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    until = time.monotonic() + 10
    while time.monotonic() < until and any(_processes().get(pid, (0, "Z"))[1] != "Z" for pid in pids[1:]):
        time.sleep(0.01)  # orphans are reaped by init; zombies do not run


def _kill_after(cmd: list[str], cwd: Path, ckpt: Path, target: int) -> None:
    """Start `cmd`; SIGKILL it and all its processes once a checkpoint is past `target`."""
    with open(cwd / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 240
        while proc.poll() is None and _checkpoint_step(ckpt) < target and time.monotonic() < deadline:
            time.sleep(0.001)
        finished = proc.poll()
        if finished is None:
            _kill_tree(proc.pid)
        proc.wait()
    tail = (cwd / "killed.log").read_text()[-3000:]
    assert finished is None, f"the run ended (status {finished}) before its kill:\n{tail}"


def _same_sae(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a / "sae.safetensors")), load_file(str(b / "sae.safetensors"))
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), f"{key} differs after the resume"
    assert json.loads((a / "cfg.json").read_text()) == json.loads((b / "cfg.json").read_text())
    ia, ib = (json.loads((f / "train.json").read_text()) for f in (a, b))
    assert ia == ib  # steps, tokens, final losses, held-out FVU/L0/dead, config, activations key
    assert [(f.name, f.read_bytes()) for f in sorted(a.iterdir())] == [(f.name, f.read_bytes()) for f in sorted(b.iterdir())]


def _uninterrupted(tmp_path: Path, acts: Path, launcher: list[str], other: str) -> tuple[Path, Path, Path]:
    """Train once uninterrupted in `whole/`; the folder `other/` for the interrupted run, its SAE layer folder."""
    whole, run = tmp_path / "whole", tmp_path / other
    whole.mkdir()
    run.mkdir()
    _train(_cmd(acts, whole, launcher), whole)
    return whole, run, run / "saes" / "resid_post" / f"layer_{LAYER}"


def _resumes_to_the_uninterrupted(acts: Path, whole: Path, run: Path, launcher: list[str], step: int, processes: int) -> None:
    """Rerun in `run/`: every process resumes from `step`, and the SAE equals the uninterrupted one, nothing left beside it."""
    layer = run / "saes" / "resid_post" / f"layer_{LAYER}"
    out = _train(_cmd(acts, run, launcher), run)
    assert out.count(f"from step {step}") == processes, "not every process resumed from the checkpoint left"
    info = json.loads((layer / NAME / "train.json").read_text())
    assert (info["steps"], info["processes"]) == (STEPS, processes)
    _same_sae(whole / "saes" / "resid_post" / f"layer_{LAYER}" / NAME, layer / NAME)
    assert sorted(p.name for p in layer.iterdir()) == [NAME], "the checkpoint (or a temp folder) was left behind"


def _killed_run_resumes_exactly(tmp_path: Path, acts: Path, launcher: list[str], processes: int, seed: int) -> None:
    whole, killed, layer = _uninterrupted(tmp_path, acts, launcher, "killed")
    ckpt = layer / f".{NAME}.ckpt"
    target = random.Random(seed).randrange(EVERY, STEPS // 2)  # after at least one checkpoint, well before the end
    _kill_after(_cmd(acts, killed, launcher), killed, ckpt, target)
    assert not (layer / NAME).exists(), "the kill came after the SAE was saved"
    at = _checkpoint_step(ckpt)
    assert target <= at < STEPS and at % EVERY == 0, (target, at)
    _resumes_to_the_uninterrupted(acts, whole, killed, launcher, at, processes)


@pytest.mark.slow
def test_killed_stage_resumes_to_the_uninterrupted_sae(tmp_path, acts_root):
    _killed_run_resumes_exactly(tmp_path, acts_root, [sys.executable], processes=1, seed=0)


@pytest.mark.slow
def test_killed_torchrun_stage_resumes_to_the_uninterrupted_sae(tmp_path, acts_root):
    """Two gloo processes: the launcher and both workers die together; every worker resumes from rank 0's checkpoint."""
    _killed_run_resumes_exactly(tmp_path, acts_root, torchrun.torchrun_command(tmp_path / "logs"), processes=2, seed=1)


def _terminate_after(cmd: list[str], cwd: Path, ckpt: Path, target: int, delay: float) -> subprocess.CompletedProcess:
    """Start `cmd`; once a checkpoint is past `target`, wait `delay` seconds and send SIGTERM to the command
    (torchrun forwards it to its workers); return how it ended."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while proc.poll() is None and _checkpoint_step(ckpt) < target and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _terminated_run_resumes_exactly(tmp_path: Path, acts: Path, launcher: list[str], processes: int, seed: int) -> None:
    whole, stopped, layer = _uninterrupted(tmp_path, acts, launcher, "stopped")
    ckpt = layer / f".{NAME}.ckpt"
    draw = random.Random(seed)
    done = _terminate_after(_cmd(acts, stopped, launcher), stopped, ckpt, draw.randrange(EVERY, STEPS // 2), draw.uniform(0, 0.05))
    if processes > 1:
        report = torchrun.failure_report(done, tmp_path / "logs")
        lines = torchrun.process_lines(tmp_path / "logs")
        workers = [lines.get(r, []) for r in range(processes)]
    else:
        report, workers = f"exit status {done.returncode}\n{done.stderr[-3000:]}", [done.stderr.splitlines()]
    stops = [[line for line in w if line.startswith("error:")] for w in workers]
    assert all(len(s) == 1 for s in stops), report
    said = re.search(r"SIGTERM came after step (\d+); checkpoint after step (\d+) of 60", stops[0][0])
    assert said, report  # process 0 (the one that writes checkpoints) got the signal itself
    finished, after = int(said[1]), int(said[2])
    # Nothing finished is lost: the checkpoint holds every step finished at the signal and the one under way.
    # Under a launcher one more step may pass: a process waiting in the step's all-reduce when the signal came
    # had already told the others it was not stopping, so all stop after the next step.
    assert finished + 1 <= after <= finished + (1 if processes == 1 else 2), report
    assert after == _checkpoint_step(ckpt), report
    assert not (layer / NAME).exists(), "the stop came after the SAE was saved"
    if processes == 1:
        assert done.returncode == PREEMPTED, report
    else:  # the launcher itself was signalled and passed it on; every worker stopped after the same step
        assert all(f"checkpoint after step {after} of 60" in s[0] for s in stops), report
    _resumes_to_the_uninterrupted(acts, whole, stopped, launcher, after, processes)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_sigterm_checkpoints_the_step_under_way_and_resumes_exactly(tmp_path, acts_root, seed):
    _terminated_run_resumes_exactly(tmp_path, acts_root, [sys.executable], processes=1, seed=seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_sigterm_to_torchrun_stops_every_process_after_the_same_step(tmp_path, acts_root, seed):
    _terminated_run_resumes_exactly(tmp_path, acts_root, torchrun.torchrun_command(tmp_path / "logs"), processes=2, seed=seed + 100)
