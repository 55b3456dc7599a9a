"""Step 2: recordings -> log-mel shards, on one machine or as the parts of a ParallelFor (``coughreg.features``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from coughreg import artifacts
from coughreg.config.given import Given
from coughreg.config.schema import ExperimentConfig
from coughreg.features.extract import collect_feature_parts, extract_feature_part, extract_features
from coughreg.io.storage import S3Options
from coughreg.steps.harness import log_metrics, reports_errors, setup_logging, staged


def _features_config(ingest_dir: Path, given: Given, named: str | Path) -> ExperimentConfig:
    upstream = artifacts.read_config(ingest_dir, "ingest")
    return given.build("features", upstream, f"the ingest output {named}")


def _features_metrics(out_dir: Path, metrics: Any) -> dict:
    report = artifacts.read_json(out_dir, artifacts.FEATURES_REPORT, "features")
    log_metrics(metrics, {"spectrograms": report["rows"], "shards": report["shards"], "failed_recordings": len(report["failures"]),
                          "audio_hours": report["audio_seconds"] / 3600,
                          **({"recordings_without_copies": len(report["copy_failures"])} if "copy_failures" in report else {})})
    return report


@reports_errors("features")
def features_step(ingest: str | Path, out: str | Path, given: Given, *, metrics: Any = None, s3: S3Options | None = None,
                  cache_dir: Path | None = None, workers: int | None = None) -> dict:
    """Every shard on this machine (one process per core): the features step outside a ParallelFor."""
    setup_logging()
    with staged(s3, cache_dir) as staging:
        ingest_dir, out_dir = staging.input(ingest), staging.output(out)
        extract_features(ingest_dir, out_dir, _features_config(ingest_dir, given, ingest), workers)
        return _features_metrics(out_dir, metrics)


@reports_errors("features")
def feature_part_step(ingest: str | Path, out: str | Path, given: Given, part: int, parts: int, *,
                      workers: int | None = None) -> None:
    """One of ``parts`` slices of the shard plan: a branch of the ParallelFor."""
    setup_logging()
    extract_feature_part(Path(ingest), Path(out), _features_config(Path(ingest), given, ingest), part, parts, workers)


@reports_errors("features")
def collect_features_step(ingest: str | Path, parts: list[str], out: str | Path, given: Given, *, metrics: Any = None) -> dict:
    """The parts' shards gathered into one features folder with its index."""
    setup_logging()
    collect_feature_parts(Path(ingest), [Path(p) for p in parts], Path(out), _features_config(Path(ingest), given, ingest))
    return _features_metrics(Path(out), metrics)
