"""Step 6: the test table (``dataset.test_dataframe``) scored with the exported scorer
(``coughreg.export.score_test_table``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from coughreg.export.score_test_table import score_test_table
from coughreg.io.storage import S3Options
from coughreg.steps.harness import log_metrics, reports_errors, setup_logging, staged


@reports_errors("score-test-table")
def score_test_table_step(scorer: str | Path, ingest: str | Path, out: str | Path, *, metrics: Any = None,
                    s3: S3Options | None = None, cache_dir: Path | None = None, workers: int | None = None) -> dict:
    """The test table (``dataset.test_dataframe``) scored with the exported scorer (``coughreg.export.score_test_table``)."""
    setup_logging()
    with staged(s3, cache_dir) as staging:
        summary = score_test_table(staging.input(scorer), staging.input(ingest), staging.output(out), workers)
    log_metrics(metrics, summary)
    return summary
