"""Sweep members' names and groups (token_journey.sweeps): the values a DVC experiment changed."""

from __future__ import annotations

import subprocess

import yaml

from token_journey.sweeps import SweepMember, changed_keys, dvc_member, sweep_name


def test_changed_keys_lists_the_section_keys_whose_values_differ():
    baseline = {"sae": {"name": "topk-w16-k2", "k": 2, "lr": 0.002, "width": 16}, "seed": 0}
    current = {"sae": {"name": "topk-w16-k4", "k": 4, "lr": 0.003, "width": 16}, "seed": 1}
    # name is derived, width is unchanged, seed is outside the section: k and lr remain, sorted.
    assert changed_keys(baseline, current, "sae") == ["sae.k=4", "sae.lr=0.003"]
    assert sweep_name("topk-w16-k4", changed_keys(baseline, current, "sae")) == "topk-w16-k4-lr0.003"


def test_dvc_member_reads_the_baseline_params_from_git(tmp_path, monkeypatch):
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"sae": {"lr": 0.002, "k": 32}}))
    subprocess.run([*git, "add", "params.yaml"], check=True)
    subprocess.run([*git, "commit", "-qm", "b"], check=True)
    rev = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)
    assert dvc_member({"sae": {"lr": 0.001}}) is None  # not a DVC experiment
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", rev)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert dvc_member({"sae": {"lr": 0.001, "k": 32}}) == SweepMember(["sae.lr=0.001"], f"dvc-{rev[:8]}")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "f" * 40)  # unknown commit: plain name, one warning, same group rule
    assert dvc_member({"sae": {"lr": 0.001}}) == SweepMember([], "dvc-ffffffff")
