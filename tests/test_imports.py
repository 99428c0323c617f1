"""The package's import graph: no cycles, every module importable on its own, config free of torch."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from support.imports import REPO, all_modules, imports, module_file


def _graph() -> dict[str, set[str]]:
    """module -> the project modules it imports when it is imported (function-level imports excluded)."""
    return {m: imports(module_file(m), top_level_only=True) - {m} for m in all_modules()}


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as a list of modules (first == last), or [] when the graph has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return []

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return []


def test_cycle_finder_finds_a_planted_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycles():
    graph = _graph()
    assert len(graph) > 50  # the walk found the package
    assert _cycle(graph) == []


@pytest.mark.parametrize("module", [m for m in all_modules() if not m.endswith("__main__")])  # __main__ runs
def test_every_module_imports_on_its_own(module):
    """Imported first, with no other module of the package loaded, each module still imports."""
    saved = {name: mod for name, mod in sys.modules.items() if name.split(".")[0] in ("token_journey", "support")}
    for name in saved:
        del sys.modules[name]
    try:
        importlib.import_module(module)
    finally:
        for name in [n for n in sys.modules if n.split(".")[0] == "token_journey"]:
            del sys.modules[name]
        sys.modules.update(saved)


def test_config_layout_and_registry_import_neither_torch_nor_wandb():
    """Reading and validating config stays cheap: no torch, no wandb behind it."""
    code = (
        "import sys, token_journey.config, token_journey.layout, token_journey.sae.registry\n"
        "import token_journey.config.model, token_journey.config.corpus, token_journey.config.harvest\n"
        "import token_journey.config.sae, token_journey.config.eval, token_journey.config.report\n"
        "import token_journey.config.journey, token_journey.config.tracking\n"
        "print(sorted(m for m in ('torch', 'wandb') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"
