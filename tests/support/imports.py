"""The project's import graph, read from the source with `ast` (nothing is imported).

`imports(path, top_level_only)` lists the project modules a file imports; `closure` follows them
transitively. Used by the import-graph test (no cycles) and the stage-deps test (dvc.yaml's
`deps` cover every module a stage runs).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "token_journey"


def module_file(module: str) -> Path | None:
    """The source file of a project module (`a.b` -> a/b.py or a/b/__init__.py), None if not ours."""
    base = REPO / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path) -> str:
    """`token_journey/sae/io.py` -> `token_journey.sae.io` (a package's __init__ -> the package)."""
    parts = list(path.resolve().relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> list[str]:
    """Every module of the package, sorted."""
    return sorted(module_name(p) for p in (REPO / PACKAGE).rglob("*.py"))


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(body: list[ast.stmt], top_level_only: bool):
    """Import statements in `body`: those that run at import time, or (not top_level_only) every one."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _type_checking(node):
            continue  # annotations only, never executed
        elif top_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif top_level_only and isinstance(node, ast.ClassDef):
            yield from _walk(node.body, top_level_only)
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                yield from _walk(getattr(node, field, []) or [], top_level_only)


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Project modules imported by the file at `path` (`from pkg import mod` counts `pkg.mod`)."""
    found: set[str] = set()
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in _walk(tree.body, top_level_only):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif node.level:  # relative imports are not used in this project; resolve them anyway
            package = module_name(path).rsplit(".", node.level)[0]
            names = [f"{package}.{node.module}" if node.module else package]
        else:
            names = [node.module or ""]
        for name in names:
            if name.split(".")[0] != PACKAGE:
                continue
            submodules = {f"{name}.{a.name}" for a in getattr(node, "names", []) if module_file(f"{name}.{a.name}")}
            found |= submodules
            # `from pkg import mod` needs pkg only as mod's parent package, which Python imports anyway.
            if not isinstance(node, ast.ImportFrom) or len(submodules) < len(node.names):
                found.add(name)
    return {name for name in found if module_file(name)}


def with_parents(module: str) -> list[str]:
    """A module and the packages Python imports first (`a.b.c` -> a, a.b, a.b.c)."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def closure(start: Path) -> set[Path]:
    """Every project source file that running `start` can import, transitively (lazy imports included)."""
    seen: set[Path] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        for module in imports(path):
            for name in with_parents(module):
                file = module_file(name)
                if file is not None and file not in seen:
                    seen.add(file)
                    todo.append(file)
    return seen
