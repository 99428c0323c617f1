"""TopK SAE with the AuxK loss (Gao et al. 2024).

f = TopK(ReLU(W_enc^T (x - b_dec) + b_enc)); the loss is the FVU of the batch, plus alpha times
the AuxK loss: the top `k_aux` dead latents (no activation over the dead window) reconstruct the
residual x - x_hat, which gives dead latents a gradient and revives them.
"""

from __future__ import annotations

import torch

from token_journey.sae.base import SAE, StepContext, StepOutput
from token_journey.sae.sparse import Active, decode_at


class TopKSAE(SAE):
    """Exactly k active latents per token."""

    architecture = "topk"
    apply_b_dec_to_input = True

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_acts(x)
        values, indices = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, indices, values.relu())

    def training_step(self, x: torch.Tensor, ctx: StepContext, target: torch.Tensor | None = None) -> StepOutput:
        y = x if target is None else target
        x_in, pre = self._sparse_pre(x)
        with torch.no_grad():
            values, indices = pre.topk(self.cfg.k, dim=-1, sorted=False)
        active = Active.from_topk(indices, self.cfg.d_sae)
        f = self._attach(x_in, values.reshape(-1), active).relu()
        x_hat = self._reconstruct(f, active, x)
        err = x_hat - y
        total_var = (y - y.mean(0)).pow(2).sum(-1).mean()
        mse = err.pow(2).sum(-1).mean()
        aux = self._auxk(x_in, pre, err.detach(), ctx)
        loss = mse / total_var + ctx.extra.get("auxk_alpha", 1 / 32) * aux
        fired = self._fired(f.detach(), active)
        return StepOutput(loss, mse.detach(), aux.detach(), float((f > 0).sum()) / x.shape[0], fired)

    def _auxk(self, x_in: torch.Tensor, pre: torch.Tensor, err: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """AuxK loss: FVU of the top-k_aux dead latents reconstructing -err = x - x_hat (no bias)."""
        dead = ctx.dead
        k_aux = int(ctx.extra.get("k_aux", self.cfg.d_in // 2))
        if dead is None or not bool(dead.any()) or k_aux < 1:
            return x_in.new_zeros(())
        dead_ids = dead.nonzero().squeeze(1)
        with torch.no_grad():
            values, local = pre.index_select(1, dead_ids).topk(min(k_aux, dead_ids.numel()), dim=-1, sorted=False)
            # Pairs with a non-positive pre-activation add nothing and get no gradient through the
            # ReLU: drop them (when k_aux >= #dead, that is about half of all dead-latent pairs).
            keep = (values > 0).reshape(-1)
            n, k = values.shape
            rows = torch.arange(n, device=pre.device).unsqueeze(1).expand(n, k).reshape(-1)[keep]
            active = Active(rows, dead_ids[local].reshape(-1)[keep], n, self.cfg.d_sae)
        f = self._attach(x_in, values.reshape(-1)[keep], active)
        residual = -err
        e_hat = decode_at(f, self.W_dec, active)
        scale = (residual - residual.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
        return (e_hat - residual).pow(2).sum(-1).mean() / scale
