"""Steering and ablation: SAE latents set to chosen values, and the pass re-run with them.

At each edited layer the SAE's site activation `x [T, d_model]` (resid_post: the decoder layer's
output) is encoded, `f = encode(x)`; the edit sets some latents on every position, `f'`; and the
model continues from

    x' = x + (decode(f') - decode(f)) = x + (f' - f) · W_dec

so the SAE's reconstruction error `x - decode(f)` is kept: only the edited latents' decoder
directions move. When `f' = f` (an ablated latent that never fired, or no edit at all) the tensor
is handed on untouched, so that pass is the clean pass bit for bit. An edit may hold one position
only (`@POSITION`), the others keep their latents.

A transcoder edit (`tc:`) reads its latents from the MLP's input of the same pass and moves the
MLP's output: `mlp_out' = mlp_out + (f' - f) · W_dec` with `f = encode(mlp_in)`, so every later
layer, attention and norm responds freely. This is how the circuits stage tests a graph's nodes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from token_journey.config.journey import Edit, GenerationConfig
from token_journey.errors import TokenJourneyError
from token_journey.journey.generate import Generated, generate
from token_journey.journey.sae_hits import LayerSAE
from token_journey.sites import SITES, decoder_layers, splice


def layer_sae(saes: list[LayerSAE], layer: int, transcoder: bool = False) -> LayerSAE | None:
    """The SAE that steering and attribution use at `layer`: its resid_post SAE first, then the
    other sites in `SITES` order, several SAEs of one site by name; never a transcoder, which reads one
    activation and writes another. With `transcoder`: the layer's transcoder (the first by name)."""
    here = [s for s in saes if s.layer == layer and (s.reads != s.site) == transcoder]
    return min(here, key=lambda s: (SITES.index(s.site) if s.site in SITES else len(SITES), s.name), default=None)


def plan_edits(edits: list[Edit], saes: list[LayerSAE], n_layers: int, n_positions: int) -> list[tuple[LayerSAE, list[Edit]]]:
    """Group the edits by the SAE (or transcoder) each uses, or stop with one line on a bad spec."""
    plan: dict[tuple[int, bool], tuple[LayerSAE, list[Edit]]] = {}
    for edit in edits:
        kind = "transcoder" if edit.transcoder else "SAE"
        if not 0 <= edit.layer < n_layers:
            raise TokenJourneyError(f"edit {edit.spec!r}: layer {edit.layer} is out of range; this model has layers 0..{n_layers - 1}")
        if edit.position is not None and not 0 <= edit.position < n_positions:
            raise TokenJourneyError(f"edit {edit.spec!r}: position {edit.position} is out of range; the text has positions 0..{n_positions - 1}")
        sae = layer_sae(saes, edit.layer, edit.transcoder)
        if sae is None:
            layers = sorted({s.layer for s in saes if (s.reads != s.site) == edit.transcoder})
            how = "dvc repro circuits/dvc.yaml" if edit.transcoder else "dvc repro"
            have = ", ".join(map(str, layers)) or f"none (train them first: {how})"
            raise TokenJourneyError(f"edit {edit.spec!r}: layer {edit.layer} has no {kind}; layers with {kind}s: {have}")
        d_sae = sae.sae.spec.d_sae
        if not 0 <= edit.latent < d_sae:
            raise TokenJourneyError(
                f"edit {edit.spec!r}: latent {edit.latent} is out of range; {kind} {sae.name} at layer {edit.layer} has latents 0..{d_sae - 1}"
            )
        plan.setdefault((edit.layer, edit.transcoder), (sae, []))[1].append(edit)
    return [plan[key] for key in sorted(plan)]


def _replacement(sae: LayerSAE, edits: list[Edit], device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """(read, x) `[B, T, d]` -> x + (f' - f) · W_dec with f = encode(read), or x itself (the same tensor) when no latent changes.

    `f' - f` is zero outside the edited latents (and positions), so only their decoder rows are read;
    the encoder is held for as long as the edit is spliced in."""
    encoder = sae.sae.encoder(device)
    latents = list(dict.fromkeys(edit.latent for edit in edits))
    column = {latent: j for j, latent in enumerate(latents)}
    rows = sae.sae.decoder_rows(latents, device)  # (n, d)

    @torch.inference_mode()
    def replace(read: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        f = encoder.encode(read.reshape(-1, read.shape[-1]).float())[:, latents].reshape(*read.shape[:-1], len(latents))
        target = f.clone()
        for edit in edits:  # in order: a later edit of the same latent and position wins
            where = slice(None) if edit.position is None else edit.position
            target[:, where, column[edit.latent]] = edit.value
        change = target - f
        if not change.any():
            return x
        return x + (change @ rows).to(x.dtype)

    return replace


def _keep(store: dict[str, torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A splice that changes nothing and keeps what passed (the MLP's input, for a transcoder edit)."""

    def keep(x: torch.Tensor) -> torch.Tensor:
        store["x"] = x
        return x

    return keep


@contextlib.contextmanager
def edited(model: nn.Module, plan: list[tuple[LayerSAE, list[Edit]]]) -> Iterator[None]:
    """Within the block, every forward pass of `model` runs with the planned latents set."""
    device = next(model.parameters()).device
    with contextlib.ExitStack() as stack:
        for sae, edits in plan:
            replace = _replacement(sae, edits, device)
            if sae.reads == sae.site:
                stack.enter_context(splice(model, sae.site, sae.layer, lambda x, replace=replace: replace(x, x)))
            else:
                read: dict[str, torch.Tensor] = {}
                stack.enter_context(splice(model, sae.reads, sae.layer, _keep(read)))
                stack.enter_context(splice(model, sae.site, sae.layer, lambda x, replace=replace, read=read: replace(read["x"], x)))
        yield


@torch.inference_mode()
def last_position(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass: the last position's logits `[vocab]` and resid_post `[n_layers, d_model]`.

    The residual stream is read after any edit at the same layer (hooks registered later see the
    edited output), so it is what the next layer receives.
    """
    resid: dict[int, torch.Tensor] = {}
    handles = []

    def hook(layer: int):
        def read(_module: nn.Module, _inputs: object, output: object) -> None:
            tensor = output[0] if isinstance(output, tuple) else output
            resid[layer] = tensor[0, -1].detach()

        return read

    try:
        for layer, block in enumerate(decoder_layers(model)):
            handles.append(block.register_forward_hook(hook(layer)))
        logits = model(input_ids=input_ids, use_cache=False).logits[0, -1]
    finally:
        for handle in handles:
            handle.remove()
    return logits, torch.stack([resid[layer] for layer in sorted(resid)])


@dataclass(frozen=True)
class Steering:
    """The prediction before and after the edits, side by side."""

    edits: list[tuple[str, str, float, str]]
    """Per edit: (spec, SAE name, value, site)."""
    before: list[tuple[int, float]]
    """Most likely next tokens of the clean pass: (id, probability)."""
    after: list[tuple[int, float]]
    """Most likely next tokens with the edits."""
    kl: float
    """KL(before ‖ after) of the next-token distributions, in nats."""
    norms: list[tuple[int, float, float, float]]
    """From the first edited layer on, at the last position: (layer, ‖resid before‖, ‖resid after‖, ‖after - before‖)."""
    generated: Generated
    """The seeded continuation with the edits (same seed as the clean one)."""


def kl_divergence(before: torch.Tensor, after: torch.Tensor) -> float:
    """KL(p ‖ q) in nats between the softmaxes of two logit vectors `[vocab]` (in float64)."""
    log_p = torch.log_softmax(before.double(), dim=-1)
    log_q = torch.log_softmax(after.double(), dim=-1)
    return float((log_p.exp() * (log_p - log_q)).sum())


def run_steering(
    model: nn.Module,
    input_ids: torch.Tensor,
    edits: list[Edit],
    saes: list[LayerSAE],
    top: int,
    generation: GenerationConfig,
    seed: int,
    eos_id: int | None,
    max_len: int | None,
) -> Steering:
    """Re-run `input_ids [1, T]` with `edits` and compare with the clean pass; sample the steered continuation."""
    plan = plan_edits(edits, saes, len(decoder_layers(model)), input_ids.shape[1])
    clean_logits, clean_resid = last_position(model, input_ids)
    with edited(model, plan):
        logits, resid = last_position(model, input_ids)
        generated = generate(model, input_ids, generation, seed, eos_id, max_len)
    first = plan[0][0].layer if plan else len(clean_resid)
    norms = [
        (layer, float(clean_resid[layer].norm()), float(resid[layer].norm()), float((resid[layer] - clean_resid[layer]).norm()))
        for layer in range(first, len(clean_resid))
    ]
    p_before, i_before = torch.softmax(clean_logits.float(), -1).topk(top)
    p_after, i_after = torch.softmax(logits.float(), -1).topk(top)
    return Steering(
        edits=[(e.spec, sae.name, e.value, sae.site) for sae, group in plan for e in group],
        before=list(zip(i_before.tolist(), p_before.tolist(), strict=True)),
        after=list(zip(i_after.tolist(), p_after.tolist(), strict=True)),
        kl=kl_divergence(clean_logits, logits),
        norms=norms,
        generated=generated,
    )
