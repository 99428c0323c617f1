"""Benchmark the SAEBench-style metrics (absorption, sparse probing, decoder geometry) of SAEs.

Usage:
  python benchmarks/saebench.py SAE_FOLDER [SAE_FOLDER ...] [--acts data/activations/smollm2-135m]
      [--base models/base/smollm2-135m] [--site resid_post --layer 15] [--split eval] [--rows 8192]

Runs exactly what the evaluate stage runs (`token_journey.eval.evaluate.saebench_metrics`) on the
first `--rows` harvested rows of the split, and prints per SAE the headline figures and seconds,
with the ratio of those seconds to the issue's budget of 20 s per SAE on the CPU at the default
run's size. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from token_journey.eval.evaluate import saebench_metrics, saebench_rows
from token_journey.lm import final_norm_gain, load_prepared
from token_journey.sae.io import load_sae

BUDGET_S = 20.0
HEADLINE = (
    "absorption_rate",
    "split_fraction",
    "probe_llm",
    "probe_sae_top_1",
    "probe_sae_top_2",
    "probe_sae_top_5",
    "decoder_max_cos",
    "duplicate_fraction",
    "token_max_cos",
    "token_feature_fraction",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("saes", nargs="+", type=Path)
    parser.add_argument("--acts", type=Path, default=Path("data/activations/smollm2-135m"))
    parser.add_argument("--base", type=Path, default=Path("models/base/smollm2-135m"))
    parser.add_argument("--site", default="resid_post")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--split", default="eval")
    parser.add_argument("--rows", type=int, default=8192)
    args = parser.parse_args()

    loaded = load_prepared(args.base, device="cpu")
    w_u = loaded.model.get_output_embeddings().weight.detach().float().cpu() * final_norm_gain(loaded.model)
    start = time.perf_counter()
    x, token_ids = saebench_rows(args.acts, args.site, args.layer, args.rows, args.split)
    read_s = time.perf_counter() - start
    saes = {folder.name: load_sae(folder).eval() for folder in args.saes}
    results = saebench_metrics(saes, x, token_ids, loaded.tokenizer, w_u)
    print(f"{len(x):,} {args.split} rows of {args.site} layer {args.layer} read in {read_s:.1f} s ({len(set(token_ids.tolist())):,} distinct tokens)")
    summary = {}
    for name, m in results.items():
        seconds = m["saebench_seconds"]
        letters = m["saebench"]["first_letter"]
        print(f"{name}: " + "  ".join(f"{key} {m[key]:.3f}" if m[key] is not None else f"{key} n/a" for key in HEADLINE))
        print(
            f"  first-letter task: {letters['word_tokens']} word tokens, {len(letters['letters'])} letters scored, "
            f"raw probe accuracy {letters['probe_accuracy']:.3f}"
        )
        for task, acc in m["saebench"]["probing"].items():
            print(
                f"  probe {task}: "
                + ("too few rows" if acc is None else "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in acc.items()))
            )
        print(f"  {seconds:.1f} s (ratio to the {BUDGET_S:.0f} s budget: {seconds / BUDGET_S:.2f})")
        summary[name] = {**{key: m[key] for key in HEADLINE}, "seconds": seconds, "budget_ratio": seconds / BUDGET_S}
    print(json.dumps({"rows": len(x), "split": args.split, "layer": args.layer, "threads": torch.get_num_threads(), "saes": summary}))


if __name__ == "__main__":
    main()
