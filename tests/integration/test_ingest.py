"""Ingestion: S3 zip and prefix, COUGHVID and Hydrogen Torch layouts, real files, bad input reported."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from coughreg.artifacts import MANIFEST, read_manifest
from coughreg.ingest.manifest import REASON_NO_METADATA, REASON_NO_RECORDING, ingest
from coughreg.runtime.errors import CoughPipelineError, StorageError
from coughreg.synth.coughvid import SAMPLE_RATE, encode_audio
from tests.conftest import REAL_COUGHS, REAL_METADATA


def _unzip(archive: Path, into: Path) -> Path:
    with zipfile.ZipFile(archive) as handle:
        handle.extractall(into)
    return into


def _tone(seconds: float = 1.5, freq: float = 700.0) -> np.ndarray:
    t = np.arange(int(SAMPLE_RATE * seconds)) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_ingest_a_coughvid_zip_from_s3(s3_env, bucket, coughvid_zip, config, tmp_path):
    s3_env.client().upload_file(str(coughvid_zip), bucket, "coughvid/public_dataset.zip")
    result = ingest(f"s3://{bucket}/coughvid/public_dataset.zip", tmp_path / "ingest", config)
    manifest, meta = read_manifest(tmp_path / "ingest")
    assert result.layout == "coughvid" and meta["layout"] == "coughvid"
    assert len(manifest) == 24 and set(manifest["status"]) == {"ok"}
    assert {"id", "audio_path", "cough_detected", "datetime", "status", "reason", "duration_s", "sample_rate",
            "channels", "codec", "sha256"} <= set(manifest.columns)
    assert set(manifest["codec"]) <= {"opus", "vorbis"} and set(manifest["sample_rate"]) == {48000}
    assert manifest["duration_s"].between(0.9, 10.1).all()
    with zipfile.ZipFile(coughvid_zip) as archive:
        for row in manifest.itertuples():
            stored = (tmp_path / "ingest" / row.audio_path).read_bytes()
            assert stored == archive.read(row.source_name)  # kept as they came
            assert hashlib.sha256(stored).hexdigest() == row.sha256
            assert row.audio_path.endswith(f"{row.id}.{row.source_name.rsplit('.', 1)[1]}")
    saved = yaml.safe_load((tmp_path / "ingest" / "config.yaml").read_text())
    assert set(saved) == {"dataset", "ingest", "resolved"}  # the keys that shaped the manifest, and no others
    assert saved["dataset"]["label_columns"] == ["cough_detected"] and "selected_folds" not in saved["dataset"]
    report = json.loads((tmp_path / "ingest" / "ingest_report.json").read_text())
    assert report["ok"] == 24 and report["rejected"] == 0


def test_ingest_an_s3_prefix(s3_env, bucket, coughvid_zip, config, tmp_path):
    folder = _unzip(coughvid_zip, tmp_path / "unzipped")
    client = s3_env.client()
    for path in folder.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"release/{path.relative_to(folder).as_posix()}")
    ingest(f"s3://{bucket}/release/", tmp_path / "ingest", config)
    manifest, _ = read_manifest(tmp_path / "ingest")
    assert (manifest["status"] == "ok").sum() == 24


def test_wrong_keys_fail_the_ingest_with_the_uri(s3_server, bucket, coughvid_zip, config, tmp_path, monkeypatch):
    s3_server.client().upload_file(str(coughvid_zip), bucket, "d.zip")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOBODY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with pytest.raises(StorageError, match=f"s3://{bucket}/d.zip: access denied"):
        ingest(f"s3://{bucket}/d.zip", tmp_path / "ingest", config)
    assert not (tmp_path / "ingest" / MANIFEST).exists()


def test_real_recordings_through_the_hydrogen_torch_layout(config, tmp_path):
    """The ten REAL recordings (MP3, 16 and 48 kHz) with an audio.csv in HT's layout: all coughs."""
    root = tmp_path / "ht"
    data = root / "covid19-cough-audio-classification"
    data.mkdir(parents=True)
    names = sorted(p.name for p in REAL_COUGHS.glob("*.mp3"))
    for name in names:
        shutil.copy(REAL_COUGHS / name, data / name)
    pd.DataFrame({"filename": names, "cough_detected": 1.0, "datetime": [f"2021-01-{i + 1:02d}" for i in range(len(names))]}).to_csv(
        root / "audio.csv", index=False
    )
    result = ingest(str(root), tmp_path / "ingest", config)
    manifest, _ = read_manifest(tmp_path / "ingest")
    assert result.layout == "hydrogen_torch"
    assert (manifest["status"] == "ok").all() and len(manifest) == 10
    assert set(manifest["codec"]) == {"mp3"}
    assert set(manifest["sample_rate"]) == {16000, 48000}
    real = manifest.set_index("id").loc["coughvid_00039425-7f3a-42aa-ac13-834aaa2b6b92.mp3"]
    assert real["duration_s"] == pytest.approx(9.8, abs=0.15)


def test_real_metadata_with_generated_audio_for_a_few_hundred_uuids(config, tmp_path):
    """The REAL metadata_compiled.csv read as is; rows without audio are reported, not dropped."""
    metadata = pd.read_csv(REAL_METADATA, dtype=str, keep_default_na=False)
    folder = tmp_path / "release" / "public_dataset"
    folder.mkdir(parents=True)
    shutil.copy(REAL_METADATA, folder / "metadata_compiled.csv")
    chosen = metadata["uuid"].iloc[::67].tolist()[:300]
    assert len(chosen) == 300
    clip = encode_audio(_tone(0.5), "webm", "opus")
    for uid in chosen:
        (folder / f"{uid}.webm").write_bytes(clip)
    ingest(str(tmp_path / "release"), tmp_path / "ingest", config)
    manifest, _ = read_manifest(tmp_path / "ingest")
    assert len(manifest) == len(metadata)  # every metadata row exactly once
    ok = manifest[manifest["status"] == "ok"]
    assert sorted(ok["id"]) == sorted(chosen)
    missing = manifest[manifest["status"] != "ok"]
    assert set(missing["reason"]) == {REASON_NO_RECORDING}
    labels = metadata.set_index("uuid").loc[ok["id"], "cough_detected"].astype(float).to_numpy()
    np.testing.assert_allclose(ok["cough_detected"].to_numpy(), labels)
    assert set(ok["datetime"]) <= set(metadata["datetime"])


def test_bad_input_is_reported_row_by_row_and_good_recordings_survive(config, tmp_path):
    config.ingest.max_invalid_fraction = 0.9  # this test is mostly faults on purpose
    root = tmp_path / "release"
    root.mkdir()
    good = encode_audio(_tone(), "webm", "opus")
    rows = []

    def add(uid, data: bytes | None, label="0.9", suffix="webm", when="2020-04-02T10:00:00+00:00"):
        rows.append({"uuid": uid, "datetime": when, "cough_detected": label})
        if data is not None:
            (root / f"{uid}.{suffix}").write_bytes(data)

    for i in range(6):
        add(f"good-{i}", good)
    add("corrupt", b"\x1aE\xdf\xa3" + bytes(range(256)) * 20)
    add("empty", b"")
    add("short", encode_audio(_tone(0.02), "ogg", "opus"))
    add("nan-label", good, label="")
    add("text-label", good, label="high")
    add("too-high", good, label="1.7")
    add("no-audio", None)
    rows.append({"uuid": "good-0", "datetime": "2020-04-03T00:00:00+00:00", "cough_detected": "0.5"})  # duplicate
    (root / "orphan.ogg").write_bytes(encode_audio(_tone(), "ogg", "vorbis"))
    pd.DataFrame(rows).to_csv(root / "metadata_compiled.csv", index=False)

    ingest(str(root), tmp_path / "ingest", config)
    manifest, _ = read_manifest(tmp_path / "ingest")
    reasons = {row.id: row.reason for row in manifest.itertuples() if row.status == "rejected"}
    assert reasons["corrupt"].startswith("undecodable")
    assert reasons["empty"] == "empty file (0 bytes)"
    assert reasons["short"].startswith("shorter than 0.1 s")
    assert reasons["nan-label"] == "label 'cough_detected' is missing"
    assert reasons["text-label"].startswith("label 'cough_detected' is not a number")
    assert reasons["too-high"] == "label 'cough_detected' = 1.7 is outside [0, 1]"
    assert reasons["no-audio"] == REASON_NO_RECORDING
    assert reasons["orphan"] == REASON_NO_METADATA
    duplicates = manifest[(manifest["id"] == "good-0")]  # one uuid, two different labels: both rows rejected
    assert sorted(duplicates["status"]) == ["rejected", "rejected"]
    assert all(r.startswith("uuid 'good-0' is on two rows with different labels") for r in duplicates["reason"])
    ok = manifest[manifest["status"] == "ok"]
    assert sorted(ok["id"]) == [f"good-{i}" for i in range(1, 6)]
    assert len(manifest) == len(rows) + 1  # every row and the orphan file, exactly once


def test_unsafe_archive_members_are_refused(config, tmp_path):
    config.ingest.max_invalid_fraction = 1.0
    good = encode_audio(_tone(), "webm", "opus")
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("metadata_compiled.csv", "uuid,datetime,cough_detected\na,2020-04-01,0.5\nb,2020-04-02,0.6\n")
        handle.writestr("a.webm", good)
        for i in range(4):
            handle.writestr(f"extra/e{i}.webm", good)  # not in the metadata's folder: reported
        handle.writestr("../b.webm", good)
        link = zipfile.ZipInfo("c.webm")
        link.external_attr = (0o120777) << 16
        handle.writestr(link, "/etc/passwd")
    ingest(str(archive), tmp_path / "ingest", config)
    manifest, _ = read_manifest(tmp_path / "ingest")
    reasons = dict(zip(manifest["source_name"].where(manifest["source_name"] != "", manifest["id"]), manifest["reason"]))
    assert reasons["a.webm"] == ""
    assert reasons["b"] == REASON_NO_RECORDING
    assert any("unsafe path" in r for r in manifest["reason"])
    assert reasons["c.webm"] == "symbolic link in archive"
    assert not (tmp_path / "b.webm").exists() and not (tmp_path / "ingest" / "b.webm").exists()


def test_too_many_unusable_recordings_fail_the_step_and_leave_no_manifest(config, tmp_path):
    root = tmp_path / "release"
    root.mkdir()
    good = encode_audio(_tone(), "webm", "opus")
    rows = []
    for i in range(10):
        rows.append({"uuid": f"r{i}", "datetime": "2020-04-01", "cough_detected": "0.5"})
        (root / f"r{i}.webm").write_bytes(good if i < 3 else b"not audio at all")
    pd.DataFrame(rows).to_csv(root / "metadata_compiled.csv", index=False)
    with pytest.raises(CoughPipelineError, match=r"7 of 10 recordings present are unusable"):
        ingest(str(root), tmp_path / "ingest", config)
    assert not (tmp_path / "ingest" / MANIFEST).exists()
    assert json.loads((tmp_path / "ingest" / "ingest_report.json").read_text())["rejected"] == 7


def test_an_unknown_layout_says_what_to_set(config, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "labels.csv").write_text("file,y\n")
    with pytest.raises(CoughPipelineError, match=r"no known layout.*labels.csv.*dataset.train_dataframe"):
        ingest(str(tmp_path / "data"), tmp_path / "ingest", config)


def test_latin1_metadata_is_read(config, tmp_path):
    root = tmp_path / "release"
    root.mkdir()
    (root / "r1.webm").write_bytes(encode_audio(_tone(), "webm", "opus"))
    (root / "metadata_compiled.csv").write_bytes("uuid,datetime,cough_detected,gender\nr1,2020-04-01,0.5,m\xe4nnlich\n".encode("latin-1"))
    ingest(str(root), tmp_path / "ingest", config)
    manifest, _ = read_manifest(tmp_path / "ingest")
    assert manifest["status"].tolist() == ["ok"]


def test_hydrogen_torch_validation_and_test_tables(config, tmp_path):
    root = tmp_path / "ht"
    (root / "audio").mkdir(parents=True)
    (root / "audio_test").mkdir()
    clip = encode_audio(_tone(), "ogg", "opus")
    for i in range(6):
        (root / "audio" / f"c{i}.ogg").write_bytes(clip)
    for i in range(2):
        (root / "audio_test" / f"t{i}.ogg").write_bytes(clip)
    pd.DataFrame({"filename": [f"c{i}.ogg" for i in range(4)], "cough_detected": 0.5, "datetime": "d"}).to_csv(root / "train.csv", index=False)
    pd.DataFrame({"filename": ["c4.ogg", "c5.ogg"], "cough_detected": 0.7, "datetime": "d"}).to_csv(root / "valid.csv", index=False)
    pd.DataFrame({"filename": ["t0.ogg", "t1.ogg"]}).to_csv(root / "test.csv", index=False)  # no labels: to be scored
    for key, value in {"train_dataframe": "data/user/ht/train.csv", "validation_dataframe": "data/user/ht/valid.csv",
                       "test_dataframe": "data/user/ht/test.csv", "data_folder": "data/user/ht/audio",
                       "data_folder_test": "data/user/ht/audio_test", "validation_strategy": "custom"}.items():
        setattr(config.dataset, key, value)
    ingest(str(root), tmp_path / "ingest", config)
    manifest, meta = read_manifest(tmp_path / "ingest")
    assert meta["tables"] == {"train": "train.csv", "validation": "valid.csv", "test": "test.csv"}
    assert (manifest["status"] == "ok").all()
    assert manifest.groupby("split").size().to_dict() == {"train": 4, "validation": 2, "test": 2}
    assert manifest.loc[manifest["split"] == "test", "cough_detected"].isna().all()
