"""Report inputs in the contract's on-disk shapes, small enough to build a whole report in seconds.

A tiny Llama folder whose tokenizer has hostile added tokens, an eval corpus split (with an
accent, an emoji and a euro sign that the byte-level tokenizer splits into byte tokens), eval
activation shards, a ReLU SAE of the real package saved with `save_sae`, and metrics JSONs.
`tests/conftest.py` builds them, and the report from them, once per test session.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from token_journey.layout import Layout, sha256_file

HOSTILE = ["<script>alert(1)</script>", "\"q'uote", "a&amp;b", "bell\x07esc\x1b"]
# Each of its three non-ASCII characters is split over 2 to 4 byte tokens by the tiny tokenizer.
MULTIBYTE = "café 😀 €"
D_MODEL, D_SAE, CONTEXT, N_SEQ = 32, 48, 16, 10
# Features 0..19 are sparse (a few % of tokens), 20..39 mostly dense, 40.. dead.
SPARSE, DEAD = 20, 40


def make_sae(seed: int = 0):
    """A ReLU SAE of the real package with random weights; the bias sets each feature's density (see SPARSE, DEAD)."""
    from token_journey.sae.base import SAESpec
    from token_journey.sae.registry import build_sae

    sae = build_sae(SAESpec("relu", D_MODEL, D_SAE, name="relu-1", model="tiny", site="resid_post", layer=1))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_MODEL, D_SAE, generator=g) / D_MODEL**0.5)
        sae.W_dec.copy_(torch.randn(D_SAE, D_MODEL, generator=g) / D_MODEL**0.5)
        bias = -torch.rand(D_SAE, generator=g)
        bias[:SPARSE] = -2.0
        bias[DEAD:] = -1e4
        sae.b_enc.copy_(bias)
    return sae.eval()


def _tables(x: np.ndarray, meta: dict[str, np.ndarray], chunk: int) -> list[pa.Table]:
    """Activation rows as shard-shaped tables of `chunk` rows."""
    out = []
    for start in range(0, len(x), chunk):
        part = x[start : start + chunk]
        act = pa.FixedSizeListArray.from_arrays(pa.array(part.reshape(-1)), D_MODEL)
        out.append(
            pa.table(
                {
                    "activation": act,
                    "token_id": pa.array(meta["token_id"][start : start + chunk], pa.int32()),
                    "sequence_id": pa.array(meta["sequence_id"][start : start + chunk], pa.int64()),
                    "position": pa.array(meta["position"][start : start + chunk], pa.int32()),
                }
            )
        )
    return out


def write_inputs(root: Path) -> Layout:
    """A complete set of report inputs under `root` (see the module docstring)."""
    from support.tiny import save_tiny, tiny_tokenizer

    base = save_tiny("llama", root / "base")
    tok = tiny_tokenizer()
    tok.add_tokens(HOSTILE)
    tok.save_pretrained(base)
    (base / "manifest.json").write_text(json.dumps({"name": "tiny<b>", "source": "local", "dtype": "float32", "n_params": 1234, "n_layers": 3}))
    hostile_ids = tok.convert_tokens_to_ids(HOSTILE)
    multibyte = tok.encode(MULTIBYTE)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 300, size=(N_SEQ, CONTEXT)).astype(np.int32)
    ids[:, 0] = 0  # BOS: never an activation row
    ids[:, 5] = hostile_ids[0]
    ids[::2, 7 : 7 + len(hostile_ids)] = hostile_ids
    ids[1::2, 1 : 1 + len(multibyte)] = multibyte
    corpus = root / "corpus"
    corpus.mkdir()
    seq_ids = np.arange(100, 100 + N_SEQ)
    pq.write_table(
        pa.table(
            {
                "sequence_id": pa.array(seq_ids, pa.int64()),
                "doc_id": pa.array(seq_ids, pa.int64()),
                "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), CONTEXT),
            }
        ),
        corpus / "eval.parquet",
    )
    (corpus / "stats.json").write_text(json.dumps({"eval_tokens": int(ids.size), "source": "fixture"}))
    seq, pos = np.meshgrid(np.arange(N_SEQ), np.arange(1, CONTEXT), indexing="ij")
    seq, pos = seq.reshape(-1), pos.reshape(-1)
    x = rng.normal(size=(len(seq), D_MODEL)).astype(np.float32)
    meta = {"token_id": ids[seq, pos], "sequence_id": seq_ids[seq], "position": pos}
    layer_dir = root / "acts" / "resid_post" / "layer_1" / "eval"
    layer_dir.mkdir(parents=True)
    shards = []
    for i, table in enumerate(_tables(x, meta, 64)):
        pq.write_table(table, layer_dir / f"shard-{i:05d}.parquet")
        shards.append({"file": f"shard-{i:05d}.parquet", "rows": table.num_rows, "sha256": sha256_file(layer_dir / f"shard-{i:05d}.parquet")})
    (layer_dir / "manifest.json").write_text(
        json.dumps(
            {
                "rows": len(x),
                "d_model": D_MODEL,
                "dtype": "float32",
                "site": "resid_post",
                "layer": 1,
                "shards": shards,
                "excluded_counts": {"special": N_SEQ, "first_positions": 0, "max_norm": 3},
            }
        )
    )
    metrics = root / "metrics" / "resid_post"
    metrics.mkdir(parents=True)
    for layer in (1, 2):
        saes = {
            f"relu-{k}": {
                "architecture": "relu",
                "width": D_SAE,
                "l0": 10.0 * k + layer,
                "fvu": 0.5 / k,
                "delta_loss": 0.3 / k + 0.01 * layer,
                "loss_recovered": 0.9,
                "dead_fraction": 0.1,
                "dense_fraction": 0.0,
                "train_tokens_per_s": 1e5,
                "error_by_position": [None] + [0.2 + 0.01 * p for p in range(1, CONTEXT)],
            }
            for k in (1, 2)
        }
        if layer == 2:
            saes["<img src=x onerror=alert(1)>|x"] = {"l0": 3.0, "fvu": 0.9, "delta_loss": 1.0}
        (metrics / f"layer_{layer}.json").write_text(json.dumps({"model": "tiny", "site": "resid_post", "layer": layer, "saes": saes}))
    from token_journey.sae.io import save_sae

    save_sae(make_sae(), root / "saes" / "resid_post" / "layer_1" / "relu-1", {"tokens_per_s": 5e4, "tokens": 1000})
    return Layout(
        base_model=base,
        corpus=corpus,
        activations=root / "acts",
        saes=root / "saes",
        metrics=root / "metrics",
        html=root / "html",
        journey=root / "journey",
        circuits_data=root / "circuits_data",
        circuits=root / "circuits",
        graphs=root / "graphs",
        summary=root / "summary.md",
        timings=root / "timings",
    )


def all_rows(paths: Layout) -> tuple[torch.Tensor, pa.Table]:
    """Every eval activation row of the fixture as one tensor `[rows, D_MODEL]`, and the table it came from."""
    folder = paths.activations / "resid_post/layer_1/eval"
    table = pa.concat_tables(pq.read_table(f) for f in sorted(folder.glob("*.parquet")))
    x = torch.from_numpy(table.column("activation").combine_chunks().flatten().to_numpy().reshape(-1, D_MODEL).copy())
    return x, table
