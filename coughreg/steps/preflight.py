"""Step 0: the data's version, and every check that can be made before a recording is downloaded."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

from coughreg.config.given import Given, whole_config
from coughreg.config.schema import ExperimentConfig
from coughreg.io.data_version import source_identity
from coughreg.io.storage import S3Options
from coughreg.preflight.checks import Check, PreflightResult, failure_message, pipeline_root_of, preflight, write_report
from coughreg.runtime.env import GPU_NODE_SELECTOR_ENV
from coughreg.runtime.errors import ConfigError, CoughPipelineError
from coughreg.steps.harness import pipeline_name, reports_errors, setup_logging
from coughreg.tracking import tracker as tracking

log = logging.getLogger(__name__)


def source_version_step(source_uri: str, s3: S3Options | None = None) -> str:
    """The content identity of the data set at ``source_uri`` (``coughreg.io.data_version``)."""
    setup_logging()
    identity = source_identity(source_uri, s3)
    log.info("%s: %s", source_uri, identity)
    return identity


@reports_errors("preflight")
def preflight_step(source_uri: str, givens: dict[str, Given], *, report: str | None = None, artifact_uri: str | None = None,
                   s3: S3Options | None = None) -> dict:
    """Every check that can be made before a recording is downloaded (``coughreg.preflight.checks``), and, with
    ``logging.logger``, the experiment tracker's settings.

    Returns the data's version and the pretrained weights' URI and SHA-256 for the run to go on with.

    Raises:
        CoughPipelineError: one line per failed check.
    """
    setup_logging()
    started = time.perf_counter()
    # Short timeouts and few attempts: a check that cannot get an answer should say so in seconds.
    s3 = dataclasses.replace(s3 or S3Options(), max_attempts=2, connect_timeout=5, read_timeout=10, retry_budget_seconds=0)
    try:
        config = whole_config(givens)
    except ConfigError as exc:
        result = PreflightResult(checks=[Check("config", False, str(exc), time.perf_counter() - started)])
    else:
        store = config.cluster.weights_uri
        root = pipeline_root_of(artifact_uri, pipeline_name()) if artifact_uri else None
        store = store or (f"{root}/weights" if root else None)
        selector = json.loads(os.environ.get(GPU_NODE_SELECTOR_ENV) or "{}")
        result = preflight(source_uri, config, store, s3, selector)
        result.checks.insert(0, Check("config", True, "every step's keys make one valid config", 0.0))
        if config.logging.logger is not None:
            result.checks.append(_tracking_check(config))
    result.seconds = time.perf_counter() - started
    if report:
        write_report(result, report)
    log.info("preflight: %d checks in %.1f s, %d failed", len(result.checks), result.seconds, len(result.failures))
    if result.failures:
        raise CoughPipelineError(failure_message(result))
    return {"source_version": result.source_version, "weights_uri": result.weights_uri, "weights_sha256": result.weights_sha256}


def _tracking_check(config: ExperimentConfig):
    """The experiment tracker's settings and credentials are there (``coughreg.tracking.tracker.describe``); whether an MLflow
    server answers now is reported, not required (the evaluate and export steps warn and go on without it)."""
    began = time.perf_counter()
    try:
        detail, ok = tracking.describe(config), True
    except CoughPipelineError as exc:
        detail, ok = str(exc), False
    (log.info if ok else log.warning)("preflight: tracking: %s", detail if ok else "failed")
    return Check("tracking", ok, detail, time.perf_counter() - began)
