"""The container image and the manifests, checked with the tools that run here."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_the_manifests_build_and_validate(tmp_path):
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed on this machine")
    built = subprocess.run(["kubectl", "kustomize", str(PROJECT / "manifests" / "base")], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    rendered = tmp_path / "base.yaml"
    rendered.write_text(built.stdout)
    validate = Path(sys.executable).parent / "kubernetes-validate"
    done = subprocess.run([str(validate), "-k", "1.32.0", "--strict", str(rendered)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "kind: ConfigMap" in built.stdout and "defaultPipelineRoot" in built.stdout
