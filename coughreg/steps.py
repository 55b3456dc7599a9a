"""The glue between KFP components and the plain step functions: config text in, artifacts out.

Components pass the resolved config as YAML text (a pipeline parameter), so a run carries the
exact config it was compiled with; each step saves it again beside its outputs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml

from coughreg.config import ExperimentConfig, config_from_dict, resolve_config

log = logging.getLogger(__name__)


def config_from_text(config_yaml: str) -> ExperimentConfig:
    raw = yaml.safe_load(config_yaml) or {}
    return resolve_config(config_from_dict(raw, source="pipeline parameter config_yaml"))


def log_metrics(metrics: Any, values: dict[str, Any]) -> None:
    """Numbers of a flat dict into a KFP ``Metrics`` artifact (None: skipped)."""
    if metrics is None:
        return
    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(key, float(value))


def _copy_html(source: Path, target: str | None) -> None:
    import shutil

    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)


def run_ingest_step(source_uri: str, config_yaml: str, out_dir: str, metrics: Any = None, html_path: str | None = None) -> dict:
    from coughreg.errors import CoughPipelineError
    from coughreg.ingest import REPORT_NAME, ingest
    from coughreg.quality import QUALITY_HTML

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        ingest(source_uri, Path(out_dir), config_from_text(config_yaml))
    finally:  # a failed ingest still shows its data-quality report
        if (Path(out_dir) / QUALITY_HTML).exists():
            _copy_html(Path(out_dir) / QUALITY_HTML, html_path)
    report_path = Path(out_dir) / REPORT_NAME
    if not report_path.exists():
        raise CoughPipelineError(f"{report_path}: the ingest wrote no report")
    report = json.loads(report_path.read_text())
    log_metrics(metrics, {"recordings_ok": report["ok"], "recordings_rejected": report["rejected"],
                          "metadata_rows_without_recording": report["metadata_rows_without_recording"],
                          "unusable_fraction_of_present": report["unusable_fraction_of_present"],
                          "audio_hours": report["quality"]["duration_s"]["total_hours"]})
    return report


def run_feature_part_step(ingest_dir: str, config_yaml: str, part: int, parts: int, out_dir: str) -> None:
    from coughreg.features import extract_feature_part

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    extract_feature_part(Path(ingest_dir), Path(out_dir), config_from_text(config_yaml), part, parts)


def run_collect_features_step(ingest_dir: str, part_dirs: list[str], config_yaml: str, out_dir: str, metrics: Any = None) -> dict:
    from coughreg.features import REPORT_NAME, collect_feature_parts

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    collect_feature_parts(Path(ingest_dir), [Path(p) for p in part_dirs], Path(out_dir), config_from_text(config_yaml))
    report = json.loads((Path(out_dir) / REPORT_NAME).read_text())
    log_metrics(metrics, {"spectrograms": report["rows"], "shards": report["shards"], "failed_recordings": len(report["failures"]),
                          "audio_hours": report["audio_seconds"] / 3600})
    return report


def run_train_step(features_dir: str, config_yaml: str, out_dir: str, metrics: Any = None) -> dict:
    import os

    import torch

    from coughreg.train import HISTORY, MODEL_INFO, train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_text(config_yaml)
    gpus = len(config.environment.gpus)
    if gpus > 1 and torch.cuda.device_count() >= gpus and "WORLD_SIZE" not in os.environ:
        launch_distributed_training(features_dir, config, out_dir, gpus)
        history = json.loads((Path(out_dir) / HISTORY).read_text())
        members = json.loads((Path(out_dir) / MODEL_INFO).read_text())["members"]
    else:
        result = train(Path(features_dir), Path(out_dir), config)
        history, members = result.history, result.members
    last = {k: v for k, v in history[-1].items() if k not in ("fold", "seed", "epoch")} if history else {}
    log_metrics(metrics, {"members": len(members), **last})
    return last


def launch_distributed_training(features_dir: str, config, out_dir: str, processes: int) -> None:
    """DistributedDataParallel over ``processes`` GPUs: the train step again, under torchrun."""
    import subprocess
    import sys
    import tempfile

    from coughreg.config import save_config
    from coughreg.errors import CoughPipelineError
    from coughreg.export import pipeline_file

    with tempfile.TemporaryDirectory() as folder:
        config_path = save_config(config, folder)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   str(pipeline_file()), "step", "train", "--input", str(features_dir), "--out", str(out_dir),
                   "--config", str(config_path)]
        log.info("training on %d processes: %s", processes, " ".join(command))
        done = subprocess.run(command, check=False)
    if done.returncode != 0:
        raise CoughPipelineError(f"distributed training failed (exit {done.returncode}); see the log above")


def run_evaluate_step(model_dir: str, features_dir: str, config_yaml: str, out_dir: str, report_path: str | None = None,
                      metrics: Any = None) -> dict:
    from coughreg.evaluate import evaluate

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = evaluate(Path(model_dir), Path(features_dir), Path(out_dir), config_from_text(config_yaml))
    _copy_html(result.report_path, report_path)
    log_metrics(metrics, result.metrics)
    return result.metrics


def run_export_step(model_dir: str, config_yaml: str, out_dir: str) -> str:
    from coughreg.export import export

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return str(export(Path(model_dir), Path(out_dir), config_from_text(config_yaml)).scorer_dir)
