"""The KFP components of the first two steps: they compile and run through kfp.local from S3.

No `from __future__ import annotations` here: KFP reads the pipeline function's real annotations.
"""


import json
from pathlib import Path

import pytest
import yaml
from kfp import compiler, dsl, local

from components.features import features
from components.ingest import ingest
from coughreg.config import config_to_parameter
from coughreg.features import shard_paths
from coughreg.images import CPU_IMAGE
from coughreg.ingest import read_manifest
from coughreg.shards import SpectrogramShardReader


@dsl.pipeline(name="ingest-and-features")
def _first_two_steps(source_uri: str, config_yaml: str):
    ingested = ingest(source_uri=source_uri, config_yaml=config_yaml).set_display_name("Ingest from S3")
    features(dataset=ingested.outputs["dataset"], config_yaml=config_yaml).set_display_name("Log-mel shards")


def test_the_components_compile_on_the_project_image(tmp_path):
    path = tmp_path / "two.yaml"
    compiler.Compiler().compile(_first_two_steps, str(path))
    spec = yaml.safe_load(path.read_text())
    executors = spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {CPU_IMAGE}
    tasks = spec["root"]["dag"]["tasks"]
    assert tasks["features"]["inputs"]["artifacts"]["dataset"]["taskOutputArtifact"]["producerTask"] == "ingest"


@pytest.mark.slow
def test_ingest_and_features_run_through_kfp_local_from_s3(s3_env, bucket, coughvid_zip, config, tmp_path):
    s3_env.client().upload_file(str(coughvid_zip), bucket, "coughvid.zip")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    run = _first_two_steps(source_uri=f"s3://{bucket}/coughvid.zip", config_yaml=config_to_parameter(config))
    del run
    (ingest_dir,) = list((tmp_path / "root").glob("*/ingest/dataset"))
    (features_dir,) = list((tmp_path / "root").glob("*/features/spectrograms"))
    manifest, _ = read_manifest(ingest_dir)
    assert (manifest["status"] == "ok").sum() == 24
    reader = SpectrogramShardReader(shard_paths(features_dir))
    assert len(reader) == 24
    metrics = json.loads(Path(ingest_dir).parent.joinpath("executor_output.json").read_text())
    assert "recordings_ok" in json.dumps(metrics)
