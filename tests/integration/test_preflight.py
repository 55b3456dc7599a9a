"""Fail fast: the preflight step stops a run that cannot succeed before a recording is downloaded, one line per problem."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from coughreg.config.given import Given, givens_of
from coughreg.config.loading import load_resolved_config
from coughreg.io.local_s3 import Credentials
from coughreg.preflight.checks import pipeline_root_of
from coughreg.runtime.errors import CoughPipelineError
from coughreg.steps.preflight import preflight_step
from tests.conftest import HT_YAML, PROJECT, TINY


def _givens(*overrides):
    return givens_of(load_resolved_config(HT_YAML, [*TINY, *overrides]))


@pytest.mark.slow
def test_the_users_yaml_with_no_weights_stops_at_the_preflight(s3_env, bucket, coughvid_zip, tmp_path):
    """run-local with the Hydrogen Torch YAML unchanged (resnet50, pretrained) and no weights anywhere."""
    s3_env.client().upload_file(str(coughvid_zip), bucket, "covid19-cough-audio-classification.zip")
    done = subprocess.run(
        [sys.executable, "pipeline.py", "run-local", "--data", f"s3://{bucket}/covid19-cough-audio-classification.zip",
         "--out", str(tmp_path / "run")],
        cwd=PROJECT, capture_output=True, text=True, timeout=600, env=dict(os.environ),
    )
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: architecture.pretrained: no weights for 'resnet50' (timm/resnet50.a1_in1k)")
    assert done.stderr.rstrip().endswith("(the preflight step failed; its log is above)")  # the step's words, not a traceback
    (run,) = (tmp_path / "run" / "pipeline-root").glob("cough-regression-*")
    assert {path.name for path in run.iterdir()} == {"preflight"}  # nothing after it started
    assert not list(tmp_path.rglob("*.parquet")) and not list(tmp_path.rglob("*.webm"))  # no recording, no shard
    assert not (tmp_path / "cache" / "s3").exists()  # the zip was never downloaded
    ran = re.findall(r"Task \S*preflight\S* finished with status", re.sub(r"\x1b\[[0-9;]*m", "", done.stdout + done.stderr))
    assert len(ran) == 1  # and it was not retried
    seconds = float(re.search(r"preflight: \d+ checks in ([0-9.]+) s", done.stdout + done.stderr).group(1))
    assert seconds < 60


def test_missing_data_and_wrong_credentials_are_named(s3_server, s3_env, bucket, monkeypatch):
    s3_env.client().put_object(Bucket=bucket, Key="data.zip", Body=b"zip")
    givens = _givens()
    with pytest.raises(CoughPipelineError, match=r"^s3://no-such-bucket: bucket does not exist$"):
        preflight_step("s3://no-such-bucket/data.zip", givens)
    with pytest.raises(CoughPipelineError, match=rf"^s3://{bucket}/missing.zip: no such object$"):
        preflight_step(f"s3://{bucket}/missing.zip", givens)
    wrong = Credentials(s3_server.credentials.access_key_id, "not-the-secret-5678")
    for key, value in wrong.env(s3_server.endpoint_url).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(CoughPipelineError) as error:
        preflight_step(f"s3://{bucket}/data.zip", givens)
    assert str(error.value).startswith(f"s3://{bucket}/data.zip: access denied") and "not-the-secret-5678" not in str(error.value)


def test_every_failed_check_is_one_line(s3_env, bucket, tmp_path):
    done = subprocess.run(
        [sys.executable, "pipeline.py", "preflight", "--data", f"s3://{bucket}/missing.zip",
         "--set", "cluster.checkpoint_uri=s3://no-such-bucket/checkpoints", "--set", "architecture.backbone=test_efficientnet"],
        cwd=PROJECT, capture_output=True, text=True, timeout=300, env=dict(os.environ),
    )
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors[0] == f"error: s3://{bucket}/missing.zip: no such object"
    assert errors[1] == "error: s3://no-such-bucket/checkpoints: bucket does not exist"
    assert errors[2].startswith("error: architecture.pretrained: no weights for 'test_efficientnet'")
    assert len(errors) == 3


def test_a_run_parameter_that_breaks_the_config_fails_the_preflight(s3_env, bucket, coughvid_zip):
    s3_env.client().upload_file(str(coughvid_zip), bucket, "data.zip")
    givens = _givens()
    givens["train"] = Given.parameter("train_config", '{"training": {"epochs": -1}}')
    with pytest.raises(CoughPipelineError, match=r"key 'training.epochs': Input should be greater than or equal to 1"):
        preflight_step(f"s3://{bucket}/data.zip", givens)
    givens["train"] = Given.parameter("train_config", '{"audio": {"hop_size": 256}}')  # a key of another step
    with pytest.raises(CoughPipelineError, match="'audio.hop_size' belong to another step"):
        preflight_step(f"s3://{bucket}/data.zip", givens)


def test_weights_are_kept_once_by_their_hash_and_passed_on(s3_env, bucket, coughvid_zip, tmp_path):
    import hashlib

    import timm
    from safetensors.torch import save_file

    s3_env.client().upload_file(str(coughvid_zip), bucket, "data.zip")
    model = timm.create_model("test_efficientnet", pretrained=False, in_chans=3, num_classes=1000)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "weights.safetensors"))
    digest = hashlib.sha256((tmp_path / "weights.safetensors").read_bytes()).hexdigest()
    givens = _givens("architecture.pretrained=true", f"architecture.pretrained_weights={tmp_path / 'weights.safetensors'}",
                     f"cluster.weights_uri=s3://{bucket}/weights")
    first = preflight_step(f"s3://{bucket}/data.zip", givens, report=str(tmp_path / "report.md"))
    assert first["weights_sha256"] == digest and first["weights_uri"] == f"s3://{bucket}/weights/sha256/{digest}/weights.safetensors"
    assert first["source_version"].startswith("s3-object etag=")
    stored = s3_env.client().list_objects_v2(Bucket=bucket, Prefix="weights/")["Contents"]
    assert [o["Key"] for o in stored] == ["weights/.coughreg-write-check", f"weights/sha256/{digest}/weights.safetensors"]
    assert preflight_step(f"s3://{bucket}/data.zip", givens) == first
    report = (tmp_path / "report.md").read_text()
    assert "| weights | ok |" in report and "| data | ok |" in report and "| config | ok |" in report


def test_the_pipeline_root_is_found_in_an_artifact_uri():
    name = "cough-regression"
    assert pipeline_root_of("s3://artifacts/root/cough-regression/1f2e-run/preflight/abc/report", name) == "s3://artifacts/root"
    assert pipeline_root_of("/tmp/out/pipeline-root/cough-regression-2026-11-25-21-01-12-091159/preflight/report",
                            name) == "/tmp/out/pipeline-root"
    # a bucket or a folder named like the pipeline is not taken for the run's folder
    assert pipeline_root_of("s3://cough-regression/cough-regression/run-1/preflight/salt/report", name) == "s3://cough-regression"
    assert pipeline_root_of("s3://ml/cough-regression/cough-regression/run-1/preflight/s/report", name) == "s3://ml/cough-regression"
    assert pipeline_root_of("/home/u/cough-regression/out/pipeline-root/cough-regression-2026-11-25-21-01-12-091159/preflight/report",
                            name) == "/home/u/cough-regression/out/pipeline-root"
    assert pipeline_root_of("s3://bucket/elsewhere/report", name) is None


class Blackhole:
    """A loopback server that accepts connections and never answers: a hung endpoint."""

    def __init__(self) -> None:
        import socket
        import threading

        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.held = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.held.append(self.listener.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        self.listener.close()
        for connection in self.held:
            connection.close()


@pytest.mark.slow
def test_an_endpoint_that_never_answers_fails_the_checks_in_seconds(tmp_path):
    hung = Blackhole()
    try:
        env = {**os.environ, "AWS_ENDPOINT_URL_S3": hung.url, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
               "AWS_DEFAULT_REGION": "us-east-1", "HF_ENDPOINT": hung.url, "HF_HOME": str(tmp_path / "hf")}
        env.pop("HF_HUB_OFFLINE")
        started = __import__("time").perf_counter()
        done = subprocess.run([sys.executable, "pipeline.py", "preflight", "--data", "s3://coughs/data.zip",
                               "--set", "architecture.backbone=test_efficientnet"],
                              cwd=PROJECT, capture_output=True, text=True, timeout=300, env=env)
        seconds = __import__("time").perf_counter() - started
    finally:
        hung.close()
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2 and len(errors) == 2, done.stderr[-2000:]
    assert errors[0].startswith("error: s3://coughs/data.zip: ") and "could not be reached" in errors[1]
    assert seconds < 60


def test_a_misspelled_backbone_is_named_with_a_suggestion(s3_env, bucket, coughvid_zip):
    s3_env.client().upload_file(str(coughvid_zip), bucket, "data.zip")
    with pytest.raises(CoughPipelineError, match=r"architecture.backbone: timm has no model 'resnet5O' \(did you mean 'resnet50'\?\)"):
        preflight_step(f"s3://{bucket}/data.zip", _givens("architecture.backbone=resnet5O"))


def test_the_write_check_leaves_one_marker_and_deletes_nothing(s3_env, bucket, coughvid_zip):
    client = s3_env.client()
    client.upload_file(str(coughvid_zip), bucket, "data.zip")
    for _ in range(2):
        preflight_step(f"s3://{bucket}/data.zip", _givens(f"cluster.checkpoint_uri=s3://{bucket}/checkpoints"))
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="checkpoints/")["Contents"]]
    assert keys == ["checkpoints/.coughreg-write-check"]
