"""Run the whole DAG on this machine through KFP's local runner (no Docker, no cluster)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from coughreg.config import ExperimentConfig, config_to_parameter

log = logging.getLogger(__name__)


@dataclass
class LocalRunResult:
    report: Path
    metrics: Path
    scorer: Path
    values: dict
    seconds: float


def run_local(source_uri: str, config: ExperimentConfig, out_dir: str | Path) -> LocalRunResult:
    """Every step of ``pipeline.py``'s DAG as a subprocess of this Python, artifacts under ``out_dir``."""
    from kfp import local

    from coughreg.export import load_pipeline_module

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    pipeline = load_pipeline_module().build_pipeline(config, source_uri)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(out_dir / "pipeline-root"), raise_on_error=True)
    run = pipeline(source_uri=source_uri, config_yaml=config_to_parameter(config))
    report = Path(run.outputs["report"].path)
    metrics_artifact = run.outputs["metrics"]
    scorer = Path(run.outputs["scorer"].path)
    metrics_file = report.parent / "evaluation" / "metrics.json"  # the evaluate task's folder
    values = json.loads(metrics_file.read_text()) if metrics_file.exists() else dict(metrics_artifact.metadata)
    html_copy = report.parent / "evaluation" / "report.html"  # the same page, with a name browsers open
    return LocalRunResult(html_copy if html_copy.exists() else report, metrics_file, scorer, values, time.perf_counter() - started)
