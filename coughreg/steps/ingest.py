"""Step 1: a data set -> the manifest and the accepted recordings (``coughreg.ingest``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from coughreg import artifacts
from coughreg.config.given import Given
from coughreg.ingest.manifest import ingest
from coughreg.io.storage import S3Options
from coughreg.steps.harness import copy_html, log_metrics, reports_errors, setup_logging, staged


@reports_errors("ingest")
def ingest_step(source_uri: str, out: str | Path, given: Given, *, source_version: str | None = None, metrics: Any = None,
                html: str | None = None, s3: S3Options | None = None, cache_dir: Path | None = None,
                workers: int | None = None) -> dict:
    setup_logging()
    config = given.build("ingest", None)
    with staged(s3, cache_dir) as staging:
        out_dir = staging.output(out)
        try:
            ingest(source_uri, out_dir, config, s3, cache_dir, workers, source_version=source_version)
        finally:  # a failed ingest still shows its data-quality report
            copy_html(out_dir / artifacts.QUALITY_HTML, html)
        report = artifacts.read_json(out_dir, artifacts.INGEST_REPORT, "ingest")
    log_metrics(metrics, {"recordings_ok": report["ok"], "recordings_rejected": report["rejected"],
                          "metadata_rows_without_recording": report["metadata_rows_without_recording"],
                          "unusable_fraction_of_present": report["unusable_fraction_of_present"],
                          "audio_hours": report["quality"]["duration_s"]["total_hours"]})
    return report
