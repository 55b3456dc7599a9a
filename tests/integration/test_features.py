"""Features: the mel front end's numbers, Parquet shards that read back exactly, reruns, real recordings."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from coughreg.artifacts import SHARD_INDEX, read_manifest, shard_paths
from coughreg.artifacts.shards import SpectrogramShardReader, SpectrogramShardWriter, read_shard_metadata
from coughreg.audio.files import decode_audio
from coughreg.audio.frontend import LogMel, feature_parameters
from coughreg.config.loading import load_resolved_config
from coughreg.features.extract import extract_features, log_mel_of_file
from coughreg.ingest.manifest import ingest
from coughreg.runtime.errors import CoughPipelineError
from coughreg.synth.coughvid import encode_audio
from tests.conftest import HT_YAML, REAL_COUGHS


def _mel_centers(audio) -> np.ndarray:
    """Slaney mel band centre frequencies, computed independently of torchaudio."""
    import librosa

    edges = librosa.mel_frequencies(audio.mel_frequency_bins + 2, fmin=audio.minimum_frequency, fmax=audio.maximum_frequency)
    return edges[1:-1]


def _tone(freq: float, seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize("freq", [300.0, 1000.0, 4000.0, 12000.0])
def test_a_test_tone_lands_in_its_mel_band(config, tmp_path, freq):
    path = tmp_path / "tone.webm"
    path.write_bytes(encode_audio(_tone(freq, 2.0, 48000), "webm", "opus"))
    log_mel = log_mel_of_file(path, {**feature_parameters(config.audio), "max_seconds": 600.0})
    assert log_mel.shape[0] == 128
    peak = int(np.argmax(np.median(log_mel, axis=1)))
    centers = _mel_centers(config.audio)
    assert abs(np.log2(centers[peak] / freq)) < 0.08  # within a mel band's width


def test_resampling_keeps_a_tone_at_its_frequency(tmp_path):
    """A 16 kHz recording decoded to 48 kHz keeps its 1 kHz tone (band-limited resampling, no images)."""
    import soundfile

    path = tmp_path / "tone16k.flac"
    soundfile.write(path, _tone(1000.0, 1.0, 16000), 16000)
    samples = decode_audio(path, 48000)
    assert abs(samples.size - 48000) < 200
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(samples.size)))
    freqs = np.fft.rfftfreq(samples.size, 1 / 48000)
    assert abs(freqs[np.argmax(spectrum)] - 1000.0) < 2.0
    assert spectrum[freqs > 8500].max() < spectrum.max() * 1e-3  # nothing above the source's Nyquist


def test_stereo_is_mixed_to_mono(tmp_path):
    import soundfile

    left, right = _tone(500.0, 1.0, 48000), _tone(2000.0, 1.0, 48000)
    path = tmp_path / "stereo.wav"
    soundfile.write(path, np.stack([left, right], axis=1), 48000)
    samples = decode_audio(path, 48000)
    np.testing.assert_allclose(samples, (left + right) / 2, atol=2e-3)


def test_log_mel_matches_librosa(config):
    import librosa

    rng = np.random.default_rng(0)
    samples = (rng.standard_normal(48000 * 2) * 0.1).astype(np.float32)
    ours = LogMel.from_config(config.audio)(torch.from_numpy(samples)[None])[0].numpy()
    audio = config.audio
    power = librosa.feature.melspectrogram(
        y=samples, sr=audio.sample_rate, n_fft=audio.stft_window_size, hop_length=audio.hop_size,
        n_mels=audio.mel_frequency_bins, fmin=audio.minimum_frequency, fmax=audio.maximum_frequency,
        center=True, pad_mode="constant", power=2.0, htk=False, norm="slaney",
    )
    reference = 10 * np.log10(np.maximum(power, 1e-10))
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, atol=0.02)  # dB


def test_shards_read_back_exactly_what_was_written(tmp_path):
    rng = np.random.default_rng(1)
    spectrograms = [rng.normal(-40, 20, (16, n)).astype(np.float32) for n in (5, 40, 1, 17, 33)]
    writer = SpectrogramShardWriter(tmp_path / "part.parquet", ["y"], "day", {"feature_hash": "abc"}, row_group_rows=2)
    for i, spectrogram in enumerate(spectrograms):
        writer.add({"id": f"r{i}", "y": i / 10, "group": f"g{i % 2}", "duration_s": 1.0}, spectrogram)
    info = writer.close()
    assert info.rows == 5
    file = pq.ParquetFile(info.path)
    assert file.metadata.num_row_groups == 3
    assert file.metadata.row_group(0).column(file.schema_arrow.get_field_index("spectrogram")).compression == "UNCOMPRESSED"
    meta = read_shard_metadata(info.path)
    assert meta["feature_hash"] == "abc" and meta["schema_version"] == 1 and meta["label_columns"] == ["y"]
    reader = SpectrogramShardReader([info.path])
    for i in (3, 0, 4, 1, 2):  # random access
        spectrogram, row = reader[i]
        np.testing.assert_array_equal(spectrogram, spectrograms[i].astype(np.float16))
        assert row["id"] == f"r{i}" and row["y"] == pytest.approx(i / 10) and row["group"] == f"g{i % 2}"
    streamed = list(reader.stream())
    assert [row["id"] for _, row in streamed] == [f"r{i}" for i in range(5)]
    for (spectrogram, _), original in zip(streamed, spectrograms):
        np.testing.assert_array_equal(spectrogram, original.astype(np.float16))


def test_features_of_an_ingested_data_set(coughvid_zip, config, tmp_path):
    ingest(str(coughvid_zip), tmp_path / "ingest", config)
    result = extract_features(tmp_path / "ingest", tmp_path / "features", config, workers=2)
    manifest, _ = read_manifest(tmp_path / "ingest")
    assert result.rows == 24 and not result.failures
    assert len(result.shards) == 3  # features.shard_rows = 8
    reader = SpectrogramShardReader(shard_paths(tmp_path / "features"))
    assert sorted(reader.index["id"]) == sorted(manifest["id"])
    params = {**feature_parameters(config.audio), "max_seconds": 600.0}
    by_id = manifest.set_index("id")
    for row in (0, 11, 23):
        spectrogram, meta = reader[row]
        expected = log_mel_of_file(tmp_path / "ingest" / by_id.loc[meta["id"], "audio_path"], params)
        np.testing.assert_allclose(spectrogram.astype(np.float32), expected, atol=0.06)  # float16 rounding
        assert meta["cough_detected"] == by_id.loc[meta["id"], "cough_detected"]
        assert meta["group"] == by_id.loc[meta["id"], "datetime"]
        assert spectrogram.shape == (128, meta["n_frames"])
    index = json.loads((tmp_path / "features" / SHARD_INDEX).read_text())
    assert index["feature_parameters"]["mel_frequency_bins"] == 128 and index["rows"] == 24
    assert (tmp_path / "features" / "config.yaml").exists()


def test_a_rerun_skips_complete_shards_and_new_parameters_make_new_shards(coughvid_zip, config, tmp_path):
    ingest(str(coughvid_zip), tmp_path / "ingest", config)
    first = extract_features(tmp_path / "ingest", tmp_path / "features", config, workers=1)
    stamps = {p: os.stat(p).st_mtime_ns for p in first.shards}
    first.shards[1].unlink()  # as if killed before this shard was renamed into place
    again = extract_features(tmp_path / "ingest", tmp_path / "features", config, workers=1)
    assert again.skipped_shards == 2 and again.shards == first.shards
    assert all(os.stat(p).st_mtime_ns == stamps[p] for p in (first.shards[0], first.shards[2]))
    changed = load_resolved_config(HT_YAML, ["environment.seed=1", "features.shard_rows=8", "audio.mel_frequency_bins=64"])
    other = extract_features(tmp_path / "ingest", tmp_path / "features", changed, workers=1)
    assert other.skipped_shards == 0
    assert other.shards[0].parent != first.shards[0].parent  # never a mix of parameters
    assert SpectrogramShardReader(shard_paths(tmp_path / "features"))[0][0].shape[0] == 64
    assert not list((tmp_path / "features").rglob("*.partial"))


def test_a_corrupt_recording_is_reported_and_skipped(coughvid_zip, config, tmp_path):
    ingest(str(coughvid_zip), tmp_path / "ingest", config)
    manifest, _ = read_manifest(tmp_path / "ingest")
    victim = manifest.iloc[3]
    path = tmp_path / "ingest" / victim["audio_path"]
    path.write_bytes(path.read_bytes()[:60])  # the header survives, the audio does not
    result = extract_features(tmp_path / "ingest", tmp_path / "features", config, workers=1)
    assert [f["id"] for f in result.failures] == [victim["id"]]
    assert victim["audio_path"] in result.failures[0]["reason"]
    assert result.rows == 23
    report = json.loads((tmp_path / "features" / "features_report.json").read_text())
    assert report["failures"][0]["id"] == victim["id"]


def test_the_real_recordings_decode_and_featurize(config):
    params = {**feature_parameters(config.audio), "max_seconds": 600.0}
    paths = sorted(REAL_COUGHS.glob("*.mp3"))
    assert len(paths) == 10
    for path in paths:
        samples = decode_audio(path, 48000)
        log_mel = log_mel_of_file(path, params)
        assert log_mel.shape == (128, samples.size // 512 + 1)
        assert np.isfinite(log_mel).all()
        assert log_mel.max() - np.median(log_mel) > 20  # a cough stands out of its background
    real = log_mel_of_file(REAL_COUGHS / "coughvid_00039425-7f3a-42aa-ac13-834aaa2b6b92.mp3", params)
    assert 900 <= real.shape[1] <= 925  # 9.8 s at hop 512


def test_features_without_an_ingest_fail_clearly(config, tmp_path):
    with pytest.raises(CoughPipelineError, match="no manifest; run the ingest step"):
        extract_features(tmp_path / "nothing", tmp_path / "features", config)


def test_parts_and_collect_give_the_same_shards_as_one_run(coughvid_zip, config, tmp_path):
    from coughreg.features.extract import collect_feature_parts, extract_feature_part

    ingest(str(coughvid_zip), tmp_path / "ingest", config)
    whole = extract_features(tmp_path / "ingest", tmp_path / "whole", config, workers=1)
    parts = []
    for part in range(2):
        extract_feature_part(tmp_path / "ingest", tmp_path / f"part{part}", config, part, 2, workers=1)
        parts.append(tmp_path / f"part{part}")
    collected = collect_feature_parts(tmp_path / "ingest", parts, tmp_path / "collected", config)
    assert collected.rows == whole.rows == 24
    first = SpectrogramShardReader(shard_paths(tmp_path / "whole"))
    second = SpectrogramShardReader(shard_paths(tmp_path / "collected"))
    assert list(first.index["id"]) == list(second.index["id"])
    for row in range(len(first)):
        np.testing.assert_array_equal(first.spectrogram(row), second.spectrogram(row))
    with pytest.raises(CoughPipelineError, match="do not cover the plan"):
        collect_feature_parts(tmp_path / "ingest", parts[:1], tmp_path / "incomplete", config)


def test_a_killed_run_leaves_no_shard_that_reads_as_complete(coughvid_zip, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import PROJECT

    settings = ["--set", "environment.seed=1", "--set", "features.shard_rows=2", "--set", "features.workers=1"]
    done = subprocess.run([sys.executable, "pipeline.py", "step", "ingest", "--input", str(coughvid_zip), "--out",
                           str(tmp_path / "ingest"), *settings], cwd=PROJECT, capture_output=True, timeout=300)
    assert done.returncode == 0
    command = [sys.executable, "pipeline.py", "step", "features", "--input", str(tmp_path / "ingest"), "--out",
               str(tmp_path / "features"), *settings]
    process = subprocess.Popen(command, cwd=PROJECT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((tmp_path / "features").rglob("part-*.parquet"))) < 3:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the parent and its workers, mid-run
    process.wait()
    written = list((tmp_path / "features").rglob("part-*.parquet"))
    assert 3 <= len(written) < 12
    assert not (tmp_path / "features" / SHARD_INDEX).exists()  # the index is what says "done"
    for path in written:
        assert read_shard_metadata(path)["feature_hash"]  # every file under a shard's name is whole
        assert pq.ParquetFile(path).metadata.num_rows == 2
    done = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "already complete, skipped" in done.stderr
    assert len(SpectrogramShardReader(shard_paths(tmp_path / "features"))) == 24


def test_recording_chain_copies_are_stored_beside_the_shards_and_made_the_same_every_time(coughvid_zip, config, tmp_path):
    from coughreg.artifacts import view_shard_paths
    from coughreg.audio.recording_chain import Gain, Transient, draw_chain
    from coughreg.features.extract import collect_feature_parts, extract_feature_part, view_rng

    with_views = config.model_copy(update={"augmentation": config.augmentation.model_copy(update={"recording_chain_views": 2})})
    ingest(str(coughvid_zip), tmp_path / "ingest", with_views)
    plain = extract_features(tmp_path / "ingest", tmp_path / "plain", config, workers=1)
    made = extract_features(tmp_path / "ingest", tmp_path / "views", with_views, workers=2)
    assert made.rows == plain.rows == 24
    index = json.loads((tmp_path / "views" / SHARD_INDEX).read_text())
    assert index["views"] == 2 and index["shard_set"] == json.loads((tmp_path / "plain" / SHARD_INDEX).read_text())["shard_set"]
    originals = SpectrogramShardReader(shard_paths(tmp_path / "views"))
    copies = SpectrogramShardReader(view_shard_paths(tmp_path / "views"))
    assert view_shard_paths(tmp_path / "plain") == []
    assert sorted(copies.index["id"]) == sorted(list(originals.index["id"]) * 2)  # two copies of every recording
    by_id = {identifier: row for row, identifier in enumerate(originals.index["id"])}
    seen: dict[str, int] = {}
    for row, identifier in enumerate(copies.index["id"]):
        view = seen[identifier] = seen.get(identifier, -1) + 1
        chain = draw_chain(view_rng(identifier, view))  # the chain this copy went through
        copy = copies.spectrogram(row).astype(np.float32)
        original = originals.spectrogram(by_id[identifier]).astype(np.float32)
        assert copy.shape[0] == original.shape[0] and abs(copy.shape[1] - original.shape[1]) <= 1
        frames = min(copy.shape[1], original.shape[1])
        sounding = original[:, :frames] > -99.0
        if not sounding.any():  # a clip the generator's noise gate silenced whole: only a knock can sound in it
            assert (copy <= -99.0).all() or any(isinstance(stage, Transient) for stage in chain.stages)
            continue
        shift = np.median(copy[:, :frames][sounding] - original[:, :frames][sounding])
        gain = next(stage.db for stage in chain.stages if isinstance(stage, Gain))
        if len(chain.stages) == 1:  # a gain alone moves every sounding cell by its decibels
            assert shift == pytest.approx(gain, abs=0.1), chain.name
        else:
            assert not np.allclose(copy[:, :frames], original[:, :frames], atol=0.5), chain.name
    for row in range(len(originals)):  # the recordings as recorded are the same shards as without copies
        np.testing.assert_array_equal(originals.spectrogram(row),
                                      SpectrogramShardReader(shard_paths(tmp_path / "plain")).spectrogram(row))
    parts = []
    for part in range(2):
        extract_feature_part(tmp_path / "ingest", tmp_path / f"part{part}", with_views, part, 2, workers=1)
        parts.append(tmp_path / f"part{part}")
    collect_feature_parts(tmp_path / "ingest", parts, tmp_path / "collected", with_views)
    again = SpectrogramShardReader(view_shard_paths(tmp_path / "collected"))
    assert list(again.index["id"]) == list(copies.index["id"])
    for row in range(len(copies)):  # drawn from the recording's id: the same copies in any process, any part
        np.testing.assert_array_equal(again.spectrogram(row), copies.spectrogram(row))


def test_recordings_whose_copies_failed_are_reported_tried_again_and_too_many_fail_the_step(
        coughvid_zip, config, tmp_path, caplog):
    import pyarrow as pa

    from coughreg.artifacts import FEATURES_REPORT
    from coughreg.artifacts.shards import METADATA_KEY
    from coughreg.features.extract import collect_feature_parts, extract_feature_part

    with_views = config.model_copy(update={"augmentation": config.augmentation.model_copy(update={"recording_chain_views": 1})})
    ingest(str(coughvid_zip), tmp_path / "ingest", with_views)
    parts = [tmp_path / "part0", tmp_path / "part1"]
    for number, part in enumerate(parts):
        extract_feature_part(tmp_path / "ingest", part, with_views, number, 2, workers=1)
    collect_feature_parts(tmp_path / "ingest", parts, tmp_path / "features", with_views)
    assert json.loads((tmp_path / "features" / FEATURES_REPORT).read_text())["copy_failures"] == []

    def fail_copies(path, count):  # as a worker writes a shard whose chain failed on `count` recordings
        table = pq.read_table(path)
        metadata = read_shard_metadata(path)
        gone = list(dict.fromkeys(table.column("id").to_pylist()))[:count]
        metadata["copy_failures"] = [{"id": i, "audio_path": f"audio/{i}.webm", "reason": "copy 0 (Opus 12 kbit/s): no encoder"}
                         for i in gone]
        kept = table.filter(pa.compute.invert(pa.compute.is_in(table.column("id"), pa.array(gone))))
        pq.write_table(kept.replace_schema_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()}), path)
        return gone

    def copies_of(part):
        return sorted(part.glob("views/*/part-*.parquet"))

    first = copies_of(parts[0])[0]
    gone = fail_copies(first, 1)
    with caplog.at_level("WARNING"):
        collect_feature_parts(tmp_path / "ingest", parts, tmp_path / "features", with_views)
    assert [f["id"] for f in json.loads((tmp_path / "features" / FEATURES_REPORT).read_text())["copy_failures"]] == gone
    assert f"no recording-chain copies of {gone[0]}" in caplog.text and "no encoder" in caplog.text
    for path in copies_of(parts[0]) + copies_of(parts[1]):  # every copy failed: training would lose them all
        fail_copies(path, 1000)
    with pytest.raises(CoughPipelineError, match=r"copies failed for \d+ of \d+ recordings.*no encoder"):
        collect_feature_parts(tmp_path / "ingest", parts, tmp_path / "features", with_views)
    extract_feature_part(tmp_path / "ingest", parts[0], with_views, 0, 2, workers=1)  # a rerun tries the copies again
    assert gone[0] in pq.read_table(first).column("id").to_pylist() and read_shard_metadata(first)["copy_failures"] == []
    metadata = read_shard_metadata(first)  # a copies shard that does not list its failures (an older one) ...
    del metadata["copy_failures"]
    pq.write_table(pq.read_table(first).replace_schema_metadata({METADATA_KEY: json.dumps(metadata).encode()}), first)
    extract_feature_part(tmp_path / "ingest", parts[0], with_views, 0, 2, workers=1)
    assert read_shard_metadata(first)["copy_failures"] == []  # ... is made again, not trusted
