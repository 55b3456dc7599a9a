"""Run the whole DAG on this machine through KFP's local runner (no Docker, no cluster), cached like the cluster."""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from coughreg import artifacts
from coughreg.config.ownership import RUNTIME, STEPS, runtime_env
from coughreg.config.schema import ExperimentConfig
from coughreg.runtime.env import ERROR_FILE_ENV
from coughreg.runtime.errors import CoughPipelineError
from coughreg.scoring import readback

log = logging.getLogger(__name__)

PIPELINE_FILE = "pipeline.yaml"


@dataclass
class LocalRunResult:
    report: Path
    metrics: Path
    model: Path
    scorer: Path | None  # None when the model failed the quality gate
    pipeline: Path
    values: dict
    seconds: float

    @property
    def gate(self) -> dict:
        return self.values.get("quality_gate", {})


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """Runtime settings for the steps (subprocesses inherit them): kfp.local keys its cache by a task's own
    environment, so settings there would make a new worker count rerun every step."""
    saved = {env: os.environ.get(env) for env in [*(env for _, env in RUNTIME.values()), ERROR_FILE_ENV]}
    for env in saved:
        os.environ.pop(env, None)
    os.environ.update(values)
    try:
        yield
    finally:
        for env, value in saved.items():
            if value is None:
                os.environ.pop(env, None)
            else:
                os.environ[env] = value


def run_local(pipeline: ModuleType, source_uri: str, config: ExperimentConfig, out_dir: str | Path, cache: bool = True,
              feature_parts: int = 2) -> LocalRunResult:
    """Every step of the DAG as a subprocess of this Python, artifacts under ``out_dir/pipeline-root``.

    Args:
        pipeline: the module that defines the DAG (``pipeline.py``: ``build_pipeline``, ``compile_pipeline``).
        source_uri: the data set.
        config: the experiment config.
        out_dir: where the run's artifacts, the compiled ``pipeline.yaml`` and the step cache go.
        cache: reuse a step's outputs from an earlier run in ``out_dir`` when its inputs are unchanged, as
            KFP does on a cluster (``kfp.local``'s cache, under ``pipeline-root/.kfp_cache``).
        feature_parts: branches of the features ParallelFor.
    """
    from kfp import local

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    compiled = pipeline.compile_pipeline(out_dir / PIPELINE_FILE, config, source_uri, feature_parts, local=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(out_dir / "pipeline-root"),
               raise_on_error=True, enable_caching=cache)
    error_file = out_dir / "last-error.json"
    error_file.unlink(missing_ok=True)
    settings = {k: v for step in (*STEPS, "preflight") for k, v in runtime_env(config, step).items()}
    with _environment({**settings, ERROR_FILE_ENV: str(error_file)}), _print_restored():
        try:
            run = pipeline.build_pipeline(config, source_uri, feature_parts, local=True)()
        except RuntimeError as exc:  # kfp.local's "Task ... finished with status FAILURE": the step's own words instead
            if not error_file.exists():
                raise
            failed = readback.read_json(error_file, "see the step's log above")
            raise CoughPipelineError(f"{failed['message']}\n(the {failed['step']} step failed; its log is above)") from exc
    report = Path(run.outputs["report"].path)
    evaluation = report.parent / "evaluation"  # the evaluate task's folder
    metrics_file = evaluation / artifacts.METRICS
    values = readback.read_json(metrics_file, "rerun the evaluate step") if metrics_file.exists() else dict(run.outputs["metrics"].metadata)
    html_copy = evaluation / artifacts.REPORT  # the same page, with a name browsers open
    scorer = run.outputs["scorer_uri"]  # the export task's artifact (a local path here), "" when the gate failed
    return LocalRunResult(
        html_copy if html_copy.exists() else report, metrics_file, Path(run.outputs["model"].path),
        Path(scorer) if scorer else None, compiled, values, time.perf_counter() - started,
    )


@contextlib.contextmanager
def _print_restored() -> Iterator[None]:
    """``builtins.print`` as it was before the run. kfp.local indents a task's output by swapping ``print`` for
    the task's time (``logging_utils.indented_print``); tasks that run at once in its threads (the feature parts)
    restore each other's swap, and one is left in place for the rest of the process."""
    kept = builtins.print
    try:
        yield
    finally:
        builtins.print = kept
