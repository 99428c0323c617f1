"""A layer's family trained from one pass over its shards: each member the same bytes as trained alone.

`stages/train_sae.py` with the default family (three JumpReLU SAEs at three target L0s) reads the layer's
shards once (counted: `storage.BYTES_READ`, written to the layer's read timing), and every member's folder
equals the folder the same member gets when it is trained alone, byte for byte. A SIGKILLed family run
resumes every member from its checkpoint to the same folders. In-process: members that resume from
different steps, and members that cannot share a stream of batches (another batch size) in passes of their own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_sae_resume import _checkpoint_step, _env, _kill_after, _same_sae, acts_root  # noqa: F401 (a fixture)
from test_sae_train import STATS, _batches, _cfg

from support import torchrun
from token_journey.errors import TokenJourneyError
from token_journey.preemption import stop_requests
from token_journey.sae.member import Member
from token_journey.sae.train import new_sae, train, train_members
from token_journey.sae.train_layer import _passes

REPO = Path(__file__).resolve().parents[1]
LAYER, BATCH, STEPS, EVERY = 1, 256, 24, 3  # a large batch: each run also reads 65,536 calibration rows
TARGETS = {"sae": 8, "small": 4, "big": 16}  # the family's members and their target L0s at width 64
NAMES = [f"jumprelu-w64-target{t}" for t in TARGETS.values()]


def _cmd(acts: Path, out: Path, *overrides: str, launcher: tuple[str, ...] = (sys.executable,)) -> list[str]:
    return [
        *launcher,
        str(REPO / "stages/train_sae.py"),
        f"paths.activations={acts}",
        f"paths.saes={out / 'saes'}",
        f"paths.timings={out / 'timings'}",
        f"layer={LAYER}",
        "site=resid_post",
        "model.name=tiny",
        "device=cpu",
        "tracking=disabled",
        "sae=jumprelu-l0",
        "sae.width=64",
        f"sae.batch_size={BATCH}",
        f"sae.train_tokens={BATCH * STEPS}",
        "sae.eval_tokens=256",
        "sae.buffer_rows=512",
        "sae.lr_warmup_steps=5",
        "sae.dead_window_tokens=1024",
        f"sae.checkpoint_every={EVERY}",
        f"hydra.run.dir={out / 'hydra'}",
        *overrides,
    ]


def _family(acts: Path, out: Path, launcher: tuple[str, ...] = (sys.executable,)) -> list[str]:
    targets = [f"sae.target_l0={TARGETS['sae']}", f"family.small.target_l0={TARGETS['small']}", f"family.big.target_l0={TARGETS['big']}"]
    return _cmd(acts, out, *targets, launcher=launcher)


def _run(cmd: list[str], cwd: Path) -> None:
    cwd.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(cmd, check=False, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def _layer(out: Path) -> Path:
    return out / "saes" / "resid_post" / f"layer_{LAYER}"


def _reads(out: Path) -> dict:
    return json.loads((out / "timings" / "resid_post" / f"layer_{LAYER}.train.json").read_text())


@pytest.fixture(scope="module")
def family_run(acts_root, tmp_path_factory) -> Path:  # noqa: F811 (the imported fixture)
    """The default family trained uninterrupted, once for this module's tests."""
    out = tmp_path_factory.mktemp("family")
    _run(_family(acts_root, out), out)
    return out


@pytest.mark.slow
def test_the_family_reads_the_shards_once_and_each_member_is_the_sae_trained_alone(acts_root, family_run, tmp_path):  # noqa: F811
    reads = _reads(family_run)
    assert (reads["members"], reads["trained"], reads["passes"], reads["processes"]) == (NAMES, NAMES, 1, 1)
    alone = []
    for target, name in list(zip(TARGETS.values(), NAMES))[1:]:  # the members beside `sae`, each trained alone as `sae`
        out = tmp_path / name
        _run(_cmd(acts_root, out, f"sae.target_l0={target}", "family=none"), out)
        _same_sae(_layer(family_run) / name, _layer(out) / name)
        alone.append(_reads(out)["bytes_read"])
    # Each member alone reads the stream the family reads once (the training batches, then its calibration rows).
    assert len(set(alone)) == 1 and alone[0] > 0
    assert reads["bytes_read"] <= 1.05 * alone[0], (reads["bytes_read"], alone)
    assert reads["shard_bytes"] > 0
    again = tmp_path / "again"  # the same SAE folders, everything trained already: only manifests and footers are read
    _run([*_family(acts_root, family_run), f"paths.timings={again / 'timings'}"], again)
    assert _reads(again)["trained"] == [] and _reads(again)["bytes_read"] < reads["shard_bytes"] / 10


@pytest.mark.slow
def test_a_killed_family_run_resumes_every_member_to_the_same_folders(acts_root, family_run, tmp_path):  # noqa: F811
    killed = tmp_path / "killed"
    killed.mkdir()
    ckpt = _layer(killed) / f".{NAMES[1]}.ckpt"
    _kill_after(_family(acts_root, killed), killed, ckpt, STEPS // 3)
    checkpoints = {name: _checkpoint_step(_layer(killed) / f".{name}.ckpt") for name in NAMES}
    assert min(checkpoints.values()) >= EVERY and not any((_layer(killed) / name).exists() for name in NAMES), checkpoints
    _run(_family(acts_root, killed), killed)
    for name in NAMES:
        _same_sae(_layer(family_run) / name, _layer(killed) / name)
    assert sorted(p.name for p in _layer(killed).iterdir()) == sorted(NAMES), "a checkpoint (or a temp folder) was left behind"


@pytest.mark.slow
def test_under_torchrun_every_process_reads_the_shards_once_and_trains_every_member_on_its_slice(acts_root, family_run, tmp_path):  # noqa: F811
    """Two gloo processes: the members are not split between processes; each process reads every batch of the one
    stream and trains every member on its half of the batch (data parallel, gradients averaged)."""
    launcher = tuple(torchrun.torchrun_command(tmp_path / "logs"))
    both = tmp_path / "both"
    done = torchrun.run(_family(acts_root, both, launcher), _env(), cwd=tmp_path)
    assert done.returncode == 0, torchrun.failure_report(done, tmp_path / "logs")
    reads = _reads(both)
    assert (reads["trained"], reads["passes"], reads["processes"]) == (NAMES, 1, 2)
    assert reads["bytes_read"] <= 1.05 * _reads(family_run)["bytes_read"]  # process 0 reads what one process alone reads
    small = tmp_path / "small"
    done = torchrun.run(_cmd(acts_root, small, f"sae.target_l0={TARGETS['small']}", "family=none", launcher=launcher), _env(), cwd=tmp_path)
    assert done.returncode == 0, torchrun.failure_report(done, tmp_path / "logs")
    _same_sae(_layer(both) / NAMES[1], _layer(small) / NAMES[1])
    assert json.loads((_layer(both) / NAMES[1] / "train.json").read_text())["processes"] == 2


def _alone(cfg, tmp: Path | None = None, stop_after: int | None = None):
    sae = new_sae(cfg, 8, STATS, seed=0)
    train(sae, _batches(cfg.batch_size), STATS, cfg, checkpoint_dir=tmp, stop_after=stop_after)
    return sae


def test_members_resuming_from_different_steps_each_end_as_trained_alone(tmp_path):
    cfgs = [_cfg("topk", name="a"), _cfg("jumprelu", name="b"), _cfg("batchtopk", name="c", k=5)]
    stopped_at = [7, 21, 0]  # c has no checkpoint: it starts from step 0 while a and b resume
    for cfg, stop in zip(cfgs, stopped_at):
        if stop:
            _alone(cfg, tmp_path / cfg.name, stop_after=stop)
    members = [Member(new_sae(cfg, 8, STATS, seed=0), STATS, cfg, checkpoint_dir=tmp_path / cfg.name) for cfg in cfgs]
    assert [m.start for m in members] == stopped_at
    read = []

    def batches(start: int):
        read.append(start)
        return _batches(64)(start)

    with stop_requests() as stop:
        infos = train_members(members, batches, stop)
    assert read == [0], "one stream of batches, from the earliest step any member needs"
    for cfg, member, info in zip(cfgs, members, infos):
        whole = _alone(cfg)
        assert info["steps"] == cfg.steps
        for key, value in whole.tensors().items():
            assert torch.equal(value, member.sae.tensors()[key]), f"{cfg.name}: {key} differs from the SAE trained alone"


def test_members_that_cannot_share_a_stream_of_batches_get_passes_of_their_own():
    a, b, c = _cfg("topk", name="a"), _cfg("topk", name="b", batch_size=32), _cfg("jumprelu", name="c")
    assert _passes([("a", a), ("b", b), ("c", c)]) == [[("a", a), ("c", c)], [("b", b)]]
    with stop_requests() as stop, pytest.raises(TokenJourneyError, match=r"need one batch size, got \[32, 64\]"):
        train_members([Member(new_sae(cfg, 8, STATS, seed=0), STATS, cfg) for cfg in (a, b)], _batches(64), stop)
