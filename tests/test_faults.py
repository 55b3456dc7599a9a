"""Bad input and faults, as a hostile user and a flaky cluster bring them: each ends in one message that
names the file, key or URI at fault (or in the one recording being rejected), never in a traceback, a
half-written artifact, an executed file or a secret written down.

Real zips and folders of the REAL recordings, real S3 on loopback, a real full file system (a small
tmpfs), and the real command line in a subprocess wherever the issue speaks of a command.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import torch

from coughreg.artifacts import read_manifest
from coughreg.config import load_resolved_config, save_config
from coughreg.ingest import ingest
from coughreg.scoring.filenames import NAME_BYTES, fits, fitting_name
from coughreg.shards import read_shard_metadata
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
    from coughreg.scoring.filenames import temporary_file, temporary_folder, temporary_name
    from coughreg.storage import atomic_write_text

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
