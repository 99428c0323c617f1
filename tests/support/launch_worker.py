"""Run by tests/test_launchers.py under each launcher: report this process's place in the run and
what BatchTopK agrees on across the processes, as `result-<rank>.json` in the working folder.

Every process builds the same global batches; the training loop gives each its own slice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from support.configs import make
from token_journey.config.sae import SAEConfig
from token_journey.distributed import join_processes, select_device
from token_journey.sae.batchtopk import batch_cut, kth_largest
from token_journey.sae.train import DataStats, new_sae, train

D_IN, WIDTH, BATCH, K, STEPS = 8, 32, 64, 4, 6


def _batch(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, D_IN, generator=g) * torch.rand(BATCH, 1, generator=g) + 0.5


def main() -> None:
    device = select_device("auto")
    processes = join_processes(device)
    total = torch.tensor([float(processes.index + 1)])
    if processes.count > 1:
        dist.all_reduce(total)
    pre = (torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(9))).relu()
    cut = batch_cut(pre.chunk(processes.count)[processes.index], K)
    x = torch.cat([_batch(s) for s in range(8)])
    stats = DataStats(x.mean(0), float(x.pow(2).sum(1).mean()))
    thresholds = []
    for steps in (1, STEPS):
        cfg = make(
            SAEConfig,
            architecture="batchtopk",
            name="b",
            width=WIDTH,
            k=K,
            batch_size=BATCH,
            train_tokens=BATCH * steps,
            lr=0.01,
            lr_warmup_steps=1,
            checkpoint_every=0,
            dead_window_tokens=BATCH * 2,
            k_aux=8,
        )
        sae = new_sae(cfg, D_IN, stats, seed=0, device=device)
        train(sae, lambda start: (_batch(100 + s) for s in range(start, STEPS)), stats, cfg)
        thresholds.append(sae.threshold[0].item())
    # One file per process: several processes printing to one pipe can interleave their lines.
    Path(f"result-{processes.index}.json").write_text(
        json.dumps(
            {
                "rank": processes.index,
                "world": processes.count,
                "local_rank": int(os.environ.get("LOCAL_RANK", -1)),
                "device": str(device),
                "sum_of_ranks": float(total),
                "cut": float(cut),
                "exact_cut": float(kth_largest(pre, K * BATCH)),
                "first_threshold": thresholds[0],
                "threshold": thresholds[1],
                "w_dec": sae.W_dec.detach().double().sum().item(),
            }
        )
    )
    if processes.count > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
