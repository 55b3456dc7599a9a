"""Step 5: the evaluated model -> a scorer folder that stands alone (``coughreg.export.scorer_folder``)."""

from __future__ import annotations

from pathlib import Path

from coughreg import artifacts
from coughreg.config.given import Given
from coughreg.export.scorer_folder import export
from coughreg.io.storage import S3Options, is_s3_uri
from coughreg.runtime.resources import limit_threads
from coughreg.steps.harness import pipeline_name, reports_errors, run_identity, setup_logging, staged
from coughreg.tracking import tracker as tracking


@reports_errors("export")
def export_step(model: str | Path, evaluation: str | Path, out: str | Path, given: Given, *, artifact_uri: str | None = None,
                s3: S3Options | None = None, cache_dir: Path | None = None) -> dict:
    """The scorer folder; with ``logging.logger``, also to the experiment tracker (the evaluate step's tracker run)."""
    setup_logging()
    limit_threads()
    with staged(s3, cache_dir) as staging:
        model_dir, evaluation_dir, out_dir = staging.input(model), staging.input(evaluation), staging.output(out)
        upstream = artifacts.read_config(evaluation_dir, "evaluate")
        config = given.build("export", upstream, f"the evaluation {evaluation}")
        tracking.check(config)
        result = export(model_dir, evaluation_dir, out_dir, config, run_identity(artifact_uri or str(out)))
        tracking.log_scorer(config, tracking.run_key(artifact_uri or str(out), pipeline_name()), result.scorer_dir)
    return {"scorer": str(out if is_s3_uri(str(out)) else result.scorer_dir), "programs": result.programs}
