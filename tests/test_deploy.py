"""The container image and the manifests, checked with the tools that run here."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import PROJECT


def test_the_dockerfile_is_hadolint_clean():
    hadolint = Path(sys.executable).parent / "hadolint"
    done = subprocess.run([str(hadolint), str(PROJECT / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_image_installs_exactly_the_local_pins():
    dockerfile = (PROJECT / "docker" / "Dockerfile").read_text()
    assert "COPY requirements.txt" in dockerfile
    assert re.search(r"pip install --no-cache-dir -r requirements\.txt", dockerfile)
    makefile = (PROJECT / "Makefile").read_text()
    assert "-r requirements-dev.txt" in makefile
    dev = (PROJECT / "requirements-dev.txt").read_text().splitlines()
    assert "-r requirements.txt" in dev
    pins = [line for line in (PROJECT / "requirements.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[^=\s]+", line) for line in pins), "every runtime dependency is pinned"
    names = {line.split("==")[0].lower() for line in pins}
    assert {"torch", "torchaudio", "timm", "kfp", "kfp-kubernetes", "av", "pyarrow", "pandas", "scikit-learn", "boto3"} <= names


@pytest.mark.parametrize("target", ["base", "overlays/aws", "overlays/minio-dev"])
def test_the_manifests_build_and_validate(tmp_path, target):
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed on this machine")
    built = subprocess.run(["kubectl", "kustomize", str(PROJECT / "manifests" / target)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(built.stdout)
    validate = Path(sys.executable).parent / "kubernetes-validate"
    done = subprocess.run([str(validate), "-k", "1.32.0", "--strict", str(rendered)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    objects = [o for o in yaml.safe_load_all(built.stdout) if o]
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "ServiceAccount", "Secret", "ConfigMap", "Role", "RoleBinding"} <= kinds
    assert all(o["metadata"].get("namespace") == "coughreg" for o in objects if o["kind"] != "Namespace")
    launcher = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "kfp-launcher")
    assert launcher["data"]["defaultPipelineRoot"].startswith("s3://")
    if target == "overlays/minio-dev":
        assert "Deployment" in kinds and "forcePathStyle: true" in launcher["data"]["providers"]
    if target == "overlays/aws":
        account = next(o for o in objects if o["kind"] == "ServiceAccount")
        assert "eks.amazonaws.com/role-arn" in account["metadata"]["annotations"]


def test_components_take_their_image_from_one_place():
    from components.features import feature_part
    from components.train import train
    from coughreg.images import CPU_IMAGE, GPU_IMAGE

    assert feature_part.component_spec.implementation.container.image == CPU_IMAGE
    assert train.component_spec.implementation.container.image == GPU_IMAGE
    makefile = (PROJECT / "Makefile").read_text()
    assert "coughreg.images" in makefile
