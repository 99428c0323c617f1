"""benchmarks/peers.py: the replay stand-in feeds sparsify's Trainer our rows in our order; train_sae.py's bars."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from peers import SEQ_ROWS, ReplayModel, importable, replay_order, run_sparsify  # noqa: E402
from train_sae import in_memory, jumprelu_against_topk  # noqa: E402


def test_replay_model_outputs_the_rows_its_ids_name():
    rows = torch.randn(300, 8)
    ids = torch.tensor([[3, 1, 299], [0, 0, 42]])
    out = ReplayModel(rows)(input_ids=ids)
    for b in range(2):
        for s in range(3):
            assert torch.equal(out[b, s], rows[int(ids[b, s])])


def test_replay_order_is_our_training_order():
    x = torch.randn(1000, 4)
    order = replay_order(1000, 5, lambda idx: in_memory(idx, 256, 0)(0))
    ours = in_memory(x, 256, 0)(0)
    assert order.shape == (5 * 256 // SEQ_ROWS, SEQ_ROWS)
    for step in range(5):  # two epochs: 1000 // 256 = 3 batches each, reshuffled
        assert torch.equal(x[order[step * 2 : (step + 1) * 2].flatten()], next(ours))


def test_in_memory_batches_resume_mid_stream_and_cover_every_row_once_per_epoch():
    """Counted by hand: each epoch's batches are a permutation of all rows (minus the remainder), epochs
    differ, and a stream started at step s yields exactly what the stream from 0 yields from step s on."""
    x = torch.arange(10).float()[:, None]
    stream = in_memory(x, 3, 0)(0)
    batches = [next(stream).flatten().long() for _ in range(9)]  # 3 batches per epoch, 3 epochs
    for epoch in range(3):
        rows = torch.cat(batches[3 * epoch : 3 * epoch + 3])
        assert len(set(rows.tolist())) == 9  # no row twice within an epoch
    assert not torch.equal(torch.cat(batches[:3]), torch.cat(batches[3:6]))  # reshuffled
    resumed = in_memory(x, 3, 0)(4)
    assert all(torch.equal(next(resumed).flatten().long(), b) for b in batches[4:])


@pytest.mark.skipif(importable("sparsify") is not None, reason="eai-sparsify not installed (the `peers` extra)")
def test_sparsify_trains_on_replayed_rows():
    torch.manual_seed(0)
    basis = torch.randn(32, 16)
    codes = torch.rand(2048, 32) * (torch.rand(2048, 32) < 0.1)
    x = codes @ basis + 0.01 * torch.randn(2048, 16)
    result = run_sparsify(
        x[:1536],
        x[1536:],
        k=4,
        width=64,
        batch_tokens=256,
        steps=30,
        batches=lambda idx: in_memory(idx, 256, 0)(0),
        overrides=["optimizer=adam", "lr_warmup_steps=0"],
    )
    assert result["train_tokens"] == 30 * 256 and result["l0"] == 4.0
    assert result["config"]["optimizer"] == "adam"
    assert 0 < result["fvu"] < 1  # learned something from the sparse structure


def test_the_jumprelu_bar_is_judged_only_at_equal_l0_and_only_when_both_ran():
    topk = {"fvu": 0.156, "k": 32, "target_l0": 0}
    assert jumprelu_against_topk({"topk": topk}) is None
    better = jumprelu_against_topk({"topk": topk, "jumprelu-l0": {"fvu": 0.155, "k": 0, "target_l0": 32}})
    assert better["met"] is True and better["fvu_ratio"] == round(0.155 / 0.156, 4)
    assert jumprelu_against_topk({"topk": topk, "jumprelu-l0": {"fvu": 0.157, "k": 0, "target_l0": 32}})["met"] is False
    assert jumprelu_against_topk({"topk": topk, "jumprelu-l0": {"fvu": 0.1, "k": 0, "target_l0": 16}})["met"] is None
