"""MLP transcoders and skip transcoders (Dunefsky et al. 2024; Paulo et al. 2025, "Transcoders beat SAEs").

A transcoder is a sparse map from the MLP's input x (site `mlp_in`, after the pre-MLP norm) to its
output y (site `mlp_out`): y_hat = f(x) W_dec + b_dec, with f a JumpReLU or TopK encoder of x, and,
for a skip transcoder, plus x W_skip^T with W_skip [d_out, d_in] starting at zero, so the latents
only have to explain what a linear map of the input cannot. Its latents read the MLP's input and
write its output, so they describe the MLP's computation rather than one activation.

The weights keep SAELens's names and orientation (`W_enc [d_in, d_sae]`, `W_dec [d_sae, d_out]`,
`b_dec [d_out]`, `W_skip [d_out, d_in]`); the MLP's input and output both have the model's width, so
d_out = d_in here. The encoder never subtracts b_dec (an output-space bias) from its input, as
SAELens requires of transcoders. Training scales x and y by separate scalars (E||x||^2 = E||y||^2 = 1)
and `fold_scale` folds both back, so latents come out in units of the output.
"""

from __future__ import annotations

import torch
from torch import nn

from token_journey.sae.base import SAE, SAESpec
from token_journey.sae.jumprelu import JumpReLUSAE
from token_journey.sae.sparse import Active
from token_journey.sae.topk import TopKSAE


class Transcoder(SAE):
    """Mixin that turns an SAE architecture into a transcoder; `skip` adds W_skip."""

    apply_b_dec_to_input = False
    skip = False

    def __init__(self, cfg: SAESpec, device: torch.device | str = "cpu") -> None:
        super().__init__(cfg, device)
        if self.skip:
            self.W_skip = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_in, device=device))

    def output(self, f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y_hat = self.decode(f)
        return torch.addmm(y_hat, x, self.W_skip.t()) if self.skip else y_hat

    def _reconstruct(self, f: torch.Tensor, active: Active, x: torch.Tensor | None = None) -> torch.Tensor:
        y_hat = super()._reconstruct(f, active)
        if not self.skip:
            return y_hat
        assert x is not None, "a skip transcoder's training step must pass its input"
        return torch.addmm(y_hat, x, self.W_skip.t())

    @torch.no_grad()
    def fold_scale(self, scale: float, in_scale: float | None = None) -> None:
        """Weights trained on (in_scale x, scale y) -> weights on raw (x, y), latents in units of y.

        With f_s the latents of the scaled input, y_hat = (f_s W_dec + b_dec + in_scale x W_skip^T) / scale,
        and f_s / scale = x (W_enc in_scale / scale) + b_enc / scale: so W_enc and W_skip are multiplied
        by in_scale / scale and b_enc, threshold and b_dec divided by scale; W_dec keeps unit-norm rows.
        Every encoder here is positively homogeneous, so TopK picks the same latents.
        """
        super().fold_scale(scale)
        ratio = (scale if in_scale is None else in_scale) / scale
        self.W_enc *= ratio
        if self.skip:
            self.W_skip *= ratio

    def tensors(self) -> dict[str, torch.Tensor]:
        out = super().tensors()
        if self.skip:
            out["W_skip"] = self.W_skip.detach().cpu().contiguous()
        return out


class JumpReLUTranscoder(Transcoder, JumpReLUSAE):
    architecture = "jumprelu_transcoder"


class JumpReLUSkipTranscoder(Transcoder, JumpReLUSAE):
    architecture = "jumprelu_skip_transcoder"
    skip = True


class TopKTranscoder(Transcoder, TopKSAE):
    architecture = "topk_transcoder"


class TopKSkipTranscoder(Transcoder, TopKSAE):
    architecture = "topk_skip_transcoder"
    skip = True


TRANSCODER_CLASSES = (JumpReLUTranscoder, JumpReLUSkipTranscoder, TopKTranscoder, TopKSkipTranscoder)
