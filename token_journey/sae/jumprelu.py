"""JumpReLU SAE, the Gemma Scope recipe (Lieberum et al. 2024; Rajamanoharan et al. 2024).

f = z * H(z - theta), z = x W_enc + b_enc, with a learned per-latent threshold theta stored as
is (not log-parameterised, which stalls under Adam). Training loss = ||x - x_hat||^2 +
lambda * L0 (with `target_l0`, lambda follows a controller: token_journey.sae.target_l0), where L0 and
the threshold get straight-through gradients with the rectangle
kernel K(u) = 1[|u| < 1/2] of bandwidth eps:
  d JumpReLU / d theta = -(theta / eps) K((z - theta) / eps),   d H / d theta = -(1 / eps) K(...),
and no pseudo-gradient reaches z through H. Only latents with z > theta - eps/2 can carry any
gradient, so the step works on those alone (`Active`), exactly as the dense formula would.

With a target L0 and `topk_warmup_fraction`, the first steps train the same weights as a TopK SAE with
k = target (no L0 term), the thresholds following the batch's cut for that L0; the steps above then start
from weights that already reconstruct well at that L0, which a short budget cannot reach from scratch.
With `warmup_architecture=batchtopk` the warm start is a BatchTopK SAE instead (the k x batch largest
pre-activations of the whole batch), whose active set is the one that cut gives: at the handover the
thresholds keep the latents the warm start trained with, as Bussmann et al. turn a BatchTopK into a JumpReLU.
"""

from __future__ import annotations

import torch

from token_journey.sae.base import SAE, StepContext, StepOutput
from token_journey.sae.batchtopk import batch_cut
from token_journey.sae.sparse import Active
from token_journey.sae.topk import TopKSAE


def _window(u: torch.Tensor) -> torch.Tensor:
    """Rectangle kernel K(u) = 1[|u| < 1/2] as a float mask."""
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """z * H(z - theta) with the rectangle-kernel STE on theta (z [nnz], theta [nnz])."""

    @staticmethod
    def forward(ctx, z, theta, bandwidth):  # type: ignore[override]
        ctx.bandwidth = bandwidth
        ctx.save_for_backward(z, theta)
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = grad * (z > theta).to(z.dtype)
        grad_theta = -(theta / eps) * _window((z - theta) / eps) * grad
        return grad_z, grad_theta, None


class _Step(torch.autograd.Function):
    """H(z - theta) with the rectangle-kernel STE on theta only (used for the L0 penalty)."""

    @staticmethod
    def forward(ctx, z, theta, bandwidth):  # type: ignore[override]
        ctx.bandwidth = bandwidth
        ctx.save_for_backward(z, theta)
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        return None, -(1.0 / eps) * _window((z - theta) / eps) * grad, None


def jumprelu(z: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """JumpReLU with the STE of Gemma Scope (elementwise, theta broadcast to z)."""
    return _JumpReLU.apply(z, theta, bandwidth)


def heaviside(z: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """H(z - theta) with the STE on theta (elementwise)."""
    return _Step.apply(z, theta, bandwidth)


class JumpReLUSAE(SAE):
    """JumpReLU SAE: per-latent learned thresholds, L0 penalty."""

    architecture = "jumprelu"
    has_threshold = True

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_acts(x)
        return pre * (pre > self.threshold)

    def training_step(self, x: torch.Tensor, ctx: StepContext, target: torch.Tensor | None = None) -> StepOutput:
        if ctx.warmup_k:
            return self._warmup_step(x, ctx, target)
        y = x if target is None else target
        x_in, pre = self._sparse_pre(x)
        with torch.no_grad():
            active = Active.from_mask(pre > (self.threshold - ctx.bandwidth / 2))
            values = pre[active.rows, active.cols]
        z = self._attach(x_in, values, active)
        theta = self.threshold.index_select(0, active.cols)  # backward: index_add_, deterministic on CPU threads
        f = jumprelu(z, theta, ctx.bandwidth)
        x_hat = self._reconstruct(f, active, x)
        mse = (x_hat - y).pow(2).sum(-1).mean()
        l0 = heaviside(z, theta, ctx.bandwidth).sum() / x.shape[0]
        loss = mse + ctx.sparsity_coefficient * l0
        pre_act = ctx.extra.get("pre_act_coefficient", 0.0)
        if pre_act:
            loss = loss + pre_act * self._below_threshold(x, z, theta, active.cols, bool(ctx.extra.get("pre_act_moves_encoder", 1.0)))
        return StepOutput(loss, mse.detach(), l0.detach(), float(l0.detach()), self._fired(f.detach(), active))

    def _below_threshold(self, x: torch.Tensor, z: torch.Tensor, theta: torch.Tensor, cols: torch.Tensor, encoder: bool = True) -> torch.Tensor:
        """The pre-activation loss (Anthropic, "Circuits Updates", January 2025): the mean over tokens of
        sum_i relu(theta_i - z_i) over every latent, decoder rows being unit norm.

        Every latent that does not fire is pulled up towards its threshold (and its threshold down) with
        the same force however far below it is, so a latent that a threshold shut off keeps being pulled
        back instead of dying. Computed without the dense [N, d_sae] backward: summed over all (token,
        latent) pairs, theta - z is linear in the weights, sum_i (N theta_i - (sum_n x_n) W_enc[:, i] - N b_enc_i),
        a matrix-vector product; the pairs at or above their threshold (among the sparse `z`, whose
        thresholds are `theta`) are then taken back out.

        With `encoder` false only b_enc and the thresholds take its gradient (`z`'s latents are `cols`): under
        Adam's per-weight normalisation the encoder column of a latent that never fires, whose only gradient is
        this term's, otherwise takes full-size steps towards minus the mean input however small the coefficient;
        the latents then fire on everything or nothing. On SmolLM2's transcoders (docs/how-to/circuits.md)
        this form revived the latents without the FVU cost of the full one.
        """
        n = x.shape[0]
        x_in = x - self.b_dec if self.apply_b_dec_to_input else x
        w_enc = self.W_enc
        if not encoder:
            x_in, w_enc = x_in.detach(), w_enc.detach()
            bias = self.b_enc.index_select(0, cols)
            z = z.detach() - bias.detach() + bias
        every_pair = n * (self.threshold.sum() - self.b_enc.sum()) - (x_in.sum(0) @ w_enc).sum()
        firing = z >= theta
        return (every_pair - (theta[firing] - z[firing]).sum()) / n

    def _warmup_step(self, x: torch.Tensor, ctx: StepContext, target: torch.Tensor | None) -> StepOutput:
        """One step of the warm start: each token's round(k) largest pre-activations are active (TopK), or with
        `ctx.warmup_batch` the positive ones at or above the batch's cut for a mean L0 of k (BatchTopK).

        The loss is the reconstruction error plus AuxK (scaled like TopK's, relative to the batch's
        variance); no L0 term, since k fixes L0. The BatchTopK warm start divides it by the batch's variance,
        as the BatchTopK SAE's loss is (its FVU): under gradient clipping and with Adam's moments carried into
        the JumpReLU steps that scale is not neutral, and on SmolLM2 layer 15 at target 32 it took the FVU
        from 0.1521 to 0.1497 (docs/benchmarks/sae-training.md). The TopK warm start keeps the raw error, as measured before.

        The thresholds take no gradient here: they are set to the batch's cut for a mean L0 of k, so that when the
        JumpReLU steps take over, every latent starts from the one threshold that gave L0 = k on the last batch, and
        then moves on its own. The BatchTopK warm start needs that cut every step and sets the thresholds every step;
        the TopK warm start computes it on its last step only, since the cut (a sampled top-k over the whole batch)
        costs ~6 ms of a ~45 ms step at batch 512, width 4608 on 2 cores, and the TopK steps never read the thresholds.
        A checkpoint taken before that step holds the initial thresholds: it is for resuming, not for encoding.
        """
        y = x if target is None else target
        x_in, pre = self._sparse_pre(x)
        with torch.no_grad():
            cut = batch_cut(pre, ctx.warmup_k).clamp_min(torch.finfo(pre.dtype).tiny) if ctx.warmup_batch or ctx.warmup_last else None
            if ctx.warmup_batch:
                active = Active.from_mask(pre >= cut)
                values = pre[active.rows, active.cols]
            else:
                values, indices = pre.topk(max(1, round(ctx.warmup_k)), dim=-1, sorted=False)
                active = Active.from_topk(indices, self.cfg.d_sae)
            if cut is not None:
                self.threshold.fill_(cut)  # 0-d: no host sync
        f = self._attach(x_in, values.reshape(-1), active).relu()
        err = self._reconstruct(f, active, x) - y
        mse = err.pow(2).sum(-1).mean()
        aux = TopKSAE._auxk(self, x_in, pre, err.detach(), ctx)  # type: ignore[arg-type]
        total_var = (y - y.mean(0)).pow(2).sum(-1).mean().detach()
        alpha = ctx.extra.get("auxk_alpha", 1 / 32)
        loss = mse / total_var + alpha * aux if ctx.warmup_batch else mse + alpha * aux * total_var
        l0 = float((f > 0).sum()) / x.shape[0]
        return StepOutput(loss, mse.detach(), aux.detach(), l0, self._fired(f.detach(), active))
