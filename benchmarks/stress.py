"""The long-job tests again and again with the CPU kept busy: the bars of issue 28, measured.

Flaky shutdowns show up only under load (a process descheduled inside a collective while its peer
leaves), so each group of tests runs here beside CPU-burning processes (`--burners`, default one per
core), each run a fresh pytest process:

- shutdown: the two-process harvest, the real-stage torchrun training and the failing-process tests,
  `--runs` times (bar: every run passes);
- preemption: SIGTERM sent to train_sae (one process and torchrun) and to harvest at `--moments`
  moments each, drawn from seeds 0..moments-1 (`TOKEN_JOURNEY_TEST_SEEDS`); every rerun must equal the
  uninterrupted run byte for byte and lose no finished step;
- disk: ENOSPC injected at each of the write points of harvest, training and report, plus real full
  tmpfs mounts (`tests/test_disk_full.py`);
- store: the object store stopped and restarted at several points of a harvest and a training run, and
  a store that stays down (`tests/test_storage.py`).

    python benchmarks/stress.py [--runs 20] [--moments 10] [--burners N] [--groups shutdown,preemption,disk,store]
        [--failures DIR]
Prints one line per pytest run (the whole output of a run with a failure goes to DIR/<group>-<run>.txt),
then ONE JSON object on the last line: per group the passed and failed test counts and whether the bar holds.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHUTDOWN = [
    "tests/test_harvest.py::test_two_processes_write_the_same_shards_as_one",
    "tests/test_sae_stage.py::test_stage_under_torchrun_trains_one_sae_like_one_process",
    "tests/test_shutdown.py",
]
# tests/test_preemption.py's own moments are fixed; it runs once with the rest of the group.
PREEMPTION = [
    "tests/test_sae_resume.py::test_sigterm_checkpoints_the_step_under_way_and_resumes_exactly",
    "tests/test_sae_resume.py::test_sigterm_to_torchrun_stops_every_process_after_the_same_step",
    "tests/test_harvest.py::test_sigterm_drops_the_shard_in_flight_and_the_rerun_completes_it",
    "tests/test_preemption.py",
]
GROUPS = {"shutdown": SHUTDOWN, "preemption": PREEMPTION, "disk": ["tests/test_disk_full.py"], "store": ["tests/test_storage.py"]}
SUMMARY = re.compile(r"(\d+) (passed|failed|error|errors|skipped)")


def burn() -> None:
    """Keep one core busy until killed."""
    while True:
        pass


def pytest_run(tests: list[str], env: dict[str, str], keep: Path) -> dict[str, int]:
    """One pytest process over `tests`; its passed/failed/skipped counts (errors count as failed). The
    whole output of a run with a failure is kept in the file `keep`."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=REPO, env=env, capture_output=True, text=True, check=False
    )
    tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for number, word in SUMMARY.findall(tail):
        counts["failed" if word.startswith("error") else word] += int(number)
    if done.returncode not in (0, 1) and not counts["failed"]:
        counts["failed"] = 1  # pytest itself broke (collection, usage): count it against the bar
    if counts["failed"]:
        failures = [line for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
        keep.parent.mkdir(parents=True, exist_ok=True)
        keep.write_text(done.stdout + "\n" + done.stderr)
        print("\n".join(failures[:10]) + f"\n(the whole output: {keep})", flush=True)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="repetitions of the shutdown group")
    parser.add_argument("--moments", type=int, default=10, help="SIGTERM moments per preemption test")
    parser.add_argument("--burners", type=int, default=os.cpu_count() or 1, help="CPU-burning processes beside the tests")
    parser.add_argument("--groups", default="shutdown,preemption,disk,store")
    parser.add_argument("--failures", type=Path, default=Path("stress-failures"), help="where the output of failed runs goes")
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    burners = [multiprocessing.Process(target=burn, daemon=True) for _ in range(args.burners)]
    for b in burners:
        b.start()
    results: dict[str, dict] = {}
    try:
        for group in args.groups.split(","):
            runs = args.runs if group == "shutdown" else 1
            group_env = dict(env, TOKEN_JOURNEY_TEST_SEEDS=",".join(str(s) for s in range(args.moments)))
            total = {"passed": 0, "failed": 0, "skipped": 0}
            start = time.perf_counter()
            for run in range(runs):
                counts = pytest_run(GROUPS[group], group_env, args.failures / f"{group}-{run + 1}.txt")
                total = {k: total[k] + counts[k] for k in total}
                print(f"{group} run {run + 1}/{runs}: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped", flush=True)
            results[group] = {**total, "runs": runs, "bar_met": total["failed"] == 0 and total["passed"] > 0, "seconds": round(time.perf_counter() - start)}
    finally:
        for b in burners:
            b.kill()
    print(f"with {args.burners} CPU-burning processes beside them:")
    for group, r in results.items():
        print(
            f"  {group}: {r['passed']} passed, {r['failed']} failed, {r['skipped']} skipped over {r['runs']} run(s) "
            f"in {r['seconds']} s; bar {'met' if r['bar_met'] else 'NOT met'}"
        )
    print(json.dumps({"burners": args.burners, **results}))


if __name__ == "__main__":
    main()
