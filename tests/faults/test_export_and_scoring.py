"""Export and scoring faults: damaged and unfinished folders, a full disk, inputs that are never URLs."""

from __future__ import annotations

import http.server
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import PROJECT
from tests.helpers.faults import REAL, cli, last_error, no_traceback, refusal, small_file_system, tampered_ingest

pytestmark = pytest.mark.faults


def test_a_full_disk_during_export_leaves_the_output_folder_untouched(tiny_run, evaluated, tmp_path):
    small = tmp_path / "small"
    with small_file_system(small, "1500k") as mounted:  # room for scorer.ts (~1 MB), not for scorer.pt2 (~2.4 MB)
        if not mounted:
            pytest.skip("mounting a small tmpfs is not allowed here")
        out = small / "scorer"
        out.mkdir()
        (out / "kept.txt").write_text("the user's file")
        done = cli("step", "export", "--model", tiny_run["model"], "--evaluation", evaluated.metrics_path.parent, "--out", out)
        assert done.returncode == 2, done.stderr[-3000:]
        assert last_error(done).startswith(f"error: {out}: no space left on the device (while writing scorer.pt2)")
        no_traceback(done)
        assert sorted(p.name for p in small.rglob("*")) == ["kept.txt", "scorer"]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _drop_key(key: str):
    def damage(path: Path) -> None:
        info = json.loads(path.read_text())
        info.pop(key)
        path.write_text(json.dumps(info))
    return damage


def _unlisted(path: Path) -> None:
    info = json.loads(path.read_text())
    info["files"].pop("scorer.ts")
    path.write_text(json.dumps(info))


DAMAGES = [
    ("scorer.ts", _truncate, "torchscript", "scorer.ts: missing or damaged"),
    ("scorer.pt2", _truncate, "export", "scorer.pt2: missing or damaged"),
    ("scorer.json", _truncate, "torchscript", "scorer.json: not readable JSON"),
    ("scorer.json", _drop_key("label_columns"), "torchscript", "scorer.json: 'label_columns' is missing"),
    ("scorer.json", _unlisted, "torchscript", "scorer.json: records no SHA-256 for scorer.ts"),
    ("coughscore/scorer.py", lambda p: p.write_text(p.read_text() + "\n# changed\n"), "torchscript",
     "coughscore/scorer.py: missing or damaged"),
]


@pytest.mark.parametrize(("name", "damage", "program", "message"), DAMAGES,
                         ids=["truncated-torchscript", "truncated-export", "broken-json", "json-without-labels",
                              "program-without-sha256", "changed-code"])
def test_a_damaged_scorer_folder_is_one_message_naming_the_file(scorer_folder, name, damage, program, message, tmp_path):
    copy = tmp_path / "scorer"
    shutil.copytree(scorer_folder, copy)
    damage(copy / name)
    out = tmp_path / "scores.csv"
    done = cli("score", "--scorer", copy, "--program", program, REAL[0], "--out", out)
    assert done.returncode == 2
    assert last_error(done).startswith(f"error: {copy}/") and message in last_error(done)
    no_traceback(done)
    assert not out.exists()


def test_the_standalone_scorer_refuses_a_damaged_folder_too(scorer_folder, tmp_path):
    copy = tmp_path / "scorer"
    shutil.copytree(scorer_folder, copy)
    _truncate(copy / "scorer.ts")
    done = subprocess.run([sys.executable, copy / "score.py", REAL[0]], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2 and "scorer.ts: missing or damaged" in last_error(done)
    no_traceback(done)


def _without_model_json(model: Path) -> Path:
    (model / "model.json").unlink()
    return model / "model.json"


def _without_weights(model: Path) -> Path:
    weights = model / "fold0_seed0" / "model.safetensors"
    weights.unlink()
    return weights


@pytest.mark.parametrize("unfinish", [_without_model_json, _without_weights], ids=["no-model-json", "member-weights-missing"])
def test_exporting_an_unfinished_model_folder_writes_nothing(tiny_run, evaluated, unfinish, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_run["model"], model)
    missing = unfinish(model)
    out = tmp_path / "scorer"
    done = cli("step", "export", "--model", model, "--evaluation", evaluated.metrics_path.parent, "--out", out)
    assert done.returncode == 2
    assert last_error(done).startswith(f"error: {missing}: missing; {model} is not a finished train output")
    no_traceback(done)
    assert not out.exists()


class _Web(http.server.BaseHTTPRequestHandler):
    """A web server on loopback that serves a REAL recording to whoever asks, and notes every request."""

    def do_GET(self):  # noqa: N802 - the http.server interface
        data = REAL[0].read_bytes()
        self.server.requests.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "audio/mpeg")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def web_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Web)
    server.requests = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("kind", ["http-url", "local-name-ffmpeg-reads-as-a-url", "local-name-with-colons"])
def test_score_reads_local_files_and_never_a_url(kind, scorer_folder, web_server, tmp_path):
    """``http://...`` is refused; a local file whose name FFmpeg would take for a URL (``http:/host:port/x.mp3``)
    or a protocol (``10:30:00.mp3``) is read as the file it is. The web server is never asked."""
    url_like = f"http:/127.0.0.1:{web_server.server_address[1]}/cough.mp3"
    argument = {"http-url": f"http://127.0.0.1:{web_server.server_address[1]}/cough.mp3",
                "local-name-ffmpeg-reads-as-a-url": url_like, "local-name-with-colons": "2020-04-01T10:30:00.mp3"}[kind]
    if kind != "http-url":
        (tmp_path / argument).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REAL[0], tmp_path / argument)
    out = tmp_path / "scores.csv"
    done = subprocess.run([sys.executable, PROJECT / "pipeline.py", "score", "--scorer", scorer_folder, argument, "--out", out],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert web_server.requests == []
    no_traceback(done)
    if kind == "http-url":
        assert done.returncode == 2
        assert last_error(done) == f"error: {argument}: http:// is not read here; score local files, folders or globs"
        assert not out.exists()
    else:
        assert done.returncode == 0, done.stderr[-3000:]
        scored = pd.read_csv(out)
        assert scored["path"].tolist() == [argument] and scored["status"].tolist() == ["ok"]
        assert scored["duration_s"].iloc[0] == pytest.approx(0.648, abs=0.01)  # the REAL recording (0.65 s), read from disk


def test_test_scoring_refuses_a_manifest_row_outside_the_ingest_folder(tiny_run, scorer_folder, tmp_path):
    from coughreg.export.score_test_table import score_test_table

    ingest, victim, path = tampered_ingest(tiny_run, tmp_path, "absolute", test_rows=3)
    summary = score_test_table(scorer_folder, ingest, tmp_path / "scored", workers=1)
    rows = pd.read_parquet(tmp_path / "scored" / "test_predictions.parquet").set_index("id")
    assert rows.loc[victim, "status"] == "failed" and rows.loc[victim, "reason"] == refusal(ingest, victim, path)
    assert (summary["test_rows"], summary["test_scored"], summary["test_failed"]) == (3, 2, 1)
