"""Feature statistics of one SAE, streamed over eval-split activation rows in bounded memory.

Pass 1 (`feature_stats`) encodes every row once and keeps, for all features, the firing count,
the activation sum and maximum, and the top-k activating rows via a top-k merge: the running
`[k, d_sae]` best values are concatenated with the batch's own top-k and cut back to k, so
memory never grows with the number of rows. Pass 2 (`selected_activations`) re-encodes the
same rows and keeps only the columns of the features that get a dashboard, `[rows, n_selected]`,
which is what quantile sampling, histograms and the tinting of neighbouring tokens need, and
feeds every row to the page's token search index.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from token_journey.data.shards import activation_tensor
from token_journey.errors import TokenJourneyError
from token_journey.report.search import TokenFeatureIndex

META_COLUMNS = ("token_id", "sequence_id", "position")


@dataclass
class RowIndex:
    """Where each streamed row came from, `[rows]` each, and a (sequence, position) -> row lookup."""

    token_id: np.ndarray
    sequence_id: np.ndarray
    position: np.ndarray

    def __post_init__(self) -> None:
        self._rows = {(int(s), int(p)): r for r, (s, p) in enumerate(zip(self.sequence_id, self.position))}

    def __len__(self) -> int:
        return len(self.token_id)

    def row(self, sequence_id: int, position: int) -> int:
        """The row of a token, or -1 when that token was not streamed (excluded or past the budget)."""
        return self._rows.get((int(sequence_id), int(position)), -1)


@dataclass
class FeatureStats:
    """Per-feature statistics over `rows` eval tokens; `top_values`/`top_rows` are `[k, d_sae]`, best first."""

    rows: int
    counts: torch.Tensor
    sums: torch.Tensor
    maxima: torch.Tensor
    top_values: torch.Tensor
    top_rows: torch.Tensor
    index: RowIndex
    latents: list[torch.Tensor] | None = None
    """Pass 1's latents per batch, kept when the whole stream fits `keep_bytes`: pass 2 then reads them
    instead of encoding every row again (the report's short streams); None otherwise."""

    @property
    def density(self) -> torch.Tensor:
        """Fraction of rows on which each feature fires, `[d_sae]`."""
        return self.counts.double() / max(self.rows, 1)


def batches(tables: Iterable[pa.Table], batch_size: int, max_tokens: int, dtype: str = "float32") -> Iterator[tuple[torch.Tensor, dict[str, np.ndarray]]]:
    """(float32 activations `[B, d_model]`, metadata columns `[B]`) in file order, at most `max_tokens` rows.

    `dtype` is the manifest's storage dtype (bfloat16 is stored as raw bits; `activation_tensor` undoes it).
    """
    left = max_tokens
    for table in tables:
        if left <= 0:
            return
        table = table.slice(0, left)
        left -= table.num_rows
        for start in range(0, table.num_rows, batch_size):
            part = table.slice(start, batch_size)
            meta = {name: part.column(name).to_numpy() for name in META_COLUMNS}
            yield activation_tensor(part.column("activation"), dtype), meta


def merge_topk(values: torch.Tensor, rows: torch.Tensor, new_values: torch.Tensor, new_rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the k largest of two `[*, d_sae]` candidate sets per column, with their row ids."""
    all_values = torch.cat([values, new_values])
    all_rows = torch.cat([rows, new_rows])
    best = all_values.topk(min(k, all_values.shape[0]), dim=0)
    return best.values, all_rows.gather(0, best.indices)


@torch.no_grad()
def feature_stats(
    sae: torch.nn.Module,
    open_tables: Callable[[], Iterable[pa.Table]],
    dtype: str,
    batch_size: int,
    max_tokens: int,
    top_k: int,
    device: torch.device | str = "cpu",
    keep_bytes: int = 0,
) -> FeatureStats:
    """Pass 1: counts, sums, maxima and top-k rows of every feature (see the module docstring).

    `open_tables()` yields the eval shards as Arrow tables (e.g. `Activations.iter_tables`);
    `dtype` is their storage dtype. While the latents seen so far take at most `keep_bytes`, they are
    kept for pass 2 (`FeatureStats.latents`); a longer stream keeps none.
    """
    d_sae = int(sae.W_dec.shape[0])
    counts = torch.zeros(d_sae, dtype=torch.long)
    sums = torch.zeros(d_sae, dtype=torch.float64)
    top_values = torch.empty(0, d_sae)
    top_rows = torch.empty(0, d_sae, dtype=torch.long)
    meta_parts: dict[str, list[np.ndarray]] = {name: [] for name in META_COLUMNS}
    offset = 0
    kept: list[torch.Tensor] | None = []
    for x, meta in tqdm(batches(open_tables(), batch_size, max_tokens, dtype), desc="feature stats", unit="batch"):
        f = sae.encode(x.to(device)).float().cpu()  # [B, d_sae]
        if kept is not None:
            if (offset + f.shape[0]) * d_sae * 4 <= keep_bytes:
                kept.append(f)
            else:
                kept = None
        counts += torch.count_nonzero(f, dim=0)  # the evaluate stage's firing rule (f != 0)
        sums += f.sum(0).double()  # float32 within a batch, float64 across batches
        batch_top = f.topk(min(top_k, f.shape[0]), dim=0)
        top_values, top_rows = merge_topk(top_values, top_rows, batch_top.values, batch_top.indices + offset, top_k)
        for name in META_COLUMNS:
            meta_parts[name].append(meta[name])
        offset += f.shape[0]
    if offset == 0:
        raise TokenJourneyError("no eval activation rows to compute feature statistics from; run the harvest stage")
    index = RowIndex(**{name: np.concatenate(parts) for name, parts in meta_parts.items()})
    maxima = top_values[0].clamp_min(0.0)  # the best of the top-k is the maximum
    return FeatureStats(offset, counts, sums.float(), maxima, top_values, top_rows, index, kept)


def select_features(
    stats: FeatureStats, n_index: int, n_random: int, n_strongest: int, n_dense: int, dense_threshold: float, seed: int
) -> list[tuple[int, str]]:
    """The features that get a dashboard, each with its group, in page order; no feature twice.

    Readable ones lead, all drawn from the alive features that are not dense (firing density at
    most `dense_threshold`): "by index", the `n_index` lowest ids (the same ids on every SAE, so
    pages compare); "random", `n_random` drawn with `seed`; "strongest", the `n_strongest` with
    the largest maximum activation. Dense latents fire on so many tokens that their contexts
    rarely say what they mean, so the `n_dense` densest come last, as "dense".
    """
    alive = stats.counts > 0
    dense = alive & (stats.density > dense_threshold)
    readable = torch.nonzero(alive & ~dense).flatten()
    by_index = [int(i) for i in readable[:n_index]]
    rest = readable[n_index:]
    strongest = [int(i) for i in rest[stats.maxima[rest].argsort(descending=True, stable=True)][:n_strongest]]
    pool = np.array(sorted(set(rest.tolist()) - set(strongest)), dtype=np.int64)
    rng = np.random.default_rng(seed)
    sample = sorted(int(i) for i in rng.choice(pool, size=min(n_random, len(pool)), replace=False)) if len(pool) else []
    dense_ids = torch.nonzero(dense).flatten()
    densest = [int(i) for i in dense_ids[stats.counts[dense_ids].argsort(descending=True, stable=True)][:n_dense]]
    groups = (("by index", by_index), ("random", sample), ("strongest", strongest), ("dense", densest))
    return [(feature, group) for group, features in groups for feature in features]


@torch.no_grad()
def selected_activations(
    sae: torch.nn.Module,
    open_tables: Callable[[], Iterable[pa.Table]],
    dtype: str,
    features: list[int],
    batch_size: int,
    max_tokens: int,
    device: torch.device | str = "cpu",
    search: TokenFeatureIndex | None = None,
    latents: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Pass 2: the activations of `features` on every streamed row, `[rows, len(features)]`.

    Every row's full activations also go to `search`, the page's token index, which needs the
    features' densities from pass 1 to leave the dense ones out. `latents` (pass 1's, batch by
    batch, when it kept them) stand in for encoding the same rows again.
    """
    columns = torch.tensor(features, dtype=torch.long)
    parts = []
    for i, (x, meta) in enumerate(tqdm(batches(open_tables(), batch_size, max_tokens, dtype), desc="selected features", unit="batch")):
        f = latents[i] if latents is not None else sae.encode(x.to(device)).float().cpu()
        parts.append(f[:, columns])
        if search is not None:
            search.add(meta["token_id"], f)
    return torch.cat(parts) if parts else torch.empty(0, len(features))
