"""Bad input and faults, as a hostile user and a flaky cluster bring them: each ends in one message that
names the file, key or URI at fault (or in the one recording being rejected), never in a traceback, a
half-written artifact, an executed file or a secret written down.

Real zips and folders of the REAL recordings, real S3 on loopback, a real full file system (a small
tmpfs), and the real command line in a subprocess wherever the issue speaks of a command.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile
import torch

from coughreg.artifacts import read_manifest
from coughreg.artifacts.shards import read_shard_metadata
from coughreg.audio.files import decode_audio
from coughreg.config.experiment import load_resolved_config, save_config
from coughreg.ingest.manifest import ingest
from coughreg.scoring.filenames import NAME_BYTES, fits, fitting_name
from coughreg.synth.coughvid import encode_audio
from coughreg.training import checkpoints
from tests.conftest import HT_YAML, PROJECT, REAL_COUGHS, TINY

pytestmark = pytest.mark.faults

REAL = sorted(REAL_COUGHS.glob("*.mp3"))
LONG_ASCII = "a" * (250 - len(".mp3")) + ".mp3"  # 250 bytes: a legal name whose temporary name was not
LONG_ACCENTS = "é" * 130 + ".mp3"  # 264 bytes: more than any file system's name; a zip or S3 holds it
ACCENTS_ON_DISK = "é" * 120 + ".mp3"  # 244 bytes: the longest run of them a folder on disk can hold
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"  # the shape of an AWS secret key: it holds slashes
KEY_ID = "AKIAIOSFODNN7EXAMPLE"
HT_KEYS = ["dataset.data_folder=data/user/ht/audio/", "dataset.train_dataframe=data/user/ht/audio.csv"]


def _cli(*args, cwd=PROJECT, env=None, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "pipeline.py", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})}, preexec_fn=preexec_fn, check=False)


def _last_error(done: subprocess.CompletedProcess) -> str:
    return done.stderr.strip().splitlines()[-1]


def _no_traceback(done: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in done.stderr, done.stderr[-3000:]


def _table(names: list[str]) -> str:
    rows = {"filename": names, "cough_detected": [round(0.1 + 0.05 * k, 2) for k in range(len(names))],
            "datetime": [f"2020-04-{k + 1:02d}" for k in range(len(names))]}
    return pd.DataFrame(rows).to_csv(index=False)


def _partials(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith((".partial", ".link"))]


# ---------------------------------------------------------------- long file names


def _check_every_recording_kept(out: Path, expected: dict[str, bytes]) -> None:
    """Every recording ``ok``, the manifest written, each stored whole under a name that fits, the original name kept."""
    manifest, _ = read_manifest(out)
    ok = manifest[manifest["status"] == "ok"].set_index("id")
    assert sorted(ok.index) == sorted(expected), manifest[["id", "status", "reason"]]
    for name, data in expected.items():
        assert ok.loc[name, "source_name"] == f"audio/{name}"
        stored = out / ok.loc[name, "audio_path"]
        assert stored.read_bytes() == data and all(fits(part) for part in stored.relative_to(out).parts)
    assert ok.loc[LONG_ACCENTS if LONG_ACCENTS in expected else LONG_ASCII, "audio_path"].startswith("audio/audio/")
    assert not _partials(out)


def test_long_file_names_in_a_zip_keep_every_recording(tmp_path):
    """A 250-byte name (legal on disk, too long for its old temporary name) and 130 two-byte letters (too long
    for any file system): both ingested beside the good recordings, through the command line."""
    names = [p.name for p in REAL[:4]] + [LONG_ASCII, LONG_ACCENTS]
    recordings = {name: path.read_bytes() for name, path in zip(names, REAL, strict=False)}
    archive = tmp_path / "long names.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for name, data in recordings.items():
            handle.writestr(f"audio/{name}", data)
        handle.writestr("audio.csv", _table(names))
    done = _cli("step", "ingest", "--input", archive, "--out", tmp_path / "ingest", "--config", HT_YAML,
                *(f"--set={key}" for key in ["environment.seed=1", *HT_KEYS]))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "6 ok, 0 rejected" in done.stdout
    _check_every_recording_kept(tmp_path / "ingest", recordings)
    stored = read_manifest(tmp_path / "ingest")[0].set_index("id").loc[LONG_ACCENTS, "audio_path"]
    assert Path(stored).name == fitting_name(LONG_ACCENTS) and Path(stored).suffix == ".mp3"  # shortened, tagged, same type


def test_long_file_names_in_a_folder_keep_every_recording(config, tmp_path):
    root = tmp_path / "ht"
    (root / "audio").mkdir(parents=True)
    names = [p.name for p in REAL[:4]] + [LONG_ASCII, ACCENTS_ON_DISK]
    recordings = {}
    for name, path in zip(names, REAL, strict=False):
        shutil.copy(path, root / "audio" / name)
        recordings[name] = path.read_bytes()
    (root / "audio.csv").write_text(_table(names))
    config.dataset.data_folder, config.dataset.train_dataframe = "data/user/ht/audio/", "data/user/ht/audio.csv"
    ingest(str(root), tmp_path / "ingest", config)
    _check_every_recording_kept(tmp_path / "ingest", recordings)


def test_long_object_names_under_an_s3_prefix_keep_every_recording(s3_env, bucket, config, tmp_path):
    names = [p.name for p in REAL[:4]] + [LONG_ASCII, LONG_ACCENTS]
    recordings = {name: path.read_bytes() for name, path in zip(names, REAL, strict=False)}
    client = s3_env.client()
    for name, data in recordings.items():
        client.put_object(Bucket=bucket, Key=f"set/audio/{name}", Body=data)
    client.put_object(Bucket=bucket, Key="set/audio.csv", Body=_table(names).encode())
    config.dataset.data_folder, config.dataset.train_dataframe = "data/user/ht/audio/", "data/user/ht/audio.csv"
    ingest(f"s3://{bucket}/set/", tmp_path / "ingest", config, cache_dir=tmp_path / "cache")
    _check_every_recording_kept(tmp_path / "ingest", recordings)
    assert not _partials(tmp_path / "cache")


def test_a_recording_that_cannot_be_stored_is_rejected_alone(config, tmp_path):
    """``a.mp3`` and ``a.mp3/b.mp3`` in one zip: one of them cannot be stored beside the other. It alone is
    rejected, with a reason naming where it would have gone; the manifest is written."""
    names = [p.name for p in REAL[:4]] + ["a.mp3", "a.mp3/b.mp3"]
    archive = tmp_path / "clash.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for name, path in zip(names, REAL, strict=False):
            handle.write(path, f"audio/{name}")
        handle.writestr("audio.csv", _table(names))
    config.dataset.data_folder, config.dataset.train_dataframe = "data/user/ht/audio/", "data/user/ht/audio.csv"
    config.ingest.max_invalid_fraction = 0.5
    ingest(str(archive), tmp_path / "ingest", config)
    manifest, _ = read_manifest(tmp_path / "ingest")
    rejected = manifest[manifest["status"] == "rejected"]
    assert len(rejected) == 1 and rejected["id"].iloc[0] in ("a.mp3", "a.mp3/b.mp3")
    assert rejected["reason"].iloc[0].startswith(f"cannot be stored as audio/audio/{rejected['id'].iloc[0]}: ")
    assert set(manifest.loc[manifest["status"] == "ok", "id"]) == set(names) - {rejected["id"].iloc[0]}
    assert not _partials(tmp_path / "ingest")


# ---------------------------------------------------------------- a planted checkpoint


class _Planted:
    """What a hostile neighbour leaves where training resumes from: unpickling it opens (creates) a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"fingerprint": "x", "epoch": 1, "model": _Planted(marker)}, path)
    torch.load(path, weights_only=False)  # proof that the file is armed: a loader that trusts it runs it
    assert marker.exists()
    marker.unlink()


def _train_command(features: Path, out: Path, config_path: Path, cache: Path) -> list:
    return ["step", "train", "--input", features, "--out", out, "--config", config_path, "--cache-dir", cache]


def test_a_planted_checkpoint_in_the_member_folder_never_runs(tiny_run, tmp_path):
    """Training refuses the file, naming it, starts the member afresh, and finishes."""
    config = load_resolved_config(HT_YAML, [*TINY, "training.epochs=1"])
    save_config(config, tmp_path)
    planted, marker = tmp_path / "model" / "fold0_seed0" / checkpoints.CHECKPOINT, tmp_path / "code-ran"
    _plant(planted, marker)
    done = _cli(*_train_command(tiny_run["features"], tmp_path / "model", tmp_path / "config.yaml", tmp_path / "cache"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert not marker.exists()
    assert f"{planted}: not a file of tensors and plain values" in done.stderr
    assert "this member starts afresh" in done.stderr and "resuming" not in done.stderr
    assert (tmp_path / "model" / "model.json").exists() and not planted.exists()


def test_a_planted_checkpoint_under_the_checkpoint_uri_never_runs(s3_env, bucket, tiny_run, tmp_path):
    """The shared ``cluster.checkpoint_uri`` prefix: a file planted where a retried pod fetches its checkpoint is
    refused (naming the object), training starts afresh, and the object is replaced by a real checkpoint."""
    config = load_resolved_config(HT_YAML, [*TINY, "training.epochs=1", f"cluster.checkpoint_uri=s3://{bucket}/shared"])
    save_config(config, tmp_path)
    command = _train_command(tiny_run["features"], tmp_path / "first", tmp_path / "config.yaml", tmp_path / "cache")
    assert _cli(*command).returncode == 0
    client = s3_env.client()
    (key,) = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="shared/")["Contents"]]  # where pods resume
    marker = tmp_path / "code-ran"
    _plant(tmp_path / "planted.pt", marker)
    client.upload_file(str(tmp_path / "planted.pt"), bucket, key)

    done = _cli(*_train_command(tiny_run["features"], tmp_path / "second", tmp_path / "config.yaml", tmp_path / "cache"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert not marker.exists()
    assert f"(fetched from s3://{bucket}/{key}); this member starts afresh" in done.stderr
    assert "not a file of tensors and plain values" in done.stderr and "resuming" not in done.stderr
    client.download_file(bucket, key, str(tmp_path / "now.pt"))
    assert checkpoints.load(tmp_path / "now.pt", torch.device("cpu"))["epoch"] == 1  # the planted file is gone


# ---------------------------------------------------------------- credentials in a URI


PLANTED_URIS = [
    ("--data", f"s3://{KEY_ID}:{SECRET}@bucket/x.zip", "argument --data"),
    ("--set", f"cluster.checkpoint_uri=s3://{KEY_ID}:{SECRET}@b/c", "'cluster.checkpoint_uri'"),
    ("--set", f"architecture.pretrained_weights=https://user:{SECRET}@host/w.safetensors", "'architecture.pretrained_weights'"),
    ("--set", f"cluster.weights_uri=s3://{KEY_ID}@b/weights", "'cluster.weights_uri'"),
    ("--set", f"dataset.train_dataframe=https://user:{SECRET}@host/train.csv", "'dataset.train_dataframe'"),
]


def _assert_no_secret(done: subprocess.CompletedProcess, folder: Path) -> None:
    for text in (done.stdout, done.stderr):
        assert SECRET not in text and KEY_ID not in text
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert SECRET.encode() not in data and KEY_ID.encode() not in data, path


@pytest.mark.parametrize(("flag", "value", "named"), PLANTED_URIS, ids=[p[2].strip("'") for p in PLANTED_URIS])
def test_credentials_in_a_uri_never_reach_the_compiled_pipeline(flag, value, named, tmp_path):
    out = tmp_path / "compiled"
    out.mkdir()
    done = _cli("compile", "-o", out / "pipeline.yaml", flag, value)
    assert done.returncode == 2, done.stderr[-3000:]
    assert named in done.stderr and "credentials in a URI are not accepted" in done.stderr and "***@" in done.stderr
    assert not (out / "pipeline.yaml").exists()
    _assert_no_secret(done, tmp_path)
    _no_traceback(done)


def test_credentials_in_a_config_file_are_refused_naming_the_file_and_key(tmp_path):
    config = tmp_path / "experiment.yaml"
    config.write_text(f"cluster:\n  checkpoint_uri: s3://{KEY_ID}:{SECRET}@bucket/checkpoints\n")
    done = _cli("compile", "-o", tmp_path / "pipeline.yaml", "--config", config)
    assert done.returncode == 2
    assert f"{config}: invalid experiment config" in done.stderr and "'cluster.checkpoint_uri'" in done.stderr
    assert not (tmp_path / "pipeline.yaml").exists()
    config.unlink()
    _assert_no_secret(done, tmp_path)


@pytest.mark.parametrize("args", [
    ["step", "ingest", "--input", f"s3://{KEY_ID}:{SECRET}@bucket/x.zip", "--out", "{out}"],
    ["step", "train", "--input", "{out}", "--out", f"s3://{KEY_ID}:{SECRET}@bucket/model/"],
    ["preflight", "--data", f"s3://{KEY_ID}:{SECRET}@bucket/x.zip"],
    ["run-local", "--data", f"s3://{KEY_ID}:{SECRET}@bucket/x.zip", "--out", "{out}"],
    ["submit", "--data", "s3://bucket/x.zip", "--pipeline-root", f"s3://{KEY_ID}:{SECRET}@bucket/root", "--out", "{out}"],
    ["score", "--scorer", f"s3://{KEY_ID}:{SECRET}@bucket/scorer/", "x.mp3"],
    ["score", "--scorer", "{out}", f"s3://{KEY_ID}:{SECRET}@bucket/incoming/"],
    ["serve", "--scorer", "{out}", "--endpoint-url", f"http://{KEY_ID}:{SECRET}@127.0.0.1:9000"],
], ids=["ingest-input", "train-out", "preflight-data", "run-local-data", "submit-pipeline-root", "score-scorer",
        "score-input", "endpoint-url"])
def test_every_command_refuses_credentials_in_a_uri(args, tmp_path):
    out = tmp_path / "out"
    done = _cli(*(a.replace("{out}", str(out)) for a in args))
    assert done.returncode == 2
    assert "credentials in a URI are not accepted" in done.stderr and "***@" in done.stderr
    assert not out.exists()
    _assert_no_secret(done, tmp_path)
    _no_traceback(done)


# ---------------------------------------------------------------- a full disk


@contextlib.contextmanager
def _small_file_system(folder: Path, size: str):
    """A real tmpfs of ``size``; None when this machine does not allow mounting one (then the caller limits
    the file size of its subprocess instead: the writer sees EFBIG, the same class of fault)."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = shutil.which("mount") is not None and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, check=False).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], check=False)


def _file_size_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_while_writing_shards_is_one_message_naming_the_folder(tiny_run, tmp_path):
    small = tmp_path / "small"
    with _small_file_system(small, "200k") as mounted:
        out = small / "features"
        done = _cli("step", "features", "--input", tiny_run["ingest"], "--out", out, "--set", "features.shard_rows=8",
                    preexec_fn=None if mounted else _file_size_limit(100_000))
        assert done.returncode == 2, done.stderr[-3000:]
        error = _last_error(done)
        assert error.startswith(f"error: {out / 'shards'}/") and "while writing part-" in error
        assert ("no space left on the device (while writing part-" if mounted else "file size limit") in error
        assert ("free space there" if mounted else "raise the limit") in error
        _no_traceback(done)
        assert not (out / "shards.json").exists() and not _partials(small)
        for shard in out.rglob("*.parquet"):  # what is there is whole
            assert read_shard_metadata(shard)["schema_version"] == 1


def test_a_full_disk_during_export_leaves_the_output_folder_untouched(tiny_run, evaluated, tmp_path):
    small = tmp_path / "small"
    with _small_file_system(small, "1500k") as mounted:  # room for scorer.ts (~1 MB), not for scorer.pt2 (~2.4 MB)
        if not mounted:
            pytest.skip("mounting a small tmpfs is not allowed here")
        out = small / "scorer"
        out.mkdir()
        (out / "kept.txt").write_text("the user's file")
        done = _cli("step", "export", "--model", tiny_run["model"], "--evaluation", evaluated.metrics_path.parent, "--out", out)
        assert done.returncode == 2, done.stderr[-3000:]
        assert _last_error(done).startswith(f"error: {out}: no space left on the device (while writing scorer.pt2)")
        _no_traceback(done)
        assert sorted(p.name for p in small.rglob("*")) == ["kept.txt", "scorer"]


# ---------------------------------------------------------------- damaged and unfinished folders


@pytest.fixture(scope="module")
def scorer_folder(tiny_run, evaluated, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scorer") / "scorer"
    assert _cli("step", "export", "--model", tiny_run["model"], "--evaluation", evaluated.metrics_path.parent,
                "--out", out).returncode == 0
    return out


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
    done = _cli("score", "--scorer", copy, "--program", program, REAL[0], "--out", out)
    assert done.returncode == 2
    assert _last_error(done).startswith(f"error: {copy}/") and message in _last_error(done)
    _no_traceback(done)
    assert not out.exists()


def test_the_standalone_scorer_refuses_a_damaged_folder_too(scorer_folder, tmp_path):
    copy = tmp_path / "scorer"
    shutil.copytree(scorer_folder, copy)
    _truncate(copy / "scorer.ts")
    done = subprocess.run([sys.executable, copy / "score.py", REAL[0]], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2 and "scorer.ts: missing or damaged" in _last_error(done)
    _no_traceback(done)


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
    done = _cli("step", "export", "--model", model, "--evaluation", evaluated.metrics_path.parent, "--out", out)
    assert done.returncode == 2
    assert _last_error(done).startswith(f"error: {missing}: missing; {model} is not a finished train output")
    _no_traceback(done)
    assert not out.exists()


# ---------------------------------------------------------------- --out that cannot be what it must be


@pytest.mark.parametrize(("args", "message"), [
    (["step", "features", "--input", "{ingest}", "--out", "{file}"], "--out {file}: is a file; name a folder"),
    (["step", "ingest", "--input", "{zip}", "--out", "{file}/sub"], "--out {file}/sub: {file} is a file, not a folder"),
    (["step", "export", "--model", "{model}", "--evaluation", "{evaluation}", "--out", "{file}"], "--out {file}: is a file"),
    (["run-local", "--data", "{zip}", "--out", "{file}"], "--out {file}: is a file; name a folder"),
    (["generate", "--out", "{folder}"], "--out {folder}: is a folder; name a file in it"),
    (["score", "--scorer", "{scorer}", "{recording}", "--out", "{folder}"], "--out {folder}: is a folder; name a file in it"),
    (["score", "--scorer", "{scorer}", "{recording}", "--out", "{file}/scores.csv"], "--out {file}/scores.csv: {file} is a file"),
], ids=["features-out-file", "ingest-out-under-a-file", "export-out-file", "run-local-out-file", "generate-out-folder",
        "score-out-folder", "score-out-under-a-file"])
def test_an_out_that_cannot_be_written_is_refused_before_any_work(args, message, tiny_run, evaluated, scorer_folder,
                                                                   coughvid_zip, tmp_path):
    places = {"{file}": str(tmp_path / "a-file"), "{folder}": str(tmp_path / "a-folder"), "{ingest}": str(tiny_run["ingest"]),
              "{model}": str(tiny_run["model"]), "{evaluation}": str(evaluated.metrics_path.parent), "{zip}": str(coughvid_zip),
              "{scorer}": str(scorer_folder), "{recording}": str(REAL[0])}
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "a-folder").mkdir()

    def place(text: str) -> str:
        for name, value in places.items():
            text = text.replace(name, value)
        return text

    done = _cli(*map(place, args))
    assert done.returncode == 2
    assert _last_error(done).startswith(f"error: {place(message)}"), done.stderr[-2000:]
    _no_traceback(done)
    assert (tmp_path / "a-file").read_text() == "not a folder" and not list((tmp_path / "a-folder").iterdir())


def test_a_temporary_name_fits_whatever_the_final_name(tmp_path):
    from coughreg.io.storage import atomic_write_text
    from coughreg.scoring.filenames import temporary_file, temporary_folder, temporary_name

    for name in (LONG_ASCII, "é" * 127, "x" * NAME_BYTES):
        target = tmp_path / name
        for made in (temporary_file(target), temporary_folder(target), temporary_name(target, ".link")):
            assert fits(made.name) and made.parent == tmp_path and made.name.startswith(".")
            if made.is_dir():
                made.rmdir()
            elif made.exists():
                made.unlink()
        atomic_write_text(target, "whole")
        assert target.read_text() == "whole"
    assert not _partials(tmp_path)
    assert fitting_name(LONG_ACCENTS) != fitting_name("é" * 131 + ".mp3") and fits(fitting_name(LONG_ACCENTS))


# ---------------------------------------------------------------- silently odd outcomes


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
    _no_traceback(done)
    if kind == "http-url":
        assert done.returncode == 2
        assert _last_error(done) == f"error: {argument}: http:// is not read here; score local files, folders or globs"
        assert not out.exists()
    else:
        assert done.returncode == 0, done.stderr[-3000:]
        scored = pd.read_csv(out)
        assert scored["path"].tolist() == [argument] and scored["status"].tolist() == ["ok"]
        assert scored["duration_s"].iloc[0] == pytest.approx(0.648, abs=0.01)  # the REAL recording (0.65 s), read from disk


def _tampered_ingest(tiny_run, tmp_path: Path, how: str, test_rows: int = 0, among: set | None = None) -> tuple[Path, str, str]:
    """A copy of the tiny run's ingest folder whose manifest sends one accepted row (of ``among``, when given) to a
    REAL recording outside the folder (reading it would succeed); ``test_rows`` rows (that one first) become test
    rows. Returns the folder, the row's id and the path written."""
    ingest = tmp_path / "ingest"
    shutil.copytree(tiny_run["ingest"], ingest)
    table = pq.read_table(ingest / "manifest.parquet")
    frame = table.to_pandas()
    ok = list(frame.index[(frame["status"] == "ok") & (frame["id"].isin(among) if among else True)])
    victim = frame.loc[ok[0], "id"]
    outside = tmp_path / "outside.webm"
    shutil.copy(ingest / frame.loc[ok[0], "audio_path"], outside)
    path = {"climbs-out": "audio/../../outside.webm", "absolute": str(outside)}[how]
    frame.loc[ok[0], "audio_path"] = path
    frame.loc[ok[:test_rows], "split"] = "test"
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(table.schema.metadata),
                   ingest / "manifest.parquet")
    return ingest, victim, path


def _refusal(ingest: Path, victim: str, path: str) -> str:
    return (f"{ingest / 'manifest.parquet'}: the row of {victim!r} names audio_path {path!r}, which is outside "
            f"{ingest / 'audio'}; that row is refused (the manifest was changed after ingest: run the ingest step again)")


@pytest.mark.parametrize("how", ["climbs-out", "absolute"])
def test_features_refuse_a_manifest_row_outside_the_ingest_folder(how, tiny_run, tmp_path):
    from coughreg.features.extract import extract_features

    ingest, victim, path = _tampered_ingest(tiny_run, tmp_path, how)
    result = extract_features(ingest, tmp_path / "features", tiny_run["config"], workers=1)
    assert result.failures == [{"id": victim, "audio_path": path, "reason": _refusal(ingest, victim, path)}]
    ok = read_manifest(ingest)[0].query("status == 'ok'")
    assert result.rows == len(ok) - 1  # every other recording featurized


def test_an_ingest_folder_from_its_s3_uri_is_not_outside_itself(s3_env, bucket, tiny_run, tmp_path):
    """The features step mirrors an ``s3://`` ingest artifact as a folder of links into the download cache: its
    recordings are the folder's own, every one featurized."""
    from coughreg.io.storage import upload_folder

    upload_folder(tiny_run["ingest"], f"s3://{bucket}/run-1/ingest/dataset/")
    done = _cli("step", "features", "--input", f"s3://{bucket}/run-1/ingest/dataset/", "--out", tmp_path / "features",
                env={**s3_env.credentials.env(s3_env.endpoint_url), "COUGHREG_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr[-3000:]
    ok = int((read_manifest(tiny_run["ingest"])[0]["status"] == "ok").sum())
    assert f"({ok} recordings in" in done.stdout and ", 0 failed)" in done.stdout


def test_evaluate_refuses_a_manifest_row_outside_the_ingest_folder(tiny_run, tmp_path):
    from coughreg.evaluation.evaluate import evaluate

    validated = set(pd.read_parquet(tiny_run["model"] / "predictions.parquet")["id"])
    ingest, victim, path = _tampered_ingest(tiny_run, tmp_path, "climbs-out", among=validated)
    result = evaluate(tiny_run["model"], tiny_run["features"], ingest, tmp_path / "evaluation", tiny_run["config"], workers=1)
    rows = pd.read_parquet(result.predictions_path).set_index("id")
    assert rows.loc[victim, "status"] == "failed" and rows.loc[victim, "reason"] == _refusal(ingest, victim, path)
    assert (rows.drop(index=victim)["status"] == "ok").all()
    assert result.metrics["validation_unscored"] == 1


def test_test_scoring_refuses_a_manifest_row_outside_the_ingest_folder(tiny_run, scorer_folder, tmp_path):
    from coughreg.export.score_test_table import score_test_table

    ingest, victim, path = _tampered_ingest(tiny_run, tmp_path, "absolute", test_rows=3)
    summary = score_test_table(scorer_folder, ingest, tmp_path / "scored", workers=1)
    rows = pd.read_parquet(tmp_path / "scored" / "test_predictions.parquet").set_index("id")
    assert rows.loc[victim, "status"] == "failed" and rows.loc[victim, "reason"] == _refusal(ingest, victim, path)
    assert (summary["test_rows"], summary["test_scored"], summary["test_failed"]) == (3, 2, 1)


@pytest.mark.parametrize(("text", "override", "message"), [
    ("", None, "{config}: the config file holds no keys (empty, or comments only); write the experiment's sections into it"),
    ("# training:\n#   epochs: 3\n\n", None, "{config}: the config file holds no keys (empty, or comments only)"),
    ("training:\n  epochs: 0\n", None,
     "{config}: invalid experiment config:\n  key 'training.epochs': Input should be greater than or equal to 1 (got 0)"),
    ("training:\n  epochs: 3\n", "training.epochs=0", "key 'training.epochs': Input should be greater than or equal to 1"),
], ids=["empty-file", "comments-only", "epochs-0-in-the-file", "epochs-0-by-set"])
def test_a_config_that_would_train_nothing_is_refused_when_read(text, override, message, tiny_run, tmp_path):
    config = tmp_path / "experiment.yaml"
    config.write_text(text)
    out = tmp_path / "model"
    done = _cli("step", "train", "--input", tiny_run["features"], "--out", out, "--config", config,
                *(["--set", override] if override else []))
    assert done.returncode == 2, done.stderr[-3000:]
    assert message.format(config=config) in done.stderr and str(config) in done.stderr
    _no_traceback(done)
    assert not out.exists()


def _good_recordings(root: Path, count: int = 4) -> list[dict]:
    """``count`` good recordings in a COUGHVID-layout folder, and their metadata rows."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(count):
        shutil.copy(REAL[k], root / f"good-{k}.mp3")
        rows.append({"uuid": f"good-{k}", "datetime": f"2020-04-0{k + 1}", "cough_detected": f"0.{k + 2}"})
    return rows


def test_one_uuid_with_two_different_labels_rejects_both_rows(config, tmp_path):
    """Different labels: neither row is trusted (both named, with both labels). The same label twice: the first row
    stands and the second is the duplicate."""
    root = tmp_path / "release"
    rows = _good_recordings(root)
    for uid in ("twice-differing", "twice-same"):
        shutil.copy(REAL[5], root / f"{uid}.mp3")
    rows[1:1] = [{"uuid": "twice-differing", "datetime": "2020-04-10", "cough_detected": "0.9"},
                 {"uuid": "twice-same", "datetime": "2020-04-11", "cough_detected": "0.4"}]
    rows += [{"uuid": "twice-differing", "datetime": "2020-04-12", "cough_detected": "0.1"},
             {"uuid": "twice-same", "datetime": "2020-04-13", "cough_detected": "0.4"}]
    pd.DataFrame(rows).to_csv(root / "metadata_compiled.csv", index=False)
    config.ingest.max_invalid_fraction = 0.9
    ingest(str(root), tmp_path / "ingest", config)
    manifest = read_manifest(tmp_path / "ingest")[0]
    differing = manifest[manifest["id"] == "twice-differing"]
    expected = (f"uuid 'twice-differing' is on two rows with different labels: cough_detected 0.9 (line 3) and 0.1 (line 8) "
                f"of {root / 'metadata_compiled.csv'}; both rows are rejected")
    assert differing["status"].tolist() == ["rejected", "rejected"] and set(differing["reason"]) == {expected}
    same = manifest[manifest["id"] == "twice-same"].sort_values("status")
    assert same["status"].tolist() == ["ok", "rejected"] and same["reason"].iloc[1] == "duplicate id: also on line 4 of the metadata"
    assert sorted(manifest.loc[manifest["status"] == "ok", "id"]) == ["good-0", "good-1", "good-2", "good-3", "twice-same"]


def _truncated_zip(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _directory_overwritten(path: Path) -> None:
    data = bytearray(path.read_bytes())
    start = data.rfind(b"PK\x01\x02")  # the last entry of the central directory
    data[start : start + 46] = b"\x00" * 46
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncated_zip, _directory_overwritten], ids=["cut-in-half", "directory-overwritten"])
def test_a_damaged_zip_is_named_damaged(damage, coughvid_zip, tmp_path):
    archive = tmp_path / "coughvid.zip"
    shutil.copy(coughvid_zip, archive)
    damage(archive)
    done = _cli("step", "ingest", "--input", archive, "--out", tmp_path / "ingest")
    assert done.returncode == 2, done.stderr[-3000:]
    assert _last_error(done).startswith(f"error: {archive}: a damaged zip archive (")
    assert _last_error(done).endswith("copy or download the archive again")
    _no_traceback(done)
    assert not (tmp_path / "ingest" / "manifest.parquet").exists()


def test_a_zip_holding_only_a_zip_names_the_inner_archive(coughvid_zip, tmp_path):
    archive = tmp_path / "outer.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.write(coughvid_zip, "download/coughvid_small.zip")
    done = _cli("step", "ingest", "--input", archive, "--out", tmp_path / "ingest")
    assert done.returncode == 2, done.stderr[-3000:]
    assert _last_error(done) == (f"error: {archive}: no known layout, and it holds the archive download/coughvid_small.zip: "
                                 "archives inside a data set are not unpacked; unpack it and ingest its contents "
                                 "(a folder, or a zip of them)")
    _no_traceback(done)


# ---------------------------------------------------------------- recordings from phones, browsers and uploads


def _tone(seconds: float, rate: int = 48000, channels: int = 1) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    mono = (0.3 * np.sin(2 * np.pi * 600 * t)).astype(np.float32)
    return mono if channels == 1 else np.stack([mono * (k + 1) / channels for k in range(channels)], axis=1)


def _wav(samples: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def _aac(container: str, rate: int, seconds: float = 2.0) -> bytes:
    """AAC as phones record it: in MP4/M4A (iPhone, Safari's MediaRecorder) or 3GP (Android)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as out:
        stream = out.add_stream("aac", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(_tone(seconds, rate).reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate, frame.pts = rate, 0
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return buffer.getvalue()


def _wav_with_a_bogus_size(seconds: float = 2.0, claimed: float = 60.0) -> bytes:
    """A recorder that wrote the header before the data: its sizes claim 60 s, 2 s follow."""
    data = bytearray(_wav(_tone(seconds), 48000))
    size = int(claimed * 48000 * 2)
    at = data.find(b"data")
    data[at + 4 : at + 8] = struct.pack("<I", size)
    data[4:8] = struct.pack("<I", size + 36)
    return bytes(data)


def _cut_upload() -> bytes:
    """A 6 s WebM/Opus upload cut off after 55% of its bytes: its header still says 6 s."""
    data = encode_audio(_tone(6.0), "webm", "opus")
    return data[: int(len(data) * 0.55)]


HTML_ERROR = b"<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>\n"

# name -> (file suffix, bytes, rejected with this reason (None: accepted), container, codec, rate, channels, seconds decoded)
RECORDINGS = {
    "html-error-page-as-webm": ("webm", lambda: HTML_ERROR, "undecodable: not readable audio: ", None, None, None, None, None),
    "eight-channels": ("wav", lambda: _wav(_tone(2.0, channels=8), 48000), None, "wav", "pcm_s16le", 48000, 8, 2.0),
    "8-khz-phone-call": ("wav", lambda: _wav(_tone(2.0, 8000), 8000), None, "wav", "pcm_s16le", 8000, 1, 2.0),
    "wav-with-a-bogus-size": ("wav", _wav_with_a_bogus_size, None, "wav", "pcm_s16le", 48000, 1, 2.0),
    "upload-cut-off": ("webm", _cut_upload, None, "matroska", "opus", 48000, 1, 3.4335),
    "iphone-m4a": ("m4a", lambda: _aac("ipod", 44100), None, "mov", "aac", 44100, 1, 2.0201),
    "android-3gp": ("3gp", lambda: _aac("3gp", 16000), None, "mov", "aac", 16000, 1, 2.048),
    "digital-silence": ("wav", lambda: _wav(np.zeros(96000, np.float32), 48000), None, "wav", "pcm_s16le", 48000, 1, 2.0),
}


@pytest.mark.parametrize("name", list(RECORDINGS))
def test_recordings_from_phones_and_browsers(name, config, tmp_path):
    """Each kind beside four REAL recordings, through ingest and features: rejected with its reason, or accepted with
    the container, codec, rate and channels it has and the duration that decodes (not what a header claims), and a
    finite spectrogram of that length; the REAL recordings all featurized."""
    from coughreg.artifacts.shards import SpectrogramShardReader
    from coughreg.features.extract import extract_features

    suffix, make, reason, container, codec, rate, channels, seconds = RECORDINGS[name]
    root = tmp_path / "release"
    rows = _good_recordings(root)
    (root / f"{name}.{suffix}").write_bytes(make())
    rows.append({"uuid": name, "datetime": "2020-04-20", "cough_detected": "0.5"})
    pd.DataFrame(rows).to_csv(root / "metadata_compiled.csv", index=False)
    ingest(str(root), tmp_path / "ingest", config)
    manifest = read_manifest(tmp_path / "ingest")[0].set_index("id")
    assert (manifest.drop(index=name)["status"] == "ok").all()
    row = manifest.loc[name]
    if reason is not None:
        assert row["status"] == "rejected" and row["reason"].startswith(reason), row["reason"]
        return
    assert row["status"] == "ok", row["reason"]
    assert (row["container"], row["codec"], row["sample_rate"], row["channels"]) == (container, codec, rate, channels)
    assert row["duration_s"] == pytest.approx(seconds, abs=0.002)
    result = extract_features(tmp_path / "ingest", tmp_path / "features", config, workers=1)
    assert result.failures == [] and result.rows == 5
    reader = SpectrogramShardReader(result.shards)
    spectrogram = reader.spectrogram(list(reader.index["id"]).index(name)).astype(np.float32)
    stored = tmp_path / "ingest" / row["audio_path"]
    assert np.isfinite(spectrogram).all() and spectrogram.shape[1] == decode_audio(stored, 48000).size // 512 + 1
    if name == "digital-silence":
        assert (spectrogram == -100).all()  # the floor: 10 log10(1e-10)


def _table_rows(rows: list[dict], delimiter: str = ",") -> str:
    return pd.DataFrame(rows).to_csv(index=False, sep=delimiter)


def _utf16_tabbed(rows: list[dict]) -> bytes:
    """Excel's "Unicode text": UTF-16 with a byte order mark, tab-separated."""
    return _table_rows(rows, "\t").encode("utf-16")


def _semicolons_with_decimal_commas(rows: list[dict]) -> bytes:
    """A European spreadsheet's CSV: semicolons between cells, a comma for the decimal point."""
    return _table_rows([{**row, "cough_detected": row["cough_detected"].replace(".", ",")} for row in rows], ";").encode()


def _decimal_comma_in_a_comma_table(rows: list[dict]) -> bytes:
    rows = [*rows[:-1], {**rows[-1], "cough_detected": "0,85"}]
    return _table_rows(rows).encode()  # the cell is quoted: "0,85"


def _a_column_twice(rows: list[dict]) -> bytes:
    lines = ["uuid,datetime,cough_detected,cough_detected"]
    lines += [f"{row['uuid']},{row['datetime']},{row['cough_detected']},0.99" for row in rows]
    return ("\n".join(lines) + "\n").encode()


# name -> (make the table from the rows, what happens: "read", a row reason, or the step's error)
TABLES = {
    "utf-16-with-bom-tab-separated": (_utf16_tabbed, "read"),
    "semicolons-and-decimal-commas": (_semicolons_with_decimal_commas, "read"),
    "decimal-comma-in-a-comma-table": (_decimal_comma_in_a_comma_table,
                                       ("label 'cough_detected' is not a number: '0,85' has a decimal comma in a comma-separated "
                                        "table; write it with a decimal point")),
    "a-label-column-twice": (_a_column_twice,
                             ("error: {table}: column(s) ['cough_detected'] appear more than once in the header, and which one "
                              "is meant cannot be told; keep one of each")),
}


@pytest.mark.parametrize("name", list(TABLES))
def test_metadata_tables_from_spreadsheets(name, tmp_path):
    """Through the command line: read with every label right, one row rejected with its reason, or one line naming
    the table (exit status 2)."""
    make, outcome = TABLES[name]
    root = tmp_path / "release"
    rows = _good_recordings(root, 5)
    table = root / "metadata_compiled.csv"
    table.write_bytes(make(rows))
    done = _cli("step", "ingest", "--input", root, "--out", tmp_path / "ingest", "--set", "ingest.max_invalid_fraction=0.5")
    _no_traceback(done)
    if outcome.startswith("error: "):
        assert done.returncode == 2 and _last_error(done) == outcome.format(table=table)
        assert not (tmp_path / "ingest" / "manifest.parquet").exists()
        return
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = read_manifest(tmp_path / "ingest")[0].set_index("id")
    if outcome == "read":
        assert (manifest["status"] == "ok").all() and len(manifest) == 5
        assert manifest["cough_detected"].tolist() == pytest.approx([0.2, 0.3, 0.4, 0.5, 0.6])  # every cell where it belongs
    else:
        assert manifest.loc["good-4", "status"] == "rejected" and manifest.loc["good-4", "reason"] == outcome
        assert (manifest.drop(index="good-4")["status"] == "ok").all()


# ---------------------------------------------------------------- bounded, not brittle


def _ingest_through(fault_proxy, bucket: str, config, tmp_path: Path, budget: float, out: str = "ingest"):
    from coughreg.io.storage import S3Options

    config.ingest.retry_budget_seconds = budget
    return ingest(f"s3://{bucket}/coughvid.zip", tmp_path / out, config, s3=S3Options(endpoint_url=fault_proxy.endpoint_url),
                  cache_dir=tmp_path / "cache")


@pytest.fixture
def small_parts(monkeypatch):
    """Parts of 64 KiB, so the test's zip comes in many of them (the cluster's are 16 MiB)."""
    from coughreg.io import storage

    monkeypatch.setattr(storage, "PART_BYTES", 64 * 2**10)
    monkeypatch.setattr(storage, "CHUNK_BYTES", 16 * 2**10)
    return storage.PART_BYTES


def test_an_s3_outage_shorter_than_the_retry_budget_is_waited_out(s3_env, bucket, fault_proxy, coughvid_zip, config,
                                                                  small_parts, tmp_path):
    """The store goes down (every connection reset) for 3 s a third of the way into the download: with a budget
    of 10 s the ingest finishes, and the parts that had arrived are not fetched again."""
    s3_env.client().upload_file(str(coughvid_zip), bucket, "coughvid.zip")
    size = coughvid_zip.stat().st_size
    fault_proxy.outage_after(size // 3, seconds=3.0)
    started = time.monotonic()
    result = _ingest_through(fault_proxy, bucket, config, tmp_path, budget=10)
    assert result.counts == {"ok": 24}
    assert fault_proxy.refused > 0 and time.monotonic() - started >= 3.0  # the outage happened and was waited out
    assert fault_proxy.bytes_down < size + 9 * small_parts + 200_000  # at most the parts in flight again (8 threads)


def test_an_s3_outage_longer_than_the_budget_fails_naming_the_uri_and_keeps_the_parts(s3_env, bucket, fault_proxy, coughvid_zip,
                                                                                      config, small_parts, tmp_path):
    """Down for 8 s with a budget of 2 s: the step fails within seconds, naming the object and the budget; the whole
    parts stay in the cache, and the run after the outage fetches only the rest."""
    from coughreg.runtime.errors import StorageError

    s3_env.client().upload_file(str(coughvid_zip), bucket, "coughvid.zip")
    size = coughvid_zip.stat().st_size
    fault_proxy.outage_after(size // 2, seconds=8.0)
    started = time.monotonic()
    with pytest.raises(StorageError) as error:
        _ingest_through(fault_proxy, bucket, config, tmp_path, budget=2)
    message = str(error.value)
    assert message.startswith(f"s3://{bucket}/coughvid.zip: S3 failed for ")
    assert "longer than the retry budget of 2 s (ingest.retry_budget_seconds)" in message
    assert "parts were downloaded whole and are kept in" in message and "a next run fetches only the rest" in message
    assert time.monotonic() - started < 8.0  # it gave up before the store came back
    assert not (tmp_path / "ingest" / "manifest.parquet").exists()
    while fault_proxy.down():
        time.sleep(0.2)
    before = fault_proxy.bytes_down
    result = _ingest_through(fault_proxy, bucket, config, tmp_path, budget=2, out="again")
    assert result.counts == {"ok": 24}
    assert fault_proxy.bytes_down - before < size * 0.75  # the half before the outage was kept
    assert not _partials(tmp_path / "cache")


def _long_recording(path: Path, minutes: float) -> Path:
    sys.path.insert(0, str(PROJECT))
    from benchmarks.bench_long_recording import long_recording

    return long_recording(path, minutes)


def test_a_ten_minute_recording_stays_small_in_a_feature_worker(tmp_path):
    """A 10-minute 48 kHz Opus/WebM recording through the features step's per-recording path, in a process of its own:
    the recording itself adds far less than the 600 MB a worker may take (decoding the whole clip and one STFT over
    it added 1.3 GB), and the spectrogram is the whole clip's."""
    from benchmarks.bench_long_recording import measure
    from coughreg.audio.feature_spec import feature_parameters
    from coughreg.config.experiment import load_resolved_config
    from coughreg.features.extract import WINDOW_SECONDS

    path = _long_recording(tmp_path / "ten-minutes.webm", 10)
    config = load_resolved_config(HT_YAML)
    params = {**feature_parameters(config.audio), "max_seconds": float(config.prediction.max_inference_chunk_seconds)}
    imports = measure("imports", path, params, WINDOW_SECONDS)
    windowed = measure("windowed", path, params, WINDOW_SECONDS)
    assert windowed["frames"] == 600 * 48000 // 512 + 1
    assert windowed["peak_mb"] - imports["peak_mb"] < 300, (windowed, imports)


@pytest.mark.parametrize("samples", [1, 1023, 2048, 2049, 48000 * 3 + 17, 48000 * 25 + 511])
@pytest.mark.parametrize("window_frames", [1, 3, 94, 1000])
def test_the_windowed_log_mel_equals_the_whole_clips(samples, window_frames):
    """Any length, any window, blocks of any size: the same frames as one STFT over the whole clip."""
    from coughreg.audio.frontend import LogMel, windowed_log_mel

    module = LogMel(48000, 2048, 512, 128, 50.0, 24000.0).eval()
    rng = np.random.default_rng(samples)
    signal = (0.1 * rng.standard_normal(samples)).astype(np.float32)
    with torch.inference_mode():
        whole = module(torch.from_numpy(signal)[None])[0].numpy()
    blocks = np.array_split(signal, max(1, samples // 960))  # an Opus frame's worth at a time, as decoding gives them
    for announced in (None, samples):
        windowed = windowed_log_mel(module, iter(blocks), window_frames, announced)
        assert windowed.shape == whole.shape
        np.testing.assert_allclose(windowed, whole, atol=1e-3, rtol=0)


def test_the_features_of_a_long_recording_equal_the_whole_clips(tmp_path):
    """70 s of Opus (seven windows of 10 s): ``log_mel_of_file`` against decoding it whole and one STFT."""
    from coughreg.audio.feature_spec import feature_parameters
    from coughreg.config.experiment import load_resolved_config
    from coughreg.features.extract import _frontend, log_mel_of_file

    path = _long_recording(tmp_path / "seventy-seconds.webm", 70 / 60)
    params = {**feature_parameters(load_resolved_config(HT_YAML).audio), "max_seconds": 600.0}
    with torch.inference_mode():
        whole = _frontend(params)(torch.from_numpy(decode_audio(path, 48000))[None])[0].numpy()
    np.testing.assert_allclose(log_mel_of_file(path, params), whole, atol=1e-3, rtol=0)
