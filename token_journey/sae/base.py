"""The SAE module shared by every architecture: weights, encode/decode, and the training hooks.

Orientation everywhere (the SAELens convention): `W_enc [d_in, d_sae]`, `W_dec [d_sae, d_in]`,
`b_enc [d_sae]`, `b_dec [d_in]`, plus `threshold [d_sae]` for JumpReLU-style encoders.
`W_enc` is stored as the transpose of a contiguous `[d_sae, d_in]` tensor so that the sparse
gradients (one row per latent) land without a copy; it still reads as `[d_in, d_sae]`.

A subclass says how latents are chosen (`encode`) and how one training step scores a batch
(`training_step`, returning a `StepOutput`); the loop in `train.py` does the rest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from token_journey.errors import TokenJourneyError
from token_journey.sae.registry import check_architecture, check_k, check_prefixes
from token_journey.sae.sparse import Active, count, decode_at, encode_at


@dataclass(frozen=True)
class SAESpec:
    """What an SAE is (shapes and provenance), stored in `cfg.json` and rebuilt on load.

    `prefixes`: Matryoshka's nested prefix sizes in latents (the last is d_sae); empty for the others.
    """

    architecture: str
    d_in: int
    d_sae: int
    k: int = 0
    prefixes: tuple[int, ...] = ()
    name: str = ""
    model: str = ""
    site: str = "resid_post"
    layer: int = -1
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_architecture(self.architecture)
        if self.d_in < 1 or self.d_sae < 1:
            raise TokenJourneyError(f"SAE shape d_in={self.d_in}, d_sae={self.d_sae} must both be >= 1")
        check_k(self.architecture, self.k, self.d_sae)
        object.__setattr__(self, "prefixes", tuple(int(p) for p in self.prefixes))  # cfg.json gives a list
        check_prefixes(self.architecture, self.prefixes, self.d_sae)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class StepOutput(NamedTuple):
    """One training step's loss and what the loop logs.

    `fired` [d_sae] bool: latents active on at least one token of the batch.
    """

    loss: torch.Tensor
    mse: torch.Tensor
    aux: torch.Tensor
    l0: float
    fired: torch.Tensor


@dataclass
class StepContext:
    """What a step needs from the loop: the warmed-up sparsity weight and the dead latents.

    `threshold_weight`: weight of this batch in BatchTopK's running inference-threshold estimate.
    `warmup_k`: > 0 while a JumpReLU trains as TopK with this k (its warm start), 0 after.
    `warmup_batch`: that warm start keeps the k x batch largest pre-activations of the whole batch (BatchTopK), not k per token.
    `warmup_last`: this is the warm start's last step, whose batch cut becomes every threshold at the handover.
    """

    sparsity_coefficient: float = 0.0
    dead: torch.Tensor | None = None  # [d_sae] bool
    bandwidth: float = 0.001
    threshold_weight: float = 0.01
    extra: dict[str, float] = field(default_factory=dict)
    warmup_k: float = 0.0
    warmup_batch: bool = False
    warmup_last: bool = False


class SAE(nn.Module):
    """A sparse autoencoder on raw activations (any normalisation is folded into the weights)."""

    architecture: ClassVar[str] = ""
    has_threshold: ClassVar[bool] = False
    apply_b_dec_to_input: ClassVar[bool] = False
    unit_norm_decoder: ClassVar[bool] = True

    def __init__(self, cfg: SAESpec, device: torch.device | str = "cpu") -> None:
        """Zero weights on `device`, which is always explicit: nothing here follows torch's default device."""
        super().__init__()
        self.cfg = cfg
        if "apply_b_dec_to_input" in cfg.extra:  # imported SAEs say how their encoder reads x
            self.apply_b_dec_to_input = bool(cfg.extra["apply_b_dec_to_input"])
        d_in, d_sae = cfg.d_in, cfg.d_sae
        self.W_enc = nn.Parameter(torch.zeros(d_sae, d_in, device=device).t())
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in, device=device))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d_in, device=device))
        if self.has_threshold:
            self.threshold = nn.Parameter(torch.zeros(d_sae, device=device))

    # ---- inference -------------------------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations [N, d_sae] of x [N, d_in]."""
        x_in = x - self.b_dec if self.apply_b_dec_to_input else x
        return torch.addmm(self.b_enc, x_in, self.W_enc)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense post-activation latents f [N, d_sae] of x [N, d_in]; subclasses choose the latents."""
        raise NotImplementedError

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Reconstruction x_hat [N, d_in] of latents f [N, d_sae]."""
        return torch.addmm(self.b_dec, f, self.W_dec)

    def output(self, f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """What the SAE writes at its site [N, d_in] from latents f [N, d_sae] of input x [N, d_in].

        The reconstruction `decode(f)` for an SAE; a skip transcoder adds its linear map of x.
        """
        return self.decode(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        return self.output(self.encode(x2), x2).reshape(shape)

    # ---- training ----------------------------------------------------------------------------
    def training_step(self, x: torch.Tensor, ctx: StepContext, target: torch.Tensor | None = None) -> StepOutput:
        """Loss on a normalised batch x [N, d_in]; touches only the active latents.

        `target` [N, d_in] is what the output must match: x itself for an SAE (None), the MLP's output
        for a transcoder. Only the architectures a transcoder can use as its encoder accept it.
        """
        raise NotImplementedError

    def _sparse_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [N, d_in] as given, dense no-grad pre-activations [N, d_sae])."""
        with torch.no_grad():
            x_in = x - self.b_dec if self.apply_b_dec_to_input else x
            pre = torch.addmm(self.b_enc, x_in, self.W_enc, out=self._pre_buffer(x.shape[0]))
        return x, pre

    def _pre_buffer(self, rows: int) -> torch.Tensor:
        """A [rows, d_sae] buffer reused by every training step for the pre-activations.

        On CPU a fresh 75 MB tensor per step (batch 4096, width 4608) costs ~25 ms of page faults,
        a tenth of the step. Steps keep nothing that points into it, so overwriting is safe.
        """
        buf = getattr(self, "_pre", None)
        w = self.W_enc
        if buf is None or buf.shape[0] != rows or buf.device != w.device or buf.dtype != w.dtype:
            buf = self._pre = torch.empty(rows, self.cfg.d_sae, device=w.device, dtype=w.dtype)
        return buf

    def _attach(self, x: torch.Tensor, values: torch.Tensor, active: Active) -> torch.Tensor:
        """Differentiable pre-activations [nnz] at `active` (b_dec's encoder gradient included)."""
        b_dec = self.b_dec if self.apply_b_dec_to_input else None
        return encode_at(x, self.W_enc, self.b_enc, values, active, b_dec)

    def _reconstruct(self, f: torch.Tensor, active: Active, x: torch.Tensor | None = None) -> torch.Tensor:
        """x_hat [N, d_in] from latent values [nnz] at `active` (and the input x, which only a skip transcoder reads)."""
        return decode_at(f, self.W_dec, active) + self.b_dec

    @staticmethod
    def _fired(f: torch.Tensor, active: Active) -> torch.Tensor:
        return count(active.cols[f > 0], active.d_sae) > 0

    # ---- weights -----------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator, b_dec: torch.Tensor | None = None) -> None:
        """Decoder rows He-uniform then unit norm; encoder = decoder transpose; biases from the data.

        The draw happens on `generator`'s device (the CPU by default) and is copied over, so an SAE
        starts from the same weights whatever device it trains on.
        """
        bound = (6.0 / self.cfg.d_in) ** 0.5
        w = torch.empty(self.cfg.d_sae, self.cfg.d_in, device=generator.device).uniform_(-bound, bound, generator=generator)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec.copy_(w)
        self.W_enc.copy_(w.t())
        self.b_enc.zero_()
        if b_dec is None:
            self.b_dec.zero_()
        else:
            self.b_dec.copy_(b_dec)

    @torch.no_grad()
    def fold_scale(self, scale: float) -> None:
        """Turn weights trained on `scale * x` into weights on raw x (latents come out in raw units).

        Every encoder here is positively homogeneous in (pre-activation, threshold), so dividing
        b_enc, threshold and b_dec by `scale` gives f_raw = f / scale and x_hat_raw = x_hat / scale.
        """
        self.b_enc /= scale
        self.b_dec /= scale
        if self.has_threshold:
            self.threshold /= scale

    @torch.no_grad()
    def stop_centering_input(self) -> None:
        """Read x instead of x - b_dec from now on, encoding the same: b_enc - b_dec W_enc takes b_dec's part."""
        if self.apply_b_dec_to_input:
            self.b_enc -= self.b_dec @ self.W_enc
            self.apply_b_dec_to_input = False

    def tensors(self) -> dict[str, torch.Tensor]:
        """The saved tensors: on the CPU, contiguous, SAELens names and orientation."""
        out = {"W_enc": self.W_enc, "W_dec": self.W_dec, "b_enc": self.b_enc, "b_dec": self.b_dec}
        if self.has_threshold:
            out["threshold"] = self.threshold
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy saved tensors in, checking every shape."""
        own = dict(self.named_parameters())
        missing = sorted(set(own) - set(tensors))
        if missing:
            raise TokenJourneyError(f"SAE weights lack {', '.join(missing)} for architecture {self.architecture}")
        for name, param in own.items():
            if tuple(tensors[name].shape) != tuple(param.shape):
                raise TokenJourneyError(f"SAE weight {name} has shape {tuple(tensors[name].shape)}, expected {tuple(param.shape)}")
            param.copy_(tensors[name])
