"""Submit the pipeline to Kubeflow Pipelines on a cluster (KFP v2 API), once or on a schedule."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from coughreg.config.schema import ExperimentConfig
from coughreg.runtime.errors import CoughPipelineError
from coughreg.runtime.names import PIPELINE_NAME

log = logging.getLogger(__name__)


@dataclass
class Submission:
    host: str | None = None
    namespace: str = "kubeflow"
    experiment: str = PIPELINE_NAME
    run_name: str | None = None
    pipeline_root: str | None = None
    token: str | None = None
    service_account: str | None = None
    enable_caching: bool | None = None  # None: each step's own setting (cluster.cache)
    feature_parts: int = 2
    wait: bool = False
    timeout_s: int = 24 * 3600
    schedule: str | None = None  # cron expression: a recurring run instead of one run
    out: Path = Path("out/submitted")  # where the compiled pipeline.yaml is kept


def submit(pipeline: ModuleType, config: ExperimentConfig, source_uri: str, options: Submission) -> dict:
    """Compile the DAG for ``config`` (kept as ``<out>/pipeline.yaml``) and create a run (or a recurring run).

    Authentication: a bearer token (``options.token`` or ``KF_PIPELINES_TOKEN``), or, inside the
    cluster, the pod's service-account token, which ``kfp.Client`` picks up by itself. S3
    credentials are never parameters: the steps read them from the cluster Secret. Every step's
    config is in the compiled pipeline as its parameters' defaults; only the data and the fan-out
    are passed as run arguments.
    """
    import kfp

    from coughreg.preflight.checks import cluster_uri_problems

    problems = cluster_uri_problems(config, source_uri)
    if problems:
        raise CoughPipelineError("\nerror: ".join(problems))
    token = options.token or os.environ.get("KF_PIPELINES_TOKEN")
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    package = pipeline.compile_pipeline(out / "pipeline.yaml", config, source_uri, options.feature_parts)
    log.info("compiled pipeline: %s", package)
    client = kfp.Client(host=options.host, namespace=options.namespace, existing_token=token)
    arguments = {"source_uri": source_uri, "feature_parts": options.feature_parts}
    run_name = options.run_name or config.experiment_name
    if options.schedule:
        experiment = client.create_experiment(name=options.experiment, namespace=options.namespace)
        recurring = client.create_recurring_run(
            experiment_id=experiment.experiment_id, job_name=run_name, cron_expression=options.schedule,
            params=arguments, pipeline_package_path=str(package), pipeline_root=options.pipeline_root,
            enable_caching=options.enable_caching, service_account=options.service_account,
        )
        log.info("recurring run %s created (%s)", recurring.recurring_run_id, options.schedule)
        return {"recurring_run_id": recurring.recurring_run_id, "schedule": options.schedule, "pipeline": str(package)}
    result = client.create_run_from_pipeline_package(
        str(package), arguments=arguments, run_name=run_name, experiment_name=options.experiment,
        namespace=options.namespace, pipeline_root=options.pipeline_root, enable_caching=options.enable_caching,
        service_account=options.service_account,
    )
    outcome = {"run_id": result.run_id, "run_name": run_name, "pipeline": str(package)}
    log.info("run %s submitted", result.run_id)
    if options.wait:
        run = client.wait_for_run_completion(result.run_id, timeout=options.timeout_s)
        outcome["state"] = str(run.state)
        if outcome["state"] != "SUCCEEDED":
            raise CoughPipelineError(f"run {result.run_id} ended {outcome['state']}")
    return outcome
