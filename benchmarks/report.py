"""Report cost: wall time and size of the report for the default pipeline's shape.

Bars: renders in under 30 s and is smaller than 20 MB. Uses the pipeline's own
inputs (params.yaml paths) when SAEs and eval activations exist there; otherwise builds a
synthetic stand-in of the same shape in a temp folder: the packaged SmolLM2 (d_model 576),
`--tokens` eval rows of random activations, `--saes` random JumpReLU SAEs of width `--width` (4608) at
resid_post layer 15, and metrics JSONs. The last line is one JSON object.

    python benchmarks/report.py [--tokens 20000] [--saes 1] [--synthetic] [--width 4608]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from token_journey.config import build
from token_journey.config.report import ReportConfig
from token_journey.layout import Layout, activations_folder, metrics_file, sae_folder, sha256_file
from token_journey.report import build_report
from token_journey.sae.base import SAESpec
from token_journey.sae.io import find_saes, save_sae
from token_journey.sae.registry import build_sae

REPO = Path(__file__).resolve().parents[1]
BAR_S, BAR_MB = 30.0, 20.0


def synthetic(root: Path, base_model: Path, tokens: int, n_saes: int, width: int = 4608, layer: int = 15) -> Layout:
    """Eval corpus, eval activation shards, SAEs and metrics of the default shape under `root`."""
    context, d_model = 128, 576
    rng = np.random.default_rng(0)
    n_seq = -(-tokens // (context - 1))
    ids = rng.integers(100, 40000, size=(n_seq, context)).astype(np.int32)
    (root / "corpus").mkdir(parents=True)
    seq_ids = pa.array(np.arange(n_seq), pa.int64())
    pq.write_table(
        pa.table({"sequence_id": seq_ids, "doc_id": seq_ids, "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), context)}),
        root / "corpus/eval.parquet",
    )
    seq, pos = (a.reshape(-1)[:tokens] for a in np.meshgrid(np.arange(n_seq), np.arange(1, context), indexing="ij"))
    x = rng.normal(size=(len(seq), d_model)).astype(np.float32)
    layout = Layout(
        base_model=base_model,
        corpus=root / "corpus",
        activations=root / "acts",
        saes=root / "saes",
        metrics=root / "metrics",
        html=root / "html",
        journey=root / "journey",
        summary=root / "summary.md",
        timings=root / "timings",
    )
    folder = activations_folder(layout.activations, "resid_post", layer, "eval")
    folder.mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "activation": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d_model),
                "token_id": pa.array(ids[seq, pos]),
                "sequence_id": pa.array(seq, pa.int64()),
                "position": pa.array(pos.astype(np.int32)),
            }
        ),
        folder / "shard-00000.parquet",
    )
    (folder / "manifest.json").write_text(
        json.dumps(
            {
                "rows": len(x),
                "d_model": d_model,
                "dtype": "float32",
                "shards": [{"file": "shard-00000.parquet", "rows": len(x), "sha256": sha256_file(folder / "shard-00000.parquet")}],
            }
        )
    )
    metrics = {}
    for i in range(n_saes):
        sae = build_sae(SAESpec("jumprelu", d_model, width, name=f"jumprelu-{i}", site="resid_post", layer=layer))
        sae.init_weights(torch.Generator().manual_seed(i))
        with torch.no_grad():
            sae.threshold.fill_(2.5)  # about 30 of 4608 latents fire on a random row, like a trained SAE
        save_sae(sae, sae_folder(layout.saes, "resid_post", layer, f"jumprelu-{i}"))
        metrics[f"jumprelu-{i}"] = {
            "architecture": "jumprelu",
            "width": width,
            "l0": 50.0 + i,
            "fvu": 0.2,
            "delta_loss": 0.1,
            "loss_recovered": 0.9,
            "dead_fraction": 0.01,
            "dense_fraction": 0.0,
            "error_by_position": [0.2] * context,
        }
    metrics_file(layout.metrics, "resid_post", layer).parent.mkdir(parents=True)
    metrics_file(layout.metrics, "resid_post", layer).write_text(json.dumps({"saes": metrics}))
    return layout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--saes", type=int, default=1)
    parser.add_argument("--synthetic", action="store_true")
    parser.add_argument("--width", type=int, default=4608, help="SAE width of the synthetic stand-in")
    args = parser.parse_args()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    cfg = build(ReportConfig, params["report"], "report")
    pipeline = Layout.from_config({k: REPO / v for k, v in params["paths"].items()})
    real = not args.synthetic and any(find_saes(pipeline.saes, params["site"], layer) for layer in params["harvest"]["layers"])
    with tempfile.TemporaryDirectory() as tmp:
        paths = (
            replace(pipeline, html=Path(tmp) / "html", summary=Path(tmp) / "summary.md")
            if real
            else synthetic(Path(tmp), pipeline.base_model, args.tokens, args.saes, args.width)
        )
        cpu = time.process_time()
        result = build_report(cfg, paths, seed=0)
        cpu = time.process_time() - cpu  # CPU seconds of all threads: less sensitive to other jobs
        size_mb = sum(f.stat().st_size for f in Path(paths.html).rglob("*") if f.is_file()) / 1e6
    print(f"inputs: {'pipeline' if real else 'synthetic'}, {len(result.entries)} SAEs, threads {torch.get_num_threads()}")
    print(f"render: {result.seconds:.1f} s wall, {cpu:.1f} s CPU (bar {BAR_S:.0f} s, ratio {result.seconds / BAR_S:.2f})")
    print(f"size: {size_mb:.2f} MB in {len(result.files)} files (bar {BAR_MB:.0f} MB, ratio {size_mb / BAR_MB:.2f})")
    print(
        json.dumps(
            {
                "inputs": "pipeline" if real else "synthetic",
                "saes": len(result.entries),
                "seconds": result.seconds,
                "cpu_seconds": cpu,
                "ratio_time": result.seconds / BAR_S,
                "megabytes": size_mb,
                "ratio_size": size_mb / BAR_MB,
            }
        )
    )


if __name__ == "__main__":
    main()
