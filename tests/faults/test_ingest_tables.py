"""Crowdsourced audio is messy: more than twenty kinds of bad input, each reported with its reason,
and every good recording beside them kept."""

from __future__ import annotations

import io
import json
import stat
import warnings
import zipfile

import av
import numpy as np
import pandas as pd
import pytest

from coughreg.artifacts import read_manifest
from coughreg.ingest.manifest import REASON_NO_METADATA, REASON_NO_RECORDING, ingest
from coughreg.runtime.errors import CoughPipelineError, StorageError
from coughreg.synth.coughvid import encode_audio


def _tone(seconds=1.5, rate=48000, freq=600.0, channels=1):
    t = np.arange(int(rate * seconds)) / rate
    mono = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return mono if channels == 1 else np.stack([mono, mono * 0.5], axis=1)


def _wav(samples, rate) -> bytes:
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV")
    return buffer.getvalue()


def _video_only_mp4() -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for _ in range(5):
            frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buffer.getvalue()


def _member(archive, name, data, mode=0o100644, compress=zipfile.ZIP_STORED):
    info = zipfile.ZipInfo(name, date_time=(2020, 4, 1, 0, 0, 0))
    info.external_attr = mode << 16
    info.compress_type = compress
    archive.writestr(info, data)


EXPECTED = {
    "corrupt": "undecodable",
    "empty": "empty file (0 bytes)",
    "short": "shorter than 0.1 s",
    "nan-label": "label 'cough_detected' is missing",
    "text-label": "label 'cough_detected' is not a number",
    "above-range": "label 'cough_detected' = 1.7 is outside [0, 1]",
    "below-range": "label 'cough_detected' = -0.2 is outside [0, 1]",
    "infinite": "label 'cough_detected' = inf is outside [0, 1]",
    "no-audio": REASON_NO_RECORDING,
    "two-files": "several recordings for one id",
    "truncated": "undecodable",
    "png-as-ogg": "undecodable",
    "video-only": "undecodable",
    "slipped": REASON_NO_RECORDING,
    "linked": "symbolic link in archive",
    "bomb": "compression ratio",
    "device": "special file in archive",
    "twice": "duplicate name in archive",
}


def test_twenty_kinds_of_bad_input_in_a_coughvid_archive(config, tmp_path):
    good = encode_audio(_tone(), "webm", "opus")
    rows = []

    def row(uid, label="0.9"):
        rows.append({"uuid": uid, "datetime": "2020-04-02T10:00:00+00:00", "cough_detected": label})

    path = tmp_path / "messy.zip"
    with zipfile.ZipFile(path, "w") as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name on purpose
        root = "public_dataset/"
        for i in range(20):
            row(f"good-{i}")
            _member(archive, f"{root}good-{i}.webm", good)
        # accepted oddities: other rates, stereo, other codecs
        row("odd-rate")
        _member(archive, f"{root}odd-rate.ogg", encode_audio(_tone(rate=48000), "ogg", "vorbis"))
        row("stereo-wav")
        _member(archive, f"{root}stereo-wav.wav", _wav(_tone(channels=2, rate=11025), 11025))
        # faults
        row("corrupt"), _member(archive, f"{root}corrupt.webm", b"\x1aE\xdf\xa3" + bytes(range(256)) * 40)
        row("empty"), _member(archive, f"{root}empty.ogg", b"")
        row("short"), _member(archive, f"{root}short.ogg", encode_audio(_tone(0.03), "ogg", "opus"))
        row("nan-label", ""), _member(archive, f"{root}nan-label.webm", good)
        row("text-label", "high"), _member(archive, f"{root}text-label.webm", good)
        row("above-range", "1.7"), _member(archive, f"{root}above-range.webm", good)
        row("below-range", "-0.2"), _member(archive, f"{root}below-range.webm", good)
        row("infinite", "inf"), _member(archive, f"{root}infinite.webm", good)
        row("no-audio")
        _member(archive, f"{root}orphan.webm", good)
        row("good-3", "0.1")  # duplicate id
        row("two-files"), _member(archive, f"{root}two-files.webm", good), _member(archive, f"{root}two-files.ogg", good)
        row("truncated"), _member(archive, f"{root}truncated.webm", good[:300])
        row("png-as-ogg"), _member(archive, f"{root}png-as-ogg.ogg", b"\x89PNG\r\n\x1a\n" + b"\x00" * 500)
        row("video-only"), _member(archive, f"{root}video-only.mp4", _video_only_mp4())
        row("slipped"), _member(archive, "../slipped.webm", good)
        _member(archive, "/abs/absolute.webm", good)
        row("linked"), _member(archive, f"{root}linked.webm", "/etc/passwd", mode=stat.S_IFLNK | 0o777)
        row("bomb"), _member(archive, f"{root}bomb.wav", b"\x00" * 20_000_000, compress=zipfile.ZIP_DEFLATED)
        row("device"), _member(archive, f"{root}device.webm", b"", mode=stat.S_IFCHR | 0o644)
        row("twice"), _member(archive, f"{root}twice.webm", good), _member(archive, f"{root}twice.webm", good)
        row("")  # empty id
        table = pd.DataFrame(rows).to_csv(index=False)
        _member(archive, f"{root}metadata_compiled.csv", table, compress=zipfile.ZIP_DEFLATED)

    config.ingest.max_invalid_fraction = 0.9
    ingest(str(path), tmp_path / "ingest", config)
    manifest, _ = read_manifest(tmp_path / "ingest")
    rejected = manifest[manifest["status"] == "rejected"]
    by_id = {}
    for item in rejected.itertuples():
        by_id.setdefault(item.id, []).append(item.reason)
    for uid, reason in EXPECTED.items():
        assert any(r.startswith(reason) for r in by_id.get(uid, [])), (uid, by_id.get(uid))
    assert by_id["orphan"] == [REASON_NO_METADATA]
    assert len(by_id["good-3"]) == 2 and all(  # one uuid, two labels: neither row is trusted
        r.startswith("uuid 'good-3' is on two rows with different labels: cough_detected 0.9 (line 5) and 0.1 (line ")
        for r in by_id["good-3"])
    assert any(r.startswith("empty uuid") for r in rejected["reason"])
    assert any("unsafe path in archive" in r for r in rejected["reason"])  # ../ and /abs/
    assert sum("unsafe path in archive" in r for r in rejected["reason"]) == 2
    assert any("no audio stream" in r for r in by_id["video-only"])

    ok = manifest[manifest["status"] == "ok"].set_index("id")
    assert set(ok.index) == {f"good-{i}" for i in range(20) if i != 3} | {"odd-rate", "stereo-wav"}
    assert ok.loc["stereo-wav", "channels"] == 2 and ok.loc["stereo-wav", "sample_rate"] == 11025
    assert ok.loc["odd-rate", "codec"] == "vorbis"
    # exactly once: every metadata row, plus every archive member that is audio-like or refused and unclaimed
    assert len(manifest[manifest["split"] == "train"]) == len(rows)
    assert (tmp_path / "ingest" / "quality_report.html").exists()
    report = json.loads((tmp_path / "ingest" / "ingest_report.json").read_text())
    assert report["quality"]["by_status"]["ok"] == 21
    assert not list((tmp_path / "ingest").rglob("*slipped*")) and not list((tmp_path / "ingest").rglob("*absolute*"))


def test_hydrogen_torch_file_names_may_not_leave_the_data_folder(config, tmp_path):
    root = tmp_path / "ht"
    (root / "audio").mkdir(parents=True)
    good = encode_audio(_tone(), "ogg", "opus")
    for i in range(4):
        (root / "audio" / f"clip{i}.ogg").write_bytes(good)
    (root / "secret.ogg").write_bytes(good)
    frame = pd.DataFrame({
        "filename": ["clip0.ogg", "clip1.ogg", "clip2.ogg", "clip3.ogg", "../secret.ogg", "/etc/passwd", "sub/../../secret.ogg", "missing.ogg"],
        "cough_detected": [0.1, 0.9, 0.5, 0.7, 1.0, 1.0, 1.0, 0.3],
        "datetime": ["d1", "d2", "d3", "d4", "d5", "d6", "d7", "d8"],
    })
    frame.to_csv(root / "audio.csv", index=False)
    config.dataset.data_folder = "data/user/ht/audio/"
    config.dataset.train_dataframe = "data/user/ht/audio.csv"
    config.ingest.max_invalid_fraction = 0.9
    ingest(str(root), tmp_path / "ingest", config)
    manifest, _ = read_manifest(tmp_path / "ingest")
    reasons = dict(zip(manifest["id"], manifest["reason"]))
    for name in ("../secret.ogg", "/etc/passwd", "sub/../../secret.ogg"):
        assert reasons[name].startswith("file name points outside the data folder"), name
    assert reasons["missing.ogg"] == REASON_NO_RECORDING
    assert reasons["secret.ogg"] == REASON_NO_METADATA  # outside the folder, never claimed, still listed
    assert sorted(manifest.loc[manifest["status"] == "ok", "id"]) == [f"clip{i}.ogg" for i in range(4)]


def test_an_archive_over_the_size_limit_is_refused_whole(config, tmp_path):
    path = tmp_path / "big.zip"
    with zipfile.ZipFile(path, "w") as archive:
        _member(archive, "a.wav", b"\x00" * 2_000_000, compress=zipfile.ZIP_DEFLATED)
    config.ingest.max_archive_bytes = 1_000_000
    with pytest.raises(StorageError, match="unpacks to .* more than the limit"):
        ingest(str(path), tmp_path / "ingest", config)


def test_utf16_metadata_without_a_byte_order_mark_is_refused_clearly(config, tmp_path):
    """With a BOM, UTF-16 is read (``tests/faults/test_ingest.py``); without one, which of its two byte orders is meant is a guess."""
    (tmp_path / "r1.webm").write_bytes(encode_audio(_tone(), "webm", "opus"))
    (tmp_path / "metadata_compiled.csv").write_bytes("uuid,datetime,cough_detected\nr1,2020,0.5\n".encode("utf-16-le"))
    with pytest.raises(CoughPipelineError, match="metadata_compiled.csv: the metadata table holds NUL bytes"):
        ingest(str(tmp_path), tmp_path / "ingest", config)


def test_credentials_never_reach_the_uri_the_manifest_or_the_report(s3_env, bucket, coughvid_zip, config, tmp_path, caplog):
    with pytest.raises(StorageError) as error:
        ingest(f"s3://AKIAEXAMPLE:topsecret@{bucket}/x.zip", tmp_path / "nope", config)
    assert "topsecret" not in str(error.value) and "AKIAEXAMPLE" not in str(error.value)
    s3_env.client().upload_file(str(coughvid_zip), bucket, "d.zip")
    with caplog.at_level("DEBUG"):
        ingest(f"s3://{bucket}/d.zip", tmp_path / "ingest", config)
    secret = s3_env.credentials.secret_access_key
    for path in (tmp_path / "ingest").rglob("*"):
        if path.is_file() and path.suffix in (".json", ".yaml", ".html", ".parquet"):
            assert secret.encode() not in path.read_bytes(), path
    assert secret not in caplog.text
