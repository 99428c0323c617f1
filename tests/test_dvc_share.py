"""Sharing and rebuilding as the README documents them, on the tiny pipeline in a scratch project.

`dvc push` to a local-folder remote, then `git clone` + `dvc pull`: every output comes back byte
for byte and `dvc status` in the clone has nothing to run (every output is in DVC's cache, none
only in a workspace), and the workspace outputs share their files with the cache (hard links: the
activations are on disk once). Then the clone rebuilds everything from scratch (`dvc repro -f`) and writes
the same dvc.lock, bit for bit: tracked outputs hold results, never timings.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO
from test_pipeline import _run, _stages_run, project  # noqa: F401  (project: the scratch git + DVC copy)

OUTPUTS = ("models/base", "data/corpus", "data/activations", "models/saes", "reports/metrics", "reports/html", "reports/journey", "reports/summary.md")


def _status(root: Path) -> dict:
    done = subprocess.run(["dvc", "status", "--json"], cwd=root, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout or "{}")


def _unique_bytes(paths: list[Path]) -> int:
    """`du`-style: the size of every file under `paths`, each inode counted once."""
    seen: dict[tuple[int, int], int] = {}
    for path in paths:
        for file in [path] if path.is_file() else (p for p in path.rglob("*") if p.is_file() and not p.is_symlink()):
            stat = file.stat()
            seen[(stat.st_dev, stat.st_ino)] = stat.st_size
    return sum(seen.values())


def _files(root: Path) -> dict[str, bytes]:
    """Every output file under `root`, by path."""
    found = {}
    for name in OUTPUTS:
        path = root / name
        for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            found[str(file.relative_to(root))] = file.read_bytes()
    return found


@pytest.fixture(scope="module")
def shared(project, tmp_path_factory) -> Path:  # noqa: F811
    """The scratch project after `dvc repro`, committed, pushed to a local-folder remote."""
    shutil.copy(REPO / ".gitignore", project / ".gitignore")
    _run(["dvc", "repro"], project)
    _run(["dvc", "remote", "add", "-d", "storage", str(tmp_path_factory.mktemp("remote"))], project)
    _run(["git", "add", "-A"], project)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "pipeline run"], project)
    _run(["dvc", "push"], project)
    return project


@pytest.mark.slow
def test_outputs_are_stored_once_with_the_cache(shared):
    """cache.type hardlink,copy: every shard is a hard link into .dvc/cache, not a second copy."""
    shards = sorted((shared / "data/activations").rglob("shard-*.parquet"))
    assert len(shards) > 4
    assert [p for p in shards if p.stat().st_nlink < 2] == []
    outputs = [shared / name for name in OUTPUTS]
    alone = _unique_bytes(outputs)
    assert alone > sum(p.stat().st_size for p in shards) > 0
    assert _unique_bytes([*outputs, shared / ".dvc/cache"]) <= 1.1 * alone


@pytest.mark.slow
def test_a_pulled_clone_has_every_output_and_nothing_to_run(shared, tmp_path):
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(shared), str(clone)], tmp_path)
    assert _files(clone) == {}  # git carries no pipeline output
    _run(["dvc", "pull"], clone)
    pulled, original = _files(clone), _files(shared)
    assert pulled == original and len(pulled) > 20
    assert _status(clone) == {}
    # Rebuilt from nothing, every stage writes the same bytes: the lock does not change.
    for name in OUTPUTS:
        path = clone / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert len(_stages_run(_run(["dvc", "repro", "-f"], clone))) == 9
    assert _run(["git", "status", "--porcelain", "dvc.lock"], clone).strip() == "", _run(["git", "diff", "dvc.lock"], clone)
    assert _files(clone) == original
