"""Evaluation cost: eval tokens/s of the sweep, and what the splice costs per SAE.

Bar: the splice costs at most one extra forward pass per SAE over the eval tokens.
Runs the packaged SmolLM2 on the first sequences of the eval corpus with N random ReLU SAEs of
width 4608 at resid_post layer 15, times a plain forward pass over the same tokens, and reports
per-SAE cost / plain-pass cost (ratio to the bar of 1 pass; encode/decode and metrics are the
small remainder). The last line is one JSON object.

    python benchmarks/evaluate.py [--tokens 2048] [--saes 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from token_journey.data.corpus import read_sequences, row_mask, special_ids
from token_journey.eval.evaluate import evaluate_saes
from token_journey.lm import load_prepared
from token_journey.sae.base import SAESpec
from token_journey.sae.registry import build_sae

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--saes", type=int, default=2)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    lm = load_prepared(REPO / "models/base/smollm2-135m", device="cpu")
    ids = read_sequences(REPO / "data/corpus/offline/eval.parquet").input_ids
    ids = ids[: max(1, args.tokens // ids.shape[1])]
    rows = row_mask(ids, special_ids(lm.tokenizer), 1)
    d = lm.model.config.hidden_size
    saes = {}
    for i in range(args.saes):
        sae = build_sae(SAESpec("relu", d, 8 * d, name=f"relu-{i}"))
        sae.init_weights(torch.Generator().manual_seed(i))
        saes[f"relu-{i}"] = sae.eval()
    with torch.inference_mode():
        start = time.perf_counter()
        for first in range(0, len(ids), args.batch_size):
            lm.model(input_ids=ids[first : first + args.batch_size], use_cache=False)
        plain_s = time.perf_counter() - start
    result = evaluate_saes(lm.model, ids, rows, "resid_post", args.layer, saes, args.batch_size)
    n = ids.numel()
    per_sae_s = sum(n / m["eval_tokens_per_s"] for m in result.saes.values()) / len(saes)
    ratio = per_sae_s / plain_s
    print(f"tokens {n}, SAEs {len(saes)}, threads {torch.get_num_threads()}")
    print(f"plain forward: {n / plain_s:.0f} tokens/s")
    print(f"sweep: {result.sweep['tokens_per_s']:.0f} eval tokens/s ({result.sweep['forward_passes']} passes per batch)")
    print(f"per SAE: {per_sae_s:.2f} s = {ratio:.2f} plain forward passes (bar: 1 pass + encode/decode; ratio to bar {ratio:.2f})")
    print(
        json.dumps(
            {
                "tokens": n,
                "saes": len(saes),
                "plain_tokens_per_s": n / plain_s,
                "sweep_tokens_per_s": result.sweep["tokens_per_s"],
                "per_sae_passes": ratio,
                "ratio_to_bar": ratio,
                "passes_per_batch": result.sweep["forward_passes"],
            }
        )
    )


if __name__ == "__main__":
    main()
