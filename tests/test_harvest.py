"""harvest: rows equal the model's own hidden states, the exclusion rule, dtypes, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from support import torchrun
from support.configs import make
from support.tiny_corpus import tiny_llama_with_corpus
from support.turns import WAITING, run_overlapping
from token_journey.config.harvest import HarvestConfig
from token_journey.data.corpus import read_sequences, row_mask, special_ids
from token_journey.data.harvest import harvest, planned_bytes
from token_journey.data.loader import ShuffledLoader
from token_journey.data.shards import open_activations
from token_journey.errors import TokenJourneyError
from token_journey.layout import activations_folder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A prepared tiny Llama and a small corpus of context 16 (train and eval)."""
    root = tmp_path_factory.mktemp("harvest")
    lm = tiny_llama_with_corpus(root, n_docs=120, max_tokens=2048)
    return root, lm


def _cfg(**kw):
    base = dict(layers=(0, 2), sites=("resid_post", "mlp_out"), batch_size=5, shard_rows=64, row_group_rows=16)
    base.update(kw)
    return make(HarvestConfig, **base)


def test_rows_are_the_models_hidden_states(tiny_setup, tmp_path):
    root, lm = tiny_setup
    harvest(lm, _cfg(), root / "corpus", tmp_path, torch.device("cpu"))
    for split in ("train", "eval"):
        seqs = read_sequences(root / "corpus" / f"{split}.parquet")
        with torch.no_grad():  # independent reference: transformers' own hidden states
            hidden = lm.model(seqs.input_ids, output_hidden_states=True).hidden_states
        mask = row_mask(seqs.input_ids, special_ids(lm.tokenizer), 1)
        for layer in (0,):  # resid_post of a non-final layer is hidden_states[layer + 1]
            acts = open_activations(tmp_path, "resid_post", layer, split, verify=True)
            table = acts.read_all()
            seq = torch.tensor(table.column("sequence_id").to_numpy())
            pos = torch.tensor(table.column("position").to_numpy()).long()
            assert acts.rows == int(mask.sum()) and len(acts.manifest["shards"]) == -(-len(seqs.sequence_ids) // 4)
            assert torch.equal(torch.tensor(table.column("token_id").to_numpy()).long(), seqs.input_ids[seq, pos])
            assert mask[seq, pos].all() and len(set(zip(seq.tolist(), pos.tolist()))) == acts.rows
            torch.testing.assert_close(acts.tensor(), hidden[layer + 1][seq, pos], rtol=1e-5, atol=1e-5)
            x = acts.tensor().double()
            assert torch.allclose(torch.tensor(acts.manifest["mean"], dtype=torch.float64), x.mean(0))
            assert acts.manifest["mean_sq_norm"] == pytest.approx(float((x * x).sum(1).mean()))
            counts = acts.manifest["excluded_counts"]
            assert counts["special"] + counts["first_positions"] + counts["max_norm"] + acts.rows == seqs.input_ids.numel()
            assert counts["first_positions"] == len(seqs.sequence_ids)  # no BOS: position 0 is the excluded one
            assert acts.manifest["exclusion"]["exclude_first"] == 1 and acts.manifest["model_fingerprint"]
        assert open_activations(tmp_path, "mlp_out", 2, split).rows == int(mask.sum())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_storage_dtype_and_norm_rule(tiny_setup, tmp_path, dtype):
    root, lm = tiny_setup
    harvest(lm, _cfg(layers=(1,), sites=("resid_post",), dtype=dtype, exclude_first=0, max_norm_ratio=1.2), root / "corpus", tmp_path, torch.device("cpu"))
    acts = open_activations(tmp_path, "resid_post", 1)
    counts = acts.manifest["excluded_counts"]
    assert acts.dtype == dtype and counts["first_positions"] == 0 and counts["max_norm"] > 0
    seqs = read_sequences(root / "corpus/train.parquet")
    expected = set()
    for lo in range(0, len(seqs.sequence_ids), 4):  # 64 rows // 16 = 4 sequences per shard, one batch each
        ids = seqs.input_ids[lo : lo + 4]
        with torch.no_grad():
            norms = lm.model(ids, output_hidden_states=True).hidden_states[2].norm(dim=-1)
        mask = row_mask(ids, special_ids(lm.tokenizer), 0)
        for b in range(ids.shape[0]):  # each sequence against the (lower) median norm of its own rows
            own = sorted(norms[b][mask[b]].tolist())
            median = own[(len(own) - 1) // 2]
            expected |= {(lo + b, t) for t in range(ids.shape[1]) if mask[b, t] and norms[b, t] <= 1.2 * median}
    table = acts.read_all(["sequence_id", "position"])
    assert set(zip(table.column("sequence_id").to_pylist(), table.column("position").to_pylist())) == expected
    batch = next(ShuffledLoader(acts, 32, seed=0).batches())
    assert batch.dtype == torch.float32 and batch.shape == (32, 32)


def _harvest_cmd(root: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        str(REPO / "stages/harvest.py"),
        f"paths.base_model={root / 'base'}",
        f"paths.corpus={root / 'corpus'}",
        f"paths.activations={out}",
        "harvest.layers=[0,2]",
        "harvest.sites=[resid_post,attn_out]",
        "harvest.shard_rows=32",
        "harvest.batch_size=2",
        "device=cpu",
        f"hydra.run.dir={out.parent / 'hydra'}",
    ]


def _env() -> dict[str, str]:
    # One thread: a tiny model gains nothing from more, and the CPU may be shared.
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def _harvest_whole(root: Path, out: Path) -> None:
    """An uninterrupted single-process harvest: the reference the other runs must equal."""
    subprocess.run(_harvest_cmd(root, out), check=True, env=_env(), capture_output=True)


def _shards(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("shard-*.parquet"))}


def test_killed_harvest_resumes_without_loss_or_duplicates(tiny_setup, tmp_path):
    root, _ = tiny_setup
    env = _env()
    whole = tmp_path / "whole" / "acts"
    _harvest_whole(root, whole)
    killed = tmp_path / "killed" / "acts"
    proc = subprocess.Popen(_harvest_cmd(root, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = activations_folder(killed, "attn_out", 2) / "shard-00000.parquet"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = _shards(killed)
    assert 0 < len(partial) < len(_shards(whole)), "the kill did not land part-way"
    assert not (activations_folder(killed, "resid_post", 0) / "manifest.json").exists()
    subprocess.run(_harvest_cmd(root, killed), check=True, env=env, capture_output=True)
    assert _shards(killed) == _shards(whole)  # byte for byte: nothing lost, nothing twice
    for site, layer in (("resid_post", 0), ("attn_out", 2)):
        for split in ("train", "eval"):
            a = json.loads((activations_folder(killed, site, layer, split) / "manifest.json").read_text())
            b = json.loads((activations_folder(whole, site, layer, split) / "manifest.json").read_text())
            assert a == b
            table = open_activations(killed, site, layer, split, verify=True).read_all(["sequence_id", "position"])
            keys = list(zip(table.column("sequence_id").to_pylist(), table.column("position").to_pylist()))
            assert len(keys) == len(set(keys))


SEEDS = [int(s) for s in os.environ.get("TOKEN_JOURNEY_TEST_SEEDS", "0").split(",")]
"""The moments of the SIGTERM tests (benchmarks/stress.py sets ten)."""


def _manifests(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("manifest.json"))}


@pytest.mark.parametrize("seed", SEEDS)
def test_sigterm_drops_the_shard_in_flight_and_the_rerun_completes_it(tiny_setup, tmp_path, seed):
    """A scheduler's SIGTERM at a moment drawn from `seed`: one line, status 75, only complete shards left."""
    root, _ = tiny_setup
    whole = tmp_path / "whole" / "acts"
    _harvest_whole(root, whole)
    draw = random.Random(seed)
    stopped = tmp_path / "stopped" / "acts"
    proc = subprocess.Popen(_harvest_cmd(root, stopped), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    target = draw.randrange(1, len(_shards(whole)) // 2)
    deadline = time.time() + 120
    while len(list(stopped.rglob("shard-*.parquet"))) < target and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    time.sleep(draw.uniform(0, 0.05))
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: harvest ") and "SIGTERM during shard" in last and "rerun the same command" in last, err[-3000:]
    assert "Traceback" not in err
    partial = _shards(stopped)
    assert 0 < len(partial) < len(_shards(whole)), "the signal did not land part-way"
    assert all(partial[name] == _shards(whole)[name] for name in partial), "a shard left behind differs from the whole run's"
    assert not list(stopped.rglob(".*tmp*")), "a temporary file was left behind"
    subprocess.run(_harvest_cmd(root, stopped), check=True, env=_env(), capture_output=True)
    assert _shards(stopped) == _shards(whole) and _manifests(stopped) == _manifests(whole)


def test_two_harvests_of_the_same_layers_at_once_take_turns(tiny_setup, tmp_path):
    """Two terminals harvest into one root: the second waits on the layers' locks while the first (frozen
    mid-way, holding them) writes, then keeps its shards; everything equals one harvest, no lock left."""
    root, _ = tiny_setup
    whole = tmp_path / "whole" / "acts"
    _harvest_whole(root, whole)
    shared = tmp_path / "shared" / "acts"
    first, second = run_overlapping(_harvest_cmd(root, shared), _env(), None, lambda: any(shared.rglob("shard-*.parquet")))
    assert first.returncode == 0 and second.returncode == 0, first.stdout[-2000:] + second.stdout[-2000:]
    assert WAITING in second.stdout, second.stdout[-2000:]
    assert _shards(shared) == _shards(whole) and _manifests(shared) == _manifests(whole)
    assert not list(shared.rglob(".harvest.lock")), "a lock was left behind"


@pytest.mark.slow
def test_two_processes_write_the_same_shards_as_one(tiny_setup, tmp_path):
    """torchrun with 2 gloo processes on the CPU: each writes every other shard."""
    root, _ = tiny_setup
    one = tmp_path / "one" / "acts"
    _harvest_whole(root, one)
    two = tmp_path / "two" / "acts"
    logs = tmp_path / "logs"
    done = torchrun.run(torchrun.torchrun_command(logs) + _harvest_cmd(root, two)[1:], _env())
    assert done.returncode == 0, torchrun.failure_report(done, logs)
    assert any("train: process 1 of 2 writes shards" in line for line in torchrun.process_lines(logs)[1])
    assert len(_shards(one)) > 2 and _shards(two) == _shards(one)
    for split in ("train", "eval"):
        a = json.loads((activations_folder(two, "attn_out", 2, split) / "manifest.json").read_text())
        b = json.loads((activations_folder(one, "attn_out", 2, split) / "manifest.json").read_text())
        assert a == b


def _slow_second_process(rank: int, port: int, root: str, out: str) -> None:
    """One of two gloo processes harvesting `out`; process 1 is slow wherever it would look at the folder
    itself, so that process 0 has written shards by then (what a busy CPU does now and then)."""
    import token_journey.data.harvest as harvest_module
    from token_journey.lm import load_prepared

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
    if rank == 1:
        looks = harvest_module.complete_shards

        def late_look(*args, **kwargs):
            time.sleep(1.0)
            return looks(*args, **kwargs)

        harvest_module.complete_shards = late_look
    lm = load_prepared(Path(root) / "base", device="cpu")
    harvest(lm, _cfg(), Path(root) / "corpus", Path(out), torch.device("cpu"))
    torch.distributed.destroy_process_group()


def test_every_process_splits_the_shards_as_process_0_found_them(tiny_setup, tmp_path):
    """Process 1 must not decide from its own, later look at the folder which shards are left."""
    root, lm = tiny_setup
    harvest(lm, _cfg(), root / "corpus", tmp_path / "one", torch.device("cpu"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(_slow_second_process, args=(port, str(root), str(tmp_path / "two")), nprocs=2, join=True)
    assert len(_shards(tmp_path / "one")) > 4 and _shards(tmp_path / "two") == _shards(tmp_path / "one")
    assert _manifests(tmp_path / "two") == _manifests(tmp_path / "one")


def test_resume_drops_leftovers_and_foreign_shards(tiny_setup, tmp_path):
    root, lm = tiny_setup
    cfg = _cfg(layers=(1,), sites=("resid_post",))
    harvest(lm, cfg, root / "corpus", tmp_path, torch.device("cpu"))
    folder = activations_folder(tmp_path, "resid_post", 1)
    reference = _shards(tmp_path)
    (folder / "manifest.json").unlink()
    for name in ("shard-00005.parquet", "shard-00006.parquet"):
        (folder / name).unlink()
    (folder / ".shard-00005.parquet.tmp-123").write_bytes(b"half a shard")
    harvest(lm, cfg, root / "corpus", tmp_path, torch.device("cpu"))
    assert _shards(tmp_path) == reference and not list(folder.glob(".shard-*"))
    open_rows = open_activations(tmp_path, "resid_post", 1).rows
    harvest(lm, _cfg(layers=(1,), sites=("resid_post",), exclude_first=2), root / "corpus", tmp_path, torch.device("cpu"))
    acts = open_activations(tmp_path, "resid_post", 1)  # another rule: every old shard replaced
    assert acts.manifest["exclusion"]["exclude_first"] == 2
    keys = {json.loads(pq.read_schema(p).metadata[b"token_journey"])["run_key"] for p in acts.paths}
    assert keys == {acts.manifest["run_key"]} and acts.rows < open_rows
    assert acts.manifest["excluded_counts"]["first_positions"] == 2 * acts.manifest["sequences"]


def test_bad_input_errors(tiny_setup, tmp_path):
    root, lm = tiny_setup
    with pytest.raises(TokenJourneyError, match="layer 7 is out of range"):
        harvest(lm, _cfg(layers=(7,)), root / "corpus", tmp_path, torch.device("cpu"))
    assert not any(tmp_path.iterdir())  # nothing written
    with pytest.raises(TokenJourneyError, match="no corpus split"):
        harvest(lm, _cfg(), tmp_path / "nowhere", tmp_path, torch.device("cpu"))
    with pytest.raises(TokenJourneyError, match="harvest.dtype"):
        make(HarvestConfig, layers=(1,), dtype="int8")
    result = subprocess.run(
        _harvest_cmd(root, tmp_path / "acts")[:2]
        + ["harvest.layers=[9]", f"paths.base_model={root / 'base'}", f"paths.corpus={root / 'corpus'}", f"hydra.run.dir={tmp_path / 'h'}"],
        env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: layer 9 is out of range")


@pytest.mark.slow
def test_smollm2_first_position_is_the_outlier(smollm2):
    """The measurement behind exclude_first=1: position 0 dwarfs every other position at layer 15."""
    from token_journey.sites import capture

    ids = smollm2.tokenizer(["In the beginning God created the heaven and the earth. " * 6] * 2, return_tensors="pt")["input_ids"]
    norms = capture(smollm2.model, ids, [("resid_post", 15)])[("resid_post", 15)].norm(dim=-1)
    assert (norms[:, 0] > 20 * norms[:, 1:].median()).all()
    assert (norms[:, 1:] < 5 * norms[:, 1:].median()).all()


def test_a_harvest_that_cannot_fit_stops_before_writing(tiny_setup, tmp_path, monkeypatch, caplog):
    root, lm = tiny_setup
    cfg = _cfg()
    needed, tokens = planned_bytes(cfg, 32, root / "corpus")
    seqs = [read_sequences(root / "corpus" / f"{split}.parquet").input_ids for split in ("train", "eval")]
    assert tokens == sum(s.numel() for s in seqs)
    assert needed >= tokens * 4 * (32 * 4 + 16)  # 2 layers x 2 sites, float32 rows and their id columns
    real = shutil.disk_usage
    asked = []

    def small_disk(path):
        asked.append(Path(path))
        return real(path)._replace(free=needed // 2)

    monkeypatch.setattr(shutil, "disk_usage", small_disk)
    target = tmp_path / "deep" / "acts"
    with pytest.raises(TokenJourneyError) as info:
        harvest(lm, cfg, root / "corpus", target, torch.device("cpu"))
    message = str(info.value)
    assert "\n" not in message and f"{needed:,} bytes" in message and f"{needed // 2:,} bytes" in message
    for knob in ("corpus.max_tokens", "harvest.layers", "harvest.dtype"):
        assert knob in message
    assert "upper bound" in message
    assert asked == [tmp_path] and not (tmp_path / "deep").exists()  # the nearest existing folder; nothing written

    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=needed))
    with caplog.at_level("INFO", logger="token_journey.data.harvest"):
        harvest(lm, cfg, root / "corpus", target, torch.device("cpu"))
    assert f"up to {needed:,} bytes" in caplog.text
    written = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    assert 0.5 * needed < written <= needed, (written, needed)  # an upper bound, and not a loose one
