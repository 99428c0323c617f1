"""Everything the journey shows for one text, gathered from the recomputed pass.

`run_journey` = recompute (with checks) + top next tokens + logit lens + SAE features + a seeded
continuation + parameter/FLOP sums. Renderers (terminal, HTML) read only the `Journey` record.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from token_journey.config.journey import GenerationConfig, JourneyConfig
from token_journey.errors import TokenJourneyError
from token_journey.journey import flops
from token_journey.journey.attribution import Attribution, attribute, token_id
from token_journey.journey.forward import Pass, recompute, token_strings
from token_journey.journey.generate import Generated, generate
from token_journey.journey.hooks import capture_modules
from token_journey.journey.lens import LensRow, logit_lens
from token_journey.journey.sae_hits import FeatureHits, load_saes, sae_features
from token_journey.journey.spec import SUPPORTED_TYPES, text_config
from token_journey.journey.steer import Steering, run_steering


class UnsupportedArchitecture(TokenJourneyError):
    """The recomputation does not know this architecture; `captured` holds what the hooks saw."""

    def __init__(self, message: str, captured: list[tuple[str, torch.Tensor]]) -> None:
        super().__init__(message)
        self.captured = captured


@dataclass
class Journey:
    """One text's journey through one model, ready to render."""

    model_name: str
    text: str
    run: Pass
    next_tokens: list[tuple[int, float]]
    """The most likely next tokens after the text: (id, probability)."""
    lens: list[LensRow]
    features: list[FeatureHits]
    features_note: str
    generated: Generated
    vocab: dict[int, str]
    """Text of every token id the renderings mention."""
    model_params: int
    """Parameter count of the model itself (each tied tensor once), for comparison with the steps' sum."""
    generation: GenerationConfig
    seed: int
    attribution: Attribution | None = None
    """The prediction's logit decomposed through each resid_post SAE (None without SAEs)."""
    steering: Steering | None = None
    """The pass re-run with SAE latents set (None without edits)."""

    @property
    def per_layer(self) -> dict[int | None, dict[str, int]]:
        return flops.per_layer(self.run.steps)

    @property
    def totals(self) -> dict[str, int]:
        return flops.totals(self.run.steps)

    @property
    def continuation(self) -> str:
        return "".join(self.vocab[i] for i in self.generated.token_ids)

    @property
    def steered_continuation(self) -> str:
        return "".join(self.vocab[i] for i in self.steering.generated.token_ids) if self.steering else ""

    def timeline(self, position: int) -> list[TimelineRow]:
        """The path of the token at `position` through the layers: its strongest SAE latents and the logit lens."""
        rows = []
        for lens in self.lens:
            hits = [(h.sae_name, [(f, a, h.link(f)) for f, a in h.top[position]]) for h in self.features if h.layer == lens.layer]
            rows.append(TimelineRow(lens.layer, hits, lens.top[position]))
        return rows


@dataclass(frozen=True)
class TimelineRow:
    """One layer of a token's path: its strongest latents per SAE, and what the logit lens reads there."""

    layer: int
    features: list[tuple[str, list[tuple[int, float, str]]]]
    """Per SAE at this layer: (SAE name, [(latent, activation, dashboard link), ...])."""
    lens: list[tuple[int, float]]
    """The logit lens's top tokens at this layer and position: (id, probability)."""


def slug(model_name: str, text: str) -> str:
    """File name stem for a journey page: model name plus the first words of the text."""
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40].strip("-") or "text"
    return f"{model_name}-{words}"


def _check_supported(model: nn.Module, tokenizer: Any, text: str) -> None:
    model_type = getattr(text_config(model), "model_type", "?")
    if model_type in SUPPORTED_TYPES:
        return
    ids = tokenizer(text, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    captured = capture_modules(model, ids) if ids.shape[1] else []
    raise UnsupportedArchitecture(
        f"architecture {model_type!r} is not supported by the journey recomputation (supported: "
        f"{', '.join(SUPPORTED_TYPES)}); shown above: the {len(captured)} module outputs the hooks captured",
        captured,
    )


def run_journey(
    model: nn.Module,
    tokenizer: Any,
    cfg: JourneyConfig,
    seed: int = 0,
    model_name: str = "model",
    saes_root: Path | None = None,
    progress: bool = True,
    report_root: str = "",
    sae_names: Sequence[str] | None = None,
    transcoders: tuple[Path, str] | None = None,
) -> Journey:
    """Follow `cfg.text` through `model`: every step recomputed and checked, then lens, features, sampling.

    `report_root`: the report folder relative to where the journey page is written, for feature
    links (`Layout.journey_to_report`). `sae_names`: the SAE folders shown (`shown_saes`: the run's `sae`
    and `journey.saes`); None shows every SAE under `saes_root`. `transcoders`: (root, name) of the
    circuits branch's transcoders, read only when an edit asks for one (`tc:`).
    """
    _check_supported(model, tokenizer, cfg.text)
    run = recompute(model, tokenizer, cfg.text, progress=progress)
    probs = torch.softmax(run.logits[-1], dim=-1)
    top_p, top_i = probs.topk(cfg.top_next)
    next_tokens = list(zip(top_i.tolist(), top_p.tolist(), strict=True))
    lens = logit_lens(model, run.spec, [s["resid_post"] for s in run.sites], cfg.lens_top)
    saes, note = load_saes(saes_root, run.sites, sae_names)
    features = sae_features(saes, run.sites, cfg.feature_top, report_root)
    target = token_id(tokenizer, cfg.target, run.spec.vocab_size, "target") if cfg.target is not None else int(top_i[0])
    versus = token_id(tokenizer, cfg.versus, run.spec.vocab_size, "versus") if cfg.versus is not None else None
    attribution = None
    if saes:
        attribution = attribute(model, run.spec, run.sites, saes, target, versus, cfg.attribution_top, report_root)
    ids = torch.tensor([run.token_ids], device=next(model.parameters()).device)
    eos = getattr(tokenizer, "eos_token_id", None)
    generated = generate(model, ids, cfg.generation, seed, eos, run.spec.max_positions)
    steering = None
    if cfg.edits:
        editable = saes
        if transcoders is not None and any(edit.transcoder for edit in cfg.edits):
            editable = saes + load_saes(transcoders[0], run.sites, [transcoders[1]])[0]
        steering = run_steering(model, ids, cfg.edits, editable, cfg.top_next, cfg.generation, seed, eos, run.spec.max_positions)
    mentioned = {i for i, _ in next_tokens} | set(generated.token_ids) | set(run.token_ids)
    mentioned |= {i for row in lens for pos in row.top for i, _ in pos}
    if steering:
        mentioned |= {i for i, _ in steering.before + steering.after} | set(steering.generated.token_ids)
    if attribution:
        mentioned |= {attribution.target} | ({attribution.versus} if attribution.versus is not None else set())
    vocab = dict(zip(sorted(mentioned), token_strings(tokenizer, sorted(mentioned)), strict=True))
    model_params = sum(p.numel() for p in model.parameters())
    return Journey(model_name, cfg.text, run, next_tokens, lens, features, note, generated, vocab, model_params, cfg.generation, seed, attribution, steering)
