"""Find a headless Chromium for the browser tests, and measure a page's layout in it.

The browser is looked up on the PATH under the names Debian, Ubuntu, Google and Playwright give
it, then in Playwright's own download folder. Under `CI=true` a missing browser fails the tests
that need it: CI installs one (.ci/run), so a skip there would only hide a broken install.
"""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

NAMES = (
    "chromium",
    "chromium-browser",
    "chromium-headless-shell",
    "google-chrome",
    "google-chrome-stable",
    "chrome",
    "headless_shell",
    "chrome-headless-shell",
)
# Playwright's downloads: <root>/chromium-<rev>/chrome-linux*/chrome, <root>/chromium_headless_shell-<rev>/...
PLAYWRIGHT_GLOBS = ("chromium_headless_shell-*/*/headless_shell", "chromium_headless_shell-*/*/chrome-headless-shell", "chromium-*/chrome-linux*/chrome")
PROBE = Path(__file__).with_name("layout_probe.js")


def find_browser() -> str | None:
    """The path of a Chromium or Chrome executable, or None."""
    import shutil

    for name in NAMES:
        path = shutil.which(name)
        if path:
            return path
    roots = [os.environ.get("PLAYWRIGHT_BROWSERS_PATH"), Path.home() / ".cache" / "ms-playwright"]
    for root in (Path(r) for r in roots if r):
        for pattern in PLAYWRIGHT_GLOBS:
            for path in sorted(root.glob(pattern)):
                if os.access(path, os.X_OK):
                    return str(path)
    return None


def in_ci() -> bool:
    """Whether these tests run in CI (`CI=true`, as CI services and .ci/run's caller set it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require_browser() -> str:
    """A browser's path; without one, skip the test, or fail it under CI."""
    path = find_browser()
    if path is None:
        message = f"no Chromium or Chrome found (looked for {', '.join(NAMES)} on the PATH and in Playwright's folder)"
        if in_ci():
            pytest.fail(message + "; CI must install one, see .ci/run")
        pytest.skip(message)
    return path


def run_browser(browser: str, url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    """Headless Chromium on `url` with networking features off and console logging to stderr."""
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=5000",
        "--hide-scrollbars",
    ]
    return subprocess.run([browser, *flags, *extra, url], capture_output=True, text=True, timeout=120)


def console_errors(stderr: str) -> list[str]:
    """Console lines Chromium logged; the report's pages log nothing, so any line is a failure."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def measure(browser: str, page: Path, width: int, height: int, profile: Path, search: str | None = None) -> dict:
    """Lay `page` out at `width` x `height` and return what `layout_probe.js` found (see there).

    The probe runs in a copy of the page beside it (so its relative links still resolve); with
    `search`, it also types that text into the page's token search box and reads the results.
    """
    probe = PROBE.read_text().replace("__SEARCH__", json.dumps(search))
    copy = page.with_name(page.stem + f".probe-{width}.html")
    copy.write_text(page.read_text().replace("</body>", f"<script>{probe}</script>\n</body>"))
    try:
        run = run_browser(browser, copy.as_uri(), profile, "--dump-dom", f"--window-size={width},{height}")
    finally:
        copy.unlink()
    assert run.returncode == 0, run.stderr[-2000:]
    found = re.findall(r'<pre id="layout-probe">(.*?)</pre>', run.stdout, re.S)
    assert found, "the layout probe did not run: " + "\n".join(console_errors(run.stderr))[-2000:]
    result = json.loads(html.unescape(found[-1]))
    result["console"] = console_errors(run.stderr)
    return result
