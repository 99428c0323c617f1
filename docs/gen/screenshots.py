"""Render the README's and the docs' three screenshots from a real pipeline run, with headless Chromium.

    python docs/gen/screenshots.py reports            # after `make pipeline`; writes docs/images/*.png

REPORTS is the pipeline's `reports/` folder: the report index (`html/index.html`), the first feature page
under `html/<site>/layer_<L>/` (layer 15 when there is one, the default SAE's page first) and the first
journey page (`journey/*.html`). Each page is opened from disk in a headless Chromium (found as the browser
tests find it, `tests/support/browser.py`; `apt-get install chromium-headless-shell` if there is none) and
its top `--height` pixels saved as PNG, never edited by hand. The report is framed on its Pareto plots, the
feature page on one dashboard (`--feature`, by default the page's first): a copy of the page, in a temporary
folder, hides what comes before them except the page's title bar. A PNG above `--max-kb` is an error: lower
the window (`--width`, `--height`) rather than commit a heavy image.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from support.browser import find_browser  # noqa: E402

IMAGES = REPO / "docs" / "images"


def pages(reports: Path) -> dict[str, Path]:
    """The three pages to capture, by image name; a missing one stops with the reason."""
    index = reports / "html" / "index.html"
    features = sorted((reports / "html").glob("*/layer_*/*.html"), key=lambda p: (p.parent.name != "layer_15", not p.stem.startswith("jumprelu"), str(p)))
    journeys = sorted((reports / "journey").glob("*.html"))
    if not index.is_file() or not features or not journeys:
        sys.exit(f"error: {reports} lacks the report index, a feature page or a journey page; run `make pipeline` first")
    return {"report": index, "feature": features[0], "journey": journeys[0]}


# Hides every element before the chosen one (and before each of its ancestors), but the title bar; the heading
# and paragraphs right before the chosen element stay with it. Scrolling to it instead gives a blank capture in headless
# Chromium's --screenshot.
FRAME = """<script>(() => {{
  let node = document.querySelector({selector!r});
  while (node && node.previousElementSibling && /^(H[1-6]|P)$/.test(node.previousElementSibling.tagName)) node = node.previousElementSibling;
  while (node && node !== document.body) {{
    for (let prev = node.previousElementSibling; prev; prev = prev.previousElementSibling) {{
      if (!["HEADER", "SCRIPT", "STYLE"].includes(prev.tagName)) prev.style.display = "none";
    }}
    node = node.parentElement;
  }}
}})();</script>"""


def capture(browser: str, page: Path, out: Path, width: int, height: int, frame: str | None = None) -> None:
    """Save the top `width` x `height` pixels of `page` as the PNG `out` (written to a temp name, then renamed);
    with `frame` (a CSS selector), of a copy framed on the first element it selects (see FRAME)."""
    tmp = out.with_name(f".{out.name}.tmp.png")
    with tempfile.TemporaryDirectory() as scratch:
        if frame is not None:
            copy = Path(scratch) / page.name
            copy.write_text(page.read_text().replace("</body>", FRAME.format(selector=frame) + "</body>"))
            page = copy
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run", f"--user-data-dir={scratch}/profile"]
        flags += ["--force-device-scale-factor=1", "--virtual-time-budget=5000", f"--window-size={width},{height}", f"--screenshot={tmp}"]
        run = subprocess.run([browser, *flags, page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    if run.returncode != 0 or not tmp.is_file():
        sys.exit(f"error: Chromium could not capture {page}: {run.stderr.strip()[-500:]}")
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", type=Path, help="the pipeline's reports/ folder")
    parser.add_argument("--out", type=Path, default=IMAGES, help="where the PNGs go (default: docs/images)")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=820)
    parser.add_argument("--max-kb", type=int, default=300, help="largest PNG allowed, in KB")
    parser.add_argument("--feature", type=int, default=None, help="the dashboard the feature page is framed on (default: its first)")
    args = parser.parse_args(argv)
    browser = find_browser()
    if browser is None:
        sys.exit("error: no headless Chromium found; install one with `apt-get install chromium-headless-shell`")
    args.out.mkdir(parents=True, exist_ok=True)
    for name, page in pages(args.reports).items():
        out = args.out / f"{name}.png"
        frame = {"report": "div.charts", "feature": f"#feature-{args.feature}" if args.feature is not None else "section.card.feature"}.get(name)
        capture(browser, page, out, args.width, args.height, frame)
        size_kb = out.stat().st_size / 1000
        print(f"{out.relative_to(REPO) if out.is_relative_to(REPO) else out}: {page.relative_to(args.reports)}, {size_kb:.0f} KB")
        if size_kb > args.max_kb:
            sys.exit(f"error: {out} is {size_kb:.0f} KB, above --max-kb {args.max_kb}; use a smaller --width/--height")
    return 0


if __name__ == "__main__":
    sys.exit(main())
