"""`pipeline.py submit` against a loopback server that records what the KFP v2beta1 API receives."""

import json

import pytest
import yaml

import pipeline
from coughreg.app.submit import Submission, submit
from coughreg.config.loading import load_resolved_config
from tests.conftest import HT_YAML
from tests.helpers.kfp_api import KfpApiRecorder


@pytest.fixture
def api():
    recorder = KfpApiRecorder()
    yield recorder
    recorder.close()


def test_a_run_carries_the_pipeline_spec_and_the_parameters(api, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "must-never-be-sent")
    config = load_resolved_config(HT_YAML, ["environment.seed=31", "training.epochs=5"])
    outcome = submit(pipeline, config, "s3://coughs/covid19-cough-audio-classification.zip", Submission(
        host=api.url, namespace="team-audio", experiment="coughs", run_name="nightly", token="t0ken",
        pipeline_root="s3://artifacts/root", service_account="coughreg-pipeline-runner", feature_parts=4, wait=True,
        out=tmp_path,
    ))
    assert outcome == {"run_id": "run-1", "run_name": "nightly", "state": "SUCCEEDED", "pipeline": str(tmp_path / "pipeline.yaml")}
    (experiment,) = api.posted("/apis/v2beta1/experiments")
    assert experiment["body"]["display_name"] == "coughs" and experiment["body"]["namespace"] == "team-audio"
    (run,) = api.posted("/apis/v2beta1/runs")
    body = run["body"]
    assert run["headers"]["authorization"] == "Bearer t0ken"
    assert body["display_name"] == "nightly" and body["experiment_id"] == "exp-1"
    assert body["service_account"] == "coughreg-pipeline-runner"
    runtime = body["runtime_config"]
    assert runtime["pipeline_root"] == "s3://artifacts/root"
    parameters = runtime["parameters"]
    assert parameters == {"source_uri": "s3://coughs/covid19-cough-audio-classification.zip", "feature_parts": 4}
    spec = body["pipeline_spec"]["pipeline_spec"]
    defaults = {k: v.get("defaultValue") for k, v in spec["root"]["inputDefinitions"]["parameters"].items()}
    assert defaults["epochs"] == 5 and json.loads(defaults["train_config"])["environment"]["seed"] == 31  # the config travels in the spec
    assert spec["pipelineInfo"]["name"] == "cough-regression"
    platform = body["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert platform["exec-ingest"]["secretAsEnv"][0]["secretName"] == "coughreg-s3"
    assert {"ingest", "train", "evaluate"} <= set(spec["root"]["dag"]["tasks"])
    assert any("export" in c.get("dag", {}).get("tasks", {}) for c in spec["components"].values())  # behind the quality gate
    assert {"exec-export", "exec-gate-failed"} <= set(spec["deploymentSpec"]["executors"])  # the two sides of the quality gate
    assert "must-never-be-sent" not in json.dumps(api.requests)  # credentials stay in the cluster Secret


def test_no_cache_and_a_schedule(api, tmp_path):
    config = load_resolved_config(HT_YAML, ["environment.seed=1"])
    outcome = submit(pipeline, config, "s3://coughs/data.zip",
                     Submission(host=api.url, schedule="0 0 3 * * 1", enable_caching=False, out=tmp_path))
    assert outcome == {"recurring_run_id": "rr-1", "schedule": "0 0 3 * * 1", "pipeline": str(tmp_path / "pipeline.yaml")}
    (recurring,) = api.posted("/apis/v2beta1/recurringruns")
    body = recurring["body"]
    assert body["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 1"
    spec = body["pipeline_spec"]["pipeline_spec"]
    assert all(not t.get("cachingOptions", {}).get("enableCache") for t in spec["root"]["dag"]["tasks"].values())
    assert body["runtime_config"]["parameters"]["source_uri"] == "s3://coughs/data.zip"
    assert yaml.safe_dump(body)  # a plain JSON document
