"""Each layer's transcoder figures beside the graph: the spliced delta loss against a by-hand splice, the table, the page."""

from __future__ import annotations

import json

import pytest
import torch

from support.tiny_corpus import tiny_llama_with_corpus
from support.transcoders import random_transcoders
from token_journey.circuits.quality import layer_table, spliced_losses
from token_journey.data.corpus import read_sequences, row_mask, special_ids
from token_journey.errors import TokenJourneyError
from token_journey.layout import corpus_file
from token_journey.sites import decoder_layers


def _by_hand(model, ids, rows, layer, transcoder):
    """Mean next-token cross-entropy over the predictions whose target is a row, with layer's MLP output at the
    rows replaced by the transcoder's prediction from the MLP's input (None: the clean model)."""

    def replace(module, inputs, output):
        x = inputs[0].reshape(-1, inputs[0].shape[-1])
        predicted = transcoder.output(transcoder.encode(x), x).reshape(output.shape)
        return torch.where(rows[..., None], predicted, output)

    mlp = decoder_layers(model)[layer].mlp
    handle = mlp.register_forward_hook(replace) if transcoder is not None else None
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits.double()
    finally:
        if handle is not None:
            handle.remove()
    counted = rows[:, 1:]
    losses = torch.nn.functional.cross_entropy(logits[:, :-1][counted], ids[:, 1:][counted], reduction="none")
    return float(losses.mean())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    lm = tiny_llama_with_corpus(root, n_docs=40, max_tokens=1024, eval_tokens=256)
    return lm, corpus_file(root / "corpus", "eval")


def test_spliced_delta_loss_matches_a_by_hand_splice(tiny):
    lm, eval_file = tiny
    model = lm.model.float().eval()
    transcoders = random_transcoders(len(decoder_layers(model)))
    losses = spliced_losses(model, lm.tokenizer, eval_file, transcoders, tokens=128, exclude_first=1, max_norm_ratio=0.0, batch_size=3)
    ids = read_sequences(eval_file).input_ids[: 128 // 16]
    rows = row_mask(ids, special_ids(lm.tokenizer), 1)
    clean = _by_hand(model, ids, rows, 0, None)
    for layer, got in enumerate(losses):
        spliced = _by_hand(model, ids, rows, layer, transcoders[layer])
        assert got["ce_clean"] == pytest.approx(clean, abs=1e-4)
        assert got["delta_loss"] == pytest.approx(spliced - clean, abs=1e-4)
        assert abs(got["delta_loss"]) > 1e-3  # a random transcoder is a poor MLP: the figure is not trivially 0
        assert got["loss_positions"] == int(rows[:, 1:].sum())


def test_layer_table_reads_each_train_json(tmp_path):
    folders = []
    for layer in range(2):
        folder = tmp_path / f"layer_{layer}"
        folder.mkdir()
        (folder / "train.json").write_text(json.dumps({"fvu": 0.1 * (layer + 1), "l0": 5.0, "dead_fraction": 0.02, "eval_tokens": 100, "other": 1}))
        folders.append(folder)
    table = layer_table(folders, [{"delta_loss": 0.5}, {"delta_loss": 0.25}])
    assert table == [
        {"layer": 0, "fvu": 0.1, "l0": 5.0, "dead_fraction": 0.02, "eval_tokens": 100, "delta_loss": 0.5},
        {"layer": 1, "fvu": 0.2, "l0": 5.0, "dead_fraction": 0.02, "eval_tokens": 100, "delta_loss": 0.25},
    ]
    assert "delta_loss" not in layer_table(folders, None)[0]
    with pytest.raises(TokenJourneyError, match="no train.json"):
        layer_table([tmp_path], None)


def test_the_page_and_the_metrics_show_the_table(tmp_path):
    from support.configs import make
    from support.tiny import tiny_model, tiny_tokenizer
    from token_journey.circuits.trace import trace, write_outputs
    from token_journey.config.circuits import CircuitsConfig

    traced = trace(tiny_model("llama"), tiny_tokenizer(), random_transcoders(3), make(CircuitsConfig, max_prompt_tokens=64), "tiny-llama", progress=False)
    assert "transcoders" not in traced.summary()
    traced.transcoders = [
        {"layer": 0, "fvu": 0.25, "l0": 3.0, "dead_fraction": 0.05, "eval_tokens": 1000, "delta_loss": 0.125},
        {"layer": 1, "fvu": 0.5, "l0": 4.0, "dead_fraction": 0.0, "eval_tokens": 1000},  # delta loss not measured
    ]
    paths = write_outputs(traced, tmp_path, scan="tiny/random")
    page = paths["page"].read_text()
    table = page.split("<h2>Transcoders</h2>")[1]
    assert "<td>0</td><td>0.250</td><td>+0.1250</td><td>3.0</td><td>5.0%</td><td>1,000</td>" in table
    assert "<td>1</td><td>0.500</td><td>-</td><td>4.0</td><td>0.0%</td>" in table
    assert json.loads(paths["metrics"].read_text())["transcoders"] == traced.transcoders
