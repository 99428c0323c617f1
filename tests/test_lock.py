"""requirements.lock matches pyproject.toml: a dependency edited without `make lock` fails here."""

import re
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+) \\$")


def _lock() -> dict[str, str]:
    """Name -> pinned version; every pin carries at least one sha256 hash."""
    lines = (ROOT / "requirements.lock").read_text().splitlines()
    pins = {}
    for i, line in enumerate(lines):
        if line.startswith((" ", "#")) or not line.strip():
            continue
        match = PIN.match(line)
        assert match, f"not an exact, hashed pin: {line!r}"
        assert lines[i + 1].strip().startswith("--hash=sha256:"), line
        pins[canonicalize_name(match[1])] = match[2]
    return pins


def _wanted() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    for line in (ROOT / "requirements.in").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            reqs.append(line.strip())
    return [Requirement(r) for r in reqs]


def test_lock_pins_every_dependency_within_its_range():
    pins = _lock()
    for req in _wanted():
        name = canonicalize_name(req.name)
        if name == "torch":
            continue
        assert name in pins, f"{req.name} is not in requirements.lock; run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), f"requirements.lock pins {req.name}=={pins[name]}, outside {req}; run `make lock`"


def test_lock_leaves_torch_and_its_cuda_libraries_out():
    pins = _lock()
    assert "torch" not in pins
    assert not [n for n in pins if n.startswith("nvidia-") or n in ("triton", "llm", "llama-cpp-python")]
