"""The token search of a feature page: for each token, the features that fire hardest on it.

Built at report time while the eval rows stream through the SAE, embedded in the page as JSON,
and looked up by a few lines of script, so "which features fire on ' Paris'" works from disk
with no server. Memory stays bounded: whenever the buffered pairs pass a limit, only the best
`k` (feature, maximum activation) pairs of each token are kept. That cut is exact: a pair that is not among a token's
best k now can only fall further behind, because the others' maxima never decrease.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import numpy as np
import torch

from token_journey.report.tokens import TokenStrings


class TokenFeatureIndex:
    """For every token id seen, the `k` features with the largest activation on it, and that maximum.

    `excluded` features (the dense ones, listed apart on the page) are left out, so they do not
    crowd out the features that say something about the token.
    """

    def __init__(self, d_sae: int, k: int, excluded: Iterable[int] = (), buffer: int = 1 << 20) -> None:
        self.d_sae, self.k, self.buffer = d_sae, k, buffer
        self.keep = torch.ones(d_sae, dtype=torch.bool)
        self.keep[torch.tensor(sorted(excluded), dtype=torch.long)] = False
        self.keys = np.empty(0, dtype=np.int64)  # token_id * d_sae + feature
        self.values = np.empty(0, dtype=np.float32)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_size = 0

    def add(self, token_ids: np.ndarray, acts: torch.Tensor) -> None:
        """Fold in one batch: `token_ids` `[B]` and the SAE's activations `acts` `[B, d_sae]`.

        Pairs wait in a buffer of at most `buffer` (token, feature) pairs before they are cut
        back, which sorts the kept pairs once per buffer instead of once per batch.
        """
        rows, features = torch.nonzero((acts > 0) & self.keep, as_tuple=True)
        keys = np.asarray(token_ids, dtype=np.int64)[rows.numpy()] * self.d_sae + features.numpy()
        self._pending.append((keys, acts[rows, features].float().numpy()))
        self._pending_size += len(keys)
        if self._pending_size >= self.buffer:
            self._flush()

    def _flush(self) -> None:
        """Cut the kept and the buffered pairs together down to each token's best `k`."""
        if not self._pending:
            return
        keys = np.concatenate([self.keys, *(k for k, _ in self._pending)])
        values = np.concatenate([self.values, *(v for _, v in self._pending)])
        self._pending, self._pending_size = [], 0
        unique, where = np.unique(keys, return_inverse=True)  # sorted by token, then feature
        best = np.full(len(unique), -np.inf, dtype=np.float32)
        np.maximum.at(best, where, values)
        tokens = unique // self.d_sae
        order = np.lexsort((-best, tokens))  # per token, largest first; ties keep the lower feature id
        unique, best, tokens = unique[order], best[order], tokens[order]
        starts = np.flatnonzero(np.r_[True, tokens[1:] != tokens[:-1]])
        rank = np.arange(len(tokens)) - np.repeat(starts, np.diff(np.r_[starts, len(tokens)]))
        self.keys, self.values = unique[rank < self.k], best[rank < self.k]

    def result(self) -> dict[int, list[tuple[int, float]]]:
        """token id -> [(feature, maximum activation on that token)], largest first."""
        self._flush()
        out: dict[int, list[tuple[int, float]]] = {}
        for key, value in zip(self.keys.tolist(), self.values.tolist()):
            out.setdefault(key // self.d_sae, []).append((key % self.d_sae, value))
        return out


def search_json(index: TokenFeatureIndex, strings: TokenStrings) -> str:
    """The page's search index: `{token string: [[feature, max activation], ...]}` as JSON.

    Token ids that display alike (rare: byte tokens shown as their bytes never clash with text)
    are merged, keeping each feature's larger maximum. Values keep 3 significant digits, which
    is all the page shows and keeps the page small. `<` is escaped so that no token can close
    the `<script type="application/json">` element it is embedded in.
    """
    merged: dict[str, dict[int, float]] = {}
    for token_id, pairs in index.result().items():
        best = merged.setdefault(strings(token_id), {})
        for feature, value in pairs:
            best[feature] = max(best.get(feature, 0.0), value)
    table = {text: [[f, float(f"{v:.3g}")] for f, v in sorted(best.items(), key=lambda p: (-p[1], p[0]))[: index.k]] for text, best in sorted(merged.items())}
    return json.dumps(table, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
