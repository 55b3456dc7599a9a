"""The generated COUGHVID-format data: real files, the real schema, the real label distribution."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import zipfile

import numpy as np
import pandas as pd
import pytest
from scipy.stats import ks_2samp

from coughreg.audio.files import decode_audio, probe_audio
from coughreg.audio.recording_chain import CHAIN_VERSION
from coughreg.synth.coughvid import (
    COUGHVID_COLUMNS,
    LABEL_NOISE_SD,
    MAPPING_VERSION,
    generate_coughvid_zip,
    noise_floor,
    posterior_median,
    sample_labels,
    synthesize_clip,
)
from tests.conftest import REAL_METADATA


def _members(archive):
    with zipfile.ZipFile(archive) as handle:
        return {info.filename: handle.read(info) for info in handle.infolist()}


def test_every_generated_recording_is_real_48k_mono_audio(coughvid_zip):
    members = _members(coughvid_zip)
    audio = {name: data for name, data in members.items() if name.endswith((".webm", ".ogg"))}
    assert len(audio) == 24
    assert all(name.startswith("public_dataset/") for name in members)  # nested as in the release
    gated = dict(pd.read_csv(coughvid_zip.with_suffix(".truth.csv"))[["uuid", "gated"]].itertuples(index=False))
    kinds = set()
    for name, data in audio.items():
        info = probe_audio(data)
        samples = decode_audio(data, 48000)
        assert info.sample_rate == 48000 and info.channels == 1
        assert 1.0 - 0.05 <= info.duration_s <= 10.05
        assert abs(samples.size / 48000 - info.duration_s) < 0.05
        assert np.isfinite(samples).all() and np.abs(samples).max() <= 1.0
        # sound, unless the browser's gate found nothing above the room and silenced the whole clip
        assert np.abs(samples).max() > 0.01 or gated[name.rsplit("/", 1)[-1].split(".")[0]]
        kinds.add((info.container, info.codec))
        uid = name.split("/")[-1].rsplit(".", 1)[0]
        sidecar = json.loads(members[f"public_dataset/{uid}.json"])
        assert "cough_detected" in sidecar and "datetime" in sidecar
    assert ("matroska", "opus") in kinds and (("ogg", "opus") in kinds or ("ogg", "vorbis") in kinds)


def test_metadata_has_the_real_schema_and_many_days(coughvid_zip):
    table = _members(coughvid_zip)["public_dataset/metadata_compiled.csv"].decode()
    with open(REAL_METADATA, newline="") as handle:
        real_columns = next(csv.reader(handle))
    generated = pd.read_csv(io.StringIO(table), dtype=str, keep_default_na=False)
    assert list(generated.columns) == real_columns == COUGHVID_COLUMNS
    assert generated["uuid"].is_unique and len(generated) == 24
    days = pd.to_datetime(generated["datetime"], format="ISO8601").dt.date
    assert days.nunique() >= 8
    assert generated["cough_detected"].astype(float).between(0, 1).all()


def test_labels_follow_the_real_distribution():
    real = pd.read_csv(REAL_METADATA)["cough_detected"].to_numpy()
    generated = sample_labels(np.random.default_rng(3), 20_000)
    assert ks_2samp(generated, real).statistic < 0.02
    assert np.median(generated) == pytest.approx(np.median(real), abs=0.01)
    assert np.quantile(generated, 0.25) == pytest.approx(np.quantile(real, 0.25), abs=0.02)


def test_the_same_seed_gives_the_same_bytes_and_another_seed_does_not(coughvid_zip, tmp_path):
    again = generate_coughvid_zip(tmp_path / "again.zip", 24, seed=7, workers=1)
    assert hashlib.sha256((tmp_path / "again.zip").read_bytes()).digest() == hashlib.sha256(coughvid_zip.read_bytes()).digest()
    generate_coughvid_zip(tmp_path / "other.zip", 24, seed=8, workers=1)
    assert (tmp_path / "other.zip").read_bytes() != coughvid_zip.read_bytes()
    assert again["recordings"] == 24


def test_cough_events_are_explosive_broadband_and_short():
    from coughreg.synth.coughvid import SAMPLE_RATE, cough_event

    rng = np.random.default_rng(4)
    for _ in range(20):
        event = cough_event(rng)
        assert 0.13 <= len(event) / SAMPLE_RATE <= 0.55
        envelope = np.abs(event)
        assert np.argmax(envelope) < 0.015 * SAMPLE_RATE  # the explosive phase comes first
        spectrum = np.abs(np.fft.rfft(event[: int(0.05 * SAMPLE_RATE)])) ** 2
        freqs = np.fft.rfftfreq(int(0.05 * SAMPLE_RATE), 1 / SAMPLE_RATE)
        low, high = spectrum[(freqs > 200) & (freqs < 2000)].mean(), spectrum[(freqs > 3000) & (freqs < 6000)].mean()
        assert high > low * 10 ** (-25 / 10)  # broadband: the burst reaches well above speech formants


def test_the_label_sets_how_far_coughs_stand_above_the_background():
    from coughreg.synth.coughvid import synthesize_clip

    for evidence in (0.0, 0.5, 1.0):
        _, info = synthesize_clip(0.5, evidence, np.random.default_rng(9))
        assert info["snr_db"] == pytest.approx(-25 + 55 * evidence)


def test_a_clip_made_again_is_the_same_clip_with_its_coughs_apart(coughvid_zip):
    from coughreg.synth.coughvid import regenerate_clip, synthesize_clip

    truth = pd.read_csv(coughvid_zip.with_suffix(".truth.csv"))
    for index in range(8):  # three clear coughs among them, one gated
        uuid, samples, info = regenerate_clip(7, index)
        assert uuid == truth.at[index, "uuid"] and info["gated"] == truth.at[index, "gated"]
        assert len(samples) / 48000 == pytest.approx(truth.at[index, "duration_s"], abs=1e-3)
        coughs = info["coughs"]
        assert coughs.shape == samples.shape and np.any(coughs != 0)
        loud = np.abs(coughs) > 0.5 * np.abs(coughs).max()  # where a cough is loudest, it is in the clip
        if truth.at[index, "evidence"] > 0.8:
            assert np.corrcoef(coughs[loud], samples[loud])[0, 1] > 0.9
    alone, _ = synthesize_clip(0.5, 0.7, np.random.default_rng(3))
    with_coughs, _ = synthesize_clip(0.5, 0.7, np.random.default_rng(3), with_coughs=True)
    np.testing.assert_array_equal(alone, with_coughs)  # asking for the coughs changes nothing in the clip


def test_non_cough_sounds_and_gated_silence_appear_at_every_label(tmp_path):
    generate_coughvid_zip(tmp_path / "mix.zip", 80, seed=12, workers=2)
    truth = pd.read_csv(tmp_path / "mix.truth.csv")
    high = truth[truth["cough_detected"] > 0.8]
    assert (high["distractor"] != "none").any()  # sharp or loud non-cough sounds are no shortcut
    kinds = {k for value in truth["distractor"] for k in value.split("+")}
    assert {"speech", "breathing", "knocks", "beeps"} & kinds and len(kinds - {"none"}) >= 3
    assert 0.1 < truth["gated"].mean() < 0.45


def test_the_noise_floor_is_the_bayes_error_of_the_label_noise():
    floor = noise_floor()
    assert 0.03 < floor < 0.08
    rng = np.random.default_rng(11)
    labels = sample_labels(rng, 50_000)
    evidence = np.clip(labels + rng.normal(0, LABEL_NOISE_SD, labels.size), 0, 1)
    best = np.mean(np.abs(labels - posterior_median(evidence)))
    assert best == pytest.approx(floor, abs=0.003)
    # No other simple predictor from the same evidence does better than the posterior median.
    assert np.mean(np.abs(labels - evidence)) > best
    assert np.mean(np.abs(labels - np.median(labels))) > 4 * best
    assert np.all(np.diff(posterior_median(np.linspace(0, 1, 101))) >= 0)


def test_the_generator_reports_its_floor(coughvid_zip):
    report = json.loads(coughvid_zip.with_suffix(".generator.json").read_text())
    assert report["noise_floor_mae_expected"] == pytest.approx(noise_floor(), abs=1e-4)
    assert report["noise_floor_mae_realized"] < report["median_baseline_mae_realized"]
    assert report["mapping_version"] == MAPPING_VERSION == 3 and report["recordings"] == 24
    assert report["nuisances_independent_of_label"] and report["recording_chain_version"] == CHAIN_VERSION


def test_every_nuisance_is_drawn_at_the_same_odds_at_every_label():
    # the law (mapping version 3): only the coughs' level depends on the label; a phone's odds do not
    rates = {}
    for label in (0.02, 0.98):
        rng = np.random.default_rng(11)
        infos = [synthesize_clip(label, label, rng)[1] for _ in range(80)]
        rates[label] = {
            "distractor": np.mean([i["distractor"] != "none" for i in infos]),
            "gated": np.mean([i["gated"] for i in infos]),
            "band-limited": np.mean([i["band_limit_hz"] > 0 for i in infos]),
        }
    for nuisance, expected in (("distractor", 0.6 + 0.4 * 0.3), ("gated", 0.25), ("band-limited", 0.25)):
        for label in rates:
            assert abs(rates[label][nuisance] - expected) < 0.16, (nuisance, label, rates)
