"""Device-clean code, proved on the CPU, and the launchers' environments.

The guard: torch's default device is set to `meta` while the SAE and its data are explicitly on the
CPU. Any tensor our training code creates without naming a device then lands on `meta`, and the
first operation mixing it with a CPU tensor fails. So a pass means every tensor the loop makes
(counters, buffers, checkpoints, optimizer scalars, metrics) follows the SAE's device, which is
what lets the same code train on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from support.configs import make_sae
from token_journey.config.sae import SAEConfig
from token_journey.distributed import first_host, select_device, slurm_environment
from token_journey.errors import TokenJourneyError
from token_journey.eval.metrics import sae_reconstruction
from token_journey.sae.registry import ARCHITECTURES, USES_K, is_transcoder
from token_journey.sae.train import DataStats, new_sae, train

D_IN, WIDTH, BATCH, STEPS = 8, 32, 64, 12


def _rows(seed: int, n: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(24, D_IN, generator=g, device="cpu"), dim=1)
    on = torch.rand(n, 24, generator=g, device="cpu") < 0.1
    return (on * torch.rand(n, 24, generator=g, device="cpu") * 4) @ dirs + 1.0


def _cfg(arch: str) -> SAEConfig:
    return make_sae(
        arch,
        name=arch,
        width=WIDTH,
        k=4,
        batch_size=BATCH,
        train_tokens=BATCH * STEPS,
        lr=0.01,
        lr_warmup_steps=2,
        sparsity_warmup_steps=3,
        checkpoint_every=5,
        dead_window_tokens=BATCH * 4,
        log_every=4,
        coefficient=0.02 if arch.startswith("jumprelu") else 0.05,
        k_aux=16,
    )


@pytest.fixture
def meta_default():
    """torch's default device is `meta` inside the test."""
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_training_creates_every_tensor_on_the_sae_device(arch, tmp_path, meta_default):
    torch.set_default_device(None)  # the data is made (on the CPU) before the guard goes up
    paired = is_transcoder(arch)  # a transcoder's rows: input beside target (here twice the input)
    data = [_rows(100 + i, BATCH) for i in range(STEPS)]
    if paired:
        data = [torch.cat([x, 2 * x], 1) for x in data]
    held_out = _rows(7, 512)
    target = 2 * held_out if paired else held_out
    stats = DataStats(target.mean(0), float(target.pow(2).sum(1).mean()))
    in_stats = DataStats(held_out.mean(0), float(held_out.pow(2).sum(1).mean())) if paired else None
    torch.set_default_device("meta")
    assert torch.empty(1).device.type == "meta"  # the guard is up

    def batches(start: int):
        yield from data[start:]

    cfg = _cfg(arch)
    cpu = torch.device("cpu")
    sae = new_sae(cfg, D_IN, stats, seed=0, device=cpu)
    before = sae.W_dec.detach().clone()
    # Stop, checkpoint and resume: the checkpoint's tensors and optimizer scalars are covered too.
    train(sae, batches, stats, cfg, in_stats=in_stats, checkpoint_dir=tmp_path / "ckpt", stop_after=6)
    resumed = new_sae(cfg, D_IN, stats, seed=0, device=cpu)
    info = train(resumed, batches, stats, cfg, in_stats=in_stats, checkpoint_dir=tmp_path / "ckpt")
    metrics = sae_reconstruction(resumed, held_out, target=target if paired else None)

    assert info["steps"] == STEPS
    assert {p.device for p in resumed.parameters()} == {cpu}
    assert not torch.equal(resumed.W_dec.detach(), before)
    assert 0 <= metrics["fvu"] < 1.5 and metrics["l0"] > 0


def test_the_guard_catches_a_tensor_made_without_a_device(meta_default):
    """The guard itself: code that forgets the device fails under it (as the loop did before the fix)."""
    counter = torch.zeros(4, dtype=torch.long)  # what `since_fired` was: no device named
    fired = torch.ones(4, dtype=torch.bool, device="cpu")
    with pytest.raises((RuntimeError, NotImplementedError)):
        counter[fired] = 0
        float(counter.sum())


def test_new_sae_starts_from_the_same_weights_whatever_the_default_device(meta_default):
    torch.set_default_device(None)
    cfg, x = _cfg("topk"), _rows(3, 256)
    stats = DataStats(x.mean(0), float(x.pow(2).sum(1).mean()))
    reference = new_sae(cfg, D_IN, stats, seed=5).tensors()
    torch.set_default_device("meta")
    guarded = new_sae(cfg, D_IN, stats, seed=5, device="cpu").tensors()
    assert all(torch.equal(reference[k], guarded[k]) for k in reference)
    assert cfg.architecture in USES_K


def test_slurm_variables_become_torch_distributed_ones():
    env = {"SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "gpu[07-08]"}
    assert slurm_environment(env) == {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07", "MASTER_PORT": "29500"}
    # A launcher inside srun (torchrun, accelerate) already describes the run; one task needs nothing.
    assert slurm_environment({**env, "WORLD_SIZE": "8"}) == {}
    assert slurm_environment({**env, "SLURM_NTASKS": "1"}) == {}
    assert slurm_environment({**env, "MASTER_ADDR": "head", "MASTER_PORT": "1234"})["MASTER_ADDR"] == "head"
    with pytest.raises(TokenJourneyError, match="SLURM_PROCID"):
        slurm_environment({"SLURM_NTASKS": "2"})


@pytest.mark.parametrize("nodes,first", [("node1", "node1"), ("a,b", "a"), ("gpu[03-05,07],cpu1", "gpu03"), ("x[9,2]", "x9"), ("n[001-004]", "n001")])
def test_first_host_of_a_slurm_node_list(nodes, first):
    assert first_host(nodes) == first


def test_device_names(monkeypatch):
    assert select_device("cpu") == torch.device("cpu")
    with pytest.raises(TokenJourneyError, match="not a torch device"):
        select_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(TokenJourneyError, match="no CUDA GPU"):
            select_device("cuda")
        assert select_device("auto").type in ("cpu", "mps")
