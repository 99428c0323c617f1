"""The rehearsal, end to end: every pipeline stage at a real model's shapes, from a fresh clone, timed and weighed.

A rehearsal model has random weights in the exact architecture of the real one (`token_journey.rehearsal`),
so every stage costs what it will cost on the real model, offline and on any machine. This script clones
the repository's committed HEAD into a scratch folder, composes params.yaml there as a new user would,

    python -m token_journey.config <OVERRIDES> > params.yaml
    rm dvc.lock     # the default model's lock: see docs/how-to/gpu-run.md, "Another model, a new lock"

and then runs each stage group (prepare_model, collect_corpus, harvest, train_sae@*, evaluate@*, report,
journey) with `dvc repro --single-item`, in order. Per group it prints the wall time, the part of it spent
in the stage processes themselves (the rest is dvc's: checking and hashing dependencies and outputs), and
the peak resident memory of the largest process (the kernel's own figure, from `wait4`, so no short peak is
missed), then the bars, and ends with one JSON line. The default family is whatever conf/family/default.yaml holds.

    python benchmarks/rehearsal.py                                  # Llama 3.2 1B shapes, the whole pipeline
    python benchmarks/rehearsal.py --shape aitana-2b-s --only prepare_model journey   # the journey, no SAEs

`--only` runs some groups (an empty SAE folder stands in for train_sae's output when the journey runs
without it). The clone is deleted at the end unless `--keep`. Run it alone on the machine: it needs about
10 GB of memory and, at Llama 3.2 1B shapes, 15 GB of disk (the family's SAEs: 16 layers x 3 x 268 MB).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
GROUPS = ("prepare_model", "collect_corpus", "harvest", "train_sae", "evaluate", "report", "journey")
MODELS = {"llama-3.2-1b": "llama-3.2-1b-rehearsal", "aitana-2b-s": "aitana-2b-s-rehearsal"}
BUDGET = (
    "profile=gpu device=cpu corpus=offline corpus.context_size=64 corpus.max_tokens=1024 corpus.eval_tokens=128 "
    "harvest.forward_dtype=float32 eval.dtype=float32 sae.batch_size=512 sae.train_tokens=1024 sae.eval_tokens=128 "
    "sae.buffer_rows=1024 eval.max_tokens=32 eval.saebench=false report.max_tokens=128 tracking=disabled"
).split()
"""The GPU profile's shapes (16k-wide SAEs, all layers) with a token budget a CPU runs in minutes."""
BAR_TOTAL_S, BAR_PEAK_GB, BAR_REPORT_S, BAR_JOURNEY_RATIO = 900.0, 10.0, 60.0, 1.25


def overrides(shape: str) -> list[str]:
    """The Hydra overrides of the rehearsal of `shape`."""
    return [f"model={MODELS[shape]}", *BUDGET]


def stage_running(root: int) -> bool:
    """Whether a stage process (`python stages/<name>.py`) runs under process `root` now (Linux /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):  # the process ended while we looked
            continue
    for pid in parents:
        ancestor = parents.get(pid)
        while ancestor is not None and ancestor != root:
            ancestor = parents.get(ancestor)
        if ancestor == root:
            try:
                if b"stages/" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return True
            except OSError:
                continue
    return False


def run_measured(cmd: list[str], cwd: Path, env: dict[str, str], log: Path, every_s: float = 0.2) -> tuple[int, float, float, int]:
    """Run `cmd` (output appended to `log`); returns (exit status, wall seconds, seconds during which a stage
    process ran, peak RSS bytes of its largest process).

    `os.wait4` reports the largest resident set of the child and of every descendant it waited for,
    which is exactly the stage's peak: dvc waits for the stage process it starts. (A forked child starts
    with its parent's resident set, so the figure is never below this script's own: it imports nothing heavy.) The rest of the wall
    time is dvc's own: checking and hashing dependencies and outputs before and after each stage.
    """
    start = time.perf_counter()
    in_stages = [0.0]
    done = threading.Event()
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)

        def clock() -> None:
            while not done.wait(every_s):
                if stage_running(proc.pid):
                    in_stages[0] += every_s

        watcher = threading.Thread(target=clock, daemon=True)
        watcher.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        watcher.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - start, in_stages[0], usage.ru_maxrss * 1024  # KiB on Linux


def stage_names(clone: Path, env: dict[str, str]) -> dict[str, list[str]]:
    """The pipeline's stages by group (`train_sae` -> [`train_sae@0`, ...]), in dvc.yaml's order."""
    listed = subprocess.run(["dvc", "stage", "list", "--name-only"], cwd=clone, env=env, capture_output=True, text=True, check=True).stdout.split()
    groups: dict[str, list[str]] = {}
    for name in listed:
        groups.setdefault(name.split("@")[0], []).append(name)
    return groups


def rehearse(shape: str, only: list[str], scratch: Path) -> dict:
    """Clone, compose params.yaml, run the groups; the figures as a dict."""
    clone = scratch / "token-journey"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    env = {**os.environ, "PYTHONPATH": str(clone)}  # the clone's code, whatever is installed
    command = [sys.executable, "-m", "token_journey.config", *overrides(shape)]
    (clone / "params.yaml").write_text(subprocess.run(command, cwd=clone, env=env, capture_output=True, text=True, check=True).stdout)
    # dvc.lock records the default model's paths. DVC 3.67 takes a path that a stage's lock entry lacks for a DVC 2
    # entry: it hashes it with "md5-dos2unix", misses the state's "md5" hashes, and hashes every dependency and output
    # of a stage's first run twice (report: 85 s of 106 at these shapes). A new model starts a lock of its own.
    (clone / "dvc.lock").unlink(missing_ok=True)
    params = yaml.safe_load((clone / "params.yaml").read_text())["paths"]
    groups = stage_names(clone, env)
    log = scratch / "rehearsal.log"
    print(f"rehearsal of {shape} in {clone} (log: {log})")
    print(f"  python -m token_journey.config {' '.join(overrides(shape))} > params.yaml")
    print("  rm dvc.lock")
    figures: dict[str, dict] = {}
    for group in only:
        if group == "journey" and "train_sae" not in only:
            (clone / params["saes"]).mkdir(parents=True, exist_ok=True)  # no SAEs: the journey says so and goes on
        code, seconds, in_stages, peak = run_measured(["dvc", "repro", "--single-item", *groups[group]], clone, env, log)
        n = len(groups[group])
        figures[group] = {"s": round(seconds, 1), "stage_s": round(in_stages, 1), "peak_gb": round(peak / 1e9, 2), "stages": n, "exit": code}
        plural = "s" if n > 1 else ""
        print(f"  {group:<16} {seconds:8.1f} s {peak / 1e9:8.2f} GB  ({n} stage{plural}: {in_stages:.0f} s in the stage processes, the rest dvc's)", flush=True)
        if code != 0:
            print(f"  {group} failed with status {code}; see {log}")
            break
    manifest = clone / params["base_model"] / "manifest.json"
    weights_gb = json.loads(manifest.read_text())["n_params"] * 4 / 1e9 if manifest.is_file() else None
    pages = len(list((clone / params["html"]).rglob("*.html"))) - 1 if "report" in figures else 0
    return {"figures": figures, "weights_f32_gb": weights_gb, "report_pages": max(pages, 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(MODELS), default="llama-3.2-1b")
    parser.add_argument("--only", nargs="+", choices=GROUPS, default=list(GROUPS), help="stage groups to run, in pipeline order")
    parser.add_argument("--scratch", type=Path, default=None, help="folder for the clone (default: a new temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the clone and its outputs")
    args = parser.parse_args()
    only = [g for g in GROUPS if g in args.only]
    scratch = Path(tempfile.mkdtemp(prefix="rehearsal-", dir=args.scratch))
    try:
        result = rehearse(args.shape, only, scratch)
    finally:
        if not args.keep:
            shutil.rmtree(scratch / "token-journey", ignore_errors=True)
    figures = result["figures"]
    total = sum(f["s"] for f in figures.values())
    peak = max((f["peak_gb"] for f in figures.values()), default=0.0)
    print(f"  {'total':<16} {total:8.1f} s {peak:8.2f} GB (largest stage)")
    bars = {}
    if len(figures) == len(GROUPS):
        bars["total_s <= 900"] = total <= BAR_TOTAL_S
    bars[f"peak_gb <= {BAR_PEAK_GB:g}"] = peak <= BAR_PEAK_GB
    if "report" in figures:
        bars["report_s <= 60"] = figures["report"]["s"] <= BAR_REPORT_S
        print(f"report: {result['report_pages']} pages, {figures['report']['s'] / max(result['report_pages'], 1):.2f} s per page")
    ratio = None
    if "journey" in figures and result["weights_f32_gb"]:
        ratio = figures["journey"]["peak_gb"] / result["weights_f32_gb"]
        bars["journey_peak <= 1.25 x float32 weights"] = ratio <= BAR_JOURNEY_RATIO
        print(f"journey: peak {figures['journey']['peak_gb']:.2f} GB for {result['weights_f32_gb']:.2f} GB of float32 weights ({ratio:.2f}x)")
    for name, ok in bars.items():
        print(f"  bar {name}: {'ok' if ok else 'MISSED'}")
    command = " ".join(["python benchmarks/rehearsal.py", *sys.argv[1:]])
    summary = {
        "shape": args.shape,
        "command": command,
        "overrides": overrides(args.shape),
        "stages": figures,
        "total_s": round(total, 1),
        "peak_gb": peak,
        "report_pages": result["report_pages"],
        "weights_f32_gb": result["weights_f32_gb"] and round(result["weights_f32_gb"], 2),
        "journey_peak_over_weights": ratio and round(ratio, 3),
        "bars": bars,
        "log": str(scratch / "rehearsal.log"),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
