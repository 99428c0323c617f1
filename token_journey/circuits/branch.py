"""The circuits branch's data: a slice of the pipeline's corpus, harvested at mlp_in and mlp_out of every layer.

The branch has its own token budget (`circuits.train_tokens`, `circuits.eval_tokens`), separate from
the SAEs': harvesting two sites at all 30 layers costs 60 times one site's disk, so it reads the first
sequences of the pipeline's tokenized corpus rather than all of it, with the harvest's own rules
(special tokens, first positions, norm outliers) unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pyarrow.parquet as pq

from token_journey.config.circuits import CircuitsConfig
from token_journey.config.harvest import HarvestConfig
from token_journey.errors import TokenJourneyError
from token_journey.layout import corpus_file, temp_sibling

SITES = ("mlp_in", "mlp_out")


def slice_corpus(source: Path, target: Path, budgets: dict[str, int]) -> dict[str, int]:
    """Write the first sequences of each split of `source` holding at least `budgets[split]` tokens to `target`.

    Returns the tokens (sequence slots, padding included) written per split. The files keep the
    source's schema and metadata; each is written to a temporary name, then renamed.
    """
    written = {}
    for split, budget in budgets.items():
        path = corpus_file(source, split)
        if not path.is_file():
            raise TokenJourneyError(f"no corpus split at {path}; run `dvc repro collect_corpus` first")
        table = pq.read_table(path)
        width = table.schema.field("input_ids").type.list_size
        rows = min(table.num_rows, math.ceil(budget / width))
        out = corpus_file(target, split)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_sibling(out)
        pq.write_table(table.slice(0, rows), tmp)
        tmp.replace(out)
        written[split] = rows * width
    return written


def harvest_config(harvest: HarvestConfig, circuits: CircuitsConfig) -> HarvestConfig:
    """The pipeline's harvest settings, at the branch's layers and both MLP sites, stored in its dtype."""
    return dataclasses.replace(harvest, layers=circuits.layers, sites=SITES, dtype=circuits.dtype)
