"""The report in a real browser: headless Debian chromium renders the pages from disk.

Checks the DOM after scripts ran (charts and feature tables are there, the feature jump box
works), that the console logged no errors, and saves screenshots under reports/screenshots/.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import REPO
from test_report import _Doc, built, inputs  # noqa: F401  (fixtures shared with the unit tests)

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = REPO / "reports" / "screenshots"

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not CHROMIUM.is_file(), reason="Debian's chromium is not installed")]


def chromium(url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    """Headless chromium on `url` with networking features off and console logging to stderr."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
             "--enable-logging=stderr", "--v=0", "--virtual-time-budget=3000"]
    return subprocess.run([str(CHROMIUM), *flags, *extra, url], capture_output=True, text=True, timeout=120)


def console_errors(stderr: str) -> list[str]:
    """Console lines chromium logged; the report's pages log nothing, so any line is a failure."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def test_console_check_catches_script_errors(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<html><body><script>console.error('boom'); undefinedFn();</script></body></html>")
    run = chromium(page.as_uri(), tmp_path / "profile", "--dump-dom")
    assert any("Uncaught ReferenceError" in line for line in console_errors(run.stderr))


@pytest.mark.parametrize("page", ["index.html", "resid_post/layer_1/relu-1.html"])
def test_pages_render_in_chromium(built, inputs, tmp_path, page):  # noqa: F811
    url = (inputs.html / page).as_uri()
    run = chromium(url, tmp_path / "profile", "--dump-dom")
    assert run.returncode == 0, run.stderr[-2000:]
    assert not console_errors(run.stderr), console_errors(run.stderr)
    doc = _Doc(run.stdout)
    tags = [t for t, _ in doc.tags]
    assert tags.count("svg") >= 2
    assert "headline" in doc.ids()
    if page != "index.html":
        assert "all-features" in doc.ids()
        assert sum(t == "section" for t in tags) == 5
        assert sum(a.get("class") == "contexts top" for _, a in doc.tags) == 5
    SHOTS.mkdir(parents=True, exist_ok=True)
    shot = SHOTS / f"{page.replace('/', '_').removesuffix('.html')}.png"
    run = chromium(url, tmp_path / "profile2", f"--screenshot={shot}", "--window-size=1366,900")
    assert run.returncode == 0 and shot.stat().st_size > 10_000


def test_feature_jump_box_runs_without_errors(built, inputs, tmp_path):  # noqa: F811
    """The inline script is wired up: a hash URL to a feature loads with no script error."""
    page = (inputs.html / "resid_post/layer_1/relu-1.html").as_uri()
    first = next(a["id"] for t, a in _Doc((inputs.html / "resid_post/layer_1/relu-1.html").read_text()).tags
                 if t == "section")
    run = chromium(f"{page}#{first}", tmp_path / "profile", "--dump-dom")
    assert run.returncode == 0 and not console_errors(run.stderr)
    assert f'id="{first}"' in run.stdout and 'id="jump"' in run.stdout
