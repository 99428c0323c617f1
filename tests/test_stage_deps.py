"""Every DVC stage lists, in its `deps`, every project module its script can import.

The lists in dvc.yaml are derived from the code: this test reads each stage's script, follows its
imports (`ast`, lazy function-level imports included) through the package, and fails when a file
it reaches is not listed, either by name or under a listed folder. So an edit to any module a
stage runs marks that stage as changed in `dvc status`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from support.imports import REPO, closure
from support.stage_deps import PIPELINES, rewrite, stage_script


def _stages() -> dict[str, dict]:
    """stage name -> its definition (the `do` body for foreach stages), over every pipeline file."""
    stages = {}
    for pipeline in PIPELINES:
        for name, body in yaml.safe_load((REPO / pipeline).read_text())["stages"].items():
            stages[name] = body.get("do", body)
    return stages


def _code_deps(stage: dict) -> list[str]:
    """The stage's deps that are code of this repo (no `${...}` data paths)."""
    return [d for d in stage.get("deps", []) if isinstance(d, str) and "${" not in d]


def missing_deps(stage: dict) -> list[str]:
    """Project files the stage's script imports (transitively) that its deps do not cover."""
    script = stage_script(stage["cmd"])
    listed = [REPO / d for d in _code_deps(stage)]

    def covered(path: Path) -> bool:
        return any(path == d or d in path.parents for d in listed)

    needed = {script, *closure(script)}
    return sorted(str(p.relative_to(REPO)) for p in needed if not covered(p))


@pytest.mark.parametrize("name", sorted(_stages()))
def test_stage_deps_cover_every_module_the_stage_imports(name):
    assert missing_deps(_stages()[name]) == [], f"stage {name} misses these deps: run `python tests/support/stage_deps.py`"


@pytest.mark.parametrize("name", sorted(_stages()))
def test_removing_any_code_dep_is_caught(name):
    """Each code dep is needed: with it removed, the check above reports what it covered."""
    stage = _stages()[name]
    for dep in _code_deps(stage):
        trimmed = {**stage, "deps": [d for d in stage["deps"] if d != dep]}
        assert missing_deps(trimmed), f"{name}: {dep} is listed but nothing the stage imports needs it"


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_the_committed_deps_are_the_derived_ones(pipeline):
    """Each pipeline file is what `python tests/support/stage_deps.py` writes: no stale extra deps either."""
    text = (REPO / pipeline).read_text()
    assert rewrite(text) == text, "run `python tests/support/stage_deps.py`"
