"""Rerun one step and reuse the rest: what each task's cache key is made of, and reruns for real.

No `from __future__ import annotations` here: KFP reads real annotations.
"""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import yaml
from safetensors.torch import load_file

import pipeline
from coughreg.app.cache_keys import compare, task_materials
from coughreg.app.local_run import run_local
from coughreg.config.given import Given
from coughreg.config.loading import load_resolved_config, save_config
from coughreg.config.ownership import UI_PARAMETERS, step_parameter
from coughreg.runtime.errors import CoughPipelineError
from coughreg.steps.train import train_step
from coughreg.training import train
from tests.conftest import HT_YAML, PROJECT, TINY

FEATURES = {"for-loop-1/feature-part", "collect-features"}
SHIPPING = {"quality-gate-passed/export", "quality-gate-failed/gate-failed"}  # the two sides of the quality gate
AFTER_TRAIN = {"train", "evaluate"} | SHIPPING


def _compile(tmp_path, name, *overrides):
    path = pipeline.compile_pipeline(tmp_path / f"{name}.yaml", load_resolved_config(HT_YAML, list(overrides)))
    return next(yaml.safe_load_all(path.read_text()))


def _container_tasks(spec: dict) -> dict:
    """Read off the IR by hand: every container task -> (root parameters it reads, tasks whose artifacts it reads)."""
    found = {}

    def walk(tasks: dict, prefix: str, channels: dict) -> None:
        for name, task in tasks.items():
            inputs = task.get("inputs", {})
            parameters, producers = set(), set()
            for spec_ in inputs.get("parameters", {}).values():
                source = spec_.get("componentInputParameter")
                if source:
                    parameters |= channels.get(source, ({source}, set()))[0]
            for spec_ in inputs.get("artifacts", {}).values():
                if "taskOutputArtifact" in spec_:
                    producers.add(prefix + spec_["taskOutputArtifact"]["producerTask"])
                elif "componentInputArtifact" in spec_:
                    producers |= channels.get(spec_["componentInputArtifact"], (set(), set()))[1]
            component = spec["components"][task["componentRef"]["name"]]
            if "dag" not in component:
                found[prefix + name] = (parameters, producers)
                continue
            inner = {key: (parameters if key in inputs.get("parameters", {}) else set(), producers) for key in
                     [*inputs.get("parameters", {}), *inputs.get("artifacts", {})]}
            condition = task.get("triggerPolicy", {}).get("condition")
            group = "" if name.startswith("condition-branches") else (task["taskInfo"]["name"] if condition else name) + "/"
            walk(component["dag"]["tasks"], prefix + group, inner)

    walk(spec["root"]["dag"]["tasks"], "", {})
    return found


def _rekeyed_in_the_ir(before: dict, after: dict) -> set:
    """Tasks fed a changed pipeline parameter, then every task fed an artifact of those."""
    changed = {name for name, p in after["root"]["inputDefinitions"]["parameters"].items()
               if p.get("defaultValue") != before["root"]["inputDefinitions"]["parameters"][name].get("defaultValue")}
    tasks = _container_tasks(after)
    rekeyed = {name for name, (parameters, _) in tasks.items() if parameters & changed and name != "preflight"}  # it always runs
    while True:
        made_again = rekeyed | {name.split("/")[0] for name in rekeyed if name.startswith("for-loop")}
        grown = rekeyed | {name for name, (_, producers) in tasks.items() if producers & made_again}
        grown |= {name for name in tasks if name.startswith("for-loop-1/") and "ingest" in made_again}
        if grown == rekeyed:
            return rekeyed
        rekeyed = grown


def test_the_same_config_compiles_to_the_same_bytes(tmp_path):
    """The user's YAML unchanged (seed -1): no seed is drawn and no path of this machine is written at compile time."""
    outputs = []
    for name in ("first", "second"):
        done = subprocess.run([sys.executable, "pipeline.py", "compile", "-o", str(tmp_path / f"{name}.yaml")],
                              cwd=PROJECT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        outputs.append((tmp_path / f"{name}.yaml").read_bytes())
    assert outputs[0] == outputs[1]
    text = outputs[0].decode()
    assert str(PROJECT) not in text and str(tmp_path) not in text and "resolved" not in text
    defaults = next(yaml.safe_load_all(text))["root"]["inputDefinitions"]["parameters"]
    assert json.loads(defaults["train_config"]["defaultValue"])["environment"]["seed"] == -1


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    return _compile(tmp_path_factory.mktemp("baseline"), "baseline")


@pytest.mark.parametrize("override, rekeyed", [
    ("training.learning_rate=0.003", AFTER_TRAIN),
    ("training.epochs=7", AFTER_TRAIN),
    ("architecture.backbone=resnet18", AFTER_TRAIN),
    ("augmentation.gain_db=6", AFTER_TRAIN),
    ("dataset.selected_folds=[1]", AFTER_TRAIN),
    ("audio.spectrogram_normalization=Clip", AFTER_TRAIN),
    ("audio.hop_size=256", FEATURES | AFTER_TRAIN),
    ("prediction.max_inference_chunk_seconds=300", FEATURES | AFTER_TRAIN),
    ("dataset.label_columns=[cough_detected, severity_1]", {"ingest"} | FEATURES | AFTER_TRAIN),
    ("logging.number_of_audios=3", {"evaluate"} | SHIPPING),  # the scorer is made from the evaluation it passed
    ("training.run_interpretations=false", {"evaluate"} | SHIPPING),
    ("prediction.inference_chunk_seconds=30", {"evaluate"} | SHIPPING),  # validation is scored as the scorer will score
    ("prediction.max_mae_to_median_baseline=0.8", {"evaluate"} | SHIPPING),
    ("training.build_scoring_pipelines=false", {"quality-gate-passed/export"}),
    ("environment.number_of_workers=1", set()),
    ("features.workers=1", set()),
    ("cluster.checkpoint_uri=s3://bucket/checkpoints", set()),
    ("cluster.retries=5", set()),
    ("logging.logger=MLflow", set()),  # where results are also sent: a runtime setting of evaluate and export
    ("logging.mlflow_experiment=coughs", set()),
    ("logging.neptune_project=team/coughs", set()),
    ("cluster.tracking_secret=team-tracking", set()),
])
def test_a_changed_key_rekeys_its_step_and_those_after_it(baseline, tmp_path, override, rekeyed):
    changed = _compile(tmp_path, "changed", override)
    assert _rekeyed_in_the_ir(baseline, changed) == rekeyed
    before, after = task_materials(baseline), task_materials(changed)
    assert {name for name in after if after[name]["key"] != before[name]["key"]} - {"preflight"} == rekeyed
    verdicts = {row["task"]: row["verdict"] for row in compare(baseline, changed)}
    assert {name for name, verdict in verdicts.items() if verdict == "runs"} == rekeyed | {"preflight"}


def test_caching_off_for_train_reruns_it_and_what_reads_its_model(baseline, tmp_path):
    changed = _compile(tmp_path, "no-train-cache", "cluster.cache={train: false}")
    verdicts = {row["task"]: row["verdict"] for row in compare(baseline, changed)}
    assert {name for name, verdict in verdicts.items() if verdict == "runs"} == AFTER_TRAIN | {"preflight"}


def test_what_shapes_only_how_a_step_runs_travels_as_its_environment(tmp_path):
    path = pipeline.compile_pipeline(tmp_path / "p.yaml", load_resolved_config(
        HT_YAML, ["cluster.checkpoint_uri=s3://bucket/checkpoints", "environment.number_of_workers=3", "features.workers=2"]))
    spec = next(yaml.safe_load_all(path.read_text()))
    executors = spec["deploymentSpec"]["executors"]
    env = {name: {e["name"]: e["value"] for e in executor["container"].get("env", [])} for name, executor in executors.items()}
    assert env["exec-train"]["COUGHREG_CHECKPOINT_URI"] == "s3://bucket/checkpoints"
    assert env["exec-train"]["COUGHREG_LOADER_WORKERS"] == "3" and env["exec-feature-part"]["COUGHREG_FEATURE_WORKERS"] == "2"
    assert env["exec-train"]["COUGHREG_IMAGE"] == executors["exec-train"]["container"]["image"]
    defaults = {k: p.get("defaultValue") for k, p in spec["root"]["inputDefinitions"]["parameters"].items()}
    assert "workers" not in json.loads(defaults["features_config"])["features"]
    assert "number_of_workers" not in json.loads(defaults["train_config"])["environment"]
    assert "s3://bucket/checkpoints" not in json.dumps(defaults)


def test_cache_diff_tells_which_tasks_a_resubmission_reruns(tmp_path):
    for name, extra in (("before", []), ("after", ["--set", "training.learning_rate=0.003"])):
        done = subprocess.run([sys.executable, "pipeline.py", "compile", "-o", str(tmp_path / f"{name}.yaml"), *extra],
                              cwd=PROJECT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "pipeline.py", "cache-diff", str(tmp_path / "before.yaml"), str(tmp_path / "after.yaml")],
                          cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = {line.split()[0]: line for line in done.stdout.splitlines()[1:]}
    assert lines["ingest"].split()[3] == "cached" and lines["collect-features"].split()[3] == "cached"
    assert "runs  (parameter learning_rate)" in lines["train"]
    assert "runs  (new input artifacts from evaluate, train)" in lines["quality-gate-passed/export"]


# ---------------------------------------------------------------- real reruns


SHIPS = [*TINY, "prediction.max_mae_to_median_baseline=100"]  # these tiny models pass the quality gate


@pytest.fixture(scope="module")
def two_local_runs(coughvid_zip, tmp_path_factory):
    """The whole DAG through kfp.local twice into one folder, the second with another learning rate."""
    out = tmp_path_factory.mktemp("local-runs")
    first = run_local(pipeline, str(coughvid_zip), load_resolved_config(HT_YAML, SHIPS), out)
    second = run_local(pipeline, str(coughvid_zip), load_resolved_config(HT_YAML, [*SHIPS, "training.learning_rate=0.003"]), out)
    return out, first, second


@pytest.mark.slow
def test_a_local_run_with_only_other_worker_counts_is_taken_whole_from_the_cache(two_local_runs, coughvid_zip):
    out, _, second = two_local_runs
    config = load_resolved_config(HT_YAML, [*SHIPS, "training.learning_rate=0.003", "features.workers=1",
                                            "environment.number_of_workers=1"])
    third = run_local(pipeline, str(coughvid_zip), config, out)
    latest = sorted((out / "pipeline-root").glob("cough-regression-*"))[-1]
    assert {path.name for path in latest.iterdir()} == {"preflight"} and third.model == second.model


@pytest.mark.slow
def test_a_second_local_run_reuses_ingest_and_features_from_the_cache(two_local_runs):
    out, first, second = two_local_runs
    runs = sorted((out / "pipeline-root").glob("cough-regression-*"))
    ran = {path.name for path in runs[1].iterdir()}
    assert ran == {"preflight", "train", "evaluate", "export"}  # ingest and the features came from the cache
    assert {path.name for path in runs[0].iterdir()} >= {"ingest", "collect-features", "train"}
    assert second.model.is_relative_to(runs[1]) and first.model.is_relative_to(runs[0])
    weights = "fold0_seed0/model.safetensors"
    assert not all((load_file(str(first.model / weights))[k] == v).all() for k, v in load_file(str(second.model / weights)).items())
    assert json.loads(second.metrics.read_text())["validation_rows"] == json.loads(first.metrics.read_text())["validation_rows"]


@pytest.mark.slow
def test_rerun_train_alone_against_a_local_runs_artifacts(two_local_runs, s3_env, bucket, tmp_path):
    """The same step function from the command line (s3:// artifact URIs) and the way the component calls it."""
    from coughreg.io.storage import upload_folder

    out, first, _ = two_local_runs
    features = next((out / "pipeline-root").glob("cough-regression-*/collect-features/spectrograms"))
    upload_folder(features, f"s3://{bucket}/run-1/collect-features/spectrograms/")
    config = load_resolved_config(HT_YAML, TINY)
    config_path = save_config(config, tmp_path)

    def cli(*args):
        return subprocess.run([sys.executable, "pipeline.py", *args, "--cache-dir", str(tmp_path / "cache")], cwd=PROJECT,
                              capture_output=True, text=True, timeout=300, env=dict(os.environ))

    done = cli("step", "train", "--input", f"s3://{bucket}/run-1/collect-features/spectrograms/", "--out",
               f"s3://{bucket}/iterations/lr-0.05/model/", "--config", str(config_path), "--set", "training.learning_rate=0.05")
    assert done.returncode == 0, done.stderr
    assert "model: s3://" in done.stdout
    ingested = next((out / "pipeline-root").glob("cough-regression-*/ingest/dataset"))
    done = cli("step", "evaluate", "--model", f"s3://{bucket}/iterations/lr-0.05/model/", "--features",
               f"s3://{bucket}/run-1/collect-features/spectrograms/", "--dataset", str(ingested), "--out", str(tmp_path / "evaluation"))
    assert done.returncode == 0, done.stderr  # no --config: everything that made the model comes from its folder
    assert json.loads((tmp_path / "evaluation" / "metrics.json").read_text())["validation_rows"] >= 4
    saved = yaml.safe_load((tmp_path / "evaluation" / "config.yaml").read_text())
    assert saved["training"]["learning_rate"] == 0.05 and saved["architecture"]["backbone"] == "test_efficientnet"

    # the component's way: its parameter (the train keys as JSON) and the typed UI parameters
    typed = {"backbone": "test_efficientnet", "epochs": 1, "learning_rate": 0.02, "batch_size": 4}
    given = Given.parameter("train_config", step_parameter(config, "train", exclude=tuple(UI_PARAMETERS.values())), typed)
    summary = train_step(features, tmp_path / "component-model", given)
    info = json.loads((tmp_path / "component-model" / "model.json").read_text())
    assert summary["members"] == 1 and info["seed"] == 1234 and info["shard_set"] == json.loads((features / "shards.json").read_text())["shard_set"]
    assert yaml.safe_load((tmp_path / "component-model" / "config.yaml").read_text())["training"]["epochs"] == 1


def test_export_and_evaluate_read_the_models_own_config(tiny_run, tmp_path):
    """No --config and no repeated --set: a model trained with another backbone evaluates and exports as it was made."""
    config = load_resolved_config(HT_YAML, [*TINY, "architecture.backbone=test_resnet", "training.epochs=1"])
    train(tiny_run["features"], tmp_path / "model", config)
    for args in (["evaluate", "--model", str(tmp_path / "model"), "--features", str(tiny_run["features"]), "--dataset",
                  str(tiny_run["ingest"]), "--out", str(tmp_path / "eval")],
                 ["export", "--model", str(tmp_path / "model"), "--evaluation", str(tmp_path / "eval"), "--out", str(tmp_path / "scorer")]):
        done = subprocess.run([sys.executable, "pipeline.py", "step", *args], cwd=PROJECT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "scorer" / "scorer.json").read_text())["backbone"] == "test_resnet"
    assert yaml.safe_load((tmp_path / "eval" / "config.yaml").read_text())["architecture"]["backbone"] == "test_resnet"


def test_shards_made_with_other_audio_parameters_are_refused_naming_both(tiny_run, tmp_path):
    done = subprocess.run([sys.executable, "pipeline.py", "step", "train", "--input", str(tiny_run["features"]), "--out",
                           str(tmp_path / "model"), "--set", "audio.hop_size=256"], cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert f"audio.hop_size: the features output {tiny_run['features']} was made with 512, --set says 256" in done.stderr
    assert not (tmp_path / "model" / "model.json").exists()
    mismatched = load_resolved_config(HT_YAML, [*TINY, "audio.hop_size=256"])
    with pytest.raises(CoughPipelineError, match="audio.hop_size: the shards were made with 512, the config says 256"):
        train(tiny_run["features"], tmp_path / "plain", mismatched)


def test_a_random_seed_is_drawn_by_the_train_step_and_recorded(tiny_run, tmp_path):
    config = load_resolved_config(HT_YAML, [*TINY, "environment.seed=-1", "training.epochs=1"])
    given = Given.parameter("train_config", step_parameter(config, "train"))
    first = train_step(tiny_run["features"], tmp_path / "a", given, identity="s3://root/run-a/train/model")
    retried = train_step(tiny_run["features"], tmp_path / "a-retry", given, identity="s3://root/run-a/train/model")
    other = train_step(tiny_run["features"], tmp_path / "b", given, identity="s3://root/run-b/train/model")
    assert first["seed"] == retried["seed"] != other["seed"]  # a retried pod gets the same seed, a new run another
    for folder, summary in (("a", first), ("b", other)):
        saved = yaml.safe_load((tmp_path / folder / "config.yaml").read_text())
        assert saved["environment"]["seed"] == summary["seed"] and saved["resolved"]["seed_drawn"] is True
        assert json.loads((tmp_path / folder / "model.json").read_text())["seed"] == summary["seed"]
    local = train_step(tiny_run["features"], tmp_path / "c", given)  # no run identity: drawn, written down first
    assert json.loads((tmp_path / "c" / "seed.json").read_text())["seed"] == local["seed"]
    again = train_step(tiny_run["features"], tmp_path / "c", given)  # restarted into the same folder: the same seed
    assert again["seed"] == local["seed"]
    assert pd.read_parquet(tmp_path / "c" / "predictions.parquet")["pred_cough_detected"].notna().all()


def test_given_keys_are_checked(tmp_path):
    from coughreg.config.ownership import build_step_config
    from coughreg.runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="pipeline parameter train_config: expected a JSON object of config sections"):
        Given.parameter("train_config", '{"training": 5}')
    with pytest.raises(ConfigError, match="'audio.hop_size' belong to another step \\(features\\)"):
        Given.parameter("train_config", '{"audio": {"hop_size": 256}}').build("train", None)
    upstream = load_resolved_config(HT_YAML, [*TINY, "environment.seed=51"])
    config = build_step_config("evaluate", {"environment": {"seed": -1}}, upstream, "the run's config")  # -1: "drawn"
    assert config.environment.seed == 51
