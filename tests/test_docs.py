"""Docs that cannot rot: the README's size and images, the generated reference pages, a comment on every
conf key, and every shell block of the docs either run (on tiny fixtures) or checked.

Every ```bash block in README.md and docs/ carries a marker on the line above it:
- `<!-- runnable -->`: the block runs as written (bash, in a scratch folder whose prepared model is a tiny
  random Llama named like the default model) and must exit 0;
- `<!-- checked -->`: too slow, or needing a GPU, the network or a cluster. The block runs in bash with every
  program replaced by a recorder (variables, loops and quotes are bash's own), and each recorded command is
  checked: its Hydra overrides compose (and build the config dataclasses), its `token-journey` flags parse
  with the real parser, its benchmark flags exist in that script, its stage/test/Makefile target exists.
"""

from __future__ import annotations

import ast
import importlib.util
import itertools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

sys.path.insert(0, str(REPO / "docs" / "gen"))

from conf_comments import key_comments  # noqa: E402
from reference import _default_options, group_meanings, stale  # noqa: E402

DOCS = REPO / "docs"
MARKERS = ("<!-- runnable -->", "<!-- checked -->")
# Programs a checked block may call that nothing here can check further (a login, a clone, a browser).
UNCHECKED = {".", "source", "cd", "git", "huggingface-cli", "scontrol", "xdg-open", "pip", "rm"}
DVC_SUBCOMMANDS = {"repro", "exp", "metrics", "plots", "queue", "push", "pull", "status", "remote", "checkout"}
# Hydra groups and their config dataclasses, to validate composed values the way the stages do.
GROUPS = {
    "model": "ModelConfig",
    "corpus": "CorpusConfig",
    "harvest": "HarvestConfig",
    "sae": "SAEConfig",
    "eval": "EvalConfig",
    "report": "ReportConfig",
    "tracking": "TrackingConfig",
}


# ---------------------------------------------------------------- README


def test_readme_is_short_and_its_images_exist():
    text = (REPO / "README.md").read_text()
    assert len(text) <= 10_000, f"README.md has {len(text)} characters; move detail into docs/"
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert {"docs/images/report.png", "docs/images/feature.png", "docs/images/journey.png"} <= set(images)
    for image in images:
        assert (REPO / image).is_file(), f"README.md shows {image}, which does not exist"
        assert (REPO / image).stat().st_size < 300_000, f"{image} is above 300 KB"
    assert "`make pipeline`" in text and "`make test`" in text
    assert "make test" in (REPO / ".ci/run").read_text(), "README's test command must stay the one CI runs"


# ---------------------------------------------------------------- generated reference and conf comments


def test_reference_pages_are_current():
    assert stale() == [], "stale reference pages: run `python docs/gen/reference.py`"


def _yaml_keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        if key == "defaults" and not prefix:
            continue
        keys.add(prefix + str(key))
        if isinstance(value, dict):
            keys |= _yaml_keys(value, f"{prefix}{key}.")
    return keys


@pytest.mark.parametrize("path", sorted(p.relative_to(REPO).as_posix() for p in (REPO / "conf").rglob("*.yaml") if p.parent.name != "family"))
def test_comment_reader_finds_every_key(path):
    """The line-based reader sees exactly the keys YAML sees (family/ uses merge aliases it cannot follow)."""
    file = REPO / path
    assert {k.path for k in key_comments(file)} == _yaml_keys(yaml.safe_load(file.read_text()) or {})


def test_every_conf_key_has_a_comment():
    """Each key of conf/config.yaml, and each key of every group (in the group's default option, or in
    another option that comments it), says what it means in a comment: the config reference shows it."""
    missing = [f"conf/config.yaml: {k.path}" for k in key_comments(REPO / "conf/config.yaml") if not k.comment]
    for group in _default_options():
        folder = REPO / "conf" / group
        if group == "profile":  # a profile only sets other groups' keys
            continue
        meanings = group_meanings(group)
        for path in sorted(folder.glob("*.yaml")):
            if path.read_text().startswith("# @package _global_"):  # sets top-level keys, as a profile does
                continue
            keys = key_comments(path)
            if group == "family":  # a member's own keys are `sae` keys; the member needs a comment
                keys = [k for k in keys if "." not in k.path]
            missing += [f"{path.relative_to(REPO)}: {k.path}" for k in keys if k.path not in meanings]
    assert sorted(set(missing)) == [], "conf keys without a comment saying what they mean"


def test_a_key_without_a_comment_is_found(tmp_path):
    """The check can fail: a key below a blank line (the comment above it ends) has none."""
    file = tmp_path / "x.yaml"
    file.write_text("# header\n\n# what a means\na: 1\n\nb: 2\nc: 3  # what c means\nd:\n  # what d.e means\n  e: [1, 2]\n")
    got = {k.path: k.comment for k in key_comments(file)}
    assert got == {"a": "what a means", "b": "", "c": "what c means", "d": "", "d.e": "what d.e means"}


# ---------------------------------------------------------------- shell blocks


def shell_blocks() -> list[tuple[str, str, str]]:
    """(where, marker, text) of every ```bash block in README.md and docs/; a block without a marker fails."""
    blocks = []
    for page in [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]:
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.strip() != "```bash":
                continue
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            above = lines[i - 1].strip() if i else ""
            where = f"{page.relative_to(REPO)}:{i + 1}"
            blocks.append((where, above if above in MARKERS else "", "\n".join(lines[i + 1 : end])))
    return blocks


BLOCKS = shell_blocks()


def test_every_shell_block_is_marked():
    unmarked = [where for where, marker, _ in BLOCKS if not marker]
    assert unmarked == [], f"shell blocks without {' or '.join(MARKERS)} on the line above"
    assert sum(marker == MARKERS[0] for _, marker, _ in BLOCKS) >= 3


RECORDER = r"""
rec() { printf '%s\0' "$@" >> "$RECORD"; printf '\n\0' >> "$RECORD"; return 0; }
command_not_found_handle() { rec "$@"; }
.() { rec . "$@"; }
source() { rec source "$@"; }
cd() { rec cd "$@"; }
PATH=/nonexistent
"""


def recorded_commands(block: str, cwd: Path) -> list[list[str]]:
    """The commands a block would run, each as its argv, found by running it in bash with every program replaced
    by a recorder. `<placeholders>` become a word first (they would be redirections)."""
    record = cwd / "record"
    record.write_bytes(b"")
    text = re.sub(r"<[A-Za-z][\w ]*>", "PLACEHOLDER", block)
    run = subprocess.run(["bash", "-c", RECORDER + text], cwd=cwd, env={"RECORD": str(record), "HOME": str(cwd)}, capture_output=True, text=True)
    assert run.stderr == "", run.stderr  # bash's own complaints (syntax, a missing file); a block may end on a false test
    fields = record.read_bytes().split(b"\0")
    commands, current = [], []
    for field in fields[:-1]:
        if field == b"\n":
            commands.append(current)
            current = []
        else:
            current.append(field.decode())
    return commands


def _flags_of(script: Path) -> set[str]:
    """Every `--flag` a benchmark script (or a benchmarks/ module it imports) declares with add_argument."""
    flags, files = set(), [script]
    tree = ast.parse(script.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            candidate = REPO / "benchmarks" / (node.module.split(".")[-1] + ".py")
            if candidate.is_file():
                files.append(candidate)
    for file in files:
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
                flags |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")}
    return flags


def _split_sweep(value: str) -> list[str]:
    """`key=a,b,c` -> its members (commas inside brackets or quotes do not split)."""
    key, _, rhs = value.partition("=")
    if "," not in rhs or rhs.startswith("[") or rhs.startswith(("'", '"')):
        return [value]
    return [f"{key}={member}" for member in rhs.split(",")]


def check_overrides(overrides: list[str], sweep: bool) -> None:
    """Compose each member of the overrides (each sweep combination) and build every config group from it."""
    from token_journey.config import build, compose
    from token_journey.config.journey import journey_config

    members = [_split_sweep(o) if sweep else [o] for o in overrides]
    for combination in itertools.islice(itertools.product(*members), 12):
        cfg = compose(list(combination))
        if cfg["model"]["source"] == "rehearsal":  # the drift: profile=gpu's hub corpus stops an offline rehearsal
            assert cfg["corpus"]["source"] != "hub", f"{' '.join(combination)}: a rehearsal model runs offline; add corpus=offline"
        for group, name in GROUPS.items():
            build(getattr(__import__(f"token_journey.config.{group}", fromlist=[name]), name), cfg[group], group)
        journey_config(cfg["journey"])


def check_command(argv: list[str]) -> None:
    """Fail unless `argv` names something that exists and its arguments are ones it accepts (see the module doc)."""
    program, args = argv[0], argv[1:]
    if program in UNCHECKED:
        return
    if program in ("srun", "torchrun"):  # a launcher: check what it launches (`srun python X.py`, `torchrun ... X.py`)
        start = next(i for i, a in enumerate(args) if a in ("python", "python3") or a.endswith(".py"))
        return check_command(args[start:] if args[start].startswith("python") else ["python", *args[start:]])
    if program == "export":
        return
    if program == "token-journey":
        from token_journey.cli import _parser
        from token_journey.config import compose

        try:
            _parser(compose()).parse_args(args)
        except SystemExit as exc:
            pytest.fail(f"token-journey {' '.join(args)}: the parser refused it (status {exc.code})")
        return
    if program == "make":
        makefile = (REPO / "Makefile").read_text()
        for target in (a for a in args if "=" not in a):
            assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"make {target}: no such target"
        return
    if program == "pytest":
        for arg in args:
            if arg.startswith("tests/"):
                assert (REPO / arg.split("::")[0]).is_file(), f"pytest {arg}: no such test file"
        return
    if program == "wandb":
        assert args[0] in ("sweep", "agent", "sync", "leet"), f"wandb {args[0]}?"
        if args[0] == "sweep":
            assert (REPO / args[1]).is_file()
        return
    if program == "dvc":
        assert args[0] in DVC_SUBCOMMANDS, f"dvc {args[0]}: not a subcommand these docs expect"
        if args[:2] == ["exp", "run"]:
            sets = [args[i + 1] for i, a in enumerate(args) if a in ("-S", "--set-param")]
            check_overrides(sets, sweep="--queue" in args)
        if args[0] == "repro":
            stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
            for name in (a for a in args[1:] if not a.startswith("-")):
                assert name.split("@")[0] in stages, f"dvc repro {name}: no such stage"
        return
    if program in ("python", "python3"):
        if args[:1] == ["-m"]:
            module, rest = args[1], args[2:]
            if module == "pytest":
                return check_command(["pytest", *rest])
            assert importlib.util.find_spec(module) is not None, f"python -m {module}: no such module"
            if module == "token_journey.config":
                check_overrides(rest, sweep=False)
            return
        script, rest = REPO / args[0], args[1:]
        assert script.is_file(), f"python {args[0]}: no such file"
        if args[0].startswith("stages/"):
            sweep = "-m" in rest or "--multirun" in rest
            check_overrides([a for a in rest if a not in ("-m", "--multirun")], sweep)
        elif args[0].startswith(("benchmarks/", "docs/gen/")):
            declared = _flags_of(script)
            used = {a.split("=")[0] for a in rest if a.startswith("--")}
            assert used <= declared, f"python {args[0]}: unknown flags {sorted(used - declared)}"
        return
    pytest.fail(f"{program}: a command these tests do not know how to check; add it to UNCHECKED if nothing can be checked")


@pytest.mark.parametrize("where,marker,block", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_shell_block_is_sound(where, marker, block, tmp_path):
    commands = recorded_commands(block, tmp_path)
    assert commands, f"{where}: no command found"
    for argv in commands:
        check_command(argv)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    """A scratch project folder whose prepared default model is a tiny random Llama (seconds, not minutes)."""
    from support.configs import make
    from support.tiny import save_tiny
    from token_journey.config import compose
    from token_journey.config.model import ModelConfig
    from token_journey.lm import prepare_model

    root = tmp_path_factory.mktemp("project")
    raw = save_tiny("llama", tmp_path_factory.mktemp("raw") / "llama")
    name = compose()["model"]["name"]
    prepare_model(make(ModelConfig, name=name, source="local", id=str(raw)), root / "models/base" / name)
    return root


RUNNABLE = [b for b in BLOCKS if b[1] == MARKERS[0]]


@pytest.mark.parametrize("where,marker,block", RUNNABLE, ids=[b[0] for b in RUNNABLE])
def test_runnable_block_runs(where, marker, block, sandbox):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), WANDB_MODE="disabled")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    prelude = f'token-journey() {{ {shlex.quote(sys.executable)} -m token_journey.cli "$@"; }}\npython() {{ {shlex.quote(sys.executable)} "$@"; }}\nset -e\n'
    run = subprocess.run(["bash", "-c", prelude + block], cwd=sandbox, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"{where} failed:\n{run.stderr[-3000:]}"


@pytest.mark.parametrize(
    "block",
    [
        "python stages/train_sae.py sae.nope=1",  # an unknown key
        "python stages/train_sae.py sae=topk sae.sparsity_coefficient=0.1",  # a key topk refuses
        "dvc exp run -S profile=tpu",  # an unknown option
        "token-journey journey --colour red",  # an unknown flag
        "python benchmarks/train_sae.py --archs topk --fast",  # a flag the benchmark lacks
        "dvc repro trian_sae",  # a misspelt stage
        "make docz",  # a missing target
        "frobnicate --all",  # a program nothing checks
        "python -m token_journey.config profile=gpu model=llama-3.2-1b-rehearsal",  # a rehearsal reading the hub
    ],
)
def test_a_wrong_command_is_caught(block, tmp_path):
    """The checker can fail: each of these is a mistake a doc could make."""
    from _pytest.outcomes import Failed

    with pytest.raises((Exception, Failed)):
        for argv in recorded_commands(block, tmp_path):
            check_command(argv)


def test_version_is_one_number_everywhere(capsys):
    """`token-journey --version` prints the package version, which pyproject.toml and CHANGELOG.md state too."""
    from token_journey import __version__
    from token_journey.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"token-journey {__version__}"
    assert re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)[1] == __version__
    assert re.search(r"^## (\S+)", (REPO / "CHANGELOG.md").read_text(), re.M)[1] == __version__


@pytest.mark.browser
def test_screenshot_script_renders_the_three_pages(report_built, report_inputs, sandbox, tmp_path, capsys):
    """docs/gen/screenshots.py on a tiny report and a tiny journey: three PNGs, each framed and small."""
    import shutil

    from support.browser import require_browser
    from token_journey.cli import main as cli

    require_browser()
    import screenshots

    reports = tmp_path / "reports"
    shutil.copytree(report_inputs.html, reports / "html")
    model = sandbox / "models/base" / os.listdir(sandbox / "models/base")[0]
    args = ["journey", "--model-dir", str(model), "--html", "--quiet", "--out", str(reports / "journey"), "--saes", str(tmp_path / "none")]
    assert cli([*args, "--max-new-tokens", "1"]) == 0
    assert screenshots.main([str(reports), "--out", str(tmp_path / "images")]) == 0
    for name in ("report", "feature", "journey"):
        png = (tmp_path / "images" / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and 10_000 < len(png) < 300_000, name
