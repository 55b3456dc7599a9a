"""The DAG: it compiles with its steps, edges, quality gate and GPU request, and runs end to end through kfp.local.

No `from __future__ import annotations` here: KFP reads real annotations.
"""

import builtins
import json
import re
import subprocess
import sys
import uuid

import numpy as np
import pytest
import yaml

import pipeline
from coughreg.app.local_run import run_local
from coughreg.config.loading import load_config, load_resolved_config
from coughreg.scoring.scorer import Scorer
from tests.conftest import HT_YAML, PROJECT, REAL_COUGHS, TINY


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    path = tmp_path_factory.mktemp("compiled") / "pipeline.yaml"
    done = subprocess.run(
        [sys.executable, "pipeline.py", "compile", "-o", str(path), "--set", "environment.seed=9"],
        cwd=PROJECT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    spec, platform = yaml.safe_load_all(path.read_text())  # the pipeline, then its Kubernetes settings
    spec["platform"] = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    return spec


def _producers(task: dict) -> set[str]:
    artifacts = task.get("inputs", {}).get("artifacts", {})
    return {a["taskOutputArtifact"]["producerTask"] for a in artifacts.values() if "taskOutputArtifact" in a}


def _branches(spec: dict) -> dict[str, dict]:
    """The quality gate's two branches: taskInfo name -> (condition task, its component's tasks)."""
    (group,) = [t for name, t in spec["root"]["dag"]["tasks"].items() if name.startswith("condition-branches")]
    inner = spec["components"][group["componentRef"]["name"]]["dag"]["tasks"]
    return {t["taskInfo"]["name"]: (t, spec["components"][t["componentRef"]["name"]]["dag"]["tasks"]) for t in inner.values()}


def test_five_steps_wired_in_order(compiled):
    tasks = compiled["root"]["dag"]["tasks"]
    assert set(tasks) == {"preflight", "ingest", "plan-feature-parts", "for-loop-1", "collect-features", "train",
                          "evaluate", "condition-branches-2"}
    assert _producers(tasks["ingest"]) == set()
    version = tasks["ingest"]["inputs"]["parameters"]["source_version"]["taskOutputParameter"]
    assert version["producerTask"] == "preflight" and version["outputParameterKey"] == "source_version"  # a parameter, not an artifact
    assert tasks["preflight"]["cachingOptions"] == {}  # it looks every time
    assert _producers(tasks["collect-features"]) == {"ingest", "for-loop-1"}
    assert _producers(tasks["train"]) == {"collect-features"}
    assert _producers(tasks["evaluate"]) == {"train", "collect-features", "ingest"}  # validation scored from the audio
    assert _producers(tasks["condition-branches-2"]) == {"train", "evaluate"}
    names = {name: task["taskInfo"]["name"] for name, task in tasks.items()}
    assert names["train"] == "3. Train (GPU)" and names["ingest"] == "1. Ingest recordings"


def test_features_fan_out_over_a_parallel_for(compiled):
    loop = compiled["root"]["dag"]["tasks"]["for-loop-1"]
    assert loop["parameterIterator"]["items"]["inputParameter"].endswith("plan-feature-parts-Output")
    inner = compiled["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert set(inner) == {"feature-part"}
    assert inner["feature-part"]["inputs"]["artifacts"]["dataset"]["componentInputArtifact"] == "pipelinechannel--ingest-dataset"
    collected = compiled["root"]["dag"]["tasks"]["collect-features"]["inputs"]["artifacts"]["parts"]
    assert collected["taskOutputArtifact"]["producerTask"] == "for-loop-1"
    assert compiled["root"]["inputDefinitions"]["parameters"]["feature_parts"]["defaultValue"] == 2


def test_train_requests_one_nvidia_gpu(compiled):
    executor = compiled["deploymentSpec"]["executors"]["exec-train"]["container"]
    accelerator = executor["resources"]["accelerator"]
    assert accelerator.get("resourceType", accelerator.get("type")) == "nvidia.com/gpu"
    assert str(accelerator.get("resourceCount", accelerator.get("count"))) == "1"
    others = [e for name, e in compiled["deploymentSpec"]["executors"].items() if name != "exec-train"]
    assert all("accelerator" not in e["container"].get("resources", {}) for e in others)


def test_kubernetes_settings(compiled):
    platform = compiled["platform"]
    for executor in ("exec-preflight", "exec-ingest", "exec-train"):
        secret = platform[executor]["secretAsEnv"][0]
        assert secret["secretName"] == "coughreg-s3"
        assert {k["envVar"] for k in secret["keyToEnv"]} >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    # evaluate reads no S3 itself: only the experiment tracker's optional Secret
    assert [s["secretName"] for s in platform["exec-evaluate"]["secretAsEnv"]] == ["coughreg-tracking"]
    assert platform["exec-train"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    tasks = compiled["root"]["dag"]["tasks"]
    assert tasks["train"]["retryPolicy"]["maxRetryCount"] == 3 and tasks["ingest"]["retryPolicy"]["backoffDuration"] == "30s"
    assert all(task["cachingOptions"].get("enableCache", False) for name, task in tasks.items()
               if name not in ("preflight", "for-loop-1") and not name.startswith("condition"))
    resources = compiled["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert resources["resourceMemoryRequest"] == "32Gi" and resources["resourceCpuRequest"] == "8"
    dumped = yaml.safe_dump(compiled)
    assert "AWS_SECRET_ACCESS_KEY: " not in dumped and "replace-me" not in dumped  # no credential values, only names


def test_node_selector_and_per_step_cache(tmp_path):
    config = load_resolved_config(HT_YAML, ["cluster.gpu_node_selector={accelerator: nvidia-h100}", "cluster.cache={train: false}"])
    path = pipeline.compile_pipeline(tmp_path / "p.yaml", config)
    spec, platform = yaml.safe_load_all(path.read_text())
    train = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]
    assert train["nodeSelector"]["labels"] == {"accelerator": "nvidia-h100"}
    assert spec["root"]["dag"]["tasks"]["train"]["cachingOptions"] == {}  # caching off for train only
    assert spec["root"]["dag"]["tasks"]["evaluate"]["cachingOptions"]["enableCache"] is True


def test_each_step_gets_its_own_keys_and_the_ui_gets_typed_parameters(compiled):
    parameters = compiled["root"]["inputDefinitions"]["parameters"]
    assert set(parameters) == {"source_uri", "backbone", "epochs", "learning_rate", "batch_size", "max_mae_to_median_baseline",
                               "feature_parts", "ingest_config", "features_config", "train_config", "evaluate_config",
                               "export_config"}
    assert parameters["max_mae_to_median_baseline"]["parameterType"] == "NUMBER_DOUBLE"
    assert parameters["max_mae_to_median_baseline"]["defaultValue"] == 1.0
    assert parameters["backbone"]["parameterType"] == "STRING" and parameters["backbone"]["defaultValue"] == "resnet50"
    assert parameters["epochs"]["parameterType"] == "NUMBER_INTEGER" and parameters["learning_rate"]["parameterType"] == "NUMBER_DOUBLE"
    train = json.loads(parameters["train_config"]["defaultValue"])
    assert train["environment"]["seed"] == 9 and "backbone" not in train["architecture"]  # the typed parameter carries it
    assert set(json.loads(parameters["ingest_config"]["defaultValue"])) == {"dataset", "ingest"}
    assert "cluster" not in json.dumps([p.get("defaultValue") for p in parameters.values()])
    tasks = compiled["root"]["dag"]["tasks"]
    assert set(tasks["train"]["inputs"]["parameters"]) == {"train_config", "backbone", "epochs", "learning_rate", "batch_size",
                                                           "weights_uri", "weights_sha256"}  # the last two from the preflight
    assert set(tasks["evaluate"]["inputs"]["parameters"]) == {"evaluate_config", "max_mae_to_median_baseline"}
    evaluate_keys = json.loads(parameters["evaluate_config"]["defaultValue"])
    assert set(evaluate_keys["prediction"]) == {"inference_chunk_method", "inference_chunk_seconds",  # the chunking scored with
                                                "robustness_recordings"}  # and how many recordings the chain is measured on
    assert set(json.loads(parameters["export_config"]["defaultValue"])) == {"training"}  # build_scoring_pipelines only
    outputs = compiled["root"]["outputDefinitions"]
    assert set(outputs["artifacts"]) == {"report", "metrics", "model", "scorer"}
    assert set(outputs["parameters"]) == {"quality_gate", "scorer_uri"}


def test_the_quality_gate_decides_whether_the_model_ships(compiled):
    branches = _branches(compiled)
    passed, passed_tasks = branches["quality-gate-passed"]
    failed, failed_tasks = branches["quality-gate-failed"]
    assert passed["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--evaluate-gate'] == 'passed'"
    assert failed["triggerPolicy"]["condition"] == "!(inputs.parameter_values['pipelinechannel--evaluate-gate'] == 'passed')"
    assert set(passed_tasks) == {"export"} and set(failed_tasks) == {"gate-failed"}  # no test table in the user's YAML
    assert passed_tasks["export"]["inputs"]["artifacts"]["evaluation"]["componentInputArtifact"] == "pipelinechannel--evaluate-evaluation"
    (group,) = [name for name in compiled["root"]["dag"]["tasks"] if name.startswith("condition-branches")]
    group_outputs = compiled["components"][f"comp-{group}"]["dag"]["outputs"]
    (oneof,) = group_outputs["artifacts"].values()  # dsl.OneOf: the scorer, or the note of a failed gate
    assert {s["producerSubtask"] for s in oneof["artifactSelectors"]} == {passed["componentRef"]["name"].removeprefix("comp-"),
                                                                         failed["componentRef"]["name"].removeprefix("comp-")}
    scorer = compiled["root"]["dag"]["outputs"]["artifacts"]["scorer"]["artifactSelectors"][0]
    assert scorer["producerSubtask"] == group


def test_a_test_table_is_scored_after_the_gate(tmp_path):
    config = load_resolved_config(HT_YAML, ["dataset.test_dataframe=data/user/ht/test.csv"])
    spec = next(yaml.safe_load_all(pipeline.compile_pipeline(tmp_path / "p.yaml", config).read_text()))
    _, tasks = _branches(spec)["quality-gate-passed"]
    assert set(tasks) == {"export", "score-test-table"}
    assert tasks["score-test-table"]["inputs"]["artifacts"]["scorer"]["taskOutputArtifact"]["producerTask"] == "export"
    assert tasks["score-test-table"]["taskInfo"]["name"] == "6. Score the test table"
    assert spec["components"]["comp-score-test-table"]["outputDefinitions"]["artifacts"]["test_predictions"]["artifactType"][
        "schemaTitle"] == "system.Dataset"
    local = next(yaml.safe_load_all(pipeline.compile_pipeline(tmp_path / "local.yaml", config, local=True).read_text()))
    assert set(local["root"]["outputDefinitions"]["artifacts"]) == {"report", "metrics", "model"}  # kfp.local: OneOf of parameters only


def test_no_gpus_means_no_request(tmp_path):
    path = pipeline.compile_pipeline(tmp_path / "cpu.yaml", load_resolved_config(HT_YAML, ["environment.gpus=[]"]))
    spec = next(yaml.safe_load_all(path.read_text()))
    assert "accelerator" not in spec["deploymentSpec"]["executors"]["exec-train"]["container"].get("resources", {})


@pytest.mark.slow
def test_the_whole_dag_through_kfp_local_from_s3(s3_env, bucket, coughvid_zip, mlflow_env, tmp_path):
    """From S3, with the experiment tracker on: the tracker setting reaches the step subprocesses, and the
    evaluate and export tasks' artifact URIs name one tracker run."""
    from mlflow import MlflowClient

    from coughreg.tracking import tracker as tracking

    s3_env.client().upload_file(str(coughvid_zip), bucket, "ht/covid19-cough-audio-classification.zip")
    experiment = f"local-{uuid.uuid4().hex[:8]}"
    config = load_resolved_config(HT_YAML, [*TINY, "prediction.max_mae_to_median_baseline=50",  # this tiny model ships
                                            "logging.logger=MLflow", f"logging.mlflow_experiment={experiment}"])
    printing = builtins.print
    result = run_local(pipeline, f"s3://{bucket}/ht/covid19-cough-audio-classification.zip", config, tmp_path / "run")
    assert builtins.print is printing  # kfp.local's parallel tasks leave none of their indenting prints behind

    assert result.gate["verdict"] == "passed" and result.scorer is not None
    client = MlflowClient(tracking_uri=mlflow_env["url"])
    (logged,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    run_folder = result.scorer.parent.parent  # <root>/cough-regression-<timestamp>/export/scorer
    assert logged.info.run_name == run_folder.name and logged.data.tags[tracking.RUN_KEY_TAG] == str(run_folder)
    assert logged.data.metrics["validation_mae"] == pytest.approx(result.values["validation_mae"])
    assert {"report.html", "metrics.json", "scorer"} <= {f.path for f in client.list_artifacts(logged.info.run_id)}
    assert len(client.get_metric_history(logged.info.run_id, "training/fold0/seed1234/validation_mae")) == 2

    metrics = json.loads(result.metrics.read_text())
    assert metrics["validation_rows"] >= 4 and np.isfinite(metrics["validation_mae"])
    assert {"baseline_median_mae", "baseline_mean_mae", "validation_rmse", "validation_r2"} <= set(metrics)
    assert metrics["quality_gate"]["passed"] and result.gate["threshold"] == 50
    page = result.report.read_text()
    assert page.startswith("<!doctype html>") and "data:image/png;base64," in page

    assert result.pipeline == tmp_path / "run" / "pipeline.yaml" and result.pipeline.exists()  # compiled by the client
    provenance = json.loads((result.scorer / "provenance.json").read_text())
    assert provenance["run"]["pipeline"] == "cough-regression" and str(tmp_path / "run") in provenance["run"]["artifact_uri"]
    assert provenance["quality_gate"]["passed"]
    assert (result.model / "model.json").exists()
    rows = Scorer(result.scorer).score_paths([(p.name, p) for p in sorted(REAL_COUGHS.glob("*.mp3"))])
    assert len(rows) == 10 and all(row["status"] == "ok" and 0 <= row["cough_detected"] <= 1 for row in rows)
    saved = load_config(result.scorer / "config.yaml")
    assert saved.environment.seed == 1234

    # The same run with a gate no model passes: only evaluate reruns, nothing ships, the run still succeeds.
    strict = load_resolved_config(HT_YAML, [*TINY, "prediction.max_mae_to_median_baseline=0.01", "logging.logger=MLflow",
                                            f"logging.mlflow_experiment={experiment}"])
    failed = run_local(pipeline, f"s3://{bucket}/ht/covid19-cough-audio-classification.zip", strict, tmp_path / "run")
    assert failed.scorer is None and failed.model == result.model  # train came from the cache
    assert failed.values["quality_gate"]["verdict"] == "failed" and failed.values["quality_gate_passed"] == 0
    assert "allows 0.01" in failed.gate["message"] and "Failed" in failed.report.read_text()
    notes = list((tmp_path / "run" / "pipeline-root").glob("*/gate-failed/scorer/quality_gate_failed.txt"))
    assert len(notes) == 1 and notes[0].read_text().startswith("quality gate failed: validation MAE")


def test_pods_that_survive_on_a_cluster(compiled):
    platform, executors = compiled["platform"], compiled["deploymentSpec"]["executors"]
    (shm,) = platform["exec-train"]["emptyDirMounts"]
    assert shm == {"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "4Gi", "volumeName": "dshm"}
    (scratch,) = platform["exec-ingest"]["genericEphemeralVolume"]
    assert scratch["mountPath"] == "/scratch" and scratch["size"] == "50Gi" and scratch["defaultStorageClass"] is True
    env = {name: {e["name"]: e["value"] for e in executor["container"].get("env", [])} for name, executor in executors.items()}
    assert env["exec-ingest"]["COUGHREG_CACHE"] == "/scratch/cache" and env["exec-ingest"]["TMPDIR"] == "/scratch"
    assert env["exec-train"]["COUGHREG_GPUS_REQUESTED"] == "1" and env["exec-train"]["COUGHREG_CPU_REQUEST"] == "8"
    assert env["exec-feature-part"]["COUGHREG_CPU_REQUEST"] == "4"  # workers follow the pod's request, not the node
    deadlines = {name.removeprefix("exec-"): int(settings.get("activeDeadlineSeconds", 0)) for name, settings in platform.items()}
    assert deadlines["preflight"] == 1800 and deadlines["train"] == 72 * 3600 and deadlines["ingest"] == 6 * 3600
    tasks = compiled["root"]["dag"]["tasks"]
    assert "retryPolicy" not in tasks["preflight"] and tasks["preflight"]["cachingOptions"] == {}
    assert "preflight" in tasks["plan-feature-parts"]["dependentTasks"]


def test_images_are_immutable_and_install_nothing_at_start(compiled, tmp_path):
    import shutil

    from coughreg.runtime.images import BUILD_INPUTS, VERSION, source_digest

    digest = source_digest()
    for name, executor in compiled["deploymentSpec"]["executors"].items():
        container = executor["container"]
        assert re.fullmatch(rf"ghcr\.io/coughreg/coughreg:{re.escape(VERSION)}-{digest[:12]}-(cpu|cuda)", container["image"]), name
        assert "pip install" not in " ".join(container.get("command", []) + container.get("args", [])), name
    assert compiled["deploymentSpec"]["executors"]["exec-train"]["container"]["image"].endswith("-cuda")
    for name in BUILD_INPUTS:  # the same sources elsewhere give the same tag; one changed byte gives another
        source, target = PROJECT / name, tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, target)
    assert source_digest(tmp_path) == digest
    changed = tmp_path / "coughreg" / "features" / "extract.py"
    changed.write_text(changed.read_text() + "\n")
    assert source_digest(tmp_path) != digest


def test_the_preflight_gets_the_hub_settings_and_every_location(tmp_path):
    path = pipeline.compile_pipeline(tmp_path / "p.yaml", load_resolved_config(HT_YAML, ["cluster.checkpoint_uri=s3://b/ck"]))
    spec, platform = yaml.safe_load_all(path.read_text())
    secrets = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-preflight"]["secretAsEnv"]
    hub = next(s for s in secrets if s["secretName"] == "coughreg-hf")
    assert {k["envVar"] for k in hub["keyToEnv"]} == {"HF_ENDPOINT", "HF_TOKEN", "HF_HUB_OFFLINE"} and hub["optional"] is True
    env = {e["name"]: e["value"] for e in spec["deploymentSpec"]["executors"]["exec-preflight"]["container"]["env"]}
    assert env["COUGHREG_CHECKPOINT_URI"] == "s3://b/ck"  # the preflight checks that it can write there
