"""Harvest throughput against a bare forward pass, and bytes per token on disk.

Bare forward: the same prepared model, dtype, batch size and sequences, run up to the deepest
harvested layer and stopped there (`capture` of that one layer's output; no rows selected,
nothing copied or written). Harvest: `harvest_split` over the same sequences, all configured
sites and layers, writing shards and the manifest (sha256 included). Bar: ratio >= 0.9.

    python benchmarks/harvest.py [n_sequences] [hydra overrides...]
Prints figures, then ONE JSON object on the last line.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from token_journey.config import build, compose
from token_journey.config.harvest import HarvestConfig
from token_journey.data.harvest import harvest_split
from token_journey.distributed import select_device
from token_journey.lm import load_prepared
from token_journey.sites import capture

REPO = Path(__file__).resolve().parents[1]


def bare_forward(lm, ids: torch.Tensor, batch_size: int, deepest: int, device: torch.device) -> float:
    """Seconds for a forward pass to `deepest` over `ids` [n_seq, seq], batch by batch."""
    start = time.perf_counter()
    for lo in range(0, ids.shape[0], batch_size):
        capture(lm.model, ids[lo : lo + batch_size].to(device), [("resid_post", deepest)])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    n_seq = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 48
    overrides = [a for a in sys.argv[1:] if "=" in a]
    cfg = compose(overrides)
    hcfg = build(HarvestConfig, cfg["harvest"], "harvest")
    device = select_device(cfg["device"])
    lm = load_prepared(REPO / cfg["paths"]["base_model"], dtype=hcfg.forward_dtype, device=str(device))
    corpus = REPO / cfg["paths"]["corpus"] / "train.parquet"
    table = pq.read_table(corpus).slice(0, n_seq)
    ids = torch.from_numpy(table.column("input_ids").combine_chunks().flatten().to_numpy().astype("int64")).view(n_seq, -1)
    tokens = ids.numel()
    deepest = max(hcfg.layers)
    bare_forward(lm, ids[: hcfg.batch_size], hcfg.batch_size, deepest, device)  # warm-up
    bare_s, harvest_s, disk = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        sub = Path(tmp) / "train.parquet"
        pq.write_table(table, sub)
        for rep in range(2):  # interleaved, so a load spike from other processes hits both
            bare_s.append(bare_forward(lm, ids, hcfg.batch_size, deepest, device))
            out = Path(tmp) / f"acts{rep}"
            start = time.perf_counter()
            manifests = harvest_split(lm, hcfg, sub, out, "train", device)
            harvest_s.append(time.perf_counter() - start)
        for (site, layer), m in manifests.items():
            size = sum((out / site / f"layer_{layer}" / s["file"]).stat().st_size for s in m["shards"])
            disk[f"{site}@{layer}"] = {"bytes_per_token": size / tokens, "bytes_per_row": size / m["rows"], "rows": m["rows"]}
    bare_tps, harvest_tps = tokens / min(bare_s), tokens / min(harvest_s)
    ratio = harvest_tps / bare_tps
    print(
        f"model {lm.name} on {device}, forward {hcfg.forward_dtype}, storage {hcfg.dtype}, batch {hcfg.batch_size}, "
        f"{n_seq} sequences = {tokens} tokens, layers {list(hcfg.layers)} x sites {list(hcfg.sites)}"
    )
    print(f"bare forward to layer {deepest}: {bare_tps:,.0f} tokens/s (runs: {[round(s, 2) for s in bare_s]} s)")
    print(f"harvest (all points, written):  {harvest_tps:,.0f} tokens/s (runs: {[round(s, 2) for s in harvest_s]} s)")
    print(f"ratio harvest / bare = {ratio:.3f} (bar >= 0.9: {'PASS' if ratio >= 0.9 else 'FAIL'})")
    for key, d in disk.items():
        print(f"{key}: {d['bytes_per_token']:.0f} bytes per corpus token on disk ({d['bytes_per_row']:.0f} per stored row)")
    print(
        json.dumps(
            {
                "benchmark": "harvest",
                "device": str(device),
                "tokens": tokens,
                "bare_tokens_per_s": bare_tps,
                "harvest_tokens_per_s": harvest_tps,
                "ratio": ratio,
                "bar": 0.9,
                "pass": ratio >= 0.9,
                "disk": disk,
            }
        )
    )


if __name__ == "__main__":
    main()
