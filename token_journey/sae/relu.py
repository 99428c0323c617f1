"""ReLU SAE with an L1 penalty weighted by decoder row norms (the standard baseline).

Weighting |f_i| by ||W_dec[i]|| makes the penalty blind to the encoder/decoder scale trade, so
the decoder needs no unit-norm constraint (Anthropic, April 2024 update).
"""

from __future__ import annotations

import torch

from token_journey.sae.base import SAE, StepContext, StepOutput
from token_journey.sae.sparse import Active


class ReLUSAE(SAE):
    """f = ReLU(W_enc^T (x - b_dec) + b_enc); loss = ||x - x_hat||^2 + lambda sum_i f_i ||W_dec[i]||."""

    architecture = "relu"
    apply_b_dec_to_input = True
    unit_norm_decoder = False

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.pre_acts(x).relu()

    def training_step(self, x: torch.Tensor, ctx: StepContext) -> StepOutput:
        x_in, pre = self._sparse_pre(x)
        with torch.no_grad():
            active = Active.from_mask(pre > 0)
            values = pre[active.rows, active.cols]
        f = self._attach(x_in, values, active)
        x_hat = self._reconstruct(f, active)
        mse = (x_hat - x).pow(2).sum(-1).mean()
        norms = self.W_dec.norm(dim=1).index_select(0, active.cols)  # backward: index_add_, deterministic
        l1 = (f * norms).sum() / x.shape[0]
        loss = mse + ctx.sparsity_coefficient * l1
        return StepOutput(loss, mse.detach(), l1.detach(), active.nnz / x.shape[0], self._fired(f.detach(), active))
