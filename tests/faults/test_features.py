"""Features faults: a full disk, manifest rows outside the ingest folder, a ten-minute recording in bounded memory."""

from __future__ import annotations

import resource
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from coughreg.artifacts import read_manifest
from coughreg.artifacts.shards import read_shard_metadata
from coughreg.audio.files import decode_audio
from coughreg.config.loading import load_resolved_config
from tests.conftest import HT_YAML, PROJECT
from tests.helpers.faults import cli, last_error, no_traceback, partials, refusal, small_file_system, tampered_ingest

pytestmark = pytest.mark.faults


def _file_size_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_while_writing_shards_is_one_message_naming_the_folder(tiny_run, tmp_path):
    small = tmp_path / "small"
    with small_file_system(small, "200k") as mounted:
        out = small / "features"
        done = cli("step", "features", "--input", tiny_run["ingest"], "--out", out, "--set", "features.shard_rows=8",
                    preexec_fn=None if mounted else _file_size_limit(100_000))
        assert done.returncode == 2, done.stderr[-3000:]
        error = last_error(done)
        assert error.startswith(f"error: {out / 'shards'}/") and "while writing part-" in error
        assert ("no space left on the device (while writing part-" if mounted else "file size limit") in error
        assert ("free space there" if mounted else "raise the limit") in error
        no_traceback(done)
        assert not (out / "shards.json").exists() and not partials(small)
        for shard in out.rglob("*.parquet"):  # what is there is whole
            assert read_shard_metadata(shard)["schema_version"] == 1


@pytest.mark.parametrize("how", ["climbs-out", "absolute"])
def test_features_refuse_a_manifest_row_outside_the_ingest_folder(how, tiny_run, tmp_path):
    from coughreg.features.extract import extract_features

    ingest, victim, path = tampered_ingest(tiny_run, tmp_path, how)
    result = extract_features(ingest, tmp_path / "features", tiny_run["config"], workers=1)
    assert result.failures == [{"id": victim, "audio_path": path, "reason": refusal(ingest, victim, path)}]
    ok = read_manifest(ingest)[0].query("status == 'ok'")
    assert result.rows == len(ok) - 1  # every other recording featurized


def test_an_ingest_folder_from_its_s3_uri_is_not_outside_itself(s3_env, bucket, tiny_run, tmp_path):
    """The features step mirrors an ``s3://`` ingest artifact as a folder of links into the download cache: its
    recordings are the folder's own, every one featurized."""
    from coughreg.io.storage import upload_folder

    upload_folder(tiny_run["ingest"], f"s3://{bucket}/run-1/ingest/dataset/")
    done = cli("step", "features", "--input", f"s3://{bucket}/run-1/ingest/dataset/", "--out", tmp_path / "features",
                env={**s3_env.credentials.env(s3_env.endpoint_url), "COUGHREG_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr[-3000:]
    ok = int((read_manifest(tiny_run["ingest"])[0]["status"] == "ok").sum())
    assert f"({ok} recordings in" in done.stdout and ", 0 failed)" in done.stdout


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
    from coughreg.features.extract import _frontend, log_mel_of_file

    path = _long_recording(tmp_path / "seventy-seconds.webm", 70 / 60)
    params = {**feature_parameters(load_resolved_config(HT_YAML).audio), "max_seconds": 600.0}
    with torch.inference_mode():
        whole = _frontend(params)(torch.from_numpy(decode_audio(path, 48000))[None])[0].numpy()
    np.testing.assert_allclose(log_mel_of_file(path, params), whole, atol=1e-3, rtol=0)
