"""Stage report: the static HTML report and the Markdown summary.

Outputs: <paths.html>/index.html, <paths.html>/<site>/layer_<L>/<sae>.html, <report.summary>.
Reads every SAE folder under <paths.saes> and every metrics JSON under <paths.metrics>.
"""

from pathlib import Path

from omegaconf import OmegaConf

from token_journey.config import build
from token_journey.config.report import ReportConfig
from token_journey.lm import select_device
from token_journey.report import ReportPaths, build_report, log_to_run
from token_journey.stage import stage


@stage
def main(cfg) -> None:
    report = build(ReportConfig, cfg.report, "report")
    p = cfg.paths
    paths = ReportPaths(Path(p.base_model), Path(p.corpus), Path(p.activations), Path(p.saes), Path(p.metrics),
                        Path(p.html), Path(report.summary))
    result = build_report(report, paths, seed=cfg.seed, device=str(select_device(cfg.device)))
    print(f"report: {len(result.entries)} SAEs, {len(result.files)} files, {result.bytes / 1e6:.2f} MB "
          f"in {result.seconds:.1f} s -> {p.html}/index.html, {report.summary}")
    try:
        from token_journey.tracking import start_run
    except ImportError:  # the tracking module is optional for the report
        return
    run = start_run(OmegaConf.to_container(cfg, resolve=True), cfg.tracking, job_type="report", group="report")
    if run is not None:
        log_to_run(run, result)
        run.finish()


if __name__ == "__main__":
    main()
