"""Training kernels that touch only the active latents of each token.

A dense SAE step costs five `[tokens, d_in] x [d_in, d_sae]` matmuls (encoder forward, decoder
forward, and three in the backward pass). Only the encoder forward has to be dense: once we know
which latents are active (TopK winners, JumpReLU latents above `threshold - bandwidth/2`, ...),
the decoder and every gradient are sums over the `nnz` active (token, latent) pairs. These
autograd Functions do exactly that with `embedding_bag` (gather-and-sum) and `sampled_addmm`
(a dot product per active pair), so the step costs one dense matmul plus O(nnz * d_in).

When the active set is large (a JumpReLU early in training fires half its latents), the same
Functions switch to dense matmuls, which are faster there; results are identical either way.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

# Above this fraction of active (token, latent) pairs, dense BLAS beats gather/scatter.
DENSE_ABOVE = 0.05



@dataclass
class Active:
    """The active (token, latent) pairs of one batch, in row-major order.

    `rows`, `cols`: [nnz] token index and latent index of each pair, sorted by row.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    n_tokens: int
    d_sae: int

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> Active:
        """Pairs where `mask` [tokens, d_sae] is true."""
        rows, cols = mask.nonzero(as_tuple=True)
        return cls(rows, cols, mask.shape[0], mask.shape[1])

    @classmethod
    def from_topk(cls, indices: torch.Tensor, d_sae: int) -> Active:
        """Pairs from per-token indices [tokens, k]."""
        n, k = indices.shape
        rows = torch.arange(n, device=indices.device).repeat_interleave(k)
        return cls(rows, indices.reshape(-1), n, d_sae)

    @property
    def nnz(self) -> int:
        return self.cols.numel()

    @property
    def dense(self) -> bool:
        """Whether dense matmuls are the faster way to handle this many pairs."""
        return self.nnz > DENSE_ABOVE * self.n_tokens * self.d_sae

    @cached_property
    def row_offsets(self) -> torch.Tensor:
        """[tokens] start of each token's pairs (the `offsets` of `embedding_bag`)."""
        counts = torch.bincount(self.rows, minlength=self.n_tokens)
        return torch.cumsum(counts, 0) - counts

    @cached_property
    def csr(self) -> torch.Tensor:
        """The pattern as a [tokens, d_sae] CSR matrix with values 0..nnz-1 (float64: exact ids)."""
        crow = torch.cat([self.row_offsets, self.row_offsets.new_tensor([self.nnz])])
        ids = torch.arange(self.nnz, dtype=torch.float64, device=self.cols.device)
        with warnings.catch_warnings():  # "CSR support is in beta": the ops used here are tested
            warnings.simplefilter("ignore")
            return torch.sparse_csr_tensor(crow, self.cols, ids, (self.n_tokens, self.d_sae), check_invariants=False)

    @cached_property
    def by_latent(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(perm [nnz], rows in latent order [nnz], latent offsets [d_sae]) for the transposed products.

        Found with a CSR -> CSC conversion (a counting sort), much faster than sorting on CPU.
        """
        csc = self.csr.to_sparse_csc()
        perm = csc.values().long()
        return perm, csc.row_indices(), csc.ccol_indices()[:-1]

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """Dense [tokens, d_sae] matrix with `values` [nnz] at the pairs."""
        out = values.new_zeros(self.n_tokens, self.d_sae)
        out[self.rows, self.cols] = values
        return out

    def transposed_sum(self, values: torch.Tensor, dense_rows: torch.Tensor) -> torch.Tensor:
        """`S^T @ dense_rows` -> [d_sae, d] where S [tokens, d_sae] holds `values` at the pairs."""
        if self.dense:
            return self.scatter(values).t() @ dense_rows
        perm, rows, offsets = self.by_latent
        return F.embedding_bag(rows, dense_rows, offsets, mode="sum", per_sample_weights=values[perm])

    def row_sum(self, values: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """`S @ table` -> [tokens, d] where `table` is [d_sae, d]."""
        if self.dense:
            return self.scatter(values) @ table
        return F.embedding_bag(self.cols, table, self.row_offsets, mode="sum", per_sample_weights=values)

    def pair_dots(self, left: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """[nnz] dot products `left[row] . table[col]` (`left` [tokens, d], `table` [d_sae, d])."""
        if self.dense:
            return (left @ table.t())[self.rows, self.cols]
        csr = self.csr
        pattern = torch.sparse_csr_tensor(csr.crow_indices(), csr.col_indices(), left.new_zeros(self.nnz), csr.shape,
                                          check_invariants=False)
        return torch.sparse.sampled_addmm(pattern, left, table.t()).values()


class _EncodeAt(torch.autograd.Function):
    """Pre-activations at the active pairs, with gradients that touch only those pairs.

    forward(x [tokens, d_in], W_enc [d_in, d_sae], b_enc [d_sae], values [nnz], active) -> values.
    The values were computed by the (dense, no-grad) encoder matmul; this attaches the graph.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, values, active):  # type: ignore[override]
        ctx.active = active
        ctx.save_for_backward(x, W_enc)
        return values.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, W_enc = ctx.saved_tensors
        active: Active = ctx.active
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = active.row_sum(grad, W_enc.t())
        if ctx.needs_input_grad[1]:
            grad_w = active.transposed_sum(grad, x).t()  # [d_in, d_sae], same strides as W_enc
        if ctx.needs_input_grad[2]:
            grad_b = torch.bincount(active.cols, weights=grad, minlength=active.d_sae).to(grad.dtype)
        return grad_x, grad_w, grad_b, None, None


class _DecodeAt(torch.autograd.Function):
    """`sum_pairs f[pair] * W_dec[col]` per token -> [tokens, d_in], sparse in both directions."""

    @staticmethod
    def forward(ctx, f, W_dec, active):  # type: ignore[override]
        ctx.active = active
        ctx.save_for_backward(f, W_dec)
        return active.row_sum(f, W_dec)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        f, W_dec = ctx.saved_tensors
        active: Active = ctx.active
        grad = grad.contiguous()
        grad_f = active.pair_dots(grad, W_dec) if ctx.needs_input_grad[0] else None
        grad_w = active.transposed_sum(f, grad) if ctx.needs_input_grad[1] else None
        return grad_f, grad_w, None


def encode_at(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, values: torch.Tensor, active: Active) -> torch.Tensor:
    """Differentiable pre-activations [nnz] at `active` (values from a no-grad dense matmul)."""
    return _EncodeAt.apply(x, W_enc, b_enc, values, active)


def decode_at(f: torch.Tensor, W_dec: torch.Tensor, active: Active) -> torch.Tensor:
    """Differentiable reconstruction without bias [tokens, d_in] from latent values [nnz] at `active`."""
    return _DecodeAt.apply(f, W_dec, active)
