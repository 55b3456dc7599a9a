"""The shipped model: a scorer folder that stands alone, batch scoring from anywhere, the HTTP service.

One module-scoped run of the whole DAG through kfp.local on a Hydrogen Torch layout (a custom holdout of
the ten REAL recordings and a 0.2 s clip; a test table with a corrupt file) gives the scorer, the
evaluation's predictions and the test predictions every test here checks against.
"""

import base64
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import pipeline
from coughreg.app.local_run import run_local
from coughreg.config.loading import load_resolved_config
from coughreg.io.local_s3 import free_port
from coughreg.scoring.scorer import Scorer
from coughreg.scoring.server import ScoringService, make_server
from coughreg.synth.coughvid import SAMPLE_RATE, encode_audio, synthesize_clip
from tests.conftest import HT_YAML, PROJECT, REAL_COUGHS, TINY

TOLERANCE = 1e-4
REAL = sorted(REAL_COUGHS.glob("*.mp3"))
BLOCKER = """
import sys

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("timm", "kfp", "pydantic", "coughreg", "yaml", "sklearn", "boto3"):
            raise ImportError(f"{name} is not installed here")

sys.meta_path.insert(0, Blocked())
"""


def _ht_layout(root: Path) -> Path:
    """train.csv (generated clips), valid.csv (the REAL recordings and a 0.2 s clip), test.csv (REAL and a corrupt file)."""
    rng = np.random.default_rng(5)
    audio, test_audio = root / "audio", root / "audio_test"
    audio.mkdir(parents=True)
    test_audio.mkdir()
    train = []
    for k in range(16):
        label = float(rng.uniform(0, 1))
        samples, _ = synthesize_clip(label, label, rng)
        (audio / f"gen{k:02d}.ogg").write_bytes(encode_audio(samples[: 3 * SAMPLE_RATE], "ogg", "opus"))
        train.append({"filename": f"gen{k:02d}.ogg", "cough_detected": round(label, 4), "datetime": f"2020-04-{k + 1:02d}"})
    short = (0.2 * np.sin(2 * np.pi * 300 * np.arange(int(0.2 * SAMPLE_RATE)) / SAMPLE_RATE)).astype(np.float32)
    (audio / "short.ogg").write_bytes(encode_audio(short, "ogg", "opus"))
    valid = [{"filename": "short.ogg", "cough_detected": 0.2, "datetime": "2020-05-01"}]
    for k, path in enumerate(REAL):
        shutil.copy(path, audio / path.name)
        valid.append({"filename": path.name, "cough_detected": 0.9609 if "coughvid" in path.name else 0.8, "datetime": f"2020-05-{k + 2:02d}"})
    for path in REAL[:3]:
        shutil.copy(path, test_audio / f"test_{path.name}")
    (test_audio / "corrupt.webm").write_bytes(b"\x1aE\xdf\xa3 not a recording at all")
    pd.DataFrame(train).to_csv(root / "train.csv", index=False)
    pd.DataFrame(valid).to_csv(root / "valid.csv", index=False)
    pd.DataFrame({"filename": [f"test_{p.name}" for p in REAL[:3]] + ["corrupt.webm"]}).to_csv(root / "test.csv", index=False)
    return root


HT_KEYS = [
    "dataset.train_dataframe=data/user/ht/train.csv", "dataset.validation_dataframe=data/user/ht/valid.csv",
    "dataset.test_dataframe=data/user/ht/test.csv", "dataset.data_folder=data/user/ht/audio",
    "dataset.data_folder_test=data/user/ht/audio_test", "dataset.validation_strategy=custom",
    "prediction.inference_chunk_seconds=2",  # the 9.8 s REAL recording is scored in five chunks
    "prediction.max_mae_to_median_baseline=50",  # this tiny model ships whatever it learned
]


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    root = tmp_path_factory.mktemp("shipped")
    data = _ht_layout(root / "ht")
    result = run_local(pipeline, str(data), load_resolved_config(HT_YAML, [*TINY, *HT_KEYS]), root / "run")
    (manifest,) = (root / "run" / "pipeline-root").glob("*/ingest/dataset/manifest.parquet")
    (test_predictions,) = (root / "run" / "pipeline-root").glob("*/score-test-table/test_predictions/test_predictions.parquet")
    evaluation = pd.read_parquet(result.metrics.parent / "predictions.parquet")
    names = pd.read_parquet(manifest).set_index("id")["source_name"]
    evaluation["file"] = [Path(names[i]).name for i in evaluation["id"]]
    return {"root": root, "data": data, "result": result, "scorer": result.scorer, "evaluation": evaluation.set_index("file"),
            "test_predictions": pd.read_parquet(test_predictions), "validation": [data / "audio" / "short.ogg", *(data / "audio" / p.name for p in REAL)]}


def _blocked_env(tmp_path: Path) -> dict:
    (tmp_path / "blocker").mkdir(exist_ok=True)
    (tmp_path / "blocker" / "sitecustomize.py").write_text(BLOCKER)
    return {**os.environ, "PYTHONPATH": str(tmp_path / "blocker")}


def _run(args: list, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _by_file(table: pd.DataFrame) -> pd.Series:
    return table.assign(file=[Path(p).name for p in table["path"]]).set_index("file")["cough_detected"]


# ---------------------------------------------------------------- one policy everywhere


def test_the_standalone_scorer_runs_without_the_training_package_and_agrees_with_evaluation(shipped, tmp_path):
    out = tmp_path / "scores.parquet"
    done = _run([shipped["scorer"] / "score.py", *shipped["validation"], "--out", out], tmp_path, _blocked_env(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "clips/s" in done.stderr and "ETA" in done.stderr  # progress on standard error
    table = pd.read_parquet(out)
    assert list(table.columns) == ["path", "cough_detected", "duration_s", "n_chunks", "truncated", "status", "reason"]
    assert (table["status"] == "ok").all() and len(table) == 11
    evaluation = shipped["evaluation"]
    scored = _by_file(table)
    np.testing.assert_allclose(scored[evaluation.index], evaluation["pred_cough_detected"], atol=TOLERANCE)
    chunks = table.assign(file=[Path(p).name for p in table["path"]]).set_index("file")["n_chunks"]
    assert chunks["short.ogg"] == 1 and chunks[REAL[-1].name] == 5  # 0.2 s padded; 9.8 s in 2 s chunks
    assert (chunks[evaluation.index] == evaluation["n_chunks"]).all()
    assert evaluation.loc["short.ogg", "duration_s"] == pytest.approx(0.2, abs=0.01)


def test_the_standalone_scorer_really_cannot_import_the_training_package(shipped, tmp_path):
    done = _run(["-c", "import coughreg"], tmp_path, _blocked_env(tmp_path))
    assert done.returncode != 0 and "not installed here" in done.stderr
    done = _run(["-c", "import timm"], tmp_path, _blocked_env(tmp_path))
    assert done.returncode != 0


def test_pipeline_score_agrees_and_writes_csv_to_standard_output(shipped, tmp_path):
    done = _run(["pipeline.py", "score", "--scorer", shipped["scorer"], *shipped["validation"]], PROJECT)
    assert done.returncode == 0, done.stderr
    from io import StringIO

    table = pd.read_csv(StringIO(done.stdout))
    assert len(table) == 11 and "scored 11/11 recordings" in done.stderr
    evaluation = shipped["evaluation"]
    np.testing.assert_allclose(_by_file(table)[evaluation.index], evaluation["pred_cough_detected"], atol=TOLERANCE)


def test_the_http_service_agrees(shipped, service):
    evaluation = shipped["evaluation"]
    for path in shipped["validation"]:
        status, body = _post(service, "/score", path.read_bytes())
        assert status == 200, body
        assert body["cough_detected"] == pytest.approx(evaluation.loc[path.name, "pred_cough_detected"], abs=TOLERANCE)
        assert body["n_chunks"] == evaluation.loc[path.name, "n_chunks"] and body["duration_s"] > 0


def test_the_pipeline_scored_the_test_table_with_the_exported_scorer(shipped):
    table = shipped["test_predictions"]
    assert len(table) == 4 and list(table.columns[:3]) == ["id", "source_name", "pred_cough_detected"]
    by_name = table.assign(file=[Path(n).name for n in table["source_name"]]).set_index("file")
    assert by_name.loc["corrupt.webm", "status"] == "failed" and "not ingested" in by_name.loc["corrupt.webm", "reason"]
    ok = by_name[by_name["status"] == "ok"]
    assert sorted(ok.index) == sorted(f"test_{p.name}" for p in REAL[:3])
    rows = Scorer(shipped["scorer"]).score_paths([(f"test_{p.name}", p) for p in REAL[:3]])
    for row in rows:
        assert ok.loc[row["path"], "pred_cough_detected"] == pytest.approx(row["cough_detected"], abs=TOLERANCE)


# ---------------------------------------------------------------- inputs, outputs, exit status


def test_folders_globs_and_what_is_not_audio(shipped, tmp_path):
    folder = tmp_path / "incoming"
    (folder / "day1").mkdir(parents=True)
    (folder / ".cache").mkdir()
    for path in REAL[:2]:
        shutil.copy(path, folder / "day1" / path.name)
    shutil.copy(REAL[2], folder / REAL[2].name)
    shutil.copy(REAL[3], folder / ".cache" / REAL[3].name)  # hidden: skipped
    (folder / ".DS_Store").write_bytes(b"\0\1")  # hidden: skipped
    (folder / "notes.txt").write_text("not audio")  # a row that says so
    out = tmp_path / "scores.csv"
    done = _run(["pipeline.py", "score", "--scorer", shipped["scorer"], folder, f"{REAL_COUGHS}/*S9.mp3", "--out", out], PROJECT)
    assert done.returncode == 1, done.stderr  # one input could not be scored
    table = pd.read_csv(out)
    names = [Path(p).name for p in table["path"]]
    assert names == [REAL[2].name, REAL[0].name, REAL[1].name, "notes.txt", "cough2006_S9.mp3"]  # folder sorted, then the glob
    failed = table[table["status"] == "failed"]
    assert list(failed["path"]) == [str(folder / "notes.txt")] and str(folder / "notes.txt") in failed["reason"].iloc[0]
    assert np.isnan(failed["cough_detected"].iloc[0]) and done.stdout == ""


@pytest.mark.parametrize("arguments, message", [
    (["missing.webm"], "missing.webm: no such file or folder"),
    (["nothing/*.ogg"], "nothing/*.ogg: the pattern matches no file"),
    (["https://example.com/a.webm"], "https:// is not read here"),
    ([str(REAL[0]), "--out", "scores.txt"], "--out scores.txt: name a .csv or a .parquet file"),
])
def test_unusable_arguments_exit_2_before_scoring(shipped, tmp_path, arguments, message):
    done = _run([shipped["scorer"] / "score.py", *arguments], tmp_path, _blocked_env(tmp_path))
    assert done.returncode == 2 and message in done.stderr and done.stdout == ""


def test_a_scorer_folder_that_is_not_one_exits_2(tmp_path):
    done = _run(["pipeline.py", "score", "--scorer", tmp_path, str(REAL[0])], PROJECT)
    assert done.returncode == 2 and "scorer.json: missing" in done.stderr


def test_the_scorer_and_the_recordings_from_s3(shipped, s3_env, bucket, tmp_path):
    client = s3_env.client()
    for path in sorted(shipped["scorer"].rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"runs/1/export/scorer/{path.relative_to(shipped['scorer']).as_posix()}")
    for k, path in enumerate(REAL[:4]):
        client.upload_file(str(path), bucket, f"incoming/{'day1/' if k % 2 else ''}{path.name}")
    client.put_object(Bucket=bucket, Key="incoming/.upload-in-progress", Body=b"x")
    client.put_object(Bucket=bucket, Key="incoming/empty-folder/", Body=b"")
    out = tmp_path / "s3.parquet"
    done = _run(["pipeline.py", "score", "--scorer", f"s3://{bucket}/runs/1/export/scorer", f"s3://{bucket}/incoming/",
                 f"s3://{bucket}/incoming/{REAL[0].name}", "--out", out], PROJECT, dict(os.environ))
    assert done.returncode == 0, done.stderr
    table = pd.read_parquet(out)
    assert sorted(table["path"][:4]) == sorted(
        f"s3://{bucket}/incoming/{'day1/' if k % 2 else ''}{p.name}" for k, p in enumerate(REAL[:4]))
    assert table["path"].iloc[4] == f"s3://{bucket}/incoming/{REAL[0].name}" and len(table) == 5
    local = {row["path"]: row["cough_detected"] for row in Scorer(shipped["scorer"]).score_paths([(p.name, p) for p in REAL[:4]])}
    for path, value in zip(table["path"], table["cough_detected"]):
        assert value == pytest.approx(local[path.rsplit("/", 1)[1]], abs=1e-6)
    missing = _run(["pipeline.py", "score", "--scorer", f"s3://{bucket}/runs/1/export/scorer", f"s3://{bucket}/nothing-here/"],
                   PROJECT, dict(os.environ))
    assert missing.returncode == 2 and f"s3://{bucket}/nothing-here/: no object under this prefix" in missing.stderr


# ---------------------------------------------------------------- the HTTP service


@pytest.fixture(scope="module")
def service(shipped):
    scorer = Scorer(shipped["scorer"])
    state = ScoringService(scorer, workers=2, max_body_bytes=2 * 2**20)  # two worker processes
    server = make_server(state, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    assert _get(server.server_address[1], "/healthz")[0] == 503  # listening, not ready
    state.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    state.close()


def _post(port: int, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("POST", path, body=body, headers=headers or {})
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def _get(port: int, path: str) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("GET", path)
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def test_health_and_the_model_description(service):
    assert _get(service, "/healthz") == (200, {"status": "ok", "model": "cough-regression"})
    assert _get(service, "/v1/models/cough-regression") == (200, {"name": "cough-regression", "ready": True})
    assert _get(service, "/") == (200, {"status": "alive"})
    assert _get(service, "/v1/models/other")[0] == 404


def test_the_kserve_v1_protocol(service, shipped):
    instances = [{"b64": base64.b64encode(path.read_bytes()).decode()} for path in REAL[:3]]
    status, body = _post(service, "/v1/models/cough-regression:predict", json.dumps({"instances": instances}).encode(),
                         {"Content-Type": "application/json"})
    assert status == 200 and len(body["predictions"]) == 3
    evaluation = shipped["evaluation"]
    for path, prediction in zip(REAL[:3], body["predictions"]):
        assert prediction["cough_detected"] == pytest.approx(evaluation.loc[path.name, "pred_cough_detected"], abs=TOLERANCE)
        assert set(prediction) == {"cough_detected", "duration_s", "n_chunks", "truncated", "reason"}


@pytest.mark.parametrize("body, status, message", [
    (b"\x1aE\xdf\xa3 not audio", 422, "cannot decode audio"),
    (b"", 400, "the body is empty"),
])
def test_bad_audio_is_a_4xx_with_a_reason(service, body, status, message):
    answer, payload = _post(service, "/score", body)
    assert answer == status and message in payload["error"]


@pytest.mark.parametrize("body, message", [
    (b"{not json", "not a V1 predict request"),
    (json.dumps({"instances": [{"url": "http://169.254.169.254/latest"}]}).encode(), "URLs are not fetched"),
    (json.dumps({"instances": [{"b64": "%%%"}]}).encode(), "not a V1 predict request"),
    (json.dumps({"instances": []}).encode(), "non-empty list"),
])
def test_malformed_v1_requests_are_400(service, body, message):
    status, payload = _post(service, "/v1/models/cough-regression:predict", body)
    assert status == 400 and message in payload["error"]


def _read_until_closed(raw: socket.socket) -> str:
    """The whole answer: the head and the body may arrive in separate segments."""
    chunks = []
    while chunk := raw.recv(4096):
        chunks.append(chunk)
    return b"".join(chunks).decode()


def test_an_oversize_body_is_refused_from_its_header_before_it_is_sent(service):
    with socket.create_connection(("127.0.0.1", service), timeout=10) as raw:
        raw.sendall(b"POST /score HTTP/1.1\r\nHost: test\r\nContent-Length: 104857600\r\n\r\n")  # 100 MB declared, none sent
        answer = _read_until_closed(raw)
    assert answer.startswith("HTTP/1.1 413") and "more than the limit of 2097152" in answer
    assert _get(service, "/healthz")[0] == 200  # the service goes on


def test_a_body_without_a_length_is_refused(service):
    with socket.create_connection(("127.0.0.1", service), timeout=10) as raw:
        raw.sendall(b"POST /score HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        assert _read_until_closed(raw).startswith("HTTP/1.1 411")


def test_sixteen_concurrent_clients_get_their_own_answers(service):
    files = [REAL[k % len(REAL)] for k in range(48)]
    expected = {path.name: _post(service, "/score", path.read_bytes())[1]["cough_detected"] for path in REAL}
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda path: (path.name, _post(service, "/score", path.read_bytes())), files))
    for name, (status, body) in answers:
        assert status == 200 and body["cough_detected"] == pytest.approx(expected[name], abs=1e-6)


def _wait_ready(port: int, process: subprocess.Popen, seconds: float = 120) -> None:
    """Until /healthz says 200 (503 while the workers load, no answer before the port is open)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the service exited: {process.stderr.read()}")
        try:
            if _get(port, "/healthz")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    pytest.fail("the service did not become ready")


def test_serve_from_s3_as_the_cluster_does(shipped, s3_env, bucket, tmp_path):
    client = s3_env.client()
    for path in sorted(shipped["scorer"].rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"scorer/{path.relative_to(shipped['scorer']).as_posix()}")
    port = free_port()
    process = subprocess.Popen([sys.executable, "pipeline.py", "serve", "--scorer", f"s3://{bucket}/scorer", "--port", str(port),
                                "--max-body-mb", "1"], cwd=PROJECT, env=dict(os.environ), stderr=subprocess.PIPE, text=True)
    try:
        _wait_ready(port, process)
        status, body = _post(port, "/score", REAL[-1].read_bytes())
        expected = shipped["evaluation"].loc[REAL[-1].name, "pred_cough_detected"]
        assert status == 200 and body["cough_detected"] == pytest.approx(expected, abs=TOLERANCE) and body["n_chunks"] == 5
        with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:  # 2 MB declared, none sent: no race
            raw.sendall(f"POST /score HTTP/1.1\r\nHost: test\r\nContent-Length: {2 * 2**20}\r\n\r\n".encode())
            answer = _read_until_closed(raw)
        assert answer.startswith("HTTP/1.1 413"), answer  # refused from the declared size, over --max-body-mb 1
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_standalone_service_runs_without_the_training_package(shipped, tmp_path):
    port = free_port()
    process = subprocess.Popen([sys.executable, str(shipped["scorer"] / "score.py"), "serve", "--port", str(port)], cwd=tmp_path,
                               env=_blocked_env(tmp_path), stderr=subprocess.PIPE, text=True)
    try:
        _wait_ready(port, process)
        status, body = _post(port, "/score", REAL[0].read_bytes())
        assert status == 200 and body["cough_detected"] == pytest.approx(
            shipped["evaluation"].loc[REAL[0].name, "pred_cough_detected"], abs=TOLERANCE)
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_worker_process_that_dies_is_replaced_and_its_recording_tried_again(shipped):
    import multiprocessing
    import signal

    from coughreg.scoring.processes import ProcessPool

    pool = ProcessPool(Scorer, shipped["scorer"], "torchscript", 2)
    try:
        assert pool.score("first", REAL[0])["status"] == "ok"
        workers = [child for child in multiprocessing.active_children() if child.pid in pool.pids]
        assert len(pool.pids) == 2 and len(workers) == 2
        os.kill(workers[0].pid, signal.SIGKILL)  # as a decoder crash would end it
        workers[0].join(timeout=10)
        row = pool.score("after the crash", REAL[1])
        assert row["status"] == "ok" and row["cough_detected"] == pytest.approx(
            shipped["evaluation"].loc[REAL[1].name, "pred_cough_detected"], abs=TOLERANCE)
        assert len(pool.pids) == 2 and workers[0].pid not in pool.pids  # started again
        assert pool.pids <= {child.pid for child in multiprocessing.active_children()}
    finally:
        pool.close()
