"""Step 3: training on the shards, on one GPU or one DistributedDataParallel rank per GPU (``coughreg.training``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from coughreg import artifacts
from coughreg.config.given import Given
from coughreg.config.schema import ExperimentConfig
from coughreg.io.storage import S3Options, is_s3_uri
from coughreg.model.weights import resolve
from coughreg.runtime.resources import limit_threads
from coughreg.steps.harness import log_metrics, reports_errors, setup_logging, staged
from coughreg.training import run_seed, train
from coughreg.training.distributed import is_main_process, launch
from coughreg.training.summary import training_summary


@reports_errors("train")
def train_step(features: str | Path, out: str | Path, given: Given, *, metrics: Any = None, identity: str | None = None,
               processes: int | None = None, s3: S3Options | None = None, cache_dir: Path | None = None) -> dict:
    """Train on the shards of a features folder; on several GPUs, one DistributedDataParallel rank per GPU.

    Args:
        identity: what names this run's output across retries (the KFP artifact URI); a drawn seed
            derives from it (``coughreg.training.run_seed``).
        processes: ranks to start (default: one per GPU of ``environment.gpus`` when there are several
            and that many are present; 1 otherwise).
    """
    setup_logging()
    limit_threads()
    with staged(s3, cache_dir) as staging:
        features_dir, out_dir = staging.input(features), staging.output(out)
        upstream = artifacts.read_config(features_dir, "features")
        config = given.build("train", upstream, f"the features output {features}")
        if identity is None and is_s3_uri(str(out)):
            identity = str(out)
        processes = processes or _ranks(config)
        if processes > 1:
            config = run_seed(config, out_dir, identity)  # drawn once, before the ranks
            if config.architecture.pretrained:  # fetched once into this pod's cache, before the ranks read it
                resolve(config)
            launch(_train_rank, (str(features_dir), str(out_dir), config), processes)
        else:
            train(features_dir, out_dir, config, identity)
            if not is_main_process():  # one of ranks started by hand (torchrun): rank 0 writes and publishes
                staging.uploads.clear()
                return {}
        history = artifacts.read_json(out_dir, artifacts.HISTORY, "train", list)
        info = artifacts.read_model_info(out_dir)
    summary = {"members": len(info["members"]), "seed": info["seed"], **training_summary(history, config.prediction.metric)}
    log_metrics(metrics, summary)
    return summary


def _ranks(config: ExperimentConfig) -> int:
    gpus = len(config.environment.gpus)
    if gpus > 1 and torch.cuda.device_count() >= gpus and "WORLD_SIZE" not in os.environ:
        return gpus
    return 1


def _train_rank(features_dir: str, out_dir: str, config: ExperimentConfig) -> None:
    """One rank of a distributed training run (started by ``coughreg.training.distributed.launch``)."""
    setup_logging()
    train(features_dir, out_dir, config)
