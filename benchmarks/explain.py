"""LLM feature explanations on a real SAE: the explanations, their detection scores, seconds per feature.

Streams `--max-tokens` eval rows through the SAE as the report does, draws `--features` alive
features (seeded, denser than 10% skipped: the report's dense latents are the least readable),
and explains each with `report.explainer` settings from conf/ (explainer model `--explainer`,
SmolLM2-135M-Instruct by default). The cache is a fresh file unless `--cache` is given, so the
seconds are those of generation and scoring. Prints one line per feature, then the seconds per
feature and their ratio to the feature-statistics pass of the page, and one JSON line.

    python benchmarks/explain.py --sae models/saes/smollm2-135m/resid_post/layer_15/<name> [--features 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from token_journey.config import build, compose
from token_journey.config.report import ReportConfig
from token_journey.data.shards import open_activations
from token_journey.lm import load_prepared
from token_journey.report.dashboards import read_eval_tokens
from token_journey.report.explain import Explainer, sae_identity
from token_journey.report.feature_stats import feature_stats, selected_activations
from token_journey.sae.io import load_sae

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sae", type=Path, required=True, help="an SAE folder (cfg.json, sae.safetensors)")
    parser.add_argument("--activations", type=Path, default=REPO / "data/activations/smollm2-135m")
    parser.add_argument("--corpus", type=Path, default=REPO / "data/corpus/offline")
    parser.add_argument("--base-model", type=Path, default=REPO / "models/base/smollm2-135m")
    parser.add_argument("--explainer", default="", help="prepared folder or conf/model option (default: --base-model)")
    parser.add_argument("--features", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=20000)
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    cfg = build(ReportConfig, compose()["report"], "report")
    cache = args.cache or Path(tempfile.mkdtemp(prefix="explain-bench-")) / "explanations.json"
    ecfg = dataclasses.replace(cfg.explainer, model=args.explainer or str(args.base_model), cache=str(cache))
    sae = load_sae(args.sae).eval()
    spec = sae.cfg
    acts = open_activations(args.activations, spec.site, spec.layer, split="eval")
    start = time.perf_counter()
    stats = feature_stats(sae, acts.iter_tables, acts.dtype, cfg.batch_size, args.max_tokens, cfg.top_k)
    stats_s = time.perf_counter() - start
    density = stats.density.numpy()
    readable = np.nonzero((density > 0) & (density <= 0.1))[0]
    features = sorted(np.random.default_rng(args.seed).choice(readable, size=min(args.features, len(readable)), replace=False).tolist())
    chosen = selected_activations(sae, acts.iter_tables, acts.dtype, features, cfg.batch_size, args.max_tokens)
    studied = load_prepared(args.base_model, device="cpu")
    sequences = read_eval_tokens(args.corpus, stats.index.sequence_id)

    def decode(ids) -> str:
        return studied.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    explainer = Explainer(ecfg, args.base_model, "cpu")
    start = time.perf_counter()
    _ = explainer.lm
    load_s = time.perf_counter() - start
    rows = []
    for j, feature in enumerate(features):
        top = [int(r) for v, r in zip(stats.top_values[:, feature], stats.top_rows[:, feature]) if v > 0]
        e = explainer.explain(sae_identity(args.sae), feature, chosen[:, j].numpy(), top, stats.index, sequences, decode, args.seed)
        d = e.detection
        score = (
            (f"accuracy {d.accuracy:.2f}, balanced {d.balanced_accuracy:.2f}, AUROC {d.auroc:.2f} ({d.n_activating}+{d.n_non_activating})")
            if d
            else "no held-out contexts"
        )
        print(f"feature {feature} (density {density[feature]:.3%}): {e.text!r}: {score}; {e.seconds:.1f} s", flush=True)
        rows.append(
            {
                "feature": feature,
                "density": float(density[feature]),
                "explanation": e.text,
                "balanced_accuracy": d.balanced_accuracy if d else None,
                "auroc": d.auroc if d else None,
                "seconds": round(e.seconds, 2),
            }
        )
    explainer.cache.save()
    per_feature = float(np.mean([r["seconds"] for r in rows]))
    scored = [r for r in rows if r["auroc"] is not None]
    print(
        f"{per_feature:.1f} s per feature (+{load_s:.1f} s to load the explainer once) = "
        f"{per_feature / stats_s:.2f} x the page's feature-statistics pass ({stats_s:.1f} s over "
        f"{stats.rows:,} tokens); mean balanced accuracy "
        f"{np.mean([r['balanced_accuracy'] for r in scored]):.2f}, mean AUROC {np.mean([r['auroc'] for r in scored]):.2f}"
    )
    print(
        json.dumps(
            {
                "sae": str(args.sae),
                "explainer": explainer.identity,
                "rows_streamed": stats.rows,
                "seconds_per_feature": round(per_feature, 2),
                "load_s": round(load_s, 2),
                "ratio_to_stats_pass": round(per_feature / stats_s, 2),
                "features": rows,
                "settings": dataclasses.asdict(ecfg),
            }
        )
    )


if __name__ == "__main__":
    main()
