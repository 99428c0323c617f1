"""Derive each DVC stage's code `deps` from its script's imports, and rewrite them in dvc.yaml.

    python tests/support/stage_deps.py      # after changing what a stage imports (every file of PIPELINES)

A subpackage is listed as a folder when the stage needs all of its modules or it holds templates;
otherwise its modules are listed one by one. Data deps (`${...}`) are kept as they are.
`tests/test_stage_deps.py` fails while a stage's deps miss a module it imports.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support.imports import REPO, closure  # noqa: E402

STAGE_SCRIPT = re.compile(r"\bstages/(\w+\.py)\b")


def stage_script(cmd: str) -> Path:
    """The stage script a dvc.yaml `cmd` runs."""
    return REPO / "stages" / STAGE_SCRIPT.search(cmd).group(1)


def derived_deps(script: Path) -> list[str]:
    """The code deps of a stage: its script, then the package files and folders it imports."""
    needed = sorted(p.relative_to(REPO) for p in closure(script))
    deps, groups = [], {}
    for path in needed:
        if len(path.parts) > 2:  # token_journey/<subpackage>/...
            groups.setdefault(Path(*path.parts[:2]), []).append(path)
        else:
            deps.append(str(path))
    for folder, files in groups.items():
        every = {p.relative_to(REPO) for p in (REPO / folder).rglob("*.py")}
        if set(files) >= every or (REPO / folder / "templates").is_dir():
            deps.append(str(folder))
        else:
            deps.extend(str(p) for p in files)
    return [str(script.relative_to(REPO)), *sorted(deps)]


def rewrite(text: str) -> str:
    """dvc.yaml text with every stage's code deps replaced by the derived ones (data deps kept, after them)."""
    out, stage, deps_indent, in_deps, pending = [], None, "", False, []
    for line in text.split("\n"):
        cmd = re.match(r"^\s+cmd: (.*)$", line)
        if cmd and STAGE_SCRIPT.search(cmd.group(1)):
            stage = stage_script(cmd.group(1))
        if re.match(r"^\s+deps:\s*$", line) and stage is not None:
            in_deps, pending = True, derived_deps(stage)
            out.append(line)
            continue
        item = re.match(r"^(\s+)- (.*)$", line) if in_deps else None
        if item:
            deps_indent = item.group(1)
            if "${" in item.group(2):
                out.extend(f"{deps_indent}- {d}" for d in pending)
                pending = []
                out.append(line)
            continue
        if in_deps:
            out.extend(f"{deps_indent}- {d}" for d in pending)
            in_deps, pending = False, []
        out.append(line)
    return "\n".join(out)


PIPELINES = ("dvc.yaml", "circuits/dvc.yaml")
"""Every pipeline file: the default one and the circuits branch (its stages run from the repository root)."""

if __name__ == "__main__":
    for name in PIPELINES:
        path = REPO / name
        path.write_text(rewrite(path.read_text()))
        print(f"rewrote the code deps of every stage in {path}")
