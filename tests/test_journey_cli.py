"""`token-journey journey`: a page and panels for a good text, one-line errors (exit 2) for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support.configs import make
from support.tiny import save_tiny, tiny_tokenizer
from token_journey.cli import main
from token_journey.config.model import ModelConfig
from token_journey.lm import prepare_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    raw = save_tiny("gemma3", tmp_path_factory.mktemp("raw") / "gemma3")
    out = tmp_path_factory.mktemp("base") / "tiny-gemma3"
    prepare_model(make(ModelConfig, name="tiny-gemma3", source="local", id=str(raw)), out)
    return out


def _journey(model_dir: Path, out: Path, sae_root: Path) -> list[str]:
    """`token-journey journey` on the tiny model, focused on layer 1, writing its page to `out`."""
    return ["journey", "--model-dir", str(model_dir), "--layer", "1", "--html", "--out", str(out), "--max-new-tokens", "2", "--sae-root", str(sae_root)]


def test_cli_writes_page_and_focuses_layer(tiny_dir, tmp_path, capsys):
    rc = main(_journey(tiny_dir, tmp_path, tmp_path / "none"))
    out = capsys.readouterr().out
    assert rc == 0
    assert "─ layer 1 ─" in out and "─ layer 0 ─" not in out
    assert (tmp_path / "tiny-gemma3-the-capital-of-france-is.html").is_file()
    assert (tmp_path / "tiny-gemma3-the-capital-of-france-is.json").is_file()


@pytest.mark.parametrize("text,message", [("", "empty"), ("word " * 300, "context is 256")])
def test_cli_bad_text(tiny_dir, tmp_path, capsys, text, message):
    assert main(["journey", "--model-dir", str(tiny_dir), "--text", text, "--html", "--out", str(tmp_path)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0]
    assert not list(tmp_path.iterdir())  # nothing written


def test_cli_unsupported_architecture_shows_captures(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    base = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=320, n_embd=16, n_layer=1, n_head=2, n_positions=64)).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    # prepare_model describes only Llama/Gemma configs, so write the manifest load_prepared reads by hand.
    (base / "manifest.json").write_text(json.dumps({"name": "tiny-gpt2", "dtype": "float32"}))
    assert main(["journey", "--model-dir", str(base)]) == 2
    captured = capsys.readouterr()
    assert "'gpt2' is not supported" in captured.err
    assert "transformer.h.0.attn.c_attn" in captured.out and "lm_head" in captured.out


def test_cli_missing_model(tmp_path, capsys):
    assert main(["journey", "--model-dir", str(tmp_path / "nope")]) == 2
    assert "no prepared model" in capsys.readouterr().err


def test_cli_steers_ablates_and_attributes(tiny_dir, tmp_path, capsys):
    """--steer/--ablate/--target on the command line; a spec for a layer without an SAE is one line."""
    import torch

    from token_journey.sae.base import SAESpec
    from token_journey.sae.io import save_sae
    from token_journey.sae.registry import build_sae

    sae = build_sae(SAESpec(architecture="relu", d_in=32, d_sae=16, name="tiny-relu", site="resid_post", layer=1))
    sae.init_weights(torch.Generator().manual_seed(0))
    save_sae(sae, tmp_path / "saes" / "resid_post" / "layer_1" / "tiny-relu")
    args = _journey(tiny_dir, tmp_path / "out", tmp_path / "saes") + ["--target", " of"]
    assert main(args + ["--steer", "1:3=4"]) == 2  # by default only the run's `sae` is shown, and this folder is another
    assert "error: edit '1:3=4': layer 1 has no SAE" in capsys.readouterr().err
    args += ["--saes", "tiny-relu"]
    assert main(args + ["--steer", "1:3=4", "--ablate", "1:5"]) == 0
    out = capsys.readouterr().out
    assert "steering: 1:3=4 (resid_post SAE tiny-relu), 1:5" in out and "attribution of the logit of ' of'" in out
    summary = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert [e[0] for e in summary["steering"]["edits"]] == ["1:3=4", "1:5"]
    assert main(args + ["--steer", "2:3=4"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert errors == ["error: edit '2:3=4': layer 2 has no SAE; layers with SAEs: 1"]
