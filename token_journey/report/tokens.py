"""Token strings made safe to show, and the logit-lens view of a feature's decoder row.

Corpus text is untrusted. Jinja2 autoescaping turns `<`, `>`, `&` and quotes into entities;
here we additionally make invisible characters visible (newline as a return arrow, other
control characters as `\\xNN`), so a token never changes the layout or hides from the reader.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from token_journey.lm import final_norm_gain

_VISIBLE = {"\n": "\u21b5", "\r": "\u240d", "\t": "\u21e5"}


def visible(text: str) -> str:
    """`text` with newlines/tabs as arrows and other control or format characters as `\\xNN` / `\\uNNNN`."""
    out = []
    for char in text:
        if char in _VISIBLE:
            out.append(_VISIBLE[char])
        elif unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn") and char != " ":
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)


class TokenStrings:
    """Decodes token ids one at a time (so ` the` keeps its space) with a cache."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        token_id = int(token_id)
        if token_id not in self._cache:
            self._cache[token_id] = visible(self.tokenizer.decode([token_id]))
        return self._cache[token_id]

    def many(self, ids: Iterable[int]) -> list[str]:
        return [self(i) for i in ids]


def logit_effects(model: Any, directions: torch.Tensor, chunk: int = 256) -> Iterable[torch.Tensor]:
    """Direct effect of each direction `[n, d_model]` on the logits, yielded in chunks `[chunk, vocab]`.

    Approximation, stated once: logits ~= (d * g) @ W_U.T, where g is the final norm's gain.
    We ignore the RMS denominator of the final norm (a positive per-token scale, so the
    ranking of tokens for one feature is unchanged) and the rest of the residual stream the
    direction is added to; Gemma 2's final logit soft-capping is monotonic and also ignored.
    """
    W_U = model.get_output_embeddings().weight.detach().float().cpu()  # [vocab, d_model]
    gain = final_norm_gain(model)
    for start in range(0, directions.shape[0], chunk):
        yield (directions[start : start + chunk].float() * gain) @ W_U.T


def promoted_and_suppressed(
    model: Any, directions: torch.Tensor, strings: TokenStrings, n: int
) -> list[tuple[list[tuple[str, float]], list[tuple[str, float]]]]:
    """Per direction `[n_dirs, d_model]`: the `n` most promoted and most suppressed (token, logit) pairs."""
    result = []
    for logits in logit_effects(model, directions):
        top = logits.topk(n, dim=1)
        bottom = logits.topk(n, dim=1, largest=False)
        for row in range(logits.shape[0]):
            result.append((_pairs(strings, top.indices[row], top.values[row]),
                           _pairs(strings, bottom.indices[row], bottom.values[row])))
    return result


def _pairs(strings: TokenStrings, ids: Sequence[int] | torch.Tensor, values: torch.Tensor) -> list[tuple[str, float]]:
    return [(strings(int(i)), float(v)) for i, v in zip(ids, values)]
