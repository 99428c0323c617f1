"""Benchmark `sae.target_l0`: does JumpReLU land on the L0 asked for, at no cost in FVU?

Usage:
  python benchmarks/target_l0.py [ACTS] [--targets 16,32,64] [--tokens 250000,1000000] [--set key=value]
ACTS is what benchmarks/train_sae.py reads (default: the pipeline's SmolLM2 harvest, layer 15). For each
budget and target it trains `sae=jumprelu-l0 sae.target_l0=T` and reports its held-out L0 and FVU. Then
it tunes the raw coefficient of plain `sae=jumprelu` by hand's method, automated: starting from the
coefficient the controller ended at, a secant step in log L0 against log coefficient per run, until two
runs bracket the controller's held-out L0 (or one lands within 3% of it); the reference FVU at exactly
that L0 is interpolated between the bracketing runs, linearly in log L0. Bars (issue 15): held-out L0
within 10% of T, and FVU no worse than the coefficient-tuned reference at the same L0. The last line is
one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import torch

from token_journey.config import build, compose
from token_journey.config.sae import SAEConfig
from token_journey.eval.metrics import sae_reconstruction
from token_journey.sae.train import DataStats, new_sae, train

try:
    from train_sae import add_data_arguments, in_memory, load  # run as a script: benchmarks/ is on sys.path
except ImportError:
    from benchmarks.train_sae import add_data_arguments, in_memory, load

L0_TOLERANCE = 0.10
MAX_REFERENCE_RUNS = 5


def run(preset: str, overrides: list[str], tokens: int, x_train: torch.Tensor, x_eval: torch.Tensor, stats: DataStats) -> dict:
    """Train one JumpReLU on the first rows of the fixed shuffle; its held-out figures."""
    cfg = build(SAEConfig, compose([f"sae={preset}", *overrides])["sae"], "sae")
    cfg = dataclasses.replace(cfg, train_tokens=tokens, checkpoint_every=0)
    batches = in_memory(x_train, cfg.batch_size, 0)
    sae = new_sae(cfg, x_train.shape[1], stats, 0, next(batches(0)))
    info = train(sae, batches, stats, cfg)
    m = sae_reconstruction(sae, x_eval)
    return {
        "fvu": round(m["fvu"], 4),
        "l0": round(m["l0"], 2),
        "dead_fraction": round(m["dead_fraction"], 4),
        "coefficient": info["final_sparsity_coefficient"],
        "threshold_scale": info.get("threshold_scale"),
    }


def reference(l0: float, start: float, tokens: int, extra: list[str], *data) -> dict:
    """Coefficient-tuned plain JumpReLU runs around held-out L0 `l0`; the FVU interpolated at that L0."""
    runs: list[dict] = []
    coefficient = start
    for _ in range(MAX_REFERENCE_RUNS):
        r = run("jumprelu", [f"sae.sparsity_coefficient={coefficient:.6g}", *extra], tokens, *data)
        r["coefficient"] = coefficient
        runs.append(r)
        print(f"    reference coefficient {coefficient:.3g}: L0 {r['l0']}  FVU {r['fvu']}  dead {r['dead_fraction']}", flush=True)
        below = [x for x in runs if x["l0"] <= l0]
        above = [x for x in runs if x["l0"] > l0]
        if abs(r["l0"] / l0 - 1) < 0.03 or (below and above):
            break
        if len(runs) == 1:
            slope = -1.0  # L0 falls roughly as 1 / coefficient at these budgets
        else:
            a, b = runs[-2], runs[-1]
            slope = (math.log(b["l0"]) - math.log(a["l0"])) / (math.log(b["coefficient"]) - math.log(a["coefficient"]))
            slope = min(slope, -0.2)
        coefficient = coefficient * math.exp((math.log(l0) - math.log(r["l0"])) / slope)
    below = sorted((x for x in runs if x["l0"] <= l0), key=lambda x: -x["l0"])
    above = sorted((x for x in runs if x["l0"] > l0), key=lambda x: x["l0"])
    if below and above:
        lo, hi = below[0], above[0]
        t = (math.log(l0) - math.log(lo["l0"])) / (math.log(hi["l0"]) - math.log(lo["l0"]))
        fvu = lo["fvu"] + t * (hi["fvu"] - lo["fvu"])
    else:
        nearest = min(runs, key=lambda x: abs(math.log(x["l0"] / l0)))
        fvu = nearest["fvu"]
    return {"fvu_at_l0": round(fvu, 4), "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(ap)
    ap.add_argument("--targets", default="16,32,64")
    ap.add_argument("--tokens", default="250000,1000000")
    ap.add_argument("--set", action="append", default=[], help="override for both runs, e.g. --set sae.width=9216")
    ap.add_argument("--controller-set", action="append", default=[], help="override for the target_l0 run only")
    ap.add_argument("--no-reference", action="store_true", help="train the target_l0 runs only (no bars checked)")
    args = ap.parse_args()
    x_train, x_eval = load(args.acts, args.eval, args.site, args.layer, args.max_norm_ratio)
    stats = DataStats.from_rows(x_train)
    print(f"data: {x_train.shape[0]:,} train rows, {x_eval.shape[0]:,} held-out rows")
    results = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        for target in (float(t) for t in args.targets.split(",")):
            ours = run("jumprelu-l0", [f"sae.target_l0={target:g}", *args.set, *args.controller_set], tokens, x_train, x_eval, stats)
            print(
                f"{tokens:,} tokens, target {target:g}: L0 {ours['l0']}  FVU {ours['fvu']}  dead {ours['dead_fraction']}"
                f"  (coefficient ended at {ours['coefficient']:.3g}, thresholds x{ours['threshold_scale']:.3f})",
                flush=True,
            )
            if args.no_reference:
                results.append({"tokens": tokens, "target_l0": target, **ours})
                continue
            ref = reference(ours["l0"], ours["coefficient"], tokens, args.set, x_train, x_eval, stats)
            l0_met = abs(ours["l0"] / target - 1) <= L0_TOLERANCE
            fvu_met = ours["fvu"] <= ref["fvu_at_l0"]
            print(
                f"  -> L0 {'within' if l0_met else 'OUTSIDE'} {L0_TOLERANCE:.0%} of {target:g}; FVU {ours['fvu']} vs "
                f"coefficient-tuned {ref['fvu_at_l0']} at L0 {ours['l0']}: {'met' if fvu_met else 'NOT met'}",
                flush=True,
            )
            results.append({"tokens": tokens, "target_l0": target, **ours, "reference": ref, "l0_bar_met": l0_met, "fvu_bar_met": fvu_met})
    print(
        json.dumps(
            {"benchmark": "target_l0", "results": results, "all_met": None if args.no_reference else all(r["l0_bar_met"] and r["fvu_bar_met"] for r in results)}
        )
    )


if __name__ == "__main__":
    main()
