"""Cough-audio regression on Kubeflow Pipelines: the DAG (and, below it, the command line).

Steps, each a container, artifacts passed through the pipeline root (S3 on a cluster):
    1. ingest    - a COUGHVID or Hydrogen Torch data set from S3 (zip or prefix) or disk
                   -> manifest.parquet + the accepted recordings + a data-quality report
    2. features  - recordings -> log-mel Parquet spectrogram shards, fanned out over
                   `feature_parts` pods (ParallelFor), then collected into one shard index
    3. train     - group k-fold, timm backbone on GPUs -> weights, folds, validation predictions
    4. evaluate  - metrics beside the mean/median baselines, HTML report
    5. export    - the scoring pipeline (raw audio in) and this pipeline, compiled

Kubernetes settings come from the config's `cluster` section: S3 credentials reach the steps
that read S3 as env from a Secret (never as parameters), training requests one nvidia.com/gpu
per entry of `environment.gpus` with its node selector and tolerations, network and GPU steps
retry with backoff, and caching is on unless switched off per step.

Usage:
    python pipeline.py compile -o pipeline.yaml [--config FILE] [--set section.key=value]...
    python pipeline.py run-local [--data URI] [--config FILE] [--set section.key=value]...
    python pipeline.py submit --host URL --data s3://... [--wait] [--schedule CRON] ...
    python pipeline.py step {ingest,features,train,evaluate,export} ...
    python pipeline.py demo | config | generate | score
"""

import sys
from pathlib import Path
from typing import NamedTuple

from kfp import compiler, dsl, kubernetes
from kfp.dsl import HTML, Metrics, Model

from components.evaluate import evaluate
from components.export import export
from components.features import collect_features, feature_part, plan_feature_parts
from components.ingest import ingest
from components.train import train
from coughreg.config import ExperimentConfig, config_to_parameter

PIPELINE_NAME = "cough-regression"
S3_KEYS = {key: key for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3")}


def build_pipeline(config: ExperimentConfig, source_uri: str = "", feature_parts: int = 2):
    """The DAG for one config: the config travels as a parameter (its default is this config)."""
    cluster = config.cluster
    gpus = len(config.environment.gpus)

    def cached(task, step: str):
        return task.set_caching_options(cluster.cache.get(step, True))

    def reads_s3(task):
        kubernetes.use_secret_as_env(task, secret_name=cluster.s3_secret, secret_key_to_env=S3_KEYS, optional=True)
        return task.set_retry(num_retries=cluster.retries, backoff_duration="30s", backoff_factor=2.0)

    class Outputs(NamedTuple):
        report: HTML
        metrics: Metrics
        scorer: Model

    @dsl.pipeline(name=PIPELINE_NAME, description="Cough recordings in S3 -> log-mel shards -> timm regressor -> scorer")
    def cough_regression(
        source_uri: str = source_uri, config_yaml: str = config_to_parameter(config), feature_parts: int = feature_parts
    ) -> Outputs:
        ingest_task = ingest(source_uri=source_uri, config_yaml=config_yaml)
        ingest_task.set_display_name("1. Ingest recordings")
        reads_s3(cached(ingest_task, "ingest")).set_cpu_request(cluster.cpu_request).set_memory_request(cluster.memory_request)

        plan_task = plan_feature_parts(parts=feature_parts)
        plan_task.set_display_name("2a. Plan feature parts")
        with dsl.ParallelFor(items=plan_task.output) as part:
            part_task = feature_part(
                dataset=ingest_task.outputs["dataset"], config_yaml=config_yaml, part=part, parts=feature_parts
            )
            part_task.set_display_name("2b. Log-mel shards (one part)")
            cached(part_task, "features").set_cpu_request(cluster.features_cpu_request).set_memory_request(cluster.memory_request)
        features_task = collect_features(
            dataset=ingest_task.outputs["dataset"], parts=dsl.Collected(part_task.outputs["spectrograms"]), config_yaml=config_yaml
        )
        features_task.set_display_name("2c. Collect spectrogram shards")
        cached(features_task, "features").set_cpu_request(cluster.cpu_request).set_memory_request(cluster.memory_request)

        train_task = train(spectrograms=features_task.outputs["spectrograms"], config_yaml=config_yaml)
        train_task.set_display_name("3. Train (GPU)")
        reads_s3(cached(train_task, "train"))  # pretrained weights may come from s3://; a preempted node retries
        train_task.set_cpu_request(cluster.train_cpu_request).set_memory_request(cluster.train_memory_request)
        if gpus:
            train_task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus)
            for label, value in cluster.gpu_node_selector.items():
                kubernetes.add_node_selector(train_task, label_key=label, label_value=value)
            for toleration in cluster.gpu_tolerations:
                kubernetes.add_toleration(train_task, **toleration.model_dump())

        evaluate_task = evaluate(
            model=train_task.outputs["model"], spectrograms=features_task.outputs["spectrograms"], config_yaml=config_yaml
        )
        evaluate_task.set_display_name("4. Evaluate")
        cached(evaluate_task, "evaluate").set_cpu_request(cluster.cpu_request).set_memory_request(cluster.memory_request)

        export_task = export(model=train_task.outputs["model"], config_yaml=config_yaml)
        export_task.set_display_name("5. Export scorer and pipeline")
        cached(export_task, "export").set_cpu_request(cluster.cpu_request).set_memory_request(cluster.memory_request)

        return Outputs(
            report=evaluate_task.outputs["report"], metrics=evaluate_task.outputs["metrics"], scorer=export_task.outputs["scorer"]
        )

    return cough_regression


def compile_pipeline(path: str | Path, config: ExperimentConfig, source_uri: str = "", feature_parts: int = 2) -> Path:
    """Compile the DAG for this config to KFP IR YAML."""
    compiler.Compiler().compile(build_pipeline(config, source_uri, feature_parts), str(path))
    return Path(path)


if __name__ == "__main__":
    from coughreg.cli import main

    sys.exit(main())
