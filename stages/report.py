"""Stage report: the static HTML report and the Markdown summary.

Outputs: <paths.html>/index.html, one page per SAE under <paths.html>, and <paths.summary>.
Reads every SAE folder under <paths.saes> and every metrics JSON under <paths.metrics>.
"""

from omegaconf import OmegaConf

from token_journey.config import build
from token_journey.config.report import ReportConfig
from token_journey.config.tracking import TrackingConfig
from token_journey.distributed import select_device
from token_journey.layout import Layout
from token_journey.report import build_report, log_to_run
from token_journey.stage import stage
from token_journey.tracking import start_run


@stage
def main(cfg) -> None:
    layout = Layout.from_config(cfg.paths)
    result = build_report(build(ReportConfig, cfg.report, "report"), layout, seed=cfg.seed, device=str(select_device(cfg.device)))
    print(
        f"report: {len(result.entries)} SAEs, {len(result.files)} files, {result.bytes / 1e6:.2f} MB "
        f"in {result.seconds:.1f} s -> {layout.html}/index.html, {layout.summary}"
    )
    run = start_run(OmegaConf.to_container(cfg, resolve=True), build(TrackingConfig, cfg.tracking, "tracking"), job_type="report", group="report")
    if run is not None:
        log_to_run(run, result)
        run.finish()


if __name__ == "__main__":
    main()
