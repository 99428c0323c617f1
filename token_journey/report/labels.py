"""One-line feature labels computed from the data, with no language model.

A label reads "fires on ' Paris', ' France'; promotes ' city', ' capital'": the tokens the
feature most often fires on among its top activating contexts, then the tokens its decoder
row promotes most (the logit lens of `tokens.promoted_and_suppressed`). It is a first guess
for the reader, not an explanation: the contexts on the page are the evidence.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

LABEL_TOKENS = 3
"""Tokens named on each side of a label."""


def frequent_tokens(token_ids: Sequence[int], n: int = LABEL_TOKENS) -> list[int]:
    """The `n` most frequent ids, most frequent first; ties go to the id seen first.

    `token_ids` are the tokens of the top activating contexts, best context first, so a tie
    goes to the token of the stronger activation.
    """
    counts = Counter(int(t) for t in token_ids)
    first = {}
    for i, t in enumerate(token_ids):
        first.setdefault(int(t), i)
    return sorted(counts, key=lambda t: (-counts[t], first[t]))[:n]


def feature_label(fires_on: Sequence[str], promotes: Sequence[str], n: int = LABEL_TOKENS) -> str:
    """ "fires on 'a', 'b'; promotes 'c', 'd'" from display strings; a part without tokens is left out."""
    parts = []
    if fires_on:
        parts.append("fires on " + ", ".join(f"'{t}'" for t in fires_on[:n]))
    if promotes:
        parts.append("promotes " + ", ".join(f"'{t}'" for t in promotes[:n]))
    return "; ".join(parts)
