"""What one training checkpoint costs at a given shape: bytes on disk, seconds to write and to read back.

At the GPU profile's shape (d_in 2048 of Llama 3.2 1B, width 16384) a checkpoint holds W_enc and W_dec,
the biases and threshold, and Adam's two moments of each: about 3 x 2 x 2048 x 16384 x 4 bytes = 0.8 GB.
This times `save_checkpoint` (copy to the CPU, safetensors file, state.json, rename) and
`load_checkpoint` on the machine it runs on, into `--dir` (default: a temporary folder under the
current directory, so the disk measured is the one the checkpoints would use), and sizes
`sae.checkpoint_minutes`: the share of the wall time spent checkpointing at that interval.

    python benchmarks/checkpoint.py [--d-in 2048] [--width 16384] [--architecture jumprelu] [--device cpu]
        [--minutes 10] [--repeats 3] [--dir PATH]
Prints the figures, then ONE JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from token_journey.sae.base import SAESpec
from token_journey.sae.checkpoint import load_checkpoint, save_checkpoint
from token_journey.sae.registry import USES_K, build_sae


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=2048)
    parser.add_argument("--width", type=int, default=16384)
    parser.add_argument("--architecture", default="jumprelu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--minutes", type=float, default=10.0, help="the checkpoint_minutes to size against")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path.cwd())
    args = parser.parse_args()
    device = torch.device(args.device)
    spec = SAESpec(args.architecture, args.d_in, args.width, k=32 if args.architecture in USES_K else 0, name="bench")
    sae = build_sae(spec, device)
    sae.init_weights(torch.Generator().manual_seed(0), None)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    for p in sae.parameters():  # one step, so Adam holds both moments of every parameter
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    since_fired = torch.zeros(args.width, dtype=torch.long, device=device)
    fingerprint = {"bench": [args.d_in, args.width, args.architecture]}
    root = Path(tempfile.mkdtemp(prefix=".checkpoint-bench-", dir=args.dir))
    saves, loads = [], []
    try:
        for repeat in range(args.repeats):
            _sync(device)
            start = time.perf_counter()
            save_checkpoint(root / "ckpt", repeat + 1, sae, opt, since_fired, fingerprint)
            saves.append(time.perf_counter() - start)
            start = time.perf_counter()
            load_checkpoint(root / "ckpt", sae, opt, since_fired, fingerprint)
            _sync(device)
            loads.append(time.perf_counter() - start)
        size = sum(f.stat().st_size for f in (root / "ckpt").iterdir())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    save_s, load_s = min(saves), min(loads)
    share = save_s / (args.minutes * 60) if args.minutes > 0 else None
    print(
        f"{args.architecture} {args.d_in} x {args.width} on {device}: checkpoint {size / 1e9:.3f} GB; "
        f"write {save_s:.2f} s ({size / save_s / 1e9:.2f} GB/s), read back {load_s:.2f} s (best of {args.repeats})"
    )
    if share is not None:
        print(f"every {args.minutes:g} minutes that is {100 * share:.3f}% of the wall time")
    print(
        json.dumps(
            {
                "architecture": args.architecture,
                "d_in": args.d_in,
                "width": args.width,
                "device": str(device),
                "checkpoint_bytes": size,
                "save_s": round(save_s, 3),
                "load_s": round(load_s, 3),
                "checkpoint_minutes": args.minutes,
                "share_of_wall_time": share,
            }
        )
    )


if __name__ == "__main__":
    main()
