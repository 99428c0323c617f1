"""The SAEBench-style metrics against cases worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from token_journey.eval import saebench


def test_decoder_geometry_counts_duplicates_and_token_features() -> None:
    # Rows 0 and 1 point the same way (cos 1), row 2 is orthogonal to both, row 3 is at 45 degrees to row 2.
    w_dec = torch.tensor([[2.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 1.0, 1.0]])
    m = saebench.max_cosine_to_others(w_dec, chunk=3)  # a chunk boundary inside the rows
    assert torch.allclose(m, torch.tensor([1.0, 1.0, 1 / math.sqrt(2), 1 / math.sqrt(2)]))
    # Unembedding: one token along row 2's direction, one at cos 0.3 with row 0 (below 0.5).
    w_u = torch.tensor([[0, 5.0, 0], [0.3, 0, math.sqrt(1 - 0.09)]])
    t = saebench.max_cosine_to(w_dec, w_u)
    assert torch.allclose(t, torch.tensor([0.3, 0.3, 1.0, 1 / math.sqrt(2)]), atol=1e-6)
    got = saebench.decoder_geometry(w_dec, w_u)
    assert got["decoder_max_cos"] == pytest.approx((2 + math.sqrt(2)) / 4)
    assert got["duplicate_fraction"] == 0.5
    assert got["token_feature_fraction"] == 0.5  # rows 2 (cos 1) and 3 (cos 0.707)
    assert got["token_max_cos"] == pytest.approx((0.3 + 0.3 + 1 + 1 / math.sqrt(2)) / 4)


def test_absorbed_needs_silent_main_latents_and_an_aligned_carrier() -> None:
    # Probe direction e0. Latent 0 is the main latent, latent 1 is aligned (cos 0.8), latent 2 is
    # orthogonal, latent 3 is barely aligned (cos ~0.02, under the 0.025 threshold).
    w_dec = torch.tensor([[1.0, 0], [0.8, 0.6], [0, 1.0], [0.02, 1.0]])
    f = torch.tensor(
        [
            [1.0, 0, 0, 0],  # main latent fires: not absorbed
            [0, 1.0, 0, 0],  # main silent, aligned latent carries everything: absorbed
            [0, 0, 1.0, 0],  # main silent, only an orthogonal latent: not absorbed
            [0, 0.1, 0, 10.0],  # top contributor is latent 3 (0.2 of 0.28), under the cos threshold: not absorbed
            [0, 1.0, 0, 10.0],  # 0.8 of 1.0 (80%): absorbed
            [0.5, 1.0, 0, 0],  # main fires (weakly): not absorbed
            [0, 0.1, 0, 20.0],  # the top contributor (latent 3, 0.4 of 0.48) is not aligned: not absorbed
        ]
    )
    got = saebench.absorbed(f, w_dec, torch.tensor([3.0, 0]), torch.tensor([0]))
    assert got.tolist() == [False, True, False, False, True, False, False]


def _letter_data(n_per_letter: int = 60) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Words starting with 'a' or 'b' (plus non-words); x holds the letter in its own coordinate.

    Latent 0 fires on every 'a' word except those with index % 5 == 0, where latent 2 (decoder along
    the 'a' coordinate) fires instead; latent 1 fires on every 'b' word; latent 2 also fires on half
    of the 'b' words, so it is no good 'a' detector and is not picked as a main latent.
    """
    gen = torch.Generator().manual_seed(1)
    letters = torch.tensor([0] * n_per_letter + [1] * n_per_letter + [-1] * 10)
    n = len(letters)
    x = 0.05 * torch.randn(n, 4, generator=gen)
    x[letters == 0, 0] += 3.0
    x[letters == 1, 1] += 3.0
    f = torch.zeros(n, 6)
    index = torch.arange(n)
    is_a, is_b = letters == 0, letters == 1
    absorbed_a = is_a & (index % 5 == 0)
    f[is_a & ~absorbed_a, 0] = 2.0
    f[absorbed_a, 2] = 1.5
    f[is_b, 1] = 2.0
    f[is_b & (index % 2 == 0), 2] = 1.0
    w_dec = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0], [0, 0, 1.0, 1.0]])
    return x, f, letters, w_dec, absorbed_a


def test_absorption_rate_is_the_share_of_absorbed_letter_tokens() -> None:
    x, f, letters, w_dec, absorbed_a = _letter_data()
    got = saebench.absorption(x, f, letters, w_dec, seed=0)
    _, test = saebench.word_split(letters, seed=0)
    test_a = test[letters[test] == 0]  # the probe gets every clean word right (checked below)
    assert got["probe_accuracy"] == 1.0
    expected_a = absorbed_a[test_a].double().mean().item()
    assert 0 < expected_a < 1
    assert set(got["letters"]) == {"a", "b"}
    assert got["letters"]["a"]["main_latents"] == [0]
    assert got["letters"]["b"]["main_latents"] == [1]
    assert got["letters"]["a"]["absorption_rate"] == pytest.approx(expected_a)
    assert got["letters"]["b"]["absorption_rate"] == 0.0
    assert got["absorption_rate"] == pytest.approx(expected_a / 2)
    assert got["split_fraction"] == 0.0


def test_a_letter_shared_by_two_latents_is_split() -> None:
    x, f, letters, w_dec, absorbed_a = _letter_data()
    f[:, 2] = torch.where(absorbed_a, 1.5, 0.0)  # latent 2 now fires on the absorbed 'a' words only
    got = saebench.absorption(x, f, letters, w_dec, seed=0)
    assert sorted(got["letters"]["a"]["main_latents"]) == [0, 2]  # F1 0.89 -> 1.0 with latent 2
    assert got["letters"]["a"]["absorption_rate"] == 0.0
    assert got["split_fraction"] == 0.5


def test_sparse_probing_finds_the_latent_that_is_the_label() -> None:
    gen = torch.Generator().manual_seed(2)
    n = 400
    y = (torch.arange(n) % 2).long()
    x = torch.randn(n, 8, generator=gen)
    x[:, 3] += 8.0 * y  # the raw activations carry the label in one direction
    f = torch.rand(n, 20, generator=gen) * 0.1  # weak noise latents with equal class means
    f[:, 7] = y.float()  # latent 7 is the label
    labels = {"task": y, "rare": (torch.arange(n) < 5).long()}  # 5 positives: too few to probe
    assert saebench.top_latents(f, y, 1).tolist() == [7]
    got = saebench.sparse_probing(x, f, labels, seed=0)
    assert got["tasks"]["rare"] is None
    task = got["tasks"]["task"]
    assert task["sae_top_1"] == 1.0 and task["sae_top_2"] == 1.0 and task["sae_top_5"] == 1.0
    assert task["llm"] > 0.95
    assert task["rows"] == n  # balanced: 200 of each class
    assert got["sae_top_1"] == 1.0  # the mean over the one task that ran


def test_top_latents_ranks_mean_differences() -> None:
    f = torch.tensor([[1.0, 0, 3], [1.0, 0, 3], [0, 2.0, 0], [0, 2.0, 1]])
    y = torch.tensor([1, 1, 0, 0])
    # mean differences: +1, -2, +2.5
    assert saebench.top_latents(f, y, 3).tolist() == [2, 1, 0]
    assert saebench.top_latents(f, y, 2, signed=True).tolist() == [2, 0]


def test_probe_fits_a_separable_task_and_points_the_right_way() -> None:
    x = torch.tensor([[-1.0, 1], [-1.0, -1], [1.0, 1], [1.0, -1]])  # dim 1 says nothing
    y = torch.tensor([0, 0, 1, 1])
    probe = saebench.fit_probe(x, y, 2)
    assert probe.predict(x).tolist() == [0, 0, 1, 1]
    d = probe.direction(1)
    assert d[0] > 0 and abs(d[1]) < 1e-6 * abs(d[0]) + 1e-9
    assert torch.allclose(probe.direction(0), -d)  # the L2 penalty centres the class weights
    assert saebench.f1_score(torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 1, 0])) == pytest.approx(0.5)


def test_token_tasks_from_texts() -> None:
    texts = [" apple", "Banana", " 42", "def", " if", "é", " ", "3.5", " A"]
    labels = saebench.token_labels(texts)
    assert labels["digit"].tolist() == [0, 0, 1, 0, 0, 0, 0, 0, 0]
    assert labels["capitalised"].tolist() == [0, 1, 0, 0, 0, 0, 0, 0, 1]
    assert labels["python_keyword"].tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 0]
    assert labels["leading_space"].tolist() == [1, 0, 1, 0, 1, 0, 1, 0, 1]
    assert saebench.first_letters(texts).tolist() == [0, 1, -1, 3, 8, -1, -1, -1, 0]
    assert saebench.first_occurrences(torch.tensor([5, 3, 5, 7, 3])).tolist() == [0, 1, 3]


def test_report_shows_the_saebench_figures() -> None:
    from token_journey.report.build import overview_charts
    from token_journey.report.gather import HEADLINE, SaeEntry

    figures = [(8.0, 0.05, 0.4, 0.91), (16.0, 0.2, 0.3, 0.92), (32.0, 0.1, 0.2, 0.95)]  # l0, fvu, absorption, probe
    entries = [
        SaeEntry("resid_post", 15, f"sae-{i}", metrics={"l0": l0, "fvu": fvu, "delta_loss": fvu, "absorption_rate": a, "probe_sae_top_1": p})
        for i, (l0, fvu, a, p) in enumerate(figures)
    ]
    charts = overview_charts(entries, {}, bins=10)
    absorption = str(charts["absorption_vs_l0"])
    assert absorption.count("<circle") == 3 and 'class="front"' in absorption  # all three are Pareto-optimal
    assert 'class="front"' not in str(charts["probe_vs_l0"])  # higher is better: no lower-is-better front
    keys = [key for key, _, _ in HEADLINE]
    assert entries[0].cells()[keys.index("absorption_rate")] == "40.0%"
    assert "absorption_vs_l0" not in overview_charts([SaeEntry("resid_post", 15, "plain", metrics={"l0": 1.0, "fvu": 0.1})], {}, 10)


def test_probes_shared_by_several_saes_give_each_its_own_result() -> None:
    """`raw_probes` fitted once and handed to `sae_metrics` gives what each SAE's metrics compute alone,
    and its raw-probe accuracies are the ones `sparse_probing` fits without it."""
    from token_journey.sae.base import SAESpec
    from token_journey.sae.registry import build_sae

    words = [" " * (i % 2) + "abc"[i % 3] + "x" * (i // 3) for i in range(180)] + ["42", " def", "7", " Dog", " return"]
    gen = torch.Generator().manual_seed(4)
    n, d = 1500, 12
    token_ids = torch.cat([torch.arange(len(words)), torch.randint(0, len(words), (n - len(words),), generator=gen)])
    texts = [words[t] for t in token_ids.tolist()]
    x = torch.randn(n, d, generator=gen) + torch.nn.functional.one_hot(token_ids % 3, d).float() * 4  # the first letter
    w_u = torch.randn(len(words), d, generator=gen)
    saes = []
    for seed in (0, 1):
        sae = build_sae(SAESpec("relu", d, 24))
        sae.init_weights(torch.Generator().manual_seed(seed))
        saes.append(sae)
    raw = saebench.raw_probes(x, token_ids, texts)
    assert raw.letter_probe is not None and raw.llm["leading_space"] is not None
    alone = saebench.sparse_probing(x, saes[0].encode(x).detach(), saebench.token_labels(texts))
    assert {name: task and task["llm"] for name, task in alone["tasks"].items()} == raw.llm
    for sae in saes:
        shared = saebench.sae_metrics(sae, x, token_ids, texts, w_u, raw=raw)
        assert shared == saebench.sae_metrics(sae, x, token_ids, texts, w_u)
        f = sae.encode(x).detach()
        own_probe = saebench.absorption(x[raw.unique], f[raw.unique], raw.letters, sae.W_dec.detach())  # fits its own probe
        assert own_probe["letters"] and shared["saebench"]["first_letter"] == own_probe
