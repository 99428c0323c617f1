"""One typed record per transformation, and the recorder that checks each against the model.

A `Step` keeps only a summary of its tensor (shape, first/last values, the difference from the
model's own tensor), so a whole journey through a 30-layer model stays a few hundred small
records that serialise to JSON for the HTML page.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

N_VALUES = 4
"""How many leading and trailing values of each tensor a step shows."""


@dataclass(frozen=True)
class Step:
    """One transformation of the tokens: what it computes, on what, and how close it is to the model."""

    name: str
    """Short name, e.g. ``q_proj`` or ``residual add``."""
    formula: str
    """The computation in one line."""
    shape: tuple[int, ...]
    """Shape of the result (batch dimension dropped: `[seq, ...]`)."""
    first: tuple[float, ...]
    """The first few values of the flattened result."""
    last: tuple[float, ...]
    """The last few values of the flattened result (the last token's last dimensions)."""
    max_abs: float = 0.0
    """max |value| of the result, the scale against which the differences read."""
    layer: int | None = None
    """Decoder layer (0-based), or None for steps outside the layers."""
    max_abs_diff: float | None = None
    """max |ours - model's| with this step fed the model's own input (the check of the formula), or None
    where the model has no such tensor."""
    drift: float | None = None
    """max |ours - model's| when every step is fed our own previous result (rounding differences accumulate)."""
    reference: str = ""
    """Which of the model's tensors the step was compared with."""
    params: int = 0
    """Parameters this step reads (each weight counted once, at the step that owns it)."""
    flops: int = 0
    """Floating-point operations for the whole sequence (multiply and add count as two)."""
    kind: str = "op"
    """`matmul` for weight/activation products (the classic 2·N·T count), `op` for the rest."""


@dataclass
class Recorder:
    """Collects steps and compares each with the hooked tensor of the same name.

    `refs` maps a reference key (e.g. ``"L3.q_proj"``) to the model's tensor with the batch
    dimension dropped; `masks` optionally restricts a comparison to some entries (the
    attention positions the causal mask lets through).
    """

    refs: dict[str, torch.Tensor]
    local: bool = False
    """Hand the model's tensor (not ours) to the next step, so each check isolates one formula."""
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)

    def add(
        self,
        name: str,
        formula: str,
        tensor: torch.Tensor,
        ref: str | None = None,
        layer: int | None = None,
        params: int = 0,
        flops: int = 0,
        kind: str = "op",
    ) -> torch.Tensor:
        """Record `tensor` as a step and return what the next step reads: `tensor`, or the model's in local mode."""
        diff = None
        if ref is not None:
            diff = max_abs_diff(tensor, self.refs[ref], self.masks.get(ref))
        flat = tensor.detach().flatten().float()
        self.steps.append(
            Step(
                name=name,
                formula=formula,
                shape=tuple(tensor.shape),
                first=tuple(flat[:N_VALUES].tolist()),
                last=tuple(flat[-N_VALUES:].tolist()),
                max_abs=float(flat[torch.isfinite(flat)].abs().max()) if flat.numel() else 0.0,
                layer=layer,
                max_abs_diff=diff,
                reference=ref or "",
                params=int(params),
                flops=int(flops),
                kind=kind,
            )
        )
        if self.local and ref is not None:
            theirs = self.refs[ref].to(tensor.dtype).reshape(tensor.shape)
            mask = self.masks.get(ref)
            # Masked scores: the model adds finfo.min, we write -inf; both give zero weight, keep ours.
            return theirs if mask is None else torch.where(mask, theirs, tensor)
        return tensor


def max_abs_diff(ours: torch.Tensor, theirs: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """max |ours - theirs| in float32 over the entries `mask` keeps (all when None).

    The reference may carry the same numbers in another layout (heads first or flattened);
    it is reshaped to ours when the element counts agree, otherwise the shapes are reported.
    """
    theirs = theirs.detach().to(ours.device)
    if theirs.shape != ours.shape:
        if theirs.numel() != ours.numel():
            raise ValueError(f"shape mismatch: ours {tuple(ours.shape)} vs model {tuple(theirs.shape)}")
        theirs = theirs.reshape(ours.shape)
    delta = (ours.detach().float() - theirs.float()).abs()
    if mask is not None:
        delta = delta[mask.expand_as(delta)]
    return float(delta.max()) if delta.numel() else 0.0
