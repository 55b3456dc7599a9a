"""Command-line faults: credentials in URIs never written down, outputs that cannot be written refused first."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from coughreg.scoring.filenames import NAME_BYTES, fits, fitting_name
from tests.helpers.faults import LONG_ACCENTS, LONG_ASCII, REAL, cli, last_error, no_traceback, partials

pytestmark = pytest.mark.faults


SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"  # the shape of an AWS secret key: it holds slashes


KEY_ID = "AKIAIOSFODNN7EXAMPLE"


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
    done = cli("compile", "-o", out / "pipeline.yaml", flag, value)
    assert done.returncode == 2, done.stderr[-3000:]
    assert named in done.stderr and "credentials in a URI are not accepted" in done.stderr and "***@" in done.stderr
    assert not (out / "pipeline.yaml").exists()
    _assert_no_secret(done, tmp_path)
    no_traceback(done)


def test_credentials_in_a_config_file_are_refused_naming_the_file_and_key(tmp_path):
    config = tmp_path / "experiment.yaml"
    config.write_text(f"cluster:\n  checkpoint_uri: s3://{KEY_ID}:{SECRET}@bucket/checkpoints\n")
    done = cli("compile", "-o", tmp_path / "pipeline.yaml", "--config", config)
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
    done = cli(*(a.replace("{out}", str(out)) for a in args))
    assert done.returncode == 2
    assert "credentials in a URI are not accepted" in done.stderr and "***@" in done.stderr
    assert not out.exists()
    _assert_no_secret(done, tmp_path)
    no_traceback(done)


@pytest.mark.parametrize(("args", "message"), [
    (["step", "features", "--input", "{ingest}", "--out", "{file}"], "--out {file}: is a file; name a folder"),
    (["step", "ingest", "--input", "{zip}", "--out", "{file}/sub"], "--out {file}/sub: {file} is a file, not a folder"),
    (["step", "export", "--model", "{model}", "--evaluation", "{evaluation}", "--out", "{file}"], "--out {file}: is a file"),
    (["run-local", "--data", "{zip}", "--out", "{file}"], "--out {file}: is a file; name a folder"),
    (["generate", "--out", "{folder}"], "--out {folder}: is a folder; name a file in it"),
    (["generate", "--out", "{file}/data.zip"], "--out {file}/data.zip: {file} is a file"),
    (["score", "--scorer", "{scorer}", "{recording}", "--out", "{folder}"], "--out {folder}: is a folder; name a file in it"),
    (["score", "--scorer", "{scorer}", "{recording}", "--out", "{file}/scores.csv"], "--out {file}/scores.csv: {file} is a file"),
], ids=["features-out-file", "ingest-out-under-a-file", "export-out-file", "run-local-out-file", "generate-out-folder",
        "generate-out-under-a-file", "score-out-folder", "score-out-under-a-file"])
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

    done = cli(*map(place, args))
    assert done.returncode == 2
    assert last_error(done).startswith(f"error: {place(message)}"), done.stderr[-2000:]
    no_traceback(done)
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
    assert not partials(tmp_path)
    assert fitting_name(LONG_ACCENTS) != fitting_name("é" * 131 + ".mp3") and fits(fitting_name(LONG_ACCENTS))
