"""Step 4: the validation recordings scored from audio, the metrics, the gate's verdict (``coughreg.evaluation``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from coughreg import artifacts
from coughreg.config.given import Given
from coughreg.evaluation.evaluate import evaluate
from coughreg.io.storage import S3Options
from coughreg.runtime.resources import limit_threads
from coughreg.steps.harness import copy_html, log_metrics, pipeline_name, reports_errors, setup_logging, staged
from coughreg.tracking import tracker as tracking


@reports_errors("evaluate")
def evaluate_step(model: str | Path, features: str | Path, ingest: str | Path, out: str | Path, given: Given, *,
                  metrics: Any = None, html: str | None = None, s3: S3Options | None = None, cache_dir: Path | None = None,
                  workers: int | None = None, artifact_uri: str | None = None) -> dict:
    """Validation recordings scored from audio, metrics, the quality gate's verdict (``metrics['quality_gate']``).

    With ``logging.logger``, the config, the training curves, the metrics and the report also go to the
    experiment tracker, into the tracker run of the pipeline run ``artifact_uri`` (default: ``out``) belongs to.
    """
    setup_logging()
    limit_threads()
    with staged(s3, cache_dir) as staging:
        model_dir, features_dir, ingest_dir = staging.input(model), staging.input(features), staging.input(ingest)
        out_dir = staging.output(out)
        upstream = artifacts.read_config(model_dir, "train")
        config = given.build("evaluate", upstream, f"the model {model}")
        tracking.check(config)  # a tracker asked for but not configured fails before the work, not after it
        result = evaluate(model_dir, features_dir, ingest_dir, out_dir, config, workers)
        copy_html(result.report_path, html)
        # Before the outputs are published (and a staged folder removed); a tracker that fails is a warning.
        tracking.log_evaluation(config, tracking.run_key(artifact_uri or str(out), pipeline_name()), model_dir, out_dir)
    log_metrics(metrics, result.metrics)
    return result.metrics
