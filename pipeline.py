"""Cough-audio regression on Kubeflow Pipelines: the DAG (and, below it, the command line).

Steps, each a container, artifacts passed through the pipeline root (S3 on a cluster):
    0. preflight - the config, the data (its version: uncached, so new data reruns ingest), the output
                   locations, the GPUs and the pretrained weights (fetched once, passed on by SHA-256)
                   are checked before anything is downloaded; never retried
    1. ingest    - a COUGHVID or Hydrogen Torch data set from S3 (zip or prefix) or disk, that version
                   -> manifest.parquet + the accepted recordings + a data-quality report
    2. features  - recordings -> log-mel Parquet spectrogram shards, fanned out over
                   `feature_parts` pods (ParallelFor), then collected into one shard index
    3. train     - group k-fold, timm backbone on GPUs -> weights, folds, validation predictions
    4. evaluate  - the validation recordings scored from audio as the scorer will score them, metrics
                   beside the mean/median baselines, the quality gate's verdict, HTML report
       quality gate (dsl.If on evaluate's `gate`: MAE / median-baseline MAE <= max_mae_to_median_baseline)
    5. export    - passed: the scorer folder (raw audio in; torch, numpy, PyAV only) and its provenance
    6. score_test_table - passed, with dataset.test_dataframe: the test table scored with that scorer (Parquet)
                   failed: a note where the scorer would be; the metrics and report say why

Each step receives only the config keys that shape its output (`<step>_config`, see
coughreg/config/ownership.py), so KFP's cache reruns a step only when one of them changes; the backbone,
epochs, learning rate and batch size are typed run parameters. Kubernetes settings come from the
config's `cluster` section and are never parameters: S3 credentials reach the steps that read S3
as env from a Secret, the experiment tracker's (logging.logger) reach preflight, evaluate and export
from an optional one; training requests one nvidia.com/gpu per entry of `environment.gpus` with its
node selector and tolerations and gets a memory-backed /dev/shm; ingest unpacks on an ephemeral
volume; every step has a timeout, retries with backoff (for preemption) and its own cache switch.

Usage:
    python pipeline.py compile -o pipeline.yaml [--config FILE] [--set section.key=value]...
    python pipeline.py run-local [--data URI] [--config FILE] [--set section.key=value]... [--no-cache]
    python pipeline.py submit --host URL --data s3://... [--wait] [--schedule CRON] ...
    python pipeline.py step {ingest,features,train,evaluate,export} ...
    python pipeline.py demo | config | generate | score | cache-diff
"""

import json
import sys
from pathlib import Path
from typing import NamedTuple

from kfp import compiler, dsl, kubernetes
from kfp.dsl import HTML, Metrics, Model

from components.evaluate import evaluate
from components.export import export
from components.features import collect_features, feature_part, plan_feature_parts
from components.gate_failed import gate_failed
from components.ingest import ingest
from components.preflight import preflight
from components.score_test_table import score_test_table
from components.train import train
from coughreg.config.ownership import STEPS, runtime_env, step_arguments
from coughreg.config.schema import ExperimentConfig
from coughreg.evaluation.gate import PASSED
from coughreg.io.storage import checked_uri
from coughreg.runtime.env import (
    CACHE_ENV,
    CPU_REQUEST_ENV,
    GPU_NODE_SELECTOR_ENV,
    GPUS_REQUESTED_ENV,
    IMAGE_ENV,
    PIPELINE_ENV,
)
from coughreg.runtime.images import CPU_IMAGE, GPU_IMAGE
from coughreg.runtime.names import PIPELINE_NAME
from coughreg.tracking.tracker import SECRET_KEYS as TRACKING_SECRET_KEYS

SCRATCH = "/scratch"  # ingest's ephemeral volume
S3_KEYS = {key: key for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3")}
HF_KEYS = {key: key for key in ("HF_ENDPOINT", "HF_TOKEN", "HF_HUB_OFFLINE")}  # the hub, for pretrained weights
TRACKING_KEYS = {key: key for key in TRACKING_SECRET_KEYS}  # the experiment tracker (logging.logger)


def build_pipeline(config: ExperimentConfig, source_uri: str = "", feature_parts: int = 2, local: bool = False):
    """The DAG for one config: each step's keys are a parameter whose default is this config's values.

    ``local``: for kfp.local, which hashes a task's environment into its cache key and retries like a
    cluster: runtime settings stay in the caller's environment (``runtime_env``) and nothing retries.
    """
    checked_uri(source_uri, "source_uri")  # the parameter's default is written into the compiled pipeline
    cluster = config.cluster
    gpus = len(config.environment.gpus)
    given = {name: value for step in STEPS for name, value in step_arguments(config, step).items()}  # the defaults

    def step(task, name: str, display: str, image: str = CPU_IMAGE, cpu: str = cluster.cpu_request,
             memory: str = cluster.memory_request, retries: int = cluster.retries):
        task.set_display_name(display).set_caching_options(cluster.cache.get(name, True))
        task.set_cpu_request(cpu).set_memory_request(memory)
        if retries and not local:  # for preemption; a step retries its own I/O, the preflight catches config errors
            task.set_retry(num_retries=retries, backoff_duration="30s", backoff_factor=2.0)
        if name in cluster.timeouts:
            kubernetes.set_timeout(task, cluster.timeouts[name])
        # How the step runs (CPUs, worker counts, checkpoint_uri, names) travels as env, which no cache key holds.
        env = {PIPELINE_ENV: PIPELINE_NAME, IMAGE_ENV: image, **({} if local else {CPU_REQUEST_ENV: cpu, **runtime_env(config, name)})}
        for variable, value in env.items():
            task.set_env_variable(variable, value)
        return task

    def reads_s3(task):
        return kubernetes.use_secret_as_env(task, secret_name=cluster.s3_secret, secret_key_to_env=S3_KEYS, optional=True)

    def tracked(task):  # where the tracker is and the credentials for it; logging.logger says whether it is used
        return kubernetes.use_secret_as_env(task, secret_name=cluster.tracking_secret, secret_key_to_env=TRACKING_KEYS,
                                            optional=True)

    fields = [("report", HTML), ("metrics", Metrics), ("model", Model), ("quality_gate", str), ("scorer_uri", str)]
    if not local:  # the scorer artifact itself (kfp.local takes dsl.OneOf of parameters only)
        fields.append(("scorer", Model))
    Outputs = NamedTuple("Outputs", fields)  # noqa: N806 - a type

    @dsl.pipeline(name=PIPELINE_NAME, description="Cough recordings in S3 -> log-mel shards -> timm regressor -> scorer")
    def cough_regression(
        source_uri: str = source_uri,
        backbone: str = given["backbone"],
        epochs: int = given["epochs"],
        learning_rate: float = given["learning_rate"],
        batch_size: int = given["batch_size"],
        max_mae_to_median_baseline: float = given["max_mae_to_median_baseline"],
        feature_parts: int = feature_parts,
        ingest_config: str = given["ingest_config"],
        features_config: str = given["features_config"],
        train_config: str = given["train_config"],
        evaluate_config: str = given["evaluate_config"],
        export_config: str = given["export_config"],
    ) -> Outputs:
        preflight_task = preflight(
            source_uri=source_uri, ingest_config=ingest_config, features_config=features_config, train_config=train_config,
            backbone=backbone, epochs=epochs, learning_rate=learning_rate, batch_size=batch_size,
            evaluate_config=evaluate_config, max_mae_to_median_baseline=max_mae_to_median_baseline, export_config=export_config,
        )
        reads_s3(step(preflight_task, "preflight", "0. Preflight checks", cpu="1", memory="2Gi", retries=0))
        kubernetes.use_secret_as_env(preflight_task, secret_name=cluster.hf_secret, secret_key_to_env=HF_KEYS, optional=True)
        tracked(preflight_task)  # a tracker asked for and not configured fails here, before anything runs
        preflight_task.set_caching_options(False)  # it must look every time: new data reruns ingest
        preflight_task.set_env_variable(GPU_NODE_SELECTOR_ENV, json.dumps(cluster.gpu_node_selector if gpus else {}))

        ingest_task = ingest(source_uri=source_uri, source_version=preflight_task.outputs["source_version"],
                             ingest_config=ingest_config)
        reads_s3(step(ingest_task, "ingest", "1. Ingest recordings"))
        kubernetes.add_ephemeral_volume(ingest_task, volume_name="scratch", mount_path=SCRATCH, access_modes=["ReadWriteOnce"],
                                        size=cluster.scratch_size, storage_class_name=cluster.scratch_storage_class)
        if not local:  # downloads and temporary files on the scratch volume, not the node's disk
            ingest_task.set_env_variable(CACHE_ENV, f"{SCRATCH}/cache").set_env_variable("TMPDIR", SCRATCH)

        plan_task = step(plan_feature_parts(parts=feature_parts), "features", "2a. Plan feature parts", cpu="500m", memory="1Gi")
        plan_task.after(preflight_task)  # nothing starts before the preflight passed
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
            learning_rate=learning_rate, batch_size=batch_size, weights_uri=preflight_task.outputs["weights_uri"],
            weights_sha256=preflight_task.outputs["weights_sha256"],
        )
        reads_s3(step(train_task, "train", "3. Train (GPU)", GPU_IMAGE, cluster.train_cpu_request, cluster.train_memory_request))
        kubernetes.empty_dir_mount(train_task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                   size_limit=cluster.shm_size)  # data loader workers hand batches over in /dev/shm
        if gpus:
            train_task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus)
            if not local:  # a pod that got GPUs and cannot use them fails; a laptop trains on its CPU
                train_task.set_env_variable(GPUS_REQUESTED_ENV, str(gpus))
            for label, value in cluster.gpu_node_selector.items():
                kubernetes.add_node_selector(train_task, label_key=label, label_value=value)
            for toleration in cluster.gpu_tolerations:
                kubernetes.add_toleration(train_task, **toleration.model_dump())

        evaluate_task = evaluate(
            model=train_task.outputs["model"], spectrograms=features_task.outputs["spectrograms"],
            dataset=ingest_task.outputs["dataset"], evaluate_config=evaluate_config,
            max_mae_to_median_baseline=max_mae_to_median_baseline,
        )
        tracked(step(evaluate_task, "evaluate", "4. Evaluate"))

        with dsl.If(evaluate_task.outputs["gate"] == PASSED, "quality-gate-passed"):
            export_task = export(model=train_task.outputs["model"], evaluation=evaluate_task.outputs["evaluation"],
                                 export_config=export_config)
            tracked(step(export_task, "export", "5. Export the scorer"))
            if config.dataset.test_dataframe and config.training.build_scoring_pipelines:
                test_task = score_test_table(scorer=export_task.outputs["scorer"], dataset=ingest_task.outputs["dataset"])
                step(test_task, "score", "6. Score the test table")
        with dsl.Else("quality-gate-failed"):
            failed_task = gate_failed(evaluation=evaluate_task.outputs["evaluation"])
            step(failed_task, "export", "5. Quality gate failed: no scorer", cpu="500m", memory="1Gi", retries=0)

        outputs = dict(report=evaluate_task.outputs["report"], metrics=evaluate_task.outputs["metrics"],
                       model=train_task.outputs["model"], quality_gate=evaluate_task.outputs["gate"],
                       scorer_uri=dsl.OneOf(export_task.outputs["scorer_uri"], failed_task.outputs["scorer_uri"]))
        if not local:
            outputs["scorer"] = dsl.OneOf(export_task.outputs["scorer"], failed_task.outputs["scorer"])
        return Outputs(**outputs)

    return cough_regression


def compile_pipeline(path: str | Path, config: ExperimentConfig, source_uri: str = "", feature_parts: int = 2,
                     local: bool = False) -> Path:
    """Compile the DAG for this config to KFP IR YAML."""
    compiler.Compiler().compile(build_pipeline(config, source_uri, feature_parts, local), str(path))
    return Path(path)


if __name__ == "__main__":
    from coughreg.app.cli import main

    sys.exit(main(sys.modules[__name__]))
