"""Token strings made safe to show, and the logit-lens view of a feature's decoder row.

Corpus text is untrusted. Jinja2 autoescaping turns `<`, `>`, `&` and quotes into entities;
here we additionally make invisible characters visible (newline as a return arrow, other
control characters as `\\xNN`), so a token never changes the layout or hides from the reader.
"""

from __future__ import annotations

import re
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


# A character is at most 4 bytes, but one token may end a character and start the next, so a
# run of byte tokens can be longer; past this many tokens we stop trying to join.
MAX_JOIN = 8
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def byte_level_alphabet() -> dict[str, int]:
    """The printable stand-in character of each byte in byte-level BPE (GPT-2's table), inverted.

    Bytes that are printable Latin-1 stand for themselves; the other 68 are mapped, in order,
    to the characters from U+0100 on. Token strings of byte-level tokenizers are written in
    these stand-ins, which is how we recover a token's raw bytes.
    """
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    table = {chr(b): b for b in kept}
    shifted = (b for b in range(256) if b not in table.values())
    for n, b in enumerate(shifted):
        table[chr(256 + n)] = b
    return table


_BYTE_LEVEL = byte_level_alphabet()


class TokenStrings:
    """Display strings of token ids, decoded one at a time (so ` the` keeps its space), cached.

    A token that holds only part of a multi-byte character decodes to U+FFFD on its own; it is
    shown as its bytes (`\\xe2\\x82`) instead, and `spans` joins such tokens with the ones that
    complete their characters, so "café 😀" reads as itself in a context.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, bytes | None]] = {}

    def _lookup(self, token_id: int) -> tuple[str, bytes | None]:
        """(display string, raw bytes when the token alone is not valid UTF-8, else None)."""
        token_id = int(token_id)
        if token_id not in self._cache:
            text = self.tokenizer.decode([token_id])
            raw = self.token_bytes(token_id) if "\ufffd" in text else None
            if raw is not None:
                text = raw.decode("utf-8", errors="backslashreplace")
            self._cache[token_id] = (visible(text), raw)
        return self._cache[token_id]

    def token_bytes(self, token_id: int) -> bytes | None:
        """The raw bytes of a byte-fallback (`<0xE2>`) or byte-level BPE token, else None."""
        piece = self.tokenizer.convert_ids_to_tokens(int(token_id))
        if not isinstance(piece, str):
            return None
        match = _BYTE_TOKEN.fullmatch(piece)
        if match:
            return bytes([int(match.group(1), 16)])
        if piece and all(char in _BYTE_LEVEL for char in piece):
            return bytes(_BYTE_LEVEL[char] for char in piece)
        return None

    def __call__(self, token_id: int) -> str:
        return self._lookup(token_id)[0]

    def many(self, ids: Iterable[int]) -> list[str]:
        return [self(i) for i in ids]

    def spans(self, ids: Sequence[int]) -> list[tuple[int, int, str]]:
        """`ids` cut into display spans `(start, stop, text)`: one token each, except that a token
        holding part of a character is joined with the following tokens that complete it."""
        out, i = [], 0
        while i < len(ids):
            text, raw = self._lookup(ids[i])
            stop = i + 1
            if raw is not None:
                joined = raw
                for j in range(i + 1, min(len(ids), i + MAX_JOIN)):
                    part = self._lookup(ids[j])[1]
                    joined += part if part is not None else self.tokenizer.decode([int(ids[j])]).encode("utf-8")
                    try:
                        text, stop = visible(joined.decode("utf-8")), j + 1
                        break
                    except UnicodeDecodeError:
                        continue
            out.append((i, stop, text))
            i = stop
        return out


def logit_effects(model: Any, directions: torch.Tensor, chunk: int = 256) -> Iterable[torch.Tensor]:
    """Direct effect of each direction `[n, d_model]` on the logits, yielded in chunks `[chunk, vocab]` (float32).

    Approximation, stated once: logits ~= (d * g) @ W_U.T, where g is the final norm's gain.
    We ignore the RMS denominator of the final norm (a positive per-token scale, so the
    ranking of tokens for one feature is unchanged) and the rest of the residual stream the
    direction is added to; Gemma 2's final logit soft-capping is monotonic and also ignored.
    The product runs in the unembedding's own dtype, as the model computes its logits: a float32
    copy of a bfloat16 W_U would cost 1 GB per page at a 128k vocabulary, for no change a page shows.
    """
    W_U = model.get_output_embeddings().weight.detach()  # [vocab, d_model], the model's own tensor
    gain = final_norm_gain(model).to(W_U.device)
    for start in range(0, directions.shape[0], chunk):
        scaled = (directions[start : start + chunk].to(W_U.device).float() * gain).to(W_U.dtype)
        yield (scaled @ W_U.T).float().cpu()


def promoted_and_suppressed(
    model: Any, directions: torch.Tensor, strings: TokenStrings, n: int
) -> list[tuple[list[tuple[str, float]], list[tuple[str, float]]]]:
    """Per direction `[n_dirs, d_model]`: the `n` most promoted and most suppressed (token, logit) pairs."""
    result = []
    for logits in logit_effects(model, directions):
        top = logits.topk(n, dim=1)
        bottom = logits.topk(n, dim=1, largest=False)
        for row in range(logits.shape[0]):
            result.append((_pairs(strings, top.indices[row], top.values[row]), _pairs(strings, bottom.indices[row], bottom.values[row])))
    return result


def _pairs(strings: TokenStrings, ids: Sequence[int] | torch.Tensor, values: torch.Tensor) -> list[tuple[str, float]]:
    return [(strings(int(i)), float(v)) for i, v in zip(ids, values)]
