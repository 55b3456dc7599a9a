"""The command line runs each step alone, as a user would, against the loopback S3 endpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from coughreg.artifacts import read_manifest, shard_paths
from tests.conftest import PROJECT


def _run(*args, env=None):
    return subprocess.run(
        [sys.executable, "pipeline.py", *args], cwd=PROJECT, capture_output=True, text=True, timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_generate_then_ingest_from_s3_then_features(s3_env, bucket, tmp_path):
    archive = tmp_path / "demo.zip"
    done = _run("generate", "--out", str(archive), "-n", "12", "--seed", "3")
    assert done.returncode == 0, done.stderr
    assert "noise floor" in done.stdout
    assert json.loads(archive.with_suffix(".generator.json").read_text())["recordings"] == 12
    s3_env.client().upload_file(str(archive), bucket, "in/demo.zip")

    done = _run("step", "ingest", "--input", f"s3://{bucket}/in/demo.zip", "--out", str(tmp_path / "ingest"),
                "--set", "environment.seed=5", "--cache-dir", str(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr
    assert "12 ok, 0 rejected" in done.stdout
    assert s3_env.credentials.secret_access_key not in done.stdout + done.stderr
    manifest, _ = read_manifest(tmp_path / "ingest")
    assert len(manifest) == 12

    done = _run("step", "features", "--input", str(tmp_path / "ingest"), "--out", str(tmp_path / "features"),
                "--set", "environment.seed=5", "--set", "features.shard_rows=5")
    assert done.returncode == 0, done.stderr
    assert "12 recordings in 3 shards" in done.stdout
    assert "clips/s" in done.stderr and "ETA" in done.stderr  # progress is shown
    assert len(shard_paths(tmp_path / "features")) == 3


def test_a_step_error_is_one_clear_line(tmp_path):
    done = _run("step", "ingest", "--input", str(tmp_path / "missing.zip"), "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'missing.zip'}: no such file or folder"


def test_rerun_one_step_from_s3_artifacts(s3_env, bucket, tiny_run, tmp_path):
    """Iterate on training without re-featurizing: features from a previous run's artifact URI, model to S3."""
    from coughreg.config.loading import save_config
    from coughreg.io.storage import upload_folder

    upload_folder(tiny_run["features"], f"s3://{bucket}/run-1/features/spectrograms/")
    config_path = save_config(tiny_run["config"], tmp_path)
    done = _run("step", "train", "--input", f"s3://{bucket}/run-1/features/spectrograms/", "--out", f"s3://{bucket}/iteration-2/model/",
                "--config", str(config_path), "--set", "training.epochs=1", "--cache-dir", str(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr
    keys = {o["Key"] for o in s3_env.client().list_objects_v2(Bucket=bucket, Prefix="iteration-2/model/")["Contents"]}
    assert {"iteration-2/model/model.json", "iteration-2/model/predictions.parquet", "iteration-2/model/fold0_seed0/model.safetensors"} <= keys
    # evaluate and export read everything that made the model from its folder: no --config, no repeated --set
    done = _run("step", "evaluate", "--model", f"s3://{bucket}/iteration-2/model/", "--features", str(tiny_run["features"]),
                "--dataset", str(tiny_run["ingest"]), "--out", f"s3://{bucket}/iteration-2/evaluation/",
                "--set", "prediction.max_mae_to_median_baseline=100", "--cache-dir", str(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr
    assert "quality gate passed: validation MAE" in done.stdout
    done = _run("step", "export", "--model", f"s3://{bucket}/iteration-2/model/", "--evaluation", f"s3://{bucket}/iteration-2/evaluation/",
                "--out", str(tmp_path / "scorer"), "--cache-dir", str(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "scorer" / "scorer.ts").exists() and (tmp_path / "scorer" / "score.py").exists()
    # the training config again, without the --set it was trained with: refused, naming both values
    done = _run("step", "export", "--model", f"s3://{bucket}/iteration-2/model/", "--evaluation", f"s3://{bucket}/iteration-2/evaluation/",
                "--out", str(tmp_path / "scorer-2"), "--config", str(config_path), "--cache-dir", str(tmp_path / "cache"))
    assert done.returncode == 2
    assert f"training.epochs: the evaluation s3://{bucket}/iteration-2/evaluation/ was made with 1, {config_path} says 2" in done.stderr
