"""Experiment tracking against the real thing: an MLflow tracking server on 127.0.0.1 (its own process, a
SQLite backend store, artifacts served by the server) read back over HTTP with MlflowClient, and the
Neptune client in its offline mode, whose operation log on disk is read back. Nothing is mocked."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

import pipeline
from coughreg.config.given import Given
from coughreg.config.loading import load_resolved_config
from coughreg.config.ownership import RUNTIME, runtime_env, step_parameter
from coughreg.evaluation.evaluate import json_ready
from coughreg.io.local_s3 import free_port
from coughreg.runtime.errors import ConfigError
from coughreg.steps.evaluate import evaluate_step
from coughreg.steps.export import export_step
from coughreg.steps.preflight import _tracking_check
from coughreg.tracking import tracker as tracking
from coughreg.training.summary import training_summary
from tests.conftest import HT_YAML, PROJECT, TINY

# The Neptune client's own dependencies import jsonschema's RefResolver, which jsonschema deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:jsonschema.RefResolver is deprecated:DeprecationWarning")

EPOCHS = 3
MEMBERS = [(0, 1234), (1, 2234)]  # (fold, seed) as training writes them: seed + 1000 * fold


# ---------------------------------------------------------------- real folders, written here


def _model_folder(root: Path) -> Path:
    """What the evaluate step reads for tracking from a model folder: its history.json."""
    folder = root / "model"
    folder.mkdir(parents=True)
    rows = [{"fold": fold, "seed": seed, "epoch": epoch, "train_loss": 1.0 / epoch + fold, "learning_rate": 1e-3 / epoch,
             "validation_mae": 0.5 / epoch + 0.01 * fold, "validation_rmse": 0.6 / epoch, "validation_r2": 0.1 * epoch}
            for fold, seed in MEMBERS for epoch in range(1, EPOCHS + 1)]
    (folder / "history.json").write_text(json.dumps(rows, indent=2))
    return folder


def _evaluation_folder(root: Path) -> Path:
    folder = root / "evaluation"
    folder.mkdir(parents=True)
    metrics = {"validation_rows": 12, "metric": "MAE", "metric_value": 0.21, "validation_mae": 0.21, "validation_r2": float("nan"),
               "baseline_median_mae": 0.3, "folds": [0, 1], "validation_scheme": "kfold",
               "quality_gate": {"passed": True, "verdict": "passed", "threshold": 1.0, "mae_vs_median_baseline": 0.7,
                                "message": "validation MAE 0.21 is 0.700 x the median baseline's"},
               "per_label": {"cough_detected": {"mae": 0.21, "rmse": 0.25}}}
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (folder / "report.html").write_bytes("<html><body><h1>Évaluation ✓</h1>".encode() + os.urandom(2048) + b"</body></html>")
    return folder


def _scorer_folder(root: Path) -> Path:
    folder = root / "scorer"
    (folder / "coughscore").mkdir(parents=True)
    (folder / "scorer.json").write_text(json.dumps({"format": 1}))
    (folder / "scorer.pt2").write_bytes(os.urandom(50_000))
    (folder / "score.py").write_text("print('score')\n")
    (folder / "coughscore" / "__init__.py").write_text("")
    return folder


@pytest.fixture
def made(tmp_path):
    return {"model": _model_folder(tmp_path), "evaluation": _evaluation_folder(tmp_path), "scorer": _scorer_folder(tmp_path)}


def _cluster_uri(run: str, task: str, output: str) -> str:
    """An output artifact URI as KFP's driver makes it: <root>/<pipeline>/<run id>/<task>/<salt>/<output>."""
    return f"s3://coughreg-artifacts/pipeline-root/cough-regression/{run}/{task}/{uuid.uuid4().hex[:8]}/{output}"


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- the run key


def test_every_task_of_one_pipeline_run_has_one_run_key(tmp_path):
    run = str(uuid.uuid4())
    evaluate_uri, export_uri = _cluster_uri(run, "evaluate", "evaluation"), _cluster_uri(run, "export", "scorer")
    key = tracking.run_key(evaluate_uri)
    assert key == f"s3://coughreg-artifacts/pipeline-root/cough-regression/{run}" == tracking.run_key(export_uri)
    assert tracking.run_key(f"s3://b/root/cough-regression/{run}/export/scorer") == f"s3://b/root/cough-regression/{run}"  # unsalted
    assert tracking.run_key(_cluster_uri(str(uuid.uuid4()), "evaluate", "evaluation")) != key
    # the pipeline's name in the bucket and the root is not mistaken for the run
    named = f"s3://cough-regression/cough-regression/cough-regression/{run}/evaluate/x1/evaluation"
    assert tracking.run_key(named) == f"s3://cough-regression/cough-regression/cough-regression/{run}"
    # the folder that mounts the bucket on the cluster (the artifact's path) names the same run
    assert tracking.run_key(f"/s3/coughreg-artifacts/pipeline-root/cough-regression/{run}/evaluate/x1/evaluation").endswith(run)
    local = tmp_path / "out" / "cough-regression" / "pipeline-root" / "cough-regression-2026-11-25-10-00-00-123456"
    assert tracking.run_key(local / "evaluate" / "evaluation") == str(local) == tracking.run_key(local / "export" / "scorer")
    assert tracking.run_key(tmp_path / "runs" / "a" / "evaluation") == str(tmp_path / "runs" / "a")  # the step command
    assert tracking.run_name(key) == run and len(tracking.run_hash(key)) <= 36


def test_a_tracker_uri_is_shown_without_credentials():
    shown = tracking.public_uri("https://alice:s3cret@mlflow.example.com:8443/base?token=x#y")
    assert shown == "https://mlflow.example.com:8443/base"
    assert tracking.public_uri("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"


# ---------------------------------------------------------------- the config


def _config(*overrides):
    return load_resolved_config(HT_YAML, list(overrides))


def test_tracker_keys_are_runtime_settings_that_change_no_cache_key():
    plain, tracked = _config(), _config("logging.logger=MLflow", "logging.mlflow_experiment=coughs")
    for step in ("ingest", "features", "train", "evaluate", "export"):
        assert step_parameter(plain, step) == step_parameter(tracked, step), step
    assert runtime_env(tracked, "evaluate")["COUGHREG_TRACKING_LOGGER"] == "MLflow"
    assert runtime_env(tracked, "export")["COUGHREG_MLFLOW_EXPERIMENT"] == "coughs"
    assert "COUGHREG_TRACKING_LOGGER" not in runtime_env(tracked, "train")
    assert "COUGHREG_TRACKING_LOGGER" not in runtime_env(plain, "evaluate")
    assert "COUGHREG_NEPTUNE_PROJECT" not in runtime_env(plain, "evaluate")  # empty: not set at all


def test_a_used_tracker_key_is_not_inert():
    assert "logging.logger" not in _config("logging.logger=MLflow").resolved.inert
    assert "logging.logger" not in _config("logging.logger=Neptune").resolved.inert
    assert _config().resolved.inert["logging.neptune_project"] == "logger is None"
    inert = _config("logging.logger=MLflow", "logging.neptune_project=ws/p").resolved.inert
    assert inert["logging.neptune_project"] == "logger is MLflow"
    assert "logging.neptune_project" not in _config("logging.logger=Neptune", "logging.neptune_project=ws/p").resolved.inert
    assert _config("logging.mlflow_experiment=x").resolved.inert["logging.mlflow_experiment"] == "logger is None"
    assert "logging.mlflow_experiment" not in _config("logging.logger=MLflow", "logging.mlflow_experiment=x").resolved.inert
    with pytest.raises(ConfigError, match="logging.logger"):
        _config("logging.logger=Wandb")


def test_the_component_reads_the_tracker_from_its_task_environment(monkeypatch):
    config = _config("logging.logger=Neptune", "logging.neptune_project=ws/proj", "logging.mlflow_experiment=2024")
    for env in (env for _, env in RUNTIME.values()):
        monkeypatch.delenv(env, raising=False)
    for env, value in runtime_env(config, "export").items():
        monkeypatch.setenv(env, value)
    given = Given.parameter("export_config", step_parameter(config, "export"))
    built = given.build("export", _config())
    assert (built.logging.logger, built.logging.neptune_project, built.logging.mlflow_experiment) == ("Neptune", "ws/proj", "2024")


def test_the_training_summary_has_the_last_and_the_best_epoch():
    rows = [{"fold": 0, "seed": 7, "epoch": e, "train_loss": 1.0 / e, "validation_mae": mae, "validation_r2": r2}
            for e, mae, r2 in ((1, 0.5, 0.1), (2, 0.3, 0.4), (3, 0.4, 0.2))]
    one = training_summary(rows, "MAE")
    assert one["validation_mae"] == 0.4 and one["train_loss"] == pytest.approx(1 / 3)  # the last epoch
    assert one["best_epoch"] == 2 and one["best_validation_mae"] == 0.3 and one["best_validation_r2"] == 0.4
    assert "best_train_loss" not in one
    assert training_summary(rows, "R2")["best_epoch"] == 2
    other = [{**row, "fold": 1, "seed": 1007, "validation_mae": row["validation_mae"] + 0.1} for row in rows[:1]]
    two = training_summary(rows + other, "MAE")
    assert two["fold0_seed7_best_epoch"] == 2 and two["fold1_seed1007_best_epoch"] == 1 and "best_epoch" not in two
    assert two["best_validation_mae"] == pytest.approx((0.3 + 0.6) / 2) and two["validation_mae"] == pytest.approx((0.4 + 0.6) / 2)


def test_the_compiled_pipeline_gives_the_tracking_secret_to_preflight_evaluate_and_export(tmp_path):
    done = subprocess.run([sys.executable, "pipeline.py", "compile", "-o", str(tmp_path / "p.yaml"), "--set", "logging.logger=MLflow",
                           "--set", "cluster.tracking_secret=team-mlflow"], cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    spec, platform = yaml.safe_load_all((tmp_path / "p.yaml").read_text())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for executor in ("exec-preflight", "exec-evaluate", "exec-export"):
        (secret,) = [s for s in executors[executor]["secretAsEnv"] if s["secretName"] == "team-mlflow"]
        assert secret["optional"] is True
        assert {(k["secretKey"], k["envVar"]) for k in secret["keyToEnv"]} == {(k, k) for k in tracking.SECRET_KEYS}
    tracked = {name for name, executor in executors.items()
               if any(s["secretName"] == "team-mlflow" for s in executor.get("secretAsEnv", []))}
    assert tracked == {"exec-preflight", "exec-evaluate", "exec-export"}
    containers = spec["deploymentSpec"]["executors"]
    for executor in ("exec-preflight", "exec-evaluate", "exec-export"):
        env = {e["name"]: e.get("value") for e in containers[executor]["container"]["env"]}
        assert env["COUGHREG_TRACKING_LOGGER"] == "MLflow" and not any(key in env for key in tracking.SECRET_KEYS)
    assert "COUGHREG_TRACKING_LOGGER" not in {e["name"] for e in containers["exec-train"]["container"]["env"]}
    # the same config without a tracker compiles to the same parameters: no cache key changes
    plain = next(yaml.safe_load_all(pipeline.compile_pipeline(tmp_path / "plain.yaml", _config()).read_text()))

    def defaults(compiled: dict) -> dict:
        return {k: p.get("defaultValue") for k, p in compiled["root"]["inputDefinitions"]["parameters"].items()}

    assert defaults(plain) == defaults(spec)


# ---------------------------------------------------------------- MLflow: a real server on 127.0.0.1


def _mlflow_config(experiment: str):
    return _config("logging.logger=MLflow", f"logging.mlflow_experiment={experiment}")


def _runs(url: str, experiment: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=url)
    found = client.get_experiment_by_name(experiment)
    return client, (client.search_runs([found.experiment_id]) if found else [])


def test_mlflow_gets_params_curves_metrics_report_and_scorer_in_one_run(mlflow_env, made, tmp_path):
    experiment = f"tracking-{uuid.uuid4().hex[:8]}"
    config = _mlflow_config(experiment)
    run = str(uuid.uuid4())
    key = tracking.run_key(_cluster_uri(run, "evaluate", "evaluation"))
    assert tracking.log_evaluation(config, key, made["model"], made["evaluation"])
    assert tracking.log_scorer(config, tracking.run_key(_cluster_uri(run, "export", "scorer")), made["scorer"])

    client, runs = _runs(mlflow_env["url"], experiment)
    assert len(runs) == 1  # the evaluate and the export step: one tracker run
    (logged,) = runs
    assert logged.info.run_name == run and logged.info.status == "FINISHED"
    assert logged.data.tags[tracking.RUN_KEY_TAG] == key
    params = logged.data.params
    assert params["training.epochs"] == str(config.training.epochs) and params["architecture.backbone"] == "resnet50"
    assert params["dataset.label_columns"] == '["cough_detected"]' and params["experiment_name"] == config.experiment_name
    assert params["training.build_scoring_pipelines"] == "true"  # the export step's key
    assert not any(name.startswith(("cluster.", "resolved")) for name in params)
    history = json.loads((made["model"] / "history.json").read_text())
    for fold, seed in MEMBERS:
        for name in ("train_loss", "validation_mae"):
            points = client.get_metric_history(logged.info.run_id, f"training/fold{fold}/seed{seed}/{name}")
            assert [(p.step, p.value) for p in sorted(points, key=lambda p: p.step)] == [
                (row["epoch"], pytest.approx(row[name])) for row in history if row["fold"] == fold]
    metrics = logged.data.metrics
    assert metrics["validation_mae"] == 0.21 and metrics["quality_gate.mae_vs_median_baseline"] == 0.7
    assert metrics["per_label.cough_detected.rmse"] == 0.25
    assert not {"validation_r2", "folds", "quality_gate.passed", "quality_gate.verdict"} & set(metrics)  # NaN, lists, flags, text

    downloads = Path(client.download_artifacts(logged.info.run_id, "", str(tmp_path / "downloaded")))
    assert (downloads / "report.html").read_bytes() == (made["evaluation"] / "report.html").read_bytes()
    assert (downloads / "metrics.json").read_bytes() == (made["evaluation"] / "metrics.json").read_bytes()
    assert _files(downloads / "scorer") == _files(made["scorer"])


def test_a_retried_step_adds_no_second_curve_and_another_run_is_another_tracker_run(mlflow_env, made):
    experiment = f"tracking-{uuid.uuid4().hex[:8]}"
    config = _mlflow_config(experiment)
    first = tracking.run_key(_cluster_uri(str(uuid.uuid4()), "evaluate", "evaluation"))
    assert tracking.log_evaluation(config, first, made["model"], made["evaluation"])
    assert tracking.log_evaluation(config, first, made["model"], made["evaluation"])  # the pod retried
    second = tracking.run_key(_cluster_uri(str(uuid.uuid4()), "evaluate", "evaluation"))
    assert tracking.log_evaluation(config, second, made["model"], made["evaluation"])
    client, runs = _runs(mlflow_env["url"], experiment)
    assert sorted(r.data.tags[tracking.RUN_KEY_TAG] for r in runs) == sorted([first, second])
    for logged in runs:
        points = client.get_metric_history(logged.info.run_id, "training/fold0/seed1234/validation_mae")
        assert sorted(p.step for p in points) == list(range(1, EPOCHS + 1))


def test_a_tracking_server_that_is_down_costs_a_warning_not_the_result(made, monkeypatch, caplog):
    port = free_port()  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:s3cret@127.0.0.1:{port}")
    before = _files(made["evaluation"])
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="coughreg.tracking.tracker"):
        logged = tracking.log_evaluation(_mlflow_config("down"), "s3://b/cough-regression/r1", made["model"], made["evaluation"])
    assert logged is False and time.monotonic() - started < tracking.PROBE_SECONDS + 5
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "coughreg.tracking.tracker"]
    assert f"MLflow at http://127.0.0.1:{port}" in warning and "results are kept" in warning
    assert "s3cret" not in caplog.text and "alice" not in caplog.text
    assert _files(made["evaluation"]) == before


def test_mlflow_without_a_uri_fails_before_the_work_naming_the_variable(monkeypatch, made, tiny_run, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = _mlflow_config("no-uri")
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI") as error:
        tracking.check(config)
    assert "logging.logger" in str(error.value) and "cluster.tracking_secret" in str(error.value)
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI"):
        tracking.log_evaluation(config, "s3://b/cough-regression/r1", made["model"], made["evaluation"])
    check = _tracking_check(config)  # the preflight's line
    assert not check.ok and "MLFLOW_TRACKING_URI" in check.detail
    out = tmp_path / "step" / "evaluation"
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI"):
        evaluate_step(tiny_run["model"], tiny_run["features"], tiny_run["ingest"], out,
                      Given.command_line(None, ["logging.logger=MLflow"]))
    assert not out.exists()  # refused before evaluating


@pytest.mark.slow
def test_the_evaluate_and_export_steps_log_into_one_tracker_run(mlflow_env, tiny_run, monkeypatch, tmp_path):
    """The steps as the components call them: the tracker from the task's environment, the run key from the URIs."""
    experiment = f"steps-{uuid.uuid4().hex[:8]}"
    config = load_resolved_config(HT_YAML, [*TINY, "logging.logger=MLflow", f"logging.mlflow_experiment={experiment}"])
    for env, value in runtime_env(config, "evaluate").items():
        monkeypatch.setenv(env, value)
    run = str(uuid.uuid4())
    evaluation = tmp_path / "root" / "cough-regression" / run / "evaluate" / "a1" / "evaluation"
    scorer = tmp_path / "root" / "cough-regression" / run / "export" / "b2" / "scorer"
    values = evaluate_step(tiny_run["model"], tiny_run["features"], tiny_run["ingest"], evaluation,
                           Given.parameter("evaluate_config", step_parameter(config, "evaluate")), workers=2)
    export_step(tiny_run["model"], evaluation, scorer, Given.parameter("export_config", step_parameter(config, "export")))
    client, runs = _runs(mlflow_env["url"], experiment)
    (logged,) = runs
    assert logged.info.run_name == run
    assert logged.data.metrics["validation_mae"] == pytest.approx(values["validation_mae"])
    assert logged.data.params["training.epochs"] == "2"
    points = client.get_metric_history(logged.info.run_id, "training/fold0/seed1234/train_loss")
    assert sorted(p.step for p in points) == [1, 2]
    names = {f.path for f in client.list_artifacts(logged.info.run_id)}
    assert {"report.html", "metrics.json", "scorer"} <= names
    listed = {f.path for f in client.list_artifacts(logged.info.run_id, "scorer")}
    assert "scorer/scorer.json" in listed and "scorer/score.py" in listed

    # the server goes away: the steps warn and keep their results
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    again = tmp_path / "root" / "cough-regression" / str(uuid.uuid4()) / "evaluate" / "c3" / "evaluation"
    kept = evaluate_step(tiny_run["model"], tiny_run["features"], tiny_run["ingest"], again,
                         Given.parameter("evaluate_config", step_parameter(config, "evaluate")), workers=2)
    assert json_ready(kept) == json_ready(values)  # the same evaluation (undefined figures are NaN in memory)
    assert (again / "metrics.json").exists() and (again / "report.html").exists()


# ---------------------------------------------------------------- Neptune, offline


@pytest.fixture
def no_network(monkeypatch):
    """Every connection a test's process tries is recorded and refused."""
    tried = []

    def refuse(self, address, *args, **kwargs):
        tried.append(address)
        raise ConnectionRefusedError(f"no network in this test: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return tried


def _neptune_operations(root: Path) -> list[dict]:
    """The offline store: .neptune/offline/run__<id>__<pid>__<key>/data-1.log, one JSON operation per line."""
    logs = sorted((root / ".neptune" / "offline").glob("run__*/data-*.log"))
    assert logs, f"no offline Neptune run under {root}"
    return [json.loads(line)["obj"] for path in logs for line in path.read_text().splitlines() if line.strip()]


def test_neptune_offline_keeps_params_curves_metrics_and_files(made, monkeypatch, tmp_path, no_network):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NEPTUNE_MODE", "offline")
    monkeypatch.setenv("NEPTUNE_PROJECT", "workspace/project")
    monkeypatch.delenv("NEPTUNE_API_TOKEN", raising=False)
    monkeypatch.delenv("NEPTUNE_DATA_DIRECTORY", raising=False)
    config = _config("logging.logger=Neptune")
    key = tracking.run_key(_cluster_uri(str(uuid.uuid4()), "evaluate", "evaluation"))
    assert tracking.log_evaluation(config, key, made["model"], made["evaluation"])
    assert tracking.log_scorer(config, key, made["scorer"])
    assert no_network == []

    operations = _neptune_operations(tmp_path)
    assigned = {"/".join(op["path"]): op.get("value") for op in operations if op["type"].startswith("Assign")}
    assert assigned["parameters/training/epochs"] == str(config.training.epochs)
    assert assigned["parameters/dataset/label_columns"] == '["cough_detected"]'
    assert assigned["parameters/training/build_scoring_pipelines"] == "true"
    assert assigned["metrics/validation_mae"] == 0.21 and assigned["metrics/quality_gate/mae_vs_median_baseline"] == 0.7
    assert assigned["coughreg/run_key"] == key
    series = {}
    for op in operations:
        if op["type"] == "LogFloats" and op["path"][0] == "metrics":
            series.setdefault("/".join(op["path"]), []).extend((v["step"], v["value"]) for v in op["values"])
    history = json.loads((made["model"] / "history.json").read_text())
    for fold, seed in MEMBERS:
        assert series[f"metrics/training/fold{fold}/seed{seed}/validation_mae"] == [
            (row["epoch"], pytest.approx(row["validation_mae"])) for row in history if row["fold"] == fold]
    uploads = {"/".join(op["path"]): op for op in operations if op["type"] in ("UploadFile", "UploadFileSet")}
    assert Path(uploads["artifacts/report.html"]["file_path"]).read_bytes() == (made["evaluation"] / "report.html").read_bytes()
    assert uploads["artifacts/scorer"]["file_globs"] == [str(made["scorer"].resolve())]
    assert not any(op["path"][0] == "monitoring" for op in operations)  # nothing captured beyond what is logged


def test_neptune_needs_its_token_and_project_unless_offline(monkeypatch):
    monkeypatch.delenv("NEPTUNE_API_TOKEN", raising=False)
    monkeypatch.delenv("NEPTUNE_PROJECT", raising=False)
    monkeypatch.delenv("NEPTUNE_MODE", raising=False)
    with pytest.raises(ConfigError, match="NEPTUNE_PROJECT"):
        tracking.check(_config("logging.logger=Neptune"))
    with pytest.raises(ConfigError, match="NEPTUNE_API_TOKEN"):
        tracking.check(_config("logging.logger=Neptune", "logging.neptune_project=ws/proj"))
    monkeypatch.setenv("NEPTUNE_MODE", "offline")
    assert tracking.check(_config("logging.logger=Neptune")) == "Neptune project (none) (offline)"
    monkeypatch.setenv("NEPTUNE_MODE", "read-only")
    with pytest.raises(ConfigError, match="NEPTUNE_MODE"):
        tracking.check(_config("logging.logger=Neptune"))
