"""The SAEs one train_sae stage trains on its layer: `sae`, then the `family` members (conf/family/)."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from token_journey.config import build, compose
from token_journey.config.sae import SAEConfig
from token_journey.errors import TokenJourneyError
from token_journey.sae.family import layer_saes, sweeps_sae


def _composed(*overrides: str) -> tuple[SAEConfig, dict]:
    params = compose(["sae.width=256", "sae.train_tokens=10000", "sae.lr=0.005", *overrides])
    return build(SAEConfig, params["sae"], "sae"), params["family"]


def test_the_default_family_is_jumprelu_at_the_three_l0_buckets_on_the_runs_budget():
    sae, family = _composed()
    saes = layer_saes(sae, sae.name, family, sweep=False)
    assert [n for n, _ in saes] == ["jumprelu-w256-target40", "jumprelu-w256-target16", "jumprelu-w256-target120"]
    assert [(c.architecture, c.target_l0) for _, c in saes] == [("jumprelu", 40), ("jumprelu", 16), ("jumprelu", 120)]
    for _, cfg in saes[1:]:  # the budget follows `sae`; the target is the member's own
        assert (cfg.width, cfg.train_tokens, cfg.lr, cfg.batch_size) == (256, 10000, 0.005, sae.batch_size)
        assert asdict(cfg) == {**asdict(sae), "name": cfg.name, "target_l0": cfg.target_l0}


def test_the_topk_family_is_kept_as_a_family_file_of_its_own():
    sae, family = _composed("family=topk")
    saes = layer_saes(sae, sae.name, family, sweep=False)
    assert [n for n, _ in saes] == [sae.name, "topk-w256-k16", "topk-w256-k128"]
    for _, cfg in saes[1:]:
        assert cfg.architecture == "topk" and (cfg.width, cfg.train_tokens, cfg.lr) == (256, 10000, 0.005)
        assert cfg.adam_beta1 == 0.9 and cfg.sparsity_coefficient == 0.0


def test_a_sweep_of_sae_or_family_none_trains_sae_alone():
    sae, family = _composed()
    assert layer_saes(sae, "x-lr0.1", family, sweep=True) == [("x-lr0.1", sae)]
    none_sae, none = _composed("family=none")
    assert none == {} and layer_saes(none_sae, none_sae.name, none, sweep=False) == [(none_sae.name, none_sae)]
    assert sweeps_sae(["sae.lr=0.1"]) and sweeps_sae(["sae=topk"]) and not sweeps_sae(["layer=3", "family.a.k=2"])


def test_members_that_would_share_a_folder_are_one_sae_or_an_error():
    sae, _ = _composed()
    twin = {"twin": asdict(sae)}
    assert layer_saes(sae, sae.name, twin, sweep=False) == [(sae.name, sae)]
    other = {"other": {**asdict(sae), "lr": 0.5}}
    with pytest.raises(TokenJourneyError, match=r"^family\.other would write the SAE folder 'jumprelu-w256-target40'"):
        layer_saes(sae, sae.name, other, sweep=False)
    with pytest.raises(TokenJourneyError, match=r"^family\.bad: unknown key\(s\) family\.bad\.kk"):
        layer_saes(sae, sae.name, {"bad": {**asdict(sae), "kk": 1}}, sweep=False)
