"""Cough-audio regression on Kubeflow Pipelines: the DAG (and, below it, the command line).

Steps, each a container, artifacts passed through the pipeline root (S3 on a cluster):
    1. ingest    - resolve the data set's version (uncached: new data reruns ingest), then fetch a
                   COUGHVID or Hydrogen Torch data set from S3 (zip or prefix) or disk
                   -> manifest.parquet + the accepted recordings + a data-quality report
    2. features  - recordings -> log-mel Parquet spectrogram shards, fanned out over
                   `feature_parts` pods (ParallelFor), then collected into one shard index
    3. train     - group k-fold, timm backbone on GPUs -> weights, folds, validation predictions
    4. evaluate  - metrics beside the mean/median baselines, HTML report
    5. export    - the scoring pipeline (raw audio in) and its provenance

Each step receives only the config keys that shape its output (`<step>_config`, see
coughreg/step_config.py), so KFP's cache reruns a step only when one of them changes; the backbone,
epochs, learning rate and batch size are typed run parameters. Kubernetes settings come from the
config's `cluster` section and are never parameters: S3 credentials reach the steps that read S3
as env from a Secret, training requests one nvidia.com/gpu per entry of `environment.gpus` with its
node selector and tolerations, network and GPU steps retry with backoff, caching is per step.

Usage:
    python pipeline.py compile -o pipeline.yaml [--config FILE] [--set section.key=value]...
    python pipeline.py run-local [--data URI] [--config FILE] [--set section.key=value]... [--no-cache]
    python pipeline.py submit --host URL --data s3://... [--wait] [--schedule CRON] ...
    python pipeline.py step {ingest,features,train,evaluate,export} ...
    python pipeline.py demo | config | generate | score | cache-diff
"""

import sys
from pathlib import Path
from typing import NamedTuple

from kfp import compiler, dsl, kubernetes
from kfp.dsl import HTML, Metrics, Model

from components.evaluate import evaluate
from components.export import export
from components.features import collect_features, feature_part, plan_feature_parts
from components.ingest import ingest, source_version
from components.train import train
from coughreg.config import ExperimentConfig
from coughreg.images import CPU_IMAGE, GPU_IMAGE
from coughreg.step_config import STEPS, runtime_env, step_arguments
from coughreg.steps import IMAGE_ENV, PIPELINE_ENV

PIPELINE_NAME = "cough-regression"
S3_KEYS = {key: key for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3")}


def build_pipeline(config: ExperimentConfig, source_uri: str = "", feature_parts: int = 2, local: bool = False):
    """The DAG for one config: each step's keys are a parameter whose default is this config's values.

    ``local``: for kfp.local, which hashes a task's environment into its cache key and retries like a
    cluster: runtime settings stay in the caller's environment (``runtime_env``) and nothing retries.
    """
    cluster = config.cluster
    gpus = len(config.environment.gpus)
    given = {name: value for step in STEPS for name, value in step_arguments(config, step).items()}  # the defaults

    def step(task, name: str, display: str, image: str = CPU_IMAGE, cpu: str = cluster.cpu_request,
             memory: str = cluster.memory_request):
        task.set_display_name(display).set_caching_options(cluster.cache.get(name, True))
        task.set_cpu_request(cpu).set_memory_request(memory)
        # How the step runs (worker counts, checkpoint_uri, names) travels as env, which no cache key holds.
        for variable, value in {PIPELINE_ENV: PIPELINE_NAME, IMAGE_ENV: image, **({} if local else runtime_env(config, name))}.items():
            task.set_env_variable(variable, value)
        return task

    def reads_s3(task):
        kubernetes.use_secret_as_env(task, secret_name=cluster.s3_secret, secret_key_to_env=S3_KEYS, optional=True)
        return task.set_retry(num_retries=0 if local else cluster.retries, backoff_duration="30s", backoff_factor=2.0)

    class Outputs(NamedTuple):
        report: HTML
        metrics: Metrics
        model: Model
        scorer: Model

    @dsl.pipeline(name=PIPELINE_NAME, description="Cough recordings in S3 -> log-mel shards -> timm regressor -> scorer")
    def cough_regression(
        source_uri: str = source_uri,
        backbone: str = given["backbone"],
        epochs: int = given["epochs"],
        learning_rate: float = given["learning_rate"],
        batch_size: int = given["batch_size"],
        feature_parts: int = feature_parts,
        ingest_config: str = given["ingest_config"],
        features_config: str = given["features_config"],
        train_config: str = given["train_config"],
        evaluate_config: str = given["evaluate_config"],
        export_config: str = given["export_config"],
    ) -> Outputs:
        version_task = source_version(source_uri=source_uri)
        step(version_task, "ingest", "1a. Resolve the data's version", cpu="500m", memory="1Gi")
        reads_s3(version_task).set_caching_options(False)  # it must look every time: new data reruns ingest

        ingest_task = ingest(source_uri=source_uri, source_version=version_task.output, ingest_config=ingest_config)
        reads_s3(step(ingest_task, "ingest", "1. Ingest recordings"))

        plan_task = step(plan_feature_parts(parts=feature_parts), "features", "2a. Plan feature parts", cpu="500m", memory="1Gi")
        with dsl.ParallelFor(items=plan_task.output) as part:
            part_task = feature_part(
                dataset=ingest_task.outputs["dataset"], features_config=features_config, part=part, parts=feature_parts
            )
            step(part_task, "features", "2b. Log-mel shards (one part)", cpu=cluster.features_cpu_request)
        features_task = collect_features(
            dataset=ingest_task.outputs["dataset"], parts=dsl.Collected(part_task.outputs["spectrograms"]),
            features_config=features_config,
        )
        step(features_task, "features", "2c. Collect spectrogram shards")

        train_task = train(
            spectrograms=features_task.outputs["spectrograms"], train_config=train_config, backbone=backbone, epochs=epochs,
            learning_rate=learning_rate, batch_size=batch_size,
        )
        step(train_task, "train", "3. Train (GPU)", GPU_IMAGE, cluster.train_cpu_request, cluster.train_memory_request)
        reads_s3(train_task)  # pretrained weights and checkpoints may live in s3://; a preempted node retries
        if gpus:
            train_task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus)
            for label, value in cluster.gpu_node_selector.items():
                kubernetes.add_node_selector(train_task, label_key=label, label_value=value)
            for toleration in cluster.gpu_tolerations:
                kubernetes.add_toleration(train_task, **toleration.model_dump())

        evaluate_task = evaluate(
            model=train_task.outputs["model"], spectrograms=features_task.outputs["spectrograms"], evaluate_config=evaluate_config
        )
        step(evaluate_task, "evaluate", "4. Evaluate")

        export_task = export(model=train_task.outputs["model"], export_config=export_config)
        step(export_task, "export", "5. Export the scorer")

        return Outputs(report=evaluate_task.outputs["report"], metrics=evaluate_task.outputs["metrics"],
                       model=train_task.outputs["model"], scorer=export_task.outputs["scorer"])

    return cough_regression


def compile_pipeline(path: str | Path, config: ExperimentConfig, source_uri: str = "", feature_parts: int = 2,
                     local: bool = False) -> Path:
    """Compile the DAG for this config to KFP IR YAML."""
    compiler.Compiler().compile(build_pipeline(config, source_uri, feature_parts, local), str(path))
    return Path(path)


if __name__ == "__main__":
    from coughreg.cli import main

    sys.exit(main(sys.modules[__name__]))
