"""Training and the whole DAG on CUDA (`pytest -m gpu` on a machine with a GPU; skipped where there is none).

Proves: every architecture trains on CUDA with its parameters, buffers, Adam state and the
dead-latent counter (`since_fired`) all on the GPU, from batches the loader hands over on the CPU,
and ends close to the same training on the CPU; and `dvc repro` of the tiny DAG with `device: cuda`
runs every stage and writes every output.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch.cuda.is_available() is False here (no GPU, or a CPU build of torch)"),
]

ARCHITECTURES = ("jumprelu", "topk", "batchtopk", "matryoshka", "relu")
D_IN, WIDTH, BATCH, STEPS = 32, 128, 256, 6


def _batches(data: torch.Tensor):
    """`batches(start)` over fixed CPU rows, as the shard loader gives them."""

    def batches(start: int):
        step = start
        while True:
            i = step % (data.shape[0] // BATCH)
            yield data[i * BATCH : (i + 1) * BATCH]
            step += 1

    return batches


def _devices(tensors) -> set[str]:
    return {t.device.type for t in tensors}


def _train(arch: str, device: str, data: torch.Tensor, checkpoints: Path, monkeypatch) -> tuple[torch.nn.Module, dict, dict]:
    """Train `arch` on `device` for STEPS steps; (sae, train info, devices seen at the checkpoint)."""
    import token_journey.sae.train as train_mod
    from support.configs import make_sae
    from token_journey.sae.train import DataStats, new_sae, train

    cfg = make_sae(
        arch,
        width=WIDTH,
        k=8,
        coefficient=0.0007,
        batch_size=BATCH,
        train_tokens=BATCH * STEPS,
        checkpoint_every=STEPS // 2,
        lr_warmup_steps=2,
        sparsity_warmup_steps=2,
        dead_window_tokens=BATCH * 2,
        b_dec_init="mean",
        log_every=1,
    )
    stats = DataStats(data.mean(0), float(data.pow(2).sum(1).mean()))
    sae = new_sae(cfg, D_IN, stats, seed=0, device=device)
    seen: dict[str, set[str]] = {}
    real_save = train_mod.save_checkpoint

    def recording_save(folder, step, sae_, opt, since_fired, fingerprint):
        seen["parameters"] = _devices(sae_.parameters())
        seen["state"] = _devices(sae_.state_dict().values())  # buffers too (BatchTopK's threshold)
        seen["adam"] = _devices(v for slot in opt.state.values() for v in slot.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
        seen["since_fired"] = {since_fired.device.type}
        return real_save(folder, step, sae_, opt, since_fired, fingerprint)

    monkeypatch.setattr(train_mod, "save_checkpoint", recording_save)
    info = train(sae, _batches(data), stats, cfg, checkpoint_dir=checkpoints)
    return sae, info, seen


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_training_stays_on_cuda_and_matches_cpu(arch, tmp_path, monkeypatch):
    data = torch.randn(BATCH * 3, D_IN, generator=torch.Generator().manual_seed(1)) * 3 + 0.5
    gpu, gpu_info, seen = _train(arch, "cuda", data, tmp_path / "cuda", monkeypatch)
    assert seen, "no checkpoint was written, so the training state was never inspected"
    for what, devices in seen.items():
        assert devices == {"cuda"}, f"{arch}: {what} on {devices} during CUDA training"
    assert _devices(gpu.state_dict().values()) == {"cuda"}, f"{arch}: the trained SAE left the GPU"

    cpu, cpu_info, _ = _train(arch, "cpu", data, tmp_path / "cpu", monkeypatch)
    assert gpu_info["steps"] == cpu_info["steps"] == STEPS
    # Kernels round differently, and Adam turns a near-zero gradient's sign into a whole step,
    # so compare each tensor as a whole (relative Frobenius distance) and the reconstructions.
    for name, want in cpu.state_dict().items():
        got = gpu.state_dict()[name].cpu()
        scale = want.float().norm().clamp_min(1e-6)
        assert float((got.float() - want.float()).norm() / scale) < 2e-2, f"{arch}: {name} differs between CUDA and CPU"
    with torch.no_grad():
        x = data[:BATCH]
        got, want = gpu(x.cuda()).cpu(), cpu(x)
    assert float((got - want).norm() / want.norm()) < 2e-2, f"{arch}: reconstructions differ between CUDA and CPU"
    assert gpu_info["final_mse"] == pytest.approx(cpu_info["final_mse"], rel=2e-2)


@pytest.mark.slow
def test_dag_end_to_end_on_cuda(tmp_path_factory):
    from test_pipeline import _run, _stages_run, make_project

    project = make_project(tmp_path_factory.mktemp("pipeline-cuda"), device="cuda")
    assert "\ndevice: cuda\n" in (project / "params.yaml").read_text()
    out = _run(["dvc", "repro"], project)
    assert _stages_run(out) == {"prepare_model", "collect_corpus", "harvest", "train_sae@0", "train_sae@2", "evaluate@0", "evaluate@2", "report", "journey"}
    for layer in (0, 2):
        metrics = json.loads((project / f"reports/metrics/tiny/resid_post/layer_{layer}.json").read_text())
        assert len(metrics["saes"]) == 3  # `sae` and the two family members
        for entry in metrics["saes"].values():
            assert 0 < entry["l0"] <= 64 and entry["fvu"] >= 0
        assert len(list((project / f"models/saes/tiny/resid_post/layer_{layer}").glob("*/sae.safetensors"))) == 3
    assert (project / "reports/html/index.html").is_file()
    assert (project / "reports/summary.md").is_file()
    assert list((project / "reports/journey").glob("*.html"))
