"""Evaluation (metrics beside baselines, the report) and export (a raw-audio scorer that agrees)."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

from coughreg.artifacts import read_manifest, shard_paths
from coughreg.evaluate import evaluate
from coughreg.export import export
from coughreg.features import log_mel_of_file
from coughreg.frontend import feature_parameters
from coughreg.metrics import constant_baselines, regression_metrics
from coughreg.score import chunk_bounds, load_scorer
from coughreg.shards import SpectrogramShardReader
from coughreg.training import load_members
from tests.conftest import REAL_COUGHS


def test_regression_metrics_by_hand():
    truth = np.array([0.0, 0.5, 1.0, 1.0])
    prediction = np.array([0.1, 0.5, 0.7, 1.0])
    metrics = regression_metrics(truth, prediction)
    assert metrics["mae"] == pytest.approx(0.1)
    assert metrics["rmse"] == pytest.approx(np.sqrt((0.01 + 0.09) / 4))
    assert metrics["r2"] == pytest.approx(1 - (0.1 / 4) / np.var(truth))
    baselines = constant_baselines(np.array([0.2, 0.4, 0.9]), truth)
    assert baselines["median"]["mae"] == pytest.approx(np.mean(np.abs(truth - 0.4)))
    assert baselines["mean"]["mae"] == pytest.approx(np.mean(np.abs(truth - 0.5)))


@pytest.fixture(scope="module")
def evaluated(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluation")
    return evaluate(tiny_run["model"], tiny_run["features"], out, tiny_run["config"])


def test_evaluation_metrics_match_the_predictions(evaluated, tiny_run):
    predictions = pd.read_parquet(tiny_run["model"] / "predictions.parquet")
    metrics = json.loads(evaluated.metrics_path.read_text())
    assert metrics["validation_rows"] == len(predictions)
    expected = np.mean(np.abs(predictions["cough_detected"] - predictions["pred_cough_detected"]))
    assert metrics["validation_mae"] == pytest.approx(expected)
    assert metrics["metric"] == "MAE" and metrics["metric_value"] == metrics["validation_mae"]
    info = json.loads((tiny_run["model"] / "model.json").read_text())
    median = info["members"][0]["train_label_median"][0]
    assert metrics["baseline_median_mae"] == pytest.approx(np.mean(np.abs(predictions["cough_detected"] - median)))


def test_the_report_shows_pictures(evaluated):
    page = evaluated.report_path.read_text()
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', page)
    assert {"predicted vs true and residuals", "training curves", "spectrograms"} <= set(images)
    assert "predict the training median" in page and "occlusion" in page.lower()


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    return export(tiny_run["model"], tmp_path_factory.mktemp("export") / "scorer", tiny_run["config"])


def test_the_scorer_agrees_with_the_model_on_the_shards(exported, tiny_run):
    """Raw audio through the scorer = the trained model on the features step's spectrogram."""
    scorer = load_scorer(exported.scorer_dir, device="cpu")
    regressors = load_members(tiny_run["model"])
    reader = SpectrogramShardReader(shard_paths(tiny_run["features"]))
    manifest, _ = read_manifest(tiny_run["ingest"])
    paths = manifest.set_index("id")["audio_path"]
    for row in range(0, len(reader), 7):
        spectrogram, meta = reader[row]
        with torch.inference_mode():
            expected = float(regressors[0](torch.from_numpy(spectrogram.astype(np.float32))[None])[0, 0])
        scored = scorer.score_file(tiny_run["ingest"] / paths[meta["id"]])["cough_detected"]
        assert scored == pytest.approx(expected, abs=0.02)  # float16 shards vs float32 on the fly


def test_the_front_end_is_the_features_front_end(exported, tiny_run):
    scorer = load_scorer(exported.scorer_dir, device="cpu")
    path = sorted(REAL_COUGHS.glob("*.mp3"))[0]
    from coughreg.audio import decode_audio

    samples = decode_audio(path, 48000)
    params = {**feature_parameters(tiny_run["config"].audio), "max_seconds": 600.0}
    with torch.inference_mode():
        inside = scorer.model.frontend(torch.from_numpy(samples)[None])[0].numpy()
    np.testing.assert_array_equal(inside, log_mel_of_file(path, params))


def test_the_exported_folder(exported, tiny_run):
    folder = exported.scorer_dir
    for name in ("scorer.safetensors", "scorer.json", "config.yaml", "provenance.json", "README.md"):
        assert (folder / name).exists(), name
    info = json.loads((folder / "scorer.json").read_text())
    assert info["label_columns"] == ["cough_detected"] and info["sample_rate"] == 48000
    provenance = json.loads((folder / "provenance.json").read_text())
    weights = tiny_run["model"] / "fold0_seed0" / "model.safetensors"
    assert provenance["model"]["weights_sha256"]["fold0_seed0/model.safetensors"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert provenance["package"]["name"] == "coughreg" and provenance["model"]["seed"] == 1234


def test_the_torch_export_program_needs_only_torch(exported):
    assert exported.program_path is not None
    program = torch.export.load(str(exported.program_path)).module()
    scorer = load_scorer(exported.scorer_dir, device="cpu")
    waveform = torch.randn(2, 48000 * 4) * 0.05
    with torch.inference_mode():
        torch.testing.assert_close(program(waveform), scorer.model(waveform), atol=1e-4, rtol=1e-4)


def test_the_real_recordings_score_within_the_label_range(exported):
    scorer = load_scorer(exported.scorer_dir, device="cpu")
    table = scorer.score_files(sorted(REAL_COUGHS.glob("*.mp3")))
    assert len(table) == 10 and (table["status"] == "ok").all()
    assert np.isfinite(table["cough_detected"]).all() and table["cough_detected"].between(0, 1).all()


def test_long_audio_is_scored_in_chunks(exported):
    scorer = load_scorer(exported.scorer_dir, device="cpu")
    rate = 48000
    rng = np.random.default_rng(0)
    samples = (rng.standard_normal(rate * 150) * 0.05).astype(np.float32)  # 150 s: 60 + 60 + 30
    assert chunk_bounds(samples.size, rate, 60, 600) == [(0, 60 * rate), (60 * rate, 120 * rate), (120 * rate, 150 * rate)]
    parts = [scorer.score_waveform(samples[a:b]) for a, b in chunk_bounds(samples.size, rate, 60, 600)]
    expected = (parts[0] * 60 + parts[1] * 60 + parts[2] * 30) / 150
    np.testing.assert_allclose(scorer.score_waveform(samples), expected, atol=1e-6)
    assert chunk_bounds(rate * 61, rate, 60, 600) == [(0, 61 * rate)]  # a 1 s tail joins the chunk before
    assert chunk_bounds(rate * 900, rate, 60, 600)[-1][1] == 600 * rate  # nothing past the maximum


def test_a_bad_file_is_reported_and_the_others_scored(exported, tmp_path):
    scorer = load_scorer(exported.scorer_dir, device="cpu")
    bad = tmp_path / "broken.webm"
    bad.write_bytes(b"\x1aE\xdf\xa3 definitely not audio")
    good = sorted(REAL_COUGHS.glob("*.mp3"))[0]
    table = scorer.score_files([bad, good])
    assert table["status"].tolist() == ["failed", "ok"]
    assert str(bad) in table["reason"].iloc[0]
