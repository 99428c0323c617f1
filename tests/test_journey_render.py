"""Renderings of the journey: terminal panels, HTML escaping, SAE feature links, headless Chromium."""

from __future__ import annotations

import io
import re
import subprocess
from pathlib import Path

import pytest
import torch
from rich.console import Console

from support.configs import make
from support.tiny import tiny_model, tiny_tokenizer
from token_journey.config.journey import GenerationConfig, JourneyConfig
from token_journey.errors import TokenJourneyError
from token_journey.journey import run_journey
from token_journey.journey.render_html import write_journey
from token_journey.journey.render_terminal import render
from token_journey.journey.sae_hits import top_features

REPO = Path(__file__).resolve().parents[1]
NASTY = "<script>alert(1)</script> \"quoted\" & 'single'"
GEN = make(GenerationConfig, temperature=1.0, max_new_tokens=3)


@pytest.fixture(scope="module")
def nasty_journey():
    return run_journey(tiny_model("gemma2"), tiny_tokenizer(), make(JourneyConfig, text=NASTY, generation=GEN), progress=False)


def test_terminal_one_panel_per_layer_and_focus(nasty_journey):
    out = io.StringIO()
    render(nasty_journey, Console(file=out, width=200), layer=None)
    text = out.getvalue()
    assert len(re.findall(r"─ layer \d ─", text)) == 3
    assert "<script>" in text  # printed as text, not eaten as markup
    out = io.StringIO()
    render(nasty_journey, Console(file=out, width=200), layer=2)
    assert re.findall(r"─ layer (\d) ─", out.getvalue()) == ["2"]
    with pytest.raises(TokenJourneyError, match="layers 0..2"):
        render(nasty_journey, Console(file=io.StringIO()), layer=7)


def test_html_escapes_every_token(nasty_journey, tmp_path):
    html = write_journey(nasty_journey, tmp_path).read_text()
    assert "<script>" not in html
    assert "&lt;script&gt;" in html and "&#34;quoted&#34;" in html and "&amp;" in html
    for concept in ("rmsnorm", "rope", "gqa", "swiglu", "residual"):
        assert f'id="concept-{concept}"' in html
    assert html.count('class="heatmap"') == 3 * 4  # layers × heads


class _StandIn:
    """A minimal encoder: latent i = relu(x · e_i) for the first 6 dimensions."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x[:, :6])


def test_top_features_by_hand():
    x = torch.tensor([[3.0, -1.0, 2.0, 0.0, 0.5, 0.0, 9.0], [-1.0, -1.0, -1.0, -1.0, -1.0, -1.0, 9.0]])
    assert top_features(_StandIn(), x, 2) == [[(0, 3.0), (2, 2.0)], []]


def test_features_from_trained_sae_folder(tmp_path):
    """A real SAE folder of our own format: features appear, encoded from the recomputed activations."""
    from token_journey.sae.base import SAESpec
    from token_journey.sae.io import save_sae
    from token_journey.sae.registry import build_sae

    model = tiny_model("llama")
    sae = build_sae(SAESpec(architecture="relu", d_in=32, d_sae=16, name="tiny-relu", site="resid_post", layer=1))
    sae.init_weights(torch.Generator().manual_seed(0))
    save_sae(sae, tmp_path / "saes" / "resid_post" / "layer_1" / "tiny-relu")
    journey = run_journey(
        model, tiny_tokenizer(), make(JourneyConfig, text="The capital", generation=GEN), saes_root=tmp_path / "saes", progress=False, report_root="../report"
    )
    assert [(h.site, h.layer, h.sae_name) for h in journey.features] == [("resid_post", 1, "tiny-relu")]
    hits = journey.features[0]
    expected = top_features(sae, journey.run.sites[1]["resid_post"], 5)
    # The journey encodes with the file's mapped W_enc (another memory layout than the module's): the same latents, values to rounding.
    assert [[f for f, _ in row] for row in hits.top] == [[f for f, _ in row] for row in expected] and any(hits.top)
    assert all(abs(a - b) <= 1e-6 for row, ref in zip(hits.top, expected) for (_, a), (_, b) in zip(row, ref))
    html = write_journey(journey, tmp_path / "out").read_text()
    fid = next(f for top in hits.top for f, _ in top)
    assert f'href="../report/resid_post/layer_1/tiny-relu.html#feature-{fid}"' in html


@pytest.mark.browser
def test_page_in_headless_chromium(nasty_journey, tmp_path):
    """The page as a browser builds it (found on the PATH; under CI=true a missing browser fails)."""
    from support.browser import require_browser

    page = write_journey(nasty_journey, tmp_path)
    flags = [
        require_browser(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(flags + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120, check=True).stdout
    assert dom.count('class="step"') == len(nasty_journey.run.steps)
    assert dom.count("<svg") == 3 * 4 and "<rect" in dom
    assert "<script>alert" not in dom  # the token text stayed text
    shot = REPO / "reports" / "journey_screenshot.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(flags + ["--window-size=1400,1800", f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 10_000
