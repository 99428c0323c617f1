"""Feature explanations written by a local causal LM, scored by detection, and cached.

The method is EleutherAI delphi's, run offline with one local model in two roles. As explainer
it reads a feature's top activating contexts, the activating token marked `<<like this>>`, and
writes one sentence. As scorer it then reads held-out contexts one at a time, half where the
feature fires (one per activation-quantile bin, so weak activations are tested too, taken from
rows the explainer never saw and whose windows share no token with the ones it saw) and half
where the feature is zero on every shown token, and is asked whether the text contains the
described feature. Its answer is read from the next-token distribution, P(Yes) against P(No),
with no sampling, so scores are deterministic. We report accuracy and balanced accuracy of the
decision P(Yes) > 0.5 and the AUROC of P(Yes); the AUROC does not depend on the scorer's
calibration (a small model that answers Yes to everything has balanced accuracy 0.5 whatever
the explanation, yet can still rank the activating contexts above the others).

Generation is slow next to the rest of the report, so results are kept in one JSON file keyed by
the SAE's weights, the feature, the explainer model, `PROMPT_VERSION` and the sampling settings;
the model is only loaded when some feature misses the cache.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from token_journey.config.report import ExplainerConfig
from token_journey.errors import TokenJourneyError
from token_journey.layout import sha256_file, short_hash, write_json
from token_journey.report.feature_stats import RowIndex
from token_journey.report.tokens import visible

log = logging.getLogger(__name__)

PROMPT_VERSION = 1
"""Raise when a prompt or the way answers are read changes, so cached results are not reused."""

MARK_OPEN, MARK_CLOSE = "<<", ">>"
ANSWER_START = "They are"
"""The start of the explainer's answer, written for it: it keeps a small model on the question."""
YES_WORDS, NO_WORDS = ("Yes", "yes", "YES"), ("No", "no", "NO")


@dataclass
class Detection:
    """How well the explanation lets the scorer tell held-out activating contexts from silent ones."""

    accuracy: float
    balanced_accuracy: float
    auroc: float
    n_activating: int
    n_non_activating: int


@dataclass
class Explanation:
    """One feature's explanation, the model that wrote it, its detection score and the seconds it took."""

    text: str
    model: str
    detection: Detection | None
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Explanation:
        detection = data.get("detection")
        return cls(data["text"], data["model"], Detection(**detection) if detection else None, data["seconds"])


def detection_scores(p_yes: Sequence[float], activating: Sequence[bool]) -> Detection:
    """Accuracy and balanced accuracy of `P(Yes) > 0.5`, and the AUROC of P(Yes) (ties count one half)."""
    p, y = np.asarray(p_yes, dtype=np.float64), np.asarray(activating, dtype=bool)
    if len(p) != len(y) or not y.any() or y.all():
        raise TokenJourneyError("detection needs one P(Yes) per context and both activating and non-activating contexts")
    said_yes = p > 0.5
    recall, specificity = said_yes[y].mean(), (~said_yes[~y]).mean()
    pos, neg = p[y][:, None], p[~y][None, :]
    auroc = ((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size)
    return Detection(float((said_yes == y).mean()), float((recall + specificity) / 2), float(auroc), int(y.sum()), int((~y).sum()))


def context_text(tokens: np.ndarray, position: int, window: int, decode: Callable[[Sequence[int]], str], mark: bool) -> str:
    """The text of `tokens[position - window : position + window + 1]`, the token at `position` marked if `mark`.

    Pieces are decoded whole (so characters split across tokens come out joined), then newlines and
    control characters are made visible as on the report's pages, so each context is one line.
    """
    lo, hi = max(0, position - window), min(len(tokens), position + window + 1)
    if not mark:
        return visible(decode(tokens[lo:hi]))
    middle = decode(tokens[position : position + 1])
    return visible(decode(tokens[lo:position]) + MARK_OPEN + middle + MARK_CLOSE + decode(tokens[position + 1 : hi]))


def _positions(index: RowIndex, rows: Sequence[int]) -> dict[int, list[int]]:
    """Positions of `rows` grouped by sequence id."""
    out: dict[int, list[int]] = {}
    for r in rows:
        out.setdefault(int(index.sequence_id[r]), []).append(int(index.position[r]))
    return out


def heldout_rows(column: np.ndarray, index: RowIndex, shown: Sequence[int], n: int, window: int, rng: np.random.Generator) -> list[int]:
    """Up to `n` firing rows, one drawn per activation-quantile bin, none sharing a token with a shown context.

    Two windows of `window` tokens either side share no token when their centres are more than
    `2 * window` apart in the same sequence.
    """
    taken = _positions(index, shown)
    firing = [int(r) for r in np.nonzero(column > 0)[0] if all(abs(int(index.position[r]) - p) > 2 * window for p in taken.get(int(index.sequence_id[r]), []))]
    if not firing or n == 0:
        return []
    order = np.array(firing)[np.argsort(column[firing], kind="stable")]
    return [int(rng.choice(members)) for members in np.array_split(order, min(n, len(order)))]


def silent_rows(column: np.ndarray, index: RowIndex, n: int, window: int, rng: np.random.Generator) -> list[int]:
    """Up to `n` random rows whose whole window is silent: the feature is 0 on every streamed token of it."""
    out: list[int] = []
    for r in rng.permutation(np.nonzero(column == 0)[0]):
        if len(out) == n:
            break
        seq, pos = int(index.sequence_id[r]), int(index.position[r])
        rows = [index.row(seq, p) for p in range(pos - window, pos + window + 1)]
        if all(column[q] == 0 for q in rows if q >= 0):
            out.append(int(r))
    return out


def explainer_request(examples: Sequence[str], marked: Sequence[str]) -> str:
    """The explainer's instruction: the numbered marked contexts, the marked words alone, then the question.

    Listing the marked words again and asking what kind of words they are keeps a small model on
    them (asked what the excerpts "have in common", SmolLM2-135M echoed the question or the excerpts).
    """
    numbered = "\n".join(f"{i}. {text}" for i, text in enumerate(examples, 1))
    return (
        f"Excerpts of text, with the part of each where one hidden feature of a language model is most "
        f"active marked between {MARK_OPEN} and {MARK_CLOSE}:\n\n{numbered}\n\n"
        f"Marked words: {', '.join(m.strip() or repr(m) for m in marked)}\n"
        f"In a few words, what kind of words are the marked words?"
    )


def detection_request(explanation: str, text: str) -> str:
    """The scorer's question about one unmarked context."""
    return (
        f"A hidden feature of a language model fires on some words of a text. Those words: {explanation}\n\n"
        f"Text:\n{text}\n\nDoes this text contain the described feature? Answer Yes or No."
    )


class LocalLM:
    """A local causal LM used greedily: it writes explanations and reads P(Yes) for detection."""

    def __init__(self, model: Any, tokenizer: Any, name: str) -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.yes_ids, self.no_ids = answer_ids(tokenizer)

    def prompt(self, request: str) -> str:
        """`request` as the user's turn, through the tokenizer's chat template when it has one."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": request}], tokenize=False, add_generation_prompt=True)
        return f"User: {request}\nAssistant: "

    def _ids(self, text: str) -> torch.Tensor:
        device = next(self.model.parameters()).device
        return torch.tensor([self.tokenizer.encode(text, add_special_tokens=False)], device=device)

    @torch.no_grad()
    def explain(self, examples: Sequence[str], marked: Sequence[str], max_new_tokens: int) -> str:
        """`ANSWER_START` and the first sentence the model continues it with (greedy) after `explainer_request`."""
        ids = self._ids(self.prompt(explainer_request(examples, marked)) + ANSWER_START)
        eos = self.tokenizer.eos_token_id
        out = self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=eos,
            pad_token_id=eos,
            temperature=None,
            top_p=None,
            top_k=None,
        )
        text = self.tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)
        return first_sentence(ANSWER_START + text)

    @torch.no_grad()
    def yes_probabilities(self, explanation: str, texts: Sequence[str]) -> list[float]:
        """P(Yes) / (P(Yes) + P(No)) of the scorer's next token after `detection_request(explanation, text)`, per text.

        The prompt up to the context is the same for every text: it is tokenized and run once, and
        its key/value cache reused (cut back to it after each text), which gives the logits of a
        full forward pass over the same tokens a few times faster.
        """
        split = "\x00"  # stands for the context while the prompt is split around it
        head, tail = self.prompt(detection_request(explanation, split)).split(split)
        prefix = self._ids(head)
        cache = self.model(prefix, use_cache=True).cache
        out = []
        for text in texts:
            ids = self._ids(text + tail)
            logits = self.model(ids, cache=cache, use_cache=True).logits[0, -1].float()
            cache.crop(-ids.shape[1])
            log_p = torch.log_softmax(logits, dim=-1)
            yes, no = torch.logsumexp(log_p[self.yes_ids], 0), torch.logsumexp(log_p[self.no_ids], 0)
            out.append(float(torch.sigmoid(yes - no)))
        return out


def first_sentence(text: str) -> str:
    """The text up to its first line break or sentence end, whitespace collapsed."""
    line = " ".join(text.strip().split("\n")[0].split())
    end = re.search(r"[.!?](\s|$)", line)
    return line[: end.start() + 1] if end else line


def answer_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """First token ids of the spellings of Yes and of No; one token may not stand for both answers."""

    def first(words: Sequence[str]) -> list[int]:
        return sorted({tokenizer.encode(w, add_special_tokens=False)[0] for w in words})

    yes, no = first(YES_WORDS), first(NO_WORDS)
    if set(yes) & set(no):
        raise TokenJourneyError("the explainer's tokenizer starts Yes and No with the same token; choose another model")
    return yes, no


def explainer_folder(spec: str, base_model: Path) -> Path:
    """The prepared folder `report.explainer.model` names: a folder, or a `conf/model/` option prepared beside `base_model`."""
    from omegaconf import OmegaConf

    from token_journey.config import CONF_DIR

    if Path(spec).is_dir():
        return Path(spec)
    option = CONF_DIR / "model" / f"{spec}.yaml"
    if not option.is_file():
        options = ", ".join(sorted(p.stem for p in option.parent.glob("*.yaml")))
        raise TokenJourneyError(f"report.explainer.model={spec!r} is neither a folder nor a model option ({options})")
    folder = Path(base_model).parent / str(OmegaConf.load(option).name)
    if not folder.is_dir():
        raise TokenJourneyError(f"report.explainer.model={spec!r}: no prepared model at {folder}; run `python stages/prepare_model.py model={spec}`")
    return folder


def model_identity(folder: Path) -> str:
    """The prepared model's name and fingerprint (from its manifest.json), which change with its weights."""
    manifest_path = Path(folder) / "manifest.json"
    if not manifest_path.is_file():
        raise TokenJourneyError(f"no prepared model at {folder} (missing manifest.json); report.explainer.model needs a folder written by prepare_model")
    manifest = json.loads(manifest_path.read_text())
    return f"{manifest.get('name', Path(folder).name)}@{manifest.get('fingerprint') or short_hash(manifest)}"


def sae_identity(folder: Path) -> str:
    """A hash of the SAE's weights: the sha256 recorded in checksums.json, else that of every file."""
    from token_journey.sae.io import CHECKSUMS

    checksums = Path(folder) / CHECKSUMS
    if checksums.is_file():
        return short_hash(json.loads(checksums.read_text()))
    return short_hash({p.name: sha256_file(p) for p in sorted(Path(folder).iterdir()) if p.is_file()})


class ExplanationCache:
    """Past explanations in one JSON file; a missing or unreadable file is an empty cache, rewritten atomically."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.entries: dict[str, Any] = {}
        self.changed = False
        if self.path.is_file():
            try:
                self.entries = dict(json.loads(self.path.read_text())["entries"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring unreadable explanation cache %s (%s); it will be rewritten", self.path, exc)

    def get(self, key: str) -> Explanation | None:
        return Explanation.from_json(self.entries[key]) if key in self.entries else None

    def put(self, key: str, explanation: Explanation) -> None:
        self.entries[key] = explanation.to_json()
        self.changed = True

    def save(self) -> None:
        """Write the file (temporary sibling, then rename) when something was added."""
        if self.changed:
            write_json(self.path, {"prompt_version": PROMPT_VERSION, "entries": self.entries})
            self.changed = False


class Explainer:
    """The configured explainer: its identity and cache now, its model loaded on the first cache miss."""

    def __init__(self, cfg: ExplainerConfig, base_model: Path, device: str, load: Callable[[Path, str], LocalLM] | None = None) -> None:
        self.cfg, self.device = cfg, device
        self.folder = explainer_folder(cfg.model, base_model)
        self.identity = model_identity(self.folder)
        self.cache = ExplanationCache(cfg.cache)
        self._load = load or _load_local
        self._lm: LocalLM | None = None

    @property
    def lm(self) -> LocalLM:
        if self._lm is None:
            log.info("loading explainer model %s", self.folder)
            self._lm = self._load(self.folder, self.device)
        return self._lm

    def key(self, sae: str, feature: int, settings: dict[str, Any]) -> str:
        """The cache key of one feature's result."""
        return f"sae={sae} feature={feature} model={self.identity} prompt=v{PROMPT_VERSION} settings={short_hash(settings)}"

    def explain(
        self,
        sae: str,
        feature: int,
        column: np.ndarray,
        top_rows: Sequence[int],
        index: RowIndex,
        sequences: dict[int, np.ndarray],
        decode: Callable[[Sequence[int]], str],
        seed: int,
    ) -> Explanation:
        """One feature's explanation and detection score, from the cache when it holds them (see the module docstring).

        `column` `[rows]` holds the feature's activation on every streamed row, `top_rows` its
        top rows best first; `sequences` maps sequence ids to their token ids; `decode` turns
        token ids of the studied model into text.
        """
        cfg = self.cfg
        shown = [int(r) for r in top_rows[: cfg.n_examples]]
        settings = {
            "n_examples": cfg.n_examples,
            "n_heldout": cfg.n_heldout,
            "window": cfg.window,
            "max_new_tokens": cfg.max_new_tokens,
            "seed": seed,
            "rows": len(column),
            "shown": shown,
        }
        key = self.key(sae, feature, settings)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        start = time.perf_counter()

        def text(row: int, mark: bool) -> str:
            tokens = sequences[int(index.sequence_id[row])]
            return context_text(tokens, int(index.position[row]), cfg.window, decode, mark)

        def token(row: int) -> str:
            position = int(index.position[row])
            return visible(decode(sequences[int(index.sequence_id[row])][position : position + 1]))

        explanation = self.lm.explain([text(r, True) for r in shown], [token(r) for r in shown], cfg.max_new_tokens)
        rng = np.random.default_rng([seed, feature])
        active = heldout_rows(column, index, shown, cfg.n_heldout, cfg.window, rng)
        silent = silent_rows(column, index, len(active), cfg.window, rng)
        detection = None
        if active and silent:
            p_yes = self.lm.yes_probabilities(explanation, [text(r, False) for r in active + silent])
            detection = detection_scores(p_yes, [True] * len(active) + [False] * len(silent))
        result = Explanation(explanation, self.identity, detection, time.perf_counter() - start)
        self.cache.put(key, result)
        return result


def _load_local(folder: Path, device: str) -> LocalLM:
    from token_journey.lm import load_prepared

    loaded = load_prepared(folder, device=device)
    return LocalLM(loaded.model, loaded.tokenizer, model_identity(folder))
