"""Shared fixtures and the lanes.

Fixtures: a real S3 endpoint on loopback (auth enforced), a fault proxy, generated data, and one tiny
trained, evaluated and exported run per session for every test that only reads it.

Lanes, by folder: ``unit/`` (no server, no training), ``integration/`` (loopback S3, servers, tiny trainings),
``pipeline/`` (every ``kfp.local`` run), ``faults/`` (bad input and faults, by stage). A test is ``slow`` when it
is in ``pipeline/``, says so, or uses a fixture that trains; ``make test-fast`` runs the rest.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# No test reaches the Hugging Face hub: huggingface_hub reads this once, when it is first imported. A test
# of the download path starts its own loopback mirror and runs the product in a subprocess with HF_ENDPOINT.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.pop("HF_ENDPOINT", None)
os.environ.pop("HF_TOKEN", None)

import pytest

from coughreg.config.loading import load_resolved_config
from coughreg.io.local_s3 import LocalS3, free_port
from coughreg.synth.coughvid import generate_coughvid_zip
from tests.helpers.tcp_proxy import FaultProxy

PROJECT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
REAL_COUGHS = DATA / "real_coughs"
REAL_METADATA = DATA / "coughvid" / "metadata_compiled.csv"
HT_YAML = DATA / "ht_experiment.yaml"

_bucket_numbers = itertools.count()


@pytest.fixture(autouse=True)
def _isolated_aws(monkeypatch, tmp_path):
    """No test reads the machine's AWS config or writes the user's cache."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("COUGHREG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "huggingface"))  # an empty Hugging Face cache
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


@pytest.fixture(scope="session")
def s3_server():
    server = LocalS3(enforce_auth=True).start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The standard AWS variables point at the loopback server with valid keys."""
    for key, value in s3_server.credentials.env(s3_server.endpoint_url).items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture(scope="session")
def public_s3():
    """A second S3 endpoint, in its own process, that serves anyone: a public bucket's view."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    yield url
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def bucket(s3_server) -> str:
    name = f"coughs-{next(_bucket_numbers):03d}"
    s3_server.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def fault_proxy(s3_server):
    host, port = s3_server.endpoint_url.rsplit("//", 1)[1].split(":")
    proxy = FaultProxy(host, int(port))
    yield proxy
    proxy.close()


@pytest.fixture(scope="session")
def coughvid_zip(tmp_path_factory) -> Path:
    """A small generated COUGHVID-format zip (nested in public_dataset/ as the release is)."""
    path = tmp_path_factory.mktemp("generated") / "coughvid_small.zip"
    generate_coughvid_zip(path, 24, seed=7, workers=2)
    return path


@pytest.fixture
def config():
    """The user's Hydrogen Torch config, resolved, with a fixed seed and small shards."""
    return load_resolved_config(HT_YAML, ["environment.seed=1234", "features.shard_rows=8", "features.row_group_rows=4"])


TINY = [
    "environment.seed=1234", "architecture.backbone=test_efficientnet", "architecture.pretrained=false",
    "training.epochs=2", "training.batch_size=4", "dataset.data_sample=1.0", "environment.number_of_workers=0",
    "features.shard_rows=8", "features.row_group_rows=4", "logging.number_of_audios=3",
]


@pytest.fixture
def tiny_config():
    """The user's HT config shrunk the way a test needs: a tiny backbone, two epochs, small batches."""
    return load_resolved_config(HT_YAML, TINY)


def _made_once(tmp_path_factory, name: str, make) -> Path:
    """A folder made once per test session, across pytest-xdist's processes too: the first process to ask makes it
    in the run's shared temporary folder under a file lock; the others wait for it, then read what it left."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each process's own
    folder, finished = root / name, root / f"{name}.finished"
    with FileLock(str(root / f"{name}.lock")):
        if not finished.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            make(folder)
            finished.touch()
    return folder


@pytest.fixture(scope="session")
def tiny_run(coughvid_zip, tmp_path_factory):
    """ingest -> features -> train on the generated fixture, once per session (plain Python, no KFP)."""
    from coughreg.features.extract import extract_features
    from coughreg.ingest.manifest import ingest
    from coughreg.training import train

    config = load_resolved_config(HT_YAML, TINY)

    def make(root: Path) -> None:
        ingest(str(coughvid_zip), root / "ingest", config)
        extract_features(root / "ingest", root / "features", config, workers=2)
        train(root / "features", root / "model", config)

    root = _made_once(tmp_path_factory, "tiny_run", make)
    return {"root": root, "config": config, "ingest": root / "ingest", "features": root / "features", "model": root / "model"}


@pytest.fixture(scope="session")
def evaluated(tiny_run, tmp_path_factory):
    """The evaluation step on the tiny run, once per session."""
    from coughreg import artifacts
    from coughreg.evaluation.evaluate import EvaluationResult, evaluate

    def make(out: Path) -> None:
        evaluate(tiny_run["model"], tiny_run["features"], tiny_run["ingest"], out, tiny_run["config"], workers=2)

    out = _made_once(tmp_path_factory, "evaluation", make)
    metrics_path = out / artifacts.METRICS
    return EvaluationResult(json.loads(metrics_path.read_text()), metrics_path, out / artifacts.REPORT,
                            out / artifacts.PREDICTIONS)


@pytest.fixture(scope="session")
def exported(tiny_run, evaluated, tmp_path_factory):
    """The export step on the tiny run, once per session (tests that change it work on a copy)."""
    from coughreg import artifacts
    from coughreg.export.scorer_folder import ExportResult, export

    def make(out: Path) -> None:
        export(tiny_run["model"], evaluated.metrics_path.parent, out / "scorer", tiny_run["config"])

    scorer = _made_once(tmp_path_factory, "export", make) / "scorer"
    programs = json.loads((scorer / artifacts.SCORER_INFO).read_text())["programs"]
    return ExportResult(scorer, scorer / artifacts.PROVENANCE, programs)


@pytest.fixture(scope="session")
def scorer_folder(exported) -> Path:
    return exported.scorer_dir


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` in its own process group: a SQLite backend store, artifacts it serves itself."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(root / "server.log", "wb") as server_log:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts")],
            cwd=root, env=env, stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as answer:
                if answer.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL) if process.poll() is None else None
            pytest.fail(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield {"url": url, "root": root}
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@pytest.fixture
def mlflow_env(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server["url"])
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return mlflow_server


LANES = ("unit", "integration", "pipeline", "faults")
TRAINS = {"tiny_run", "evaluated", "exported", "scorer_folder"}  # fixtures that train (once per session)


def pytest_collection_modifyitems(config, items):
    """Each test carries its lane's marker; the pipeline lane and tests that need a trained run are also slow."""
    for item in items:
        lane = next((part for part in Path(item.fspath).relative_to(Path(__file__).parent).parts if part in LANES), None)
        if lane:
            item.add_marker(getattr(pytest.mark, lane))
        if lane == "pipeline" or TRAINS & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
