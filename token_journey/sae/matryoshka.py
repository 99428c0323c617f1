"""Matryoshka BatchTopK SAE (Bussmann et al. 2025; Nabeshima 2024).

The latents are ordered, and each nested prefix of them (the first m_1 < m_2 < ... < d_sae)
must reconstruct the input on its own, with the decoder bias: the loss is the mean of the
prefixes' FVUs, plus BatchTopK's AuxK term. Early latents then carry the broad, frequent
directions a small dictionary would learn, and later ones refine them, instead of the general
latents being split ("absorbed") into many specific ones as width grows; any prefix is a usable
smaller SAE. Which latents are active is BatchTopK's global batch cut (shared, not reimplemented),
and inference uses the same learned global threshold, so the SAE is saved exactly like BatchTopK
(a SAELens JumpReLU folder) and only our cfg.json block records the prefixes.
"""

from __future__ import annotations

import torch

from token_journey.sae.batchtopk import BatchTopKSAE
from token_journey.sae.sparse import Active, decode_at


class MatryoshkaSAE(BatchTopKSAE):
    """BatchTopK whose nested latent prefixes (`cfg.prefixes`, in latents) each reconstruct x."""

    architecture = "matryoshka"

    def _errors(self, x: torch.Tensor, f: torch.Tensor, active: Active) -> list[torch.Tensor]:
        """x_hat_m - x for each prefix m, where x_hat_m = b_dec + the decoded active latents with index < m.

        Each band of latents between two prefix ends is decoded once (sparse, as BatchTopK decodes
        all of them); the prefix reconstructions are the running sums of the bands, so the cost is
        one decode plus a [N, d_in] addition per prefix.
        """
        ends = torch.tensor(self.cfg.prefixes[:-1], device=active.cols.device, dtype=active.cols.dtype)
        band = torch.bucketize(active.cols, ends, right=True)  # band b holds prefixes[b-1] <= col < prefixes[b]
        errors, err = [], self.b_dec - x  # the error of the empty prefix
        for b in range(len(self.cfg.prefixes)):
            pairs = (band == b).nonzero().squeeze(1)
            part = Active(active.rows[pairs], active.cols[pairs], active.n_tokens, active.d_sae)
            err = err + decode_at(f.index_select(0, pairs), self.W_dec, part)
            errors.append(err)
        return errors
