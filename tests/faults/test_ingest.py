"""Ingest faults: long and odd names, recordings from phones and browsers, damaged zips, spreadsheet tables;
each ends in one message or one rejected recording, never a traceback or a lost recording."""

from __future__ import annotations

import io
import shutil
import struct
import zipfile
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest
import soundfile

from coughreg.artifacts import read_manifest
from coughreg.audio.files import decode_audio
from coughreg.ingest.manifest import ingest
from coughreg.scoring.filenames import fits, fitting_name
from coughreg.synth.coughvid import encode_audio
from tests.conftest import HT_YAML
from tests.helpers.faults import LONG_ACCENTS, LONG_ASCII, REAL, cli, last_error, no_traceback, partials

pytestmark = pytest.mark.faults


ACCENTS_ON_DISK = "é" * 120 + ".mp3"  # 244 bytes: the longest run of them a folder on disk can hold


HT_KEYS = ["dataset.data_folder=data/user/ht/audio/", "dataset.train_dataframe=data/user/ht/audio.csv"]


def _table(names: list[str]) -> str:
    rows = {"filename": names, "cough_detected": [round(0.1 + 0.05 * k, 2) for k in range(len(names))],
            "datetime": [f"2020-04-{k + 1:02d}" for k in range(len(names))]}
    return pd.DataFrame(rows).to_csv(index=False)


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
    assert not partials(out)


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
    done = cli("step", "ingest", "--input", archive, "--out", tmp_path / "ingest", "--config", HT_YAML,
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
    assert not partials(tmp_path / "cache")


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
    assert not partials(tmp_path / "ingest")


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
    done = cli("step", "ingest", "--input", archive, "--out", tmp_path / "ingest")
    assert done.returncode == 2, done.stderr[-3000:]
    assert last_error(done).startswith(f"error: {archive}: a damaged zip archive (")
    assert last_error(done).endswith("copy or download the archive again")
    no_traceback(done)
    assert not (tmp_path / "ingest" / "manifest.parquet").exists()


def test_a_zip_holding_only_a_zip_names_the_inner_archive(coughvid_zip, tmp_path):
    archive = tmp_path / "outer.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.write(coughvid_zip, "download/coughvid_small.zip")
    done = cli("step", "ingest", "--input", archive, "--out", tmp_path / "ingest")
    assert done.returncode == 2, done.stderr[-3000:]
    assert last_error(done) == (f"error: {archive}: no known layout, and it holds the archive download/coughvid_small.zip: "
                                 "archives inside a data set are not unpacked; unpack it and ingest its contents "
                                 "(a folder, or a zip of them)")
    no_traceback(done)


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
    done = cli("step", "ingest", "--input", root, "--out", tmp_path / "ingest", "--set", "ingest.max_invalid_fraction=0.5")
    no_traceback(done)
    if outcome.startswith("error: "):
        assert done.returncode == 2 and last_error(done) == outcome.format(table=table)
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
