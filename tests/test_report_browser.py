"""The report in a real browser: headless Chromium renders the pages from disk.

Checks the DOM after scripts ran (charts and feature tables are there, the feature jump box and
the token search work), that the console logged no errors, that at 1366x900 and 1920x1080 no
two boxes on a page overlap and no text sticks out of its box, and saves screenshots under
reports/screenshots/. The browser is found on the PATH (`support/browser.py`); without one
these tests skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import json
import stat

import pytest
from conftest import REPO
from test_report import PAGE, _Doc

from support.browser import console_errors, find_browser, measure, require_browser, run_browser

SHOTS = REPO / "reports" / "screenshots"
SIZES = [(1366, 900), (1920, 1080)]

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser() -> str:
    return require_browser()


def test_a_missing_browser_fails_under_ci_and_skips_elsewhere(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("PLAYWRIGHT_BROWSERS_PATH", raising=False)
    assert find_browser() is None
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        require_browser()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        require_browser()
    fake = tmp_path / "chromium-browser"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    assert find_browser() == str(fake)  # found on the PATH, under any of its usual names


def test_console_check_catches_script_errors(browser, tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<html><body><script>console.error('boom'); undefinedFn();</script></body></html>")
    run = run_browser(browser, page.as_uri(), tmp_path / "profile", "--dump-dom")
    assert any("Uncaught ReferenceError" in line for line in console_errors(run.stderr))


def test_overlap_probe_catches_overlapping_boxes(browser, tmp_path):
    """The probe sees the bug it is for: a wide table running under the chart beside it."""
    page = tmp_path / "overlap.html"
    page.write_text(
        '<html><body><div style="display:grid; grid-template-columns: 300px 200px">'
        '<div><table><tr><td style="white-space:nowrap">' + "wide " * 9 + "</td><td>where</td></tr></table></div>"
        '<svg width="200" height="100"></svg></div></body></html>'
    )
    found = measure(browser, page, 1366, 900, tmp_path / "profile")
    assert any("svg" in a + b and "where" in a + b for a, b, _ in found["overlaps"]), found


@pytest.mark.parametrize("page", ["index.html", PAGE])
def test_pages_render_in_chromium(browser, report_built, report_inputs, tmp_path, page):
    url = (report_inputs.html / page).as_uri()
    run = run_browser(browser, url, tmp_path / "profile", "--dump-dom")
    assert run.returncode == 0, run.stderr[-2000:]
    assert not console_errors(run.stderr), console_errors(run.stderr)
    doc = _Doc(run.stdout)
    tags = [t for t, _ in doc.tags]
    assert tags.count("svg") >= 2
    assert "headline" in doc.ids()
    if page != "index.html":
        _, cfg = report_built
        assert "all-features" in doc.ids()
        shown = cfg.n_index + cfg.n_random + cfg.n_strongest + cfg.n_dense
        assert sum(t == "section" for t in tags) == shown
        assert sum(a.get("class") == "contexts top" for _, a in doc.tags) == shown
    SHOTS.mkdir(parents=True, exist_ok=True)
    shot = SHOTS / f"{page.replace('/', '_').removesuffix('.html')}.png"
    run = run_browser(browser, url, tmp_path / "profile2", f"--screenshot={shot}", "--window-size=1366,900")
    assert run.returncode == 0 and shot.stat().st_size > 10_000


@pytest.mark.parametrize("width,height", SIZES)
@pytest.mark.parametrize("page", ["index.html", PAGE])
def test_no_boxes_overlap_or_overflow(browser, report_built, report_inputs, tmp_path, page, width, height):
    search = " Paris" if page == PAGE else None
    found = measure(browser, report_inputs.html / page, width, height, tmp_path / "profile", search)
    assert not found["console"], found["console"]
    assert found["viewport"] == width and found["boxes"] > 100
    assert found["scroll_width"] <= width, "the page scrolls sideways"
    assert found["overlaps"] == [], found["overlaps"]
    assert found["overflows"] == [], found["overflows"]
    if search:
        assert found["after_search"] == {"overlaps": [], "overflows": []}, found["after_search"]


def test_search_box_lists_the_features_of_a_token(browser, report_built, report_inputs, tmp_path):
    """Typing a token shows the features the page's index holds for it, in order, as links."""
    index = json.loads(_Doc((report_inputs.html / PAGE).read_text()).data["token-index"])
    token = max(index, key=lambda t: (len(index[t]), t))
    found = measure(browser, report_inputs.html / PAGE, 1366, 900, tmp_path / "profile", token)
    assert found["search"][0] == [token, [feature for feature, _ in index[token]]]
    loose = measure(browser, report_inputs.html / PAGE, 1366, 900, tmp_path / "profile", f"  {token.strip().upper()} ")
    assert token in [t for t, _ in loose["search"]]  # case and surrounding spaces are ignored without an exact match


def test_feature_jump_box_runs_without_errors(browser, report_built, report_inputs, tmp_path):
    """The inline script is wired up: a hash URL to a feature loads with no script error."""
    page = (report_inputs.html / PAGE).as_uri()
    first = next(a["id"] for t, a in _Doc((report_inputs.html / PAGE).read_text()).tags if t == "section")
    run = run_browser(browser, f"{page}#{first}", tmp_path / "profile", "--dump-dom")
    assert run.returncode == 0 and not console_errors(run.stderr)
    assert f'id="{first}"' in run.stdout and 'id="jump"' in run.stdout
