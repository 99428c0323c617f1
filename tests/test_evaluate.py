"""The evaluation sweep: splicing sanity (identity / zero), an independent loss reference, pass count."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from support.configs import make
from support.tiny import tiny_model
from token_journey.data.corpus import row_mask
from token_journey.eval import metrics
from token_journey.eval.evaluate import evaluate_saes
from token_journey.sites import capture, decoder_layers

SPECIAL = (0, 1, 2)  # the tiny tokenizer's <bos>, <eos>, <pad>


class _Linear(nn.Module):
    """A stand-in SAE: f = relu(x W_enc + b_enc), x_hat = f W_dec + b_dec (SAELens orientation)."""

    def __init__(self, W_enc: torch.Tensor, W_dec: torch.Tensor, relu: bool = True) -> None:
        super().__init__()
        self.W_enc = nn.Parameter(W_enc)
        self.W_dec = nn.Parameter(W_dec)
        self.b_enc = nn.Parameter(torch.zeros(W_enc.shape[1]))
        self.b_dec = nn.Parameter(torch.zeros(W_dec.shape[1]))
        self.relu = relu

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = x @ self.W_enc + self.b_enc
        return torch.relu(pre) if self.relu else pre

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec


def identity_sae(d: int) -> _Linear:
    return _Linear(torch.eye(d), torch.eye(d), relu=False)


def zero_sae(d: int) -> _Linear:
    return _Linear(torch.zeros(d, 3), torch.zeros(3, d))


def random_sae(d: int, d_sae: int = 48, seed: int = 0) -> _Linear:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, d_sae, generator=g) / math.sqrt(d)
    return _Linear(W, W.T.clone())


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _sequences(n_seq: int = 5, seq: int = 12, seed: int = 3) -> torch.Tensor:
    """Packed-corpus-like ids: a BOS first, an EOS inside some sequences, a padded tail in one."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 320, (n_seq, seq), generator=g)
    ids[:, 0] = 0
    ids[1, 6] = 1
    ids[2, 9:] = 2
    return ids


def test_identity_sae_costs_nothing_and_zero_sae_recovers_nothing(llama):
    ids = _sequences()
    rows = row_mask(ids, SPECIAL, exclude_first=1)
    d = llama.config.hidden_size
    result = evaluate_saes(llama, ids, rows, "resid_post", 1, {"identity": identity_sae(d), "zero": zero_sae(d)}, batch_size=2)
    ident, zero = result.saes["identity"], result.saes["zero"]
    assert abs(ident["delta_loss"]) < 1e-5
    assert ident["loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert abs(ident["kl"]) < 1e-5 and ident["fvu"] < 1e-10 and ident["cosine"] == pytest.approx(1.0)
    assert zero["loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert zero["delta_loss"] == pytest.approx(zero["ce_zero"] - zero["ce_clean"])
    assert zero["delta_loss"] > 1e-3 and zero["kl"] > 1e-3  # ablating a layer of a random model changes its output
    assert zero["l0"] == 0 and zero["dead_fraction"] == 1.0 and zero["fvu"] > 0.99
    assert ident["eval_tokens"] == int(rows.sum())
    assert result.sweep["loss_positions"] == int(rows[:, 1:].sum())


def _without_norm_outliers(x: torch.Tensor, rows: torch.Tensor, ratio: float) -> torch.Tensor:
    """Hand loop: drop rows above `ratio` x their sequence's (lower) median row norm."""
    keep = rows.clone()
    for b in range(rows.shape[0]):
        norms = [float(x[b, t].norm()) for t in range(rows.shape[1]) if rows[b, t]]
        median = sorted(norms)[(len(norms) - 1) // 2]
        for t in range(rows.shape[1]):
            keep[b, t] = bool(rows[b, t]) and float(x[b, t].norm()) <= ratio * median
    return keep


@pytest.mark.parametrize("max_norm_ratio", [0.0, 1.05])
def test_spliced_loss_matches_an_independent_reference(llama, max_norm_ratio):
    """CE with labels masked to the counted targets, and the splice done by a hand-written hook.

    With a norm rule, the evaluated rows are also chosen by hand from the clean activations.
    """
    ids = _sequences()
    admitted = row_mask(ids, SPECIAL, exclude_first=2)
    d, site, layer = llama.config.hidden_size, "mlp_out", 0
    sae = random_sae(d)
    sweep = evaluate_saes(llama, ids, admitted, site, layer, {"rand": sae}, batch_size=2, max_norm_ratio=max_norm_ratio)
    result = sweep.saes["rand"]
    with torch.inference_mode():
        x = capture(llama, ids, [(site, layer)])[(site, layer)]
    rows = _without_norm_outliers(x, admitted, max_norm_ratio) if max_norm_ratio else admitted
    assert sweep.sweep["eval_rows"] == int(rows.sum()) and result["eval_tokens"] == int(rows.sum())
    if max_norm_ratio:
        assert 0 < sweep.sweep["norm_outliers_dropped"] == int(admitted.sum() - rows.sum())
    labels = torch.where(rows, ids, torch.full_like(ids, -100))  # HF shifts labels: target t + 1 counts iff a row
    with torch.inference_mode():
        clean = llama(input_ids=ids, labels=labels)

        def hook(_module, _inputs, output):
            out = output.clone()
            out[rows] = sae.decode(sae.encode(x[rows]))
            return out

        handle = decoder_layers(llama)[layer].mlp.register_forward_hook(hook)
        try:
            spliced = llama(input_ids=ids, labels=labels)
        finally:
            handle.remove()
    assert result["ce_clean"] == pytest.approx(clean.loss.item(), rel=1e-5)
    assert result["ce_sae"] == pytest.approx(spliced.loss.item(), rel=1e-5)
    counted = rows[:, 1:]
    p = torch.log_softmax(clean.logits[:, :-1][counted], -1)
    q = torch.log_softmax(spliced.logits[:, :-1][counted], -1)
    # abs: the head runs on the counted rows only, so float32 rounding differs by ~1e-9 from the full-logits pass.
    assert result["kl"] == pytest.approx((p.exp() * (p - q)).sum(-1).mean().item(), rel=1e-4, abs=1e-8)
    x_rows, x_hat = x[rows], sae.decode(sae.encode(x[rows])).detach()
    assert result["fvu"] == pytest.approx(metrics.fvu(x_rows, x_hat), rel=1e-6)
    assert result["l0"] == pytest.approx(metrics.l0(sae.encode(x_rows)))


@pytest.mark.parametrize("site, resume_at", [("resid_post", 2), ("mlp_out", 1)])
def test_several_saes_share_one_sweep(llama, site, resume_at):
    """k SAEs over n batches cost n * (k + 2) passes: clean + zero + one spliced pass each, where only
    the clean pass runs the layers before the site's and every other pass resumes there."""
    ids = _sequences(n_seq=6)
    rows = row_mask(ids, SPECIAL, exclude_first=1)
    d, layer = llama.config.hidden_size, 1
    calls: dict[str, int] = {}

    def counter(name):
        return lambda *_: calls.__setitem__(name, calls.get(name, 0) + 1)

    modules = {f"layer {i}": block for i, block in enumerate(decoder_layers(llama))}
    modules["norm"] = llama.get_decoder().norm  # every pass ends in the final norm
    handles = [module.register_forward_hook(counter(name)) for name, module in modules.items()]
    try:
        saes = {f"s{i}": random_sae(d, seed=i) for i in range(3)}
        result = evaluate_saes(llama, ids, rows, site, layer, saes, batch_size=4)
    finally:
        for handle in handles:
            handle.remove()
    batches, passes = 2, 3 + 2
    assert result.sweep["forward_passes"] == passes
    assert calls == {"norm": batches * passes, **{f"layer {i}": batches * (passes if i >= resume_at else 1) for i in range(len(decoder_layers(llama)))}}
    assert set(result.saes) == set(saes)
    assert all(m["eval_tokens_per_s"] > 0 for m in result.saes.values())


# --- the evaluate stage on real artifacts: prepared tiny model, corpus, harvest, saved SAEs ---------

CONTEXT, N_SEQ = 16, 6


def _write_corpus(folder, seed: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 300, size=(N_SEQ, CONTEXT)).astype(np.int32)
    ids[:, 0] = 0  # BOS
    ids[1, 9] = 1  # a document boundary inside a packed sequence
    seq = np.arange(N_SEQ, dtype=np.int64)
    table = pa.table({"sequence_id": seq, "doc_id": seq, "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), CONTEXT)})
    pq.write_table(table, folder)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Everything the evaluate stage reads, made by the project's own code (layers 1 and 2 harvested)."""
    from support.tiny import save_tiny
    from token_journey.config.harvest import HarvestConfig
    from token_journey.config.model import ModelConfig
    from token_journey.data.harvest import harvest
    from token_journey.layout import Layout, train_timing_file, write_json
    from token_journey.lm import load_prepared, prepare_model
    from token_journey.sae.base import SAESpec
    from token_journey.sae.io import save_sae
    from token_journey.sae.registry import build_sae

    root = tmp_path_factory.mktemp("evaluate")
    src = save_tiny("llama", root / "src")
    prepare_model(make(ModelConfig, name="tiny", source="local", id=str(src)), root / "base")
    (root / "corpus").mkdir()
    _write_corpus(root / "corpus" / "train.parquet", seed=1)
    _write_corpus(root / "corpus" / "eval.parquet", seed=2)
    lm = load_prepared(root / "base", device="cpu")
    harvest(lm, make(HarvestConfig, layers=(1, 2), exclude_first=2, shard_rows=64), root / "corpus", root / "acts", torch.device("cpu"))
    for name, arch, k, layer in [("relu-a", "relu", 0, 1), ("topk-b", "topk", 4, 1), ("other-layer", "relu", 0, 2)]:
        sae = build_sae(SAESpec(arch, 32, 40, k=k, name=name, model="tiny", site="resid_post", layer=layer))
        sae.init_weights(torch.Generator().manual_seed(len(name)))
        place = "saes" if name != "other-layer" else "elsewhere"
        save_sae(sae, root / place / "resid_post" / f"layer_{layer}" / name)
        if k:  # what train_layer records for an SAE it trained
            write_json(train_timing_file(root / "timings", "resid_post", layer, name), {"tokens_per_s": 1234.5})
    return root, Layout(
        base_model=root / "base",
        corpus=root / "corpus",
        activations=root / "acts",
        saes=root / "saes",
        metrics=root / "metrics",
        html=root / "html",
        journey=root / "journey",
        circuits_data=root / "circuits_data",
        circuits=root / "circuits",
        graphs=root / "graphs",
        summary=root / "summary.md",
        timings=root / "timings",
    )


def test_evaluate_layer_writes_metrics_and_plot_rows(artifacts):
    import json

    import pyarrow as pa

    from token_journey.config.eval import EvalConfig
    from token_journey.data.shards import open_activations
    from token_journey.eval.evaluate import evaluate_layer
    from token_journey.layout import eval_timing_file, metrics_file, pareto_file

    root, inputs = artifacts
    doc, speeds = evaluate_layer(make(EvalConfig, max_tokens=10_000, batch_size=4), inputs, "resid_post", 1, device="cpu")
    assert json.loads(metrics_file(inputs.metrics, "resid_post", 1).read_text()) == json.loads(json.dumps(doc))
    assert json.loads(eval_timing_file(inputs.timings, "resid_post", 1).read_text()) == speeds
    assert (doc["model"], doc["site"], doc["layer"]) == ("tiny", "resid_post", 1)
    assert set(doc["saes"]) == {"relu-a", "topk-b"}
    contract = {
        "architecture",
        "width",
        "l0",
        "fvu",
        "mse",
        "cosine",
        "relative_norm",
        "dead_fraction",
        "dense_fraction",
        "ce_clean",
        "ce_sae",
        "ce_zero",
        "delta_loss",
        "loss_recovered",
        "kl",
        "eval_tokens",
        "density_hist",
        "error_by_position",
        "absorption_rate",
        "split_fraction",
        "probe_llm",
        "probe_sae_top_1",
        "probe_sae_top_2",
        "probe_sae_top_5",
        "decoder_max_cos",
        "duplicate_fraction",
        "token_max_cos",
        "token_feature_fraction",
        "saebench",
    }
    for m in doc["saes"].values():
        assert contract <= set(m)
        assert len(m["error_by_position"]) == CONTEXT and m["error_by_position"][:3] == [None, None, None]
    # Run-to-run figures are kept out of the tracked metrics file and written beside it.
    assert not any("per_s" in key or "seconds" in key for key in [*doc["sweep"], *(k for m in doc["saes"].values() for k in m)])
    assert speeds["sweep"]["tokens_per_s"] > 0 and speeds["sweep"]["seconds"] > 0
    assert speeds["saes"]["topk-b"] == {
        "eval_tokens_per_s": pytest.approx(speeds["saes"]["topk-b"]["eval_tokens_per_s"]),
        "saebench_seconds": pytest.approx(speeds["saes"]["topk-b"]["saebench_seconds"]),
        "train_tokens_per_s": 1234.5,
    }
    assert speeds["saes"]["relu-a"]["train_tokens_per_s"] is None and speeds["saes"]["relu-a"]["eval_tokens_per_s"] > 0
    assert doc["saes"]["topk-b"]["l0"] <= 4
    # The same rows as the harvest: our FVU equals FVU over the harvested eval activations.
    acts = open_activations(root / "acts", "resid_post", 1, split="eval")
    table = pa.concat_tables(list(acts.iter_tables()))
    x = torch.tensor(table.column("activation").to_pylist())
    from token_journey.sae.io import load_sae

    sae = load_sae(root / "saes" / "resid_post" / "layer_1" / "relu-a")
    with torch.inference_mode():
        assert doc["saes"]["relu-a"]["fvu"] == pytest.approx(metrics.fvu(x, sae(x)), rel=1e-4)
    assert doc["saes"]["relu-a"]["eval_tokens"] == acts.rows
    rows = json.loads(pareto_file(inputs.metrics, "resid_post", 1).read_text())
    assert {r["sae"] for r in rows} == {"relu-a", "topk-b"}
    assert all(r["layer"] == 1 and {"sae", "layer", "l0", "fvu", "delta_loss", "absorption_rate"} <= set(r) for r in rows)
    # The SAEBench rows are the harvested eval rows: decoder geometry needs no rows, so check it directly.
    from token_journey.eval import saebench

    assert doc["saes"]["relu-a"]["saebench"]["rows"] == min(acts.rows, 8192)
    assert doc["saes"]["relu-a"]["decoder_max_cos"] == pytest.approx(saebench.max_cosine_to_others(sae.W_dec.detach()).mean().item())


def test_bad_input_names_both_sides(artifacts, tmp_path):
    from token_journey.config.eval import EvalConfig
    from token_journey.errors import TokenJourneyError
    from token_journey.eval.evaluate import evaluate_layer
    from token_journey.sae.base import SAESpec
    from token_journey.sae.io import save_sae
    from token_journey.sae.registry import build_sae

    root, inputs = artifacts
    narrow = build_sae(SAESpec("relu", 16, 8, name="narrow"))
    save_sae(narrow, tmp_path / "narrow")
    with pytest.raises(TokenJourneyError, match=r"narrow has d_in=16 but resid_post at layer 1 .* d_model=32"):
        evaluate_layer(make(EvalConfig, extra_saes=(str(tmp_path / "narrow"),)), inputs, "resid_post", 1, device="cpu")
    wrong_layer = root / "elsewhere" / "resid_post" / "layer_2" / "other-layer"
    with pytest.raises(TokenJourneyError, match="trained on resid_post layer 2 but this evaluation is for resid_post layer 1"):
        evaluate_layer(make(EvalConfig, extra_saes=(str(wrong_layer),)), inputs, "resid_post", 1, device="cpu")
    with pytest.raises(TokenJourneyError, match="no SAE to evaluate for resid_post layer 2"):
        evaluate_layer(make(EvalConfig), inputs, "resid_post", 2, device="cpu")
    with pytest.raises(TokenJourneyError, match="layer 0 .*was not harvested"):
        evaluate_layer(make(EvalConfig), inputs, "resid_post", 0, device="cpu")
    assert not (inputs.metrics / "resid_post" / "layer_0.json").exists()


@pytest.mark.slow
def test_identity_splice_on_smollm2(smollm2):
    """The packaged SmolLM2: an identity SAE at resid_post layer 15 changes nothing; zero ablation hurts."""
    from token_journey.data.corpus import special_ids

    text = [
        "The capital of France is Paris, and the capital of Italy is Rome. Paris is known for",
        "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # prints 5, the sum of two and three",
    ]
    ids = smollm2.tokenizer(text, padding="max_length", max_length=24, truncation=True, return_tensors="pt").input_ids
    rows = row_mask(ids, special_ids(smollm2.tokenizer), exclude_first=1)
    d = smollm2.model.config.hidden_size
    result = evaluate_saes(smollm2.model, ids, rows, "resid_post", 15, {"identity": identity_sae(d), "zero": zero_sae(d)}, batch_size=2).saes
    assert abs(result["identity"]["delta_loss"]) < 1e-4 and result["identity"]["kl"] < 1e-4
    assert result["identity"]["loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert result["zero"]["loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert result["zero"]["delta_loss"] > 1.0  # a real model needs its residual stream


def test_stage_runs_from_params_yaml(artifacts, tmp_path):
    """`python stages/evaluate.py` as dvc.yaml runs it: reads params.yaml, prints tokens/s, writes the files."""
    import subprocess
    import sys

    import yaml
    from conftest import REPO

    root, inputs = artifacts
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["paths"].update(
        base_model=str(root / "base"), corpus=str(root / "corpus"), activations=str(root / "acts"), saes=str(root / "saes"), metrics=str(tmp_path / "metrics")
    )
    params.update(site="resid_post", device="cpu")
    params["eval"].update(max_tokens=32, batch_size=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    run = subprocess.run(
        [sys.executable, str(REPO / "stages/evaluate.py"), "--config-path", str(tmp_path), "--config-name", "params", "layer=1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "eval tokens/s" in run.stdout and "relu-a" in run.stdout and "topk-b" in run.stdout
    assert (tmp_path / "metrics/resid_post/layer_1.json").is_file()
    assert (tmp_path / "metrics/resid_post/pareto/layer_1.json").is_file()


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: the head's final logit soft-capping
def test_chunked_losses_equal_the_full_logits(family):
    """CE and KL from the final hidden states, a few rows of logits at a time, equal log_softmax of the model's logits."""
    from token_journey.eval.evaluate import chunked_losses

    model = tiny_model(family)
    ids = _sequences()
    other = ids.clone()
    other[:, 3] = (other[:, 3] + 7) % 320  # a second distribution over the same predictions
    counted = row_mask(ids, SPECIAL, exclude_first=1)[:, 1:]
    targets = ids[:, 1:][counted]
    with torch.inference_mode():
        p = torch.log_softmax(model(input_ids=ids).logits[:, :-1][counted].float(), -1)
        q = torch.log_softmax(model(input_ids=other).logits[:, :-1][counted].float(), -1)
        clean_h = model.get_decoder()(input_ids=ids).last_hidden_state[:, :-1][counted]
        other_h = model.get_decoder()(input_ids=other).last_hidden_state[:, :-1][counted]
        want_ce = -q.gather(-1, targets[:, None])[:, 0]
        want_kl = (p.exp() * (p - q)).sum(-1)
        for chunk_bytes in (3 * 320 * 4, 1 << 30):  # 3 rows at a time, and everything in one chunk
            ce, kl = chunked_losses(model, other_h, targets, clean_h, chunk_bytes=chunk_bytes)
            torch.testing.assert_close(ce, want_ce, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(kl, want_kl, rtol=1e-4, atol=1e-6)
    assert len(targets) > 3 * 3 and float(want_kl.max()) > 1e-3  # several chunks, and a KL that is not trivially 0


def test_chunk_size_bounds_the_logits():
    from token_journey.eval.evaluate import LOGIT_CHUNK_BYTES, rows_per_chunk

    assert rows_per_chunk(128256) == 261 and 261 * 128256 * 4 <= LOGIT_CHUNK_BYTES < 262 * 128256 * 4
    assert rows_per_chunk(256000) == 131 and rows_per_chunk(10**9) == 1


@pytest.mark.parametrize("keep_clean", [True, False])
def test_evaluation_does_not_depend_on_the_chunk_size(llama, monkeypatch, keep_clean):
    """Nor on whether the batch keeps its clean log-probs for the SAEs' KL or recomputes them per SAE."""
    from token_journey.eval import evaluate as evaluate_module

    ids = _sequences()
    rows = row_mask(ids, SPECIAL, exclude_first=1)
    saes = {"rand": random_sae(llama.config.hidden_size), "other": random_sae(llama.config.hidden_size, seed=1)}
    whole = evaluate_saes(llama, ids, rows, "resid_post", 1, saes, batch_size=2).saes
    if not keep_clean:
        monkeypatch.setattr(evaluate_module, "CLEAN_KEEP_BYTES", 0)
    small = evaluate_saes(llama, ids, rows, "resid_post", 1, saes, batch_size=2, chunk_bytes=2 * 320 * 4).saes
    for name in saes:
        for key in ("ce_clean", "ce_zero", "ce_sae", "kl", "loss_positions"):
            assert small[name][key] == pytest.approx(whole[name][key], rel=1e-5, abs=1e-7)
