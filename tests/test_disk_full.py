"""A disk that fills up mid-run: one line naming the path, nothing partial left, and a rerun to the same bytes.

Two ways to fill it:

- injected (`DiskFills`): the Nth low-level write of a stage (`Path.write_bytes` / `write_text`,
  `pyarrow.parquet.write_table`, safetensors' `save_file` as our modules call it, `os.replace`,
  `Path.rename`) raises ENOSPC, after writing half its bytes when it writes bytes, as a full disk
  does. Harvest, training with checkpoints and the report each fail at several points (11 in all);
  every time the error is one line naming the final path, no temporary is left, every file under a
  final name is the uninterrupted run's file (a checkpoint: a whole one, the previous one when the
  next failed), and the rerun ends byte-identical to the uninterrupted run.
- real: a small tmpfs mounted as root (skipped where mounting is not permitted). The harvest stage
  runs out of inodes and the train stage out of bytes (in its second checkpoint) through the real
  entry points; then the tmpfs is enlarged and the same command reruns to the same bytes.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from support.configs import make
from support.tiny_corpus import tiny_llama_with_corpus
from token_journey.config.harvest import HarvestConfig
from token_journey.config.report import ReportConfig
from token_journey.config.sae import SAEConfig
from token_journey.config.tracking import TrackingConfig
from token_journey.data.harvest import harvest
from token_journey.diskspace import no_space_errno, writing
from token_journey.errors import TokenJourneyError
from token_journey.layout import atomic_write_bytes, checkpoint_folder, sae_folder

REPO = Path(__file__).resolve().parents[1]
LAYER, NAME, EVERY, STEPS, BATCH = 1, "topk", 3, 12, 32
TEMP = re.compile(r"\.tmp-\d+|\.part$|\.old-\d+")
"""Names of temporaries (layout.temp_sibling, checkpoint `.part`, replace_folder's old folder)."""


# --- the injected fault ------------------------------------------------------------------


class DiskFills:
    """Records every low-level write (kind, path) and makes the `fail_at`-th (1-based) fail with ENOSPC."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_at: int | None = None) -> None:
        self.fail_at, self.calls = fail_at, []
        self._patch(monkeypatch)

    def _hit(self, kind: str, path: Any) -> bool:
        self.calls.append((kind, Path(path)))
        return len(self.calls) == self.fail_at

    @staticmethod
    def _full() -> OSError:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def _partial(self, path: Path, write: Callable[[], Any]) -> None:
        """Write the file, keep its first half (what fitted), and fail."""
        write()
        data = Path(path).read_bytes()
        with open(path, "wb") as fh:
            fh.write(data[: len(data) // 2])
        raise self._full()

    def _patch(self, mp: pytest.MonkeyPatch) -> None:
        import token_journey.sae.checkpoint as checkpoint
        import token_journey.sae.io as sae_io

        real = {
            "write_bytes": Path.write_bytes,
            "write_text": Path.write_text,
            "rename": Path.rename,
            "replace": os.replace,
            "write_table": pq.write_table,
            "save_file": checkpoint.save_file,
        }

        def file_writer(kind: str) -> Callable[..., Any]:
            def write(path: Path, data: Any, *args: Any, **kw: Any) -> Any:
                if self._hit(kind, path):
                    self._partial(path, lambda: real[kind](path, data, *args, **kw))
                return real[kind](path, data, *args, **kw)

            return write

        def write_table(table: Any, where: Any, *args: Any, **kw: Any) -> None:
            if self._hit("write_table", where):
                self._partial(where, lambda: real["write_table"](table, where, *args, **kw))
            real["write_table"](table, where, *args, **kw)

        def save_file(tensors: Any, filename: str, *args: Any, **kw: Any) -> None:
            if self._hit("save_file", filename):
                self._partial(Path(filename), lambda: real["save_file"](tensors, filename, *args, **kw))
            real["save_file"](tensors, filename, *args, **kw)

        def rename_like(kind: str) -> Callable[..., Any]:
            def move(src: Any, dst: Any) -> Any:
                if self._hit(kind, dst):
                    raise self._full()  # nothing moved
                return real[kind](src, dst)

            return move

        mp.setattr(Path, "write_bytes", file_writer("write_bytes"))
        mp.setattr(Path, "write_text", file_writer("write_text"))
        mp.setattr(Path, "rename", rename_like("rename"))
        mp.setattr(os, "replace", rename_like("replace"))
        mp.setattr(pq, "write_table", write_table)
        mp.setattr(checkpoint, "save_file", save_file)
        mp.setattr(sae_io, "save_file", save_file)


def _files(root: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Every file under `root` (relative name -> bytes), leaving out those under a `skip` folder name."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and not set(p.relative_to(root).parts) & set(skip)}


def _final(path: Path) -> Path:
    """The final name a temporary stands for (`.x.tmp-12` -> `x`, `x.part` -> `x`, inside a temp folder too)."""
    parts = [re.sub(r"^\.(.*)\.tmp-\d+$", r"\1", part) for part in path.parts]
    return Path(*parts).with_name(re.sub(r"\.part$", "", parts[-1]))


def _named_path(message: str) -> Path:
    """The path a disk-full error names (`... writing <path>: needs ...`)."""
    match = re.search(r" writing (/\S+): needs about [\d,]+ bytes, [\d,]+ free", message)
    assert match, message
    return Path(match.group(1))


def _fails_in_one_line(run: Callable[[Path], Any], fault: DiskFills, out: Path) -> str:
    """`run(out)` with the fault; check the one-line error names the failed write's final path, and no temporary is left."""
    with pytest.raises(TokenJourneyError) as info:
        run(out)
    message = str(info.value)
    assert len(fault.calls) == fault.fail_at, "the run did not reach the fault"
    kind, path = fault.calls[-1]
    named = _named_path(message)
    assert "\n" not in message and message.startswith("no space left on "), message
    assert named == _final(path) or named in _final(path).parents, (message, kind, path)
    assert named == out or out in named.parents
    leftovers = [p for p in out.rglob("*") if TEMP.search(p.name)]
    assert not leftovers, f"temporaries left after a fault at {kind} {path}: {leftovers}"
    return message


def _points(calls: list[tuple[str, Path]], *wanted: Callable[[str, Path], bool]) -> list[int]:
    """The 1-based index of the first recorded call matching each of `wanted`."""
    points = []
    for match in wanted:
        points.append(next(i for i, (kind, path) in enumerate(calls, 1) if match(kind, path)))
    assert len(set(points)) == len(points), points
    return points


# --- the three stages, in-process ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Any]:
    """A prepared tiny Llama and its corpus (context 16), and its layer-1 resid_post harvested under `acts`."""
    root = tmp_path_factory.mktemp("disk_full")
    lm = tiny_llama_with_corpus(root, n_docs=60, max_tokens=1024)
    harvest(lm, _harvest_cfg(), root / "corpus", root / "acts", torch.device("cpu"))
    return root, lm


def _harvest_cfg() -> HarvestConfig:
    return make(HarvestConfig, layers=(LAYER,), sites=("resid_post",), batch_size=8, shard_rows=128, row_group_rows=64)


def _sae_cfg() -> SAEConfig:
    return make(
        SAEConfig,
        architecture="topk",
        name=NAME,
        width=16,
        k=2,
        batch_size=BATCH,
        train_tokens=BATCH * STEPS,
        checkpoint_every=EVERY,
        eval_tokens=64,
        buffer_rows=128,
        lr_warmup_steps=1,
        sparsity_warmup_steps=1,
        log_every=2,
    )


def _train(acts: Path, out: Path) -> Path:
    from token_journey.sae.train_layer import train_layer

    return train_layer(
        _sae_cfg(),
        activations=acts,
        saes=out / "saes",
        timings=out / "timings",
        site="resid_post",
        layer=LAYER,
        model="tiny",
        seed=0,
        tracking=make(TrackingConfig, mode="disabled"),
        name=NAME,
        device="cpu",
    )


def test_harvest_stops_in_one_line_and_resumes_to_the_same_bytes(tiny, tmp_path, monkeypatch):
    root, lm = tiny
    run = lambda out: harvest(lm, _harvest_cfg(), root / "corpus", out, torch.device("cpu"))  # noqa: E731
    with monkeypatch.context() as mp:
        counted = DiskFills(mp)
        run(tmp_path / "whole")
    whole = _files(tmp_path / "whole")
    assert whole == _files(root / "acts") and sum(".parquet" in name for name in whole) > 6
    points = _points(
        counted.calls,
        lambda kind, path: kind == "write_table",  # the first shard
        lambda kind, path: kind == "replace" and path.name == "shard-00003.parquet",
        lambda kind, path: kind == "write_bytes" and path.parent.name == f"layer_{LAYER}",  # the train manifest
        lambda kind, path: kind == "replace" and path.name == "manifest.json" and path.parent.name == "eval",
    )
    for n, fail_at in enumerate(points):
        out = tmp_path / f"fault-{n}"
        with monkeypatch.context() as mp:
            _fails_in_one_line(run, DiskFills(mp, fail_at), out)
        left = _files(out)
        assert left.items() <= whole.items(), "a file under its final name is not the uninterrupted run's"
        assert not any(name.endswith("manifest.json") for name in left) or n >= 3, "a manifest beside missing shards"
        run(out)
        assert _files(out) == whole


def test_training_stops_in_one_line_keeps_its_checkpoint_and_resumes_to_the_same_sae(tiny, tmp_path, monkeypatch):
    root, _ = tiny
    acts = root / "acts"
    with monkeypatch.context() as mp:
        counted = DiskFills(mp)
        _train(acts, tmp_path / "whole")
    whole = _files(tmp_path / "whole", skip=("timings",))
    sae_dir = sae_folder(Path("saes"), "resid_post", LAYER, NAME)
    assert {str(sae_dir / f) for f in ("sae.safetensors", "sae_weights.safetensors", "cfg.json", "train.json")} <= set(whole)
    assert len([c for c in counted.calls if c[0] == "save_file"]) == (STEPS - 1) // EVERY + 1  # the checkpoints and the SAE
    in_ckpt = lambda path: ".ckpt" in str(path)  # noqa: E731
    states = [i for i, (kind, path) in enumerate(counted.calls, 1) if kind == "write_bytes" and path.name.startswith(".state.json")]
    assert len(states) == 3
    points = [
        *_points(counted.calls, lambda kind, path: kind == "save_file" and in_ckpt(path)),  # the first checkpoint's tensors
        states[1],  # the second checkpoint's state.json: the first checkpoint must stay whole
        *_points(
            counted.calls,
            lambda kind, path: kind == "save_file" and not in_ckpt(path),  # the SAE folder's weights
            lambda kind, path: kind == "rename" and path.name == NAME,
        ),
    ]  # the SAE folder moving into place
    for n, fail_at in enumerate(points):
        out = tmp_path / f"fault-{n}"
        with monkeypatch.context() as mp:
            _fails_in_one_line(lambda where: _train(acts, where), DiskFills(mp, fail_at), out)
        ckpt = checkpoint_folder(out / sae_dir)
        assert not (out / sae_dir).exists(), "an SAE folder after a failed save"
        step = _whole_checkpoint(ckpt)
        expected = {0: None, 1: EVERY, 2: 3 * EVERY, 3: 3 * EVERY}[n]  # the second checkpoint failed: the first one stays
        assert step == expected, (n, step)
        _train(acts, out)
        assert _files(out, skip=("timings",)) == whole
        assert not ckpt.exists()


def _whole_checkpoint(ckpt: Path) -> int | None:
    """The step of the checkpoint in `ckpt`, after checking it is whole (None when there is none)."""
    if not (ckpt / "state.json").exists():
        assert not ckpt.exists() or not any(ckpt.iterdir()), sorted(p.name for p in ckpt.iterdir())
        return None
    state = json.loads((ckpt / "state.json").read_text())
    tensors = load_file(str(ckpt / state["tensors"]))  # reads whole, or raises
    assert {p.name for p in ckpt.iterdir()} == {"state.json", state["tensors"]}
    assert "sae.W_enc" in tensors and state["tensors"] == f"state-{state['step']}.safetensors"
    return int(state["step"])


def test_report_stops_in_one_line_and_rebuilds_the_same_pages(report_inputs, tmp_path, monkeypatch):
    from token_journey.report import build_report

    cfg = make(ReportConfig, n_index=2, n_random=2, n_strongest=2, n_dense=2, top_k=6, n_quantile_contexts=4, window=3, n_logit_tokens=5, search_features=4)
    run = lambda out: build_report(cfg, dataclasses.replace(report_inputs, html=out / "html", summary=out / "summary.md"))  # noqa: E731
    with monkeypatch.context() as mp:
        counted = DiskFills(mp)
        run(tmp_path / "whole")
    whole = _files(tmp_path / "whole")
    assert {"html/index.html", "summary.md", "html/resid_post/layer_1/relu-1.html"} <= set(whole)
    points = _points(
        counted.calls,
        lambda kind, path: kind == "write_bytes" and path.name.startswith(".relu-1.html"),
        lambda kind, path: kind == "replace" and path.name == "index.html",
        lambda kind, path: kind == "write_bytes" and path.name.startswith(".summary.md"),
    )
    for n, fail_at in enumerate(points):
        out = tmp_path / f"fault-{n}"
        with monkeypatch.context() as mp:
            _fails_in_one_line(run, DiskFills(mp, fail_at), out)
        assert _files(out).items() <= whole.items(), "a page under its final name is not the uninterrupted run's"
        run(out)
        assert _files(out) == whole


# --- the helper itself -------------------------------------------------------------------


def test_other_errors_pass_through_and_still_leave_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "a" / "page.html"
    with monkeypatch.context() as mp:
        DiskFills(mp, fail_at=1)
        with pytest.raises(TokenJourneyError, match=r"writing .*page\.html: needs about 1,000 bytes"):
            atomic_write_bytes(target, b"x" * 1000)
    assert not target.exists() and not list(target.parent.iterdir())

    def broken(path: Path, data: bytes) -> None:
        path.open("wb").write(data[:10])
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(Path, "write_bytes", broken)
    with pytest.raises(OSError) as info:
        atomic_write_bytes(target, b"y" * 1000)
    assert info.value.errno == errno.EIO and not isinstance(info.value, TokenJourneyError)
    assert not list(target.parent.iterdir())


def test_a_full_quota_and_the_libraries_ways_of_saying_it(tmp_path):
    from safetensors import SafetensorError

    assert no_space_errno(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")) == errno.ENOSPC
    assert no_space_errno(OSError("Error writing bytes to file. Detail: [errno 122] Disk quota exceeded")) == errno.EDQUOT
    assert no_space_errno(SafetensorError("Error while serializing: I/O error (os error 5)")) is None
    assert no_space_errno(ValueError("(os error 28)")) is None
    temp = tmp_path / ".x.tmp-1"
    temp.write_bytes(b"half")
    with pytest.raises(TokenJourneyError) as info:
        with writing(tmp_path / "x", 12345, temp):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    free = shutil.disk_usage(tmp_path).free
    message = str(info.value)
    assert message.startswith("disk quota exceeded on /") and "needs about 12,345 bytes" in message and not temp.exists()
    assert abs(int(re.search(r"([\d,]+) free", message).group(1).replace(",", "")) - free) < 1 << 24


# --- a real, small filesystem ------------------------------------------------------------------


@contextmanager
def _tmpfs(where: Path, options: str) -> Iterator[Callable[[str], None]]:
    """Mount a tmpfs with `options` at `where` (skip where not permitted); yields a remount function."""
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root and the mount command")
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()[:200]}); a container without CAP_SYS_ADMIN")

    def remount(more: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{more}", str(where)], check=True, capture_output=True)

    try:
        yield remount
    finally:
        subprocess.run(["umount", str(where)], check=False, capture_output=True)


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", WANDB_MODE="disabled")


def _stage(args: list[str], elsewhere: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *args, "device=cpu", f"hydra.run.dir={elsewhere / 'hydra'}"]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=elsewhere)


def _one_line_exit_2(done: subprocess.CompletedProcess, mount: Path) -> str:
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr + done.stdout
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: no space left on {mount}") and "rerun" in last, last
    named = _named_path(last)
    assert mount in named.parents and not TEMP.search(str(named)), last
    return last


def test_harvest_stage_on_a_tmpfs_out_of_inodes(tiny, tmp_path):
    root, _ = tiny

    def args(out: Path) -> list[str]:
        return [
            str(REPO / "stages/harvest.py"),
            f"paths.base_model={root / 'base'}",
            f"paths.corpus={root / 'corpus'}",
            f"paths.activations={out}",
            "harvest.layers=[0,2]",
            "harvest.sites=[resid_post,attn_out]",
            "harvest.shard_rows=64",
            "harvest.batch_size=4",
        ]

    whole = tmp_path / "whole"
    assert _stage(args(whole), tmp_path).returncode == 0
    reference = _files(whole)
    entries = len(list(whole.rglob("*")))  # files and folders: an inode each
    small = tmp_path / "small"
    with _tmpfs(small, f"size=64m,nr_inodes={entries // 2}") as remount:
        done = _stage(args(small), tmp_path)
        last = _one_line_exit_2(done, small)
        assert "no free inodes" in last
        left = _files(small)
        assert 0 < len(left) and left.items() <= reference.items(), "a partial or foreign file under a final name"
        assert not [p for p in small.rglob("*") if TEMP.search(p.name)]
        remount(f"nr_inodes={entries * 2}")
        again = _stage(args(small), tmp_path)
        assert again.returncode == 0, again.stderr[-2000:]
        assert "resuming at shard" in again.stderr + again.stdout
        assert _files(small) == reference


def test_train_stage_on_a_tmpfs_too_small_for_its_second_checkpoint(tiny, tmp_path):
    root, _ = tiny

    def args(out: Path) -> list[str]:
        return [
            str(REPO / "stages/train_sae.py"),
            f"paths.activations={root / 'acts'}",
            f"paths.saes={out}",
            f"paths.timings={tmp_path / 'timings'}",
            f"layer={LAYER}",
            "site=resid_post",
            "model.name=tiny",
            "tracking=disabled",
            "family=none",
            "sae=topk",
            "sae.width=512",
            "sae.k=4",
            "sae.k_aux=16",
            f"sae.batch_size={BATCH}",
            f"sae.train_tokens={BATCH * STEPS}",
            "sae.eval_tokens=64",
            "sae.buffer_rows=128",
            "sae.lr_warmup_steps=1",
            f"sae.checkpoint_every={EVERY}",
        ]

    whole = tmp_path / "whole"
    done = _stage(args(whole), tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    reference = _files(whole)
    sae_dir = next(p for p in whole.rglob("sae.safetensors")).parent
    weights = (sae_dir / "sae.safetensors").stat().st_size
    # A checkpoint holds the weights and two Adam moments (~3x): one fits, two (the old kept until the new is whole) do not.
    small = tmp_path / "small"
    with _tmpfs(small, f"size={5 * weights // 4096 * 4096}") as remount:
        done = _stage(args(small), tmp_path)
        last = _one_line_exit_2(done, small)
        ckpt = checkpoint_folder(small / sae_dir.relative_to(whole))
        assert f"{ckpt}/state-{2 * EVERY}.safetensors" in last, last
        assert _whole_checkpoint(ckpt) == EVERY  # the previous checkpoint, whole
        assert not (small / sae_dir.relative_to(whole)).exists()
        remount("size=64m")
        again = _stage(args(small), tmp_path)
        assert again.returncode == 0, again.stderr[-2000:]
        assert f"from step {EVERY}" in again.stderr + again.stdout
        assert _files(small) == reference and not ckpt.exists()
