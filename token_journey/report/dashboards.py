"""Feature dashboards: top and quantile-sampled contexts rebuilt from the corpus, histograms, logit lens.

Contexts come from the eval split's token ids (`<paths.corpus>/eval.parquet`), looked up by
each activation row's (sequence_id, position); every shown token is tinted by the feature's
activation at that token when that token was itself streamed (excluded positions such as
BOS stay untinted). Tokens that each hold part of a character are shown as one cell with that
character, tinted by the largest of their activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from markupsafe import Markup

from token_journey.config.report import ReportConfig
from token_journey.errors import TokenJourneyError
from token_journey.layout import corpus_file
from token_journey.report import plots
from token_journey.report.explain import Explanation
from token_journey.report.feature_stats import FeatureStats, RowIndex
from token_journey.report.labels import feature_label, frequent_tokens
from token_journey.report.tokens import MAX_JOIN, TokenStrings, promoted_and_suppressed


@dataclass
class Cell:
    """One shown token, or the few tokens whose bytes form its characters together (see
    `TokenStrings.spans`): its text, the feature's activation on each of its tokens (None where a
    token was not streamed), the tint 0..1 of the largest, and whether it holds the row's token."""

    text: str
    values: list[float | None]
    tint: float
    anchor: bool = False

    @property
    def title(self) -> str:
        """The hover text: the activation, or one per token when the cell joins several."""
        shown = ["not streamed" if v is None else f"{v:.4g}" for v in self.values]
        if len(shown) == 1:
            return shown[0] if self.values[0] is None else f"activation {shown[0]}"
        return f"{len(shown)} tokens forming these characters, activations " + ", ".join(shown)


@dataclass
class Context:
    """A window of tokens around the row `row` whose activation is `value`."""

    value: float
    where: str
    cells: list[Cell]
    label: str = ""


@dataclass
class Dashboard:
    """Everything one feature's section of an SAE page shows."""

    feature: int
    kind: str
    density: float
    mean: float
    maximum: float
    top: list[Context]
    quantiles: list[Context]
    histogram: Markup
    promoted: list[tuple[str, float]] = field(default_factory=list)
    suppressed: list[tuple[str, float]] = field(default_factory=list)
    label: str = ""
    """One line from the data, no language model (`labels.feature_label`)."""
    explanation: Explanation | None = None
    """An explanation written by a local language model and its detection score (`report.explainer`), if on."""

    @property
    def dense(self) -> bool:
        """Whether this is one of the dense latents listed apart."""
        return self.kind == "dense"


def read_eval_tokens(corpus: Path, sequence_ids: np.ndarray) -> dict[int, np.ndarray]:
    """Token ids `[context_size]` of the given eval sequences (`<corpus>/eval.parquet`), keyed by sequence_id."""
    from token_journey.data.corpus import read_sequences

    split = read_sequences(corpus_file(corpus, "eval"))
    wanted = set(np.unique(sequence_ids).tolist())
    return {int(s): split.input_ids[i].numpy() for i, s in enumerate(split.sequence_ids.tolist()) if s in wanted}


class ContextBuilder:
    """Rebuilds token windows around activation rows and checks them against the rows' token ids."""

    def __init__(self, index: RowIndex, sequences: dict[int, np.ndarray], strings: TokenStrings, window: int) -> None:
        self.index, self.sequences, self.strings, self.window = index, sequences, strings, window

    def build(self, row: int, column: torch.Tensor | None, value: float, scale: float, label: str = "") -> Context:
        """The context of `row`; `column` `[rows]` holds the feature's activations for the tint (or None)."""
        seq, pos = int(self.index.sequence_id[row]), int(self.index.position[row])
        if seq not in self.sequences:
            raise TokenJourneyError(f"eval sequence {seq} is not in the corpus eval split; rerun harvest for this corpus")
        tokens = self.sequences[seq]
        if int(tokens[pos]) != int(self.index.token_id[row]):
            raise TokenJourneyError(
                f"corpus token at sequence {seq} position {pos} differs from the activation row's; "
                "the activations were harvested from another corpus: rerun harvest"
            )
        first, stop = max(0, pos - self.window), min(len(tokens), pos + self.window + 1)
        # Read a few tokens past each edge so a character cut by the window is still joined whole.
        lead = max(0, first - MAX_JOIN)
        cells = []
        for start, end, text in self.strings.spans(tokens[lead : min(len(tokens), stop + MAX_JOIN)].tolist()):
            start, end = start + lead, end + lead
            if end <= first or start >= stop:
                continue
            values = []
            for p in range(start, end):
                r = self.index.row(seq, p)
                values.append(float(column[r]) if (column is not None and r >= 0) else (value if p == pos else None))
            best = max((v for v in values if v is not None), default=None)
            tint = 0.0 if best is None or scale <= 0 else min(max(best / scale, 0.0), 1.0)
            cells.append(Cell(text, values, tint, start <= pos < end))
        return Context(value, f"seq {seq} pos {pos}", cells, label)


def quantile_rows(column: torch.Tensor, n: int, rng: np.random.Generator) -> list[tuple[int, str]]:
    """One random firing row per activation quantile bin, lowest bin first, with a label."""
    firing = torch.nonzero(column > 0).flatten().numpy()
    if len(firing) == 0 or n == 0:
        return []
    order = firing[np.argsort(column[firing].numpy(), kind="stable")]
    bins = np.array_split(order, min(n, len(order)))
    picks = []
    for i, members in enumerate(bins):
        lo, hi = 100 * i // len(bins), 100 * (i + 1) // len(bins)
        picks.append((int(rng.choice(members)), f"quantile {lo}-{hi}%"))
    return picks


def build_dashboards(
    stats: FeatureStats,
    features: list[tuple[int, str]],
    acts: torch.Tensor,
    contexts: ContextBuilder,
    model: Any,
    directions: torch.Tensor,
    cfg: ReportConfig,
    seed: int,
) -> list[Dashboard]:
    """One dashboard per (feature, kind); `acts` `[rows, len(features)]` from `selected_activations`,
    `directions` `[len(features), d_model]` the features' decoder rows."""
    lens = promoted_and_suppressed(model, directions, contexts.strings, cfg.n_logit_tokens) if model is not None else []
    out = []
    for j, (feature, kind) in enumerate(features):
        column, scale = acts[:, j], float(stats.maxima[feature])
        top = [contexts.build(int(r), column, float(v), scale) for v, r in zip(stats.top_values[:, feature], stats.top_rows[:, feature]) if v > 0]
        rng = np.random.default_rng([seed, feature])
        quantiles = [contexts.build(r, column, float(column[r]), scale, label) for r, label in quantile_rows(column, cfg.n_quantile_contexts, rng)]
        firing = column[column > 0].numpy()
        counts, edges = np.histogram(firing, bins=cfg.hist_bins) if len(firing) else (np.zeros(1), np.array([0.0, 1.0]))
        hist = plots.histogram(edges.tolist(), counts.tolist(), "activation (firing tokens)", f"feature {feature}")
        count = int(stats.counts[feature])
        promoted, suppressed = lens[j] if lens else ([], [])
        top_tokens = stats.index.token_id[stats.top_rows[:, feature][stats.top_values[:, feature] > 0].numpy()]
        label = feature_label(contexts.strings.many(frequent_tokens(top_tokens.tolist())), [t for t, _ in promoted])
        out.append(
            Dashboard(
                feature,
                kind,
                float(stats.density[feature]),
                float(stats.sums[feature]) / max(count, 1),
                scale,
                top,
                quantiles,
                hist,
                promoted,
                suppressed,
                label,
            )
        )
    return out


def indexed_features(counts: torch.Tensor, limit: int) -> list[int]:
    """The alive features `counts > 0` the table lists, in id order: all of them when at most `limit`,
    else the `limit` that fire most often (ties to the lower id)."""
    alive = torch.nonzero(counts > 0).flatten()
    if len(alive) > limit:
        order = torch.argsort(-counts[alive].double(), stable=True)  # alive is ascending: ties keep the lower id
        alive = torch.sort(alive[order[:limit]]).values
    return alive.tolist()


def feature_index(stats: FeatureStats, contexts: ContextBuilder, shown: set[int], dense_threshold: float, limit: int, width: int = 4) -> list[dict[str, Any]]:
    """A compact row for each alive feature (density, mean, max, best context), at most `limit` of them
    (`indexed_features`), so any listed id is linkable; dense latents are flagged."""
    narrow = ContextBuilder(contexts.index, contexts.sequences, contexts.strings, width)
    listed = indexed_features(stats.counts, limit)
    # The listed features' numbers as Python lists at once: indexing [d_sae] tensors per row costs more than the rows.
    ids = torch.tensor(listed, dtype=torch.long)
    density, sums, counts = stats.density[ids].tolist(), stats.sums[ids].tolist(), stats.counts[ids].tolist()
    maxima, best_rows, best_values = stats.maxima[ids].tolist(), stats.top_rows[0, ids].tolist(), stats.top_values[0, ids].tolist()
    rows = []
    for n, feature in enumerate(listed):
        ctx = narrow.build(int(best_rows[n]), None, float(best_values[n]), float(best_values[n]))
        anchor = next(i for i, c in enumerate(ctx.cells) if c.anchor)
        rows.append(
            {
                "feature": feature,
                "shown": feature in shown,
                "density": float(density[n]),
                "dense": float(density[n]) > dense_threshold,
                "mean": float(sums[n]) / int(counts[n]),
                "max": float(maxima[n]),
                "before": "".join(c.text for c in ctx.cells[:anchor]),
                "token": ctx.cells[anchor].text,
                "after": "".join(c.text for c in ctx.cells[anchor + 1 :]),
            }
        )
    return rows
