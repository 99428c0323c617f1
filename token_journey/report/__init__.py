"""The static HTML report: overview with Pareto plots, one feature-browser page per SAE, summary.md.

Everything is self-contained (inline CSS and SVG, one tiny inline script) so the pages open
from disk with no server and no network. Entry point: `build_report`.
"""

from token_journey.report.build import ReportResult, build_report, log_to_run

__all__ = ["ReportResult", "build_report", "log_to_run"]
