"""The train_sae stage on tiny harvested shards: folders, sweeps, errors; 2-process data parallel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from support import torchrun
from support.turns import WAITING, run_overlapping
from token_journey.sae.io import find_saes, load_sae

REPO = Path(__file__).resolve().parents[1]
D = 8


def _write_split(folder: Path, rows: int, seed: int) -> None:
    from token_journey.data.shards import ShardWriter, write_manifest

    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(20, D, generator=torch.Generator().manual_seed(0)), dim=1)
    writer = ShardWriter(folder, D, "float32", "test", row_group_rows=64)
    for index in range(2):
        acts = ((torch.rand(rows, 20, generator=g) < 0.1) * torch.rand(rows, 20, generator=g) * 3) @ dirs + 1.0
        ids = torch.arange(rows)
        writer.add(acts.float(), ids, ids, ids, {})
        writer.finish(index)
    write_manifest(folder, 2, {"model_fingerprint": "test", "site": "resid_post", "layer": 0, "d_model": D, "dtype": "float32"})


@pytest.fixture(scope="module")
def acts_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("acts")
    _write_split(root / "resid_post" / "layer_0", 256, 1)
    _write_split(root / "resid_post" / "layer_0" / "eval", 128, 2)
    return root


def _stage_args(tmp: Path, acts: Path, *extra: str, launcher: list[str] | None = None, family: str = "none") -> list[str]:
    flags = [e for e in extra if e.startswith("-")]
    return [
        *(launcher or [sys.executable]),
        str(REPO / "stages/train_sae.py"),
        *flags,
        f"paths.activations={acts}",
        f"paths.saes={tmp / 'saes'}",
        "layer=0",
        "tracking=disabled",
        f"family={family}",
        "sae=topk",
        "sae.width=16",
        "sae.k=2",
        "sae.batch_size=64",
        "sae.train_tokens=640",
        "sae.eval_tokens=200",
        "sae.buffer_rows=256",
        "sae.checkpoint_every=4",
        f"hydra.run.dir={tmp / 'hydra'}",
        f"hydra.sweep.dir={tmp / 'multirun'}",
        *(e for e in extra if not e.startswith("-")),
    ]


def _run(
    tmp: Path, acts: Path, *extra: str, launcher: list[str] | None = None, family: str = "none", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    args = _stage_args(tmp, acts, *extra, launcher=launcher, family=family)
    tmp.mkdir(parents=True, exist_ok=True)
    return subprocess.run(args, capture_output=True, text=True, cwd=tmp, timeout=300, env={**os.environ, **(env or {})})


def test_stage_writes_a_loadable_sae_folder_and_sweeps_do_not_collide(tmp_path, acts_root):
    done = _run(tmp_path, acts_root)
    assert done.returncode == 0, done.stderr[-2000:]
    (folder,) = find_saes(tmp_path / "saes", "resid_post", 0)
    assert folder.name == "topk-w16-k2"
    info = json.loads((folder / "train.json").read_text())
    assert info["steps"] == 10 and 0 < info["fvu"] < 1 and info["l0"] <= 2
    assert not (folder.parent / ".topk-w16-k2.ckpt").exists()
    assert load_sae(folder).cfg.layer == 0
    sweep = _run(tmp_path, acts_root, "-m", "sae.lr=0.001,0.003")
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    names = {p.name for p in find_saes(tmp_path / "saes", "resid_post", 0)}
    assert names == {"topk-w16-k2", "topk-w16-k2-lr0.001", "topk-w16-k2-lr0.003"}


def test_the_stage_trains_the_family_and_only_what_is_not_trained_yet(tmp_path, acts_root):
    done = _run(tmp_path, acts_root, "family.topk-k16.k=1", "family.topk-k128.k=4", family="topk")
    assert done.returncode == 0, done.stderr[-2000:]
    folders = {p.name: p for p in find_saes(tmp_path / "saes", "resid_post", 0)}
    assert set(folders) == {"topk-w16-k2", "topk-w16-k1", "topk-w16-k4"}
    for folder in folders.values():  # every member on the run's budget (sae.*), with its own k
        config = json.loads((folder / "train.json").read_text())["config"]
        assert (config["width"], config["train_tokens"], config["batch_size"]) == (16, 640, 64)
        assert config["k"] == int(folder.name.rsplit("k", 1)[1])
    before = {name: (p / "sae.safetensors").stat().st_mtime_ns for name, p in folders.items()}
    again = _run(tmp_path, acts_root, "family.topk-k16.k=1", "family.topk-k128.k=3", family="topk")
    assert again.returncode == 0, again.stderr[-2000:]
    after = {p.name: (p / "sae.safetensors").stat().st_mtime_ns for p in find_saes(tmp_path / "saes", "resid_post", 0)}
    assert set(after) == set(before) | {"topk-w16-k3"}
    assert {n: after[n] for n in before} == before  # the members already trained were kept, not retrained


def test_stage_reports_a_missing_layer_in_one_line(tmp_path, acts_root):
    done = _run(tmp_path, acts_root, "layer=5")
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error:") and "layer 5" in done.stderr
    bad_site = _run(tmp_path, acts_root, "site=resid_pots")
    assert bad_site.returncode == 2 and "Traceback" not in bad_site.stderr
    assert bad_site.stderr.strip().splitlines()[-1] == ("error: unknown site 'resid_pots'; valid sites: resid_post, attn_out, mlp_in, mlp_out")


def test_a_dvc_experiment_member_gets_a_folder_named_for_what_it_changed(tmp_path, acts_root):
    """`dvc exp run --queue -S sae.lr=...` rewrites params.yaml and names only the baseline commit."""

    from token_journey.config import compose, dump_yaml

    project = tmp_path / "project"
    project.mkdir()
    params = compose(
        [
            "sae=topk",
            "sae.width=16",
            "sae.k=2",
            "sae.batch_size=64",
            "sae.train_tokens=640",
            "sae.eval_tokens=200",
            "sae.buffer_rows=256",
            "tracking=disabled",
            "layer=0",
            f"paths.activations={acts_root}",
            f"paths.saes={project / 'saes'}",
        ]
    )
    (project / "params.yaml").write_text(dump_yaml(params))
    git = ["git", "-C", str(project), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "params.yaml"], check=True)
    subprocess.run([*git, "commit", "-qm", "baseline"], check=True)
    rev = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    params["sae"]["lr"] = 0.003  # what `-S sae.lr=0.003` does to params.yaml
    (project / "params.yaml").write_text(dump_yaml(params))
    env = dict(os.environ, DVC_EXP_BASELINE_REV=rev, DVC_EXP_NAME="exp-a", DVC_ROOT=str(project))
    done = subprocess.run(
        [sys.executable, str(REPO / "stages/train_sae.py"), "--config-path", str(project), "--config-name", "params", f"hydra.run.dir={tmp_path / 'hydra'}"],
        capture_output=True,
        text=True,
        cwd=project,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (folder,) = find_saes(project / "saes", "resid_post", 0)
    assert folder.name == "topk-w16-k2-lr0.003"
    assert json.loads((folder / "train.json").read_text())["config"]["lr"] == 0.003


def test_the_command_a_wandb_agent_builds_from_the_sweep_config_runs_the_stage(tmp_path, acts_root, monkeypatch):
    """wandb's own agent code turns conf/wandb-sweep.yaml and one grid point into the command line we run."""

    import yaml
    from wandb import wandb_agent

    sweep = yaml.safe_load((REPO / "conf/wandb-sweep.yaml").read_text())
    values = {k: v["values"][0] if "values" in v else v["value"] for k, v in sweep["parameters"].items()}
    layer = values["layer"]
    _write_split(acts_root / "resid_post" / f"layer_{layer}", 256, 3)
    _write_split(acts_root / "resid_post" / f"layer_{layer}" / "eval", 128, 4)
    # Sizes for this test only, passed the way the agent passes every parameter.
    values.update(
        {
            "paths.activations": str(acts_root),
            "paths.saes": str(tmp_path / "saes"),
            "sae.width": 64,
            "sae.batch_size": 64,
            "sae.train_tokens": 640,
            "sae.eval_tokens": 200,
            "sae.buffer_rows": 256,
            "hydra.run.dir": str(tmp_path / "hydra"),
        }
    )
    built = []
    monkeypatch.setattr(wandb_agent, "AgentProcess", lambda command=None, **_: built.append(command) or SimpleNamespace())
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SWEEP_ID", "s")
    agent = type("Agent", (), {"_sweep_command": sweep["command"], "_function": None, "_in_jupyter": False, "_forward_signals": False, "_run_processes": {}})()
    wandb_agent.Agent._command_run(agent, {"run_id": "r1", "program": sweep["program"], "args": {k: {"value": v} for k, v in values.items()}})
    (command,) = built
    assert command[:3] == ["/usr/bin/env", "python", "stages/train_sae.py"] and "sae.target_l0=16" in command
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_SWEEP", "WANDB_RUN"))}
    env.update(WANDB_MODE="disabled", PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (folder,) = find_saes(tmp_path / "saes", "resid_post", layer)
    assert folder.name == "jumprelu-w64-target16"
    assert json.loads((folder / "cfg.json").read_text())["architecture"] == "jumprelu"


def _worker(rank: int, world: int, port: int, out: str) -> None:
    """One process of a 2-process run: train uninterrupted, then killed after 10 steps and resumed."""

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from tests.test_sae_train import STATS, _batches, _cfg
    from token_journey.sae.train import new_sae, train

    cfg = _cfg("topk", batch_size=64)
    whole = new_sae(cfg, 8, STATS, seed=0)
    train(whole, _batches(64), STATS, cfg)
    ckpt = Path(out).with_name("ckpt")
    killed = new_sae(cfg, 8, STATS, seed=0)
    train(killed, _batches(64), STATS, cfg, checkpoint_dir=ckpt, stop_after=10)
    torch.distributed.barrier()  # the checkpoint (step 7) is on disk before anyone resumes
    resumed = new_sae(cfg, 8, STATS, seed=rank + 1)  # every process must take its weights from the checkpoint
    train(resumed, _batches(64), STATS, cfg, checkpoint_dir=ckpt)
    state = {f"{run}.{k}": v.detach().contiguous() for run, sae in (("whole", whole), ("resumed", resumed)) for k, v in sae.state_dict().items()}
    torch.save(state, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_two_process_data_parallel_matches_one_process_and_resumes_exactly(tmp_path):
    from tests.test_sae_train import STATS, _batches, _cfg
    from token_journey.sae.train import new_sae, train

    out = tmp_path / "dp.pt"
    torch.multiprocessing.spawn(_worker, args=(2, 29517, str(out)), nprocs=2, join=True)
    cfg = _cfg("topk", batch_size=64)
    single = new_sae(cfg, 8, STATS, seed=0)
    train(single, _batches(64), STATS, cfg)
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    for name, p in single.state_dict().items():
        # Same data, same init; the ranks' FVU/AuxK normalisers use their half batch, so not bit-equal.
        rel = float((ranks[0][f"whole.{name}"] - p).norm() / p.norm().clamp_min(1e-6))
        assert rel < 0.05, (name, rel)
        for state in ranks:  # a killed 2-process run resumes on every process to the uninterrupted result
            torch.testing.assert_close(state[f"resumed.{name}"], ranks[0][f"whole.{name}"], rtol=0, atol=0)


@pytest.mark.slow
def test_stage_under_torchrun_trains_one_sae_like_one_process(tmp_path, acts_root):
    """The real launch path: `torchrun --nproc_per_node 2 stages/train_sae.py`, gloo on the CPU."""
    one, two = tmp_path / "one", tmp_path / "two"
    for folder in (one, two):
        folder.mkdir()
    assert _run(one, acts_root).returncode == 0
    done = _run(two, acts_root, launcher=torchrun.torchrun_command(tmp_path / "logs"))
    assert done.returncode == 0, torchrun.failure_report(done, tmp_path / "logs")
    (single,) = find_saes(one / "saes", "resid_post", 0)
    (parallel,) = find_saes(two / "saes", "resid_post", 0)
    assert json.loads((parallel / "train.json").read_text())["processes"] == 2
    assert not (parallel.parent / f".{parallel.name}.ckpt").exists()
    a, b = load_sae(single).tensors(), load_sae(parallel).tensors()
    for name, p in a.items():
        rel = float((b[name] - p).norm() / p.norm().clamp_min(1e-6))
        assert rel < 0.05, (name, rel)


def test_two_runs_of_the_same_sae_at_once_take_turns_and_the_first_wins(tmp_path, acts_root):
    """Two terminals start the same SAE: the second waits on the folder's lock while the first trains, then
    keeps the first's SAE; the folder is the same bytes as a run alone, with no lock or checkpoint left."""
    alone = _run(tmp_path / "alone", acts_root)
    assert alone.returncode == 0, alone.stderr[-2000:]
    shared = tmp_path / "shared"
    shared.mkdir()
    ckpt = shared / "saes" / "resid_post" / "layer_0" / ".topk-w16-k2.ckpt"
    first, second = run_overlapping(_stage_args(shared, acts_root), None, shared, ckpt.exists)
    assert first.returncode == 0 and second.returncode == 0, first.stdout[-2000:] + second.stdout[-2000:]
    assert WAITING in second.stdout and "already trained" in second.stdout, second.stdout[-3000:]
    assert "training topk" not in second.stdout and "training topk" in first.stdout
    (folder,) = find_saes(shared / "saes", "resid_post", 0)
    (reference,) = find_saes(tmp_path / "alone" / "saes", "resid_post", 0)
    assert [(f.name, f.read_bytes()) for f in sorted(folder.iterdir())] == [(f.name, f.read_bytes()) for f in sorted(reference.iterdir())]
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name], "a lock or checkpoint was left behind"


def test_a_trained_sae_is_kept_until_its_activations_or_code_change(tmp_path):
    acts = tmp_path / "acts"
    _write_split(acts / "resid_post" / "layer_0", 256, 1)
    _write_split(acts / "resid_post" / "layer_0" / "eval", 128, 2)
    assert _run(tmp_path, acts).returncode == 0
    (folder,) = find_saes(tmp_path / "saes", "resid_post", 0)
    first = (folder / "train.json").read_text()
    again = _run(tmp_path, acts)
    assert again.returncode == 0 and "already trained" in again.stdout + again.stderr
    assert (folder / "train.json").read_text() == first
    _write_split(acts / "resid_post" / "layer_0", 256, 5)  # new rows, same shapes and names
    changed = _run(tmp_path, acts)
    assert changed.returncode == 0 and "already trained" not in changed.stdout + changed.stderr
    assert json.loads((folder / "train.json").read_text())["activations_key"] != json.loads(first)["activations_key"]
    # An SAE from other training code (its recorded code key differs) is trained again, too.
    info = json.loads((folder / "train.json").read_text())
    (folder / "train.json").write_text(json.dumps({**info, "code_key": "0" * 16}))
    retrained = _run(tmp_path, acts)
    assert retrained.returncode == 0 and "already trained" not in retrained.stdout + retrained.stderr
    assert json.loads((folder / "train.json").read_text())["code_key"] == info["code_key"] != "0" * 16
