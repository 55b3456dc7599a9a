"""Evaluation (validation scored from audio, metrics beside baselines, the gate, the report) and export
(a scorer folder that agrees with the model)."""

from __future__ import annotations

import hashlib
import html
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

from coughreg.artifacts import read_manifest, shard_paths
from coughreg.artifacts.shards import SpectrogramShardReader
from coughreg.audio.frontend import feature_parameters
from coughreg.evaluation.evaluate import evaluate
from coughreg.export.scorer_folder import export
from coughreg.features.extract import log_mel_of_file
from coughreg.model.metrics import constant_baselines, regression_metrics
from coughreg.runtime.errors import CoughPipelineError
from coughreg.scoring.policy import chunk_bounds
from coughreg.scoring.scorer import Scorer
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


def test_evaluation_scores_the_validation_recordings_from_audio(evaluated, tiny_run):
    trained = pd.read_parquet(tiny_run["model"] / "predictions.parquet")
    predictions = pd.read_parquet(evaluated.predictions_path)
    assert predictions["id"].tolist() == trained["id"].tolist() and (predictions["status"] == "ok").all()
    assert (predictions["n_chunks"] == 1).all() and predictions["duration_s"].gt(0).all()
    # whole recordings through the scoring policy, not the training's spectrograms: close, not equal
    assert np.abs(predictions["pred_cough_detected"] - trained["pred_cough_detected"]).max() < 0.05
    metrics = json.loads(evaluated.metrics_path.read_text())
    assert metrics["validation_rows"] == len(predictions) and metrics["validation_unscored"] == 0
    expected = np.mean(np.abs(predictions["cough_detected"] - predictions["pred_cough_detected"]))
    assert metrics["validation_mae"] == pytest.approx(expected)
    assert metrics["metric"] == "MAE" and metrics["metric_value"] == metrics["validation_mae"]
    info = json.loads((tiny_run["model"] / "model.json").read_text())
    median = info["members"][0]["train_label_median"][0]
    assert metrics["baseline_median_mae"] == pytest.approx(np.mean(np.abs(predictions["cough_detected"] - median)))


def test_the_quality_gate_is_in_the_metrics(evaluated):
    metrics = evaluated.metrics
    ratio = metrics["validation_mae"] / metrics["baseline_median_mae"]
    assert metrics["quality_gate"]["mae_vs_median_baseline"] == pytest.approx(ratio)
    assert metrics["quality_gate"]["passed"] == (ratio <= 1.0) and metrics["quality_gate_passed"] == int(ratio <= 1.0)
    assert metrics["quality_gate"]["verdict"] in ("passed", "failed") and "prediction.max_mae_to_median_baseline" in metrics["quality_gate"]["message"]


def test_the_report_shows_pictures_and_the_verdict(evaluated):
    page = evaluated.report_path.read_text()
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', page)
    assert {"errors of cough_detected", "training curves"} <= set(images)
    assert any(alt.startswith("spectrogram of ") for alt in images)
    assert "predict the training median" in page and "occlusion" in page.lower()
    assert "Quality gate" in page and html.escape(evaluated.gate["message"]) in page


def test_the_scorer_agrees_with_the_model_on_the_shards(exported, tiny_run):
    """Raw audio through the scorer = the trained model on the features step's spectrogram."""
    scorer = Scorer(exported.scorer_dir)
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


def test_the_front_end_inside_is_the_features_front_end(exported, tiny_run):
    from coughreg.audio.files import decode_audio

    path = min(REAL_COUGHS.glob("*.mp3"))
    samples = decode_audio(path, 48000)
    params = {**feature_parameters(tiny_run["config"].audio), "max_seconds": 600.0}
    (regressor,) = load_members(tiny_run["model"])
    with torch.inference_mode():
        expected = regressor(torch.from_numpy(log_mel_of_file(path, params))[None]).numpy()
    for program in ("torchscript", "export"):
        np.testing.assert_allclose(Scorer(exported.scorer_dir, program).predict(samples[None]), expected, atol=1e-4)


def test_the_exported_folder(exported, tiny_run):
    folder = exported.scorer_dir
    for name in ("scorer.ts", "scorer.pt2", "scorer.json", "config.yaml", "provenance.json", "README.md", "requirements.txt",
                 "score.py", "coughscore/cli.py", "coughscore/policy.py"):
        assert (folder / name).exists(), name
    info = json.loads((folder / "scorer.json").read_text())
    assert info["format"] == 2 and info["label_columns"] == ["cough_detected"] and info["sample_rate"] == 48000
    assert info["programs"] == {"torchscript": "scorer.ts", "export": "scorer.pt2"} and info["min_seconds"] == 0.35
    for name, digest in info["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    assert {"score.py", "scorer.ts", "scorer.pt2", "coughscore/scorer.py"} <= set(info["files"])
    requirements = (folder / "requirements.txt").read_text()
    assert re.search(r"^torch==\d+\.\d+\.\d+$", requirements, re.MULTILINE) and "\nav==" in requirements and "timm" not in requirements
    provenance = json.loads((folder / "provenance.json").read_text())
    weights = tiny_run["model"] / "fold0_seed0" / "model.safetensors"
    assert provenance["model"]["weights_sha256"]["fold0_seed0/model.safetensors"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert provenance["package"]["name"] == "coughreg" and provenance["model"]["seed"] == 1234
    assert provenance["quality_gate"]["verdict"] in ("passed", "failed")


def test_both_programs_agree_and_need_only_torch(exported):
    program = torch.export.load(str(exported.scorer_dir / "scorer.pt2")).module()
    script = torch.jit.load(str(exported.scorer_dir / "scorer.ts"))
    waveform = torch.randn(2, 48000 * 4) * 0.05
    with torch.inference_mode():
        torch.testing.assert_close(program(waveform), script(waveform), atol=1e-4, rtol=1e-4)


def test_a_damaged_scorer_file_is_refused(exported, tmp_path):
    import shutil

    copy = tmp_path / "scorer"
    shutil.copytree(exported.scorer_dir, copy)
    data = bytearray((copy / "scorer.ts").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "scorer.ts").write_bytes(bytes(data))
    with pytest.raises(CoughPipelineError, match=r"scorer.ts: missing or damaged"):
        Scorer(copy)
    Scorer(copy, "export")  # the other program is intact


def test_an_evaluation_of_another_model_is_refused(tiny_run, evaluated, tmp_path):
    import shutil

    other = tmp_path / "model"
    shutil.copytree(tiny_run["model"], other)
    weights = other / "fold0_seed0" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(CoughPipelineError, match=r"this evaluation is of another model"):
        export(other, evaluated.metrics_path.parent, tmp_path / "scorer", tiny_run["config"])


def test_the_real_recordings_score_within_the_label_range(exported):
    scorer = Scorer(exported.scorer_dir)
    rows = scorer.score_paths([(p.name, p) for p in sorted(REAL_COUGHS.glob("*.mp3"))], workers=2)
    assert len(rows) == 10 and all(row["status"] == "ok" for row in rows)
    assert all(0 <= row["cough_detected"] <= 1 for row in rows)


def test_long_audio_is_scored_in_chunks(exported):
    scorer = Scorer(exported.scorer_dir)
    rate = 48000
    rng = np.random.default_rng(0)
    samples = (rng.standard_normal(rate * 150) * 0.05).astype(np.float32)  # 150 s: 60 + 60 + 30
    assert chunk_bounds(samples.size, rate, 60, 600) == [(0, 60 * rate), (60 * rate, 120 * rate), (120 * rate, 150 * rate)]
    parts = [scorer.predict(samples[a:b][None])[0] for a, b in chunk_bounds(samples.size, rate, 60, 600)]
    expected = (parts[0] * 60 + parts[1] * 60 + parts[2] * 30) / 150
    values, chunks = scorer.score_samples(samples)
    np.testing.assert_allclose(values, expected, atol=1e-6)
    assert chunks == 3
    assert chunk_bounds(rate * 61, rate, 60, 600) == [(0, 61 * rate)]  # a 1 s tail joins the chunk before
    assert chunk_bounds(rate * 900, rate, 60, 600)[-1][1] == 600 * rate  # nothing past the maximum


def test_a_clip_shorter_than_the_network_needs_is_padded_with_silence(exported):
    scorer = Scorer(exported.scorer_dir)
    rate = 48000
    short = (np.random.default_rng(1).standard_normal(int(0.1 * rate)) * 0.1).astype(np.float32)
    padded = np.pad(short, (0, int(0.35 * rate) - short.size))
    values, chunks = scorer.score_samples(short)
    np.testing.assert_allclose(values, scorer.predict(padded[None])[0], atol=1e-6)
    assert chunks == 1


def test_a_bad_file_is_reported_and_the_others_scored(exported, tmp_path):
    scorer = Scorer(exported.scorer_dir)
    bad = tmp_path / "broken.webm"
    bad.write_bytes(b"\x1aE\xdf\xa3 definitely not audio")
    good = min(REAL_COUGHS.glob("*.mp3"))
    rows = scorer.score_paths([(str(bad), bad), (str(good), good)])
    assert [row["status"] for row in rows] == ["failed", "ok"]
    assert str(bad) in rows[0]["reason"] and np.isnan(rows[0]["cough_detected"])


def test_evaluation_measures_how_far_the_recording_chain_moves_each_score(evaluated):
    from coughreg.artifacts import ROBUSTNESS
    from coughreg.audio.recording_chain import STANDARD, slug
    from coughreg.evaluation.robustness import headline

    metrics = json.loads(evaluated.metrics_path.read_text())
    robustness = metrics["robustness"]
    assert list(robustness["transforms"]) == [slug(t) for t in STANDARD]
    predictions = pd.read_parquet(evaluated.predictions_path).set_index("id")
    changes = pd.read_parquet(evaluated.metrics_path.parent / ROBUSTNESS)
    measured = set(changes["id"])
    assert robustness["recordings"] == len(measured) == len(predictions)  # all of them: fewer than robustness_recordings
    assert len(changes) == len(measured) * len(STANDARD)  # one label
    for identifier, rows in changes.groupby("id"):  # "as recorded" is the prediction the metrics were computed from
        assert rows["original"].to_numpy() == pytest.approx(predictions.at[identifier, "pred_cough_detected"], abs=1e-5)
    for key, entry in robustness["transforms"].items():
        numbers = entry["labels"]["cough_detected"]
        moved = changes[changes["transform"] == key]["change"].abs()
        assert numbers["mean_change"] == pytest.approx(moved.mean()) and numbers["max_change"] == pytest.approx(moved.max())
        assert numbers["most_moved"] in measured
        assert metrics[f"robustness_{key}_cough_detected_mean_change"] == pytest.approx(numbers["mean_change"])
        assert metrics[f"robustness_{key}_cough_detected_max_change"] == pytest.approx(numbers["max_change"])
    line = headline(metrics)  # what the demo prints
    worst = max(robustness["transforms"].values(), key=lambda e: e["labels"]["cough_detected"]["max_change"])
    assert f"largest single change {worst['labels']['cough_detected']['max_change']:.3f} ({worst['name']})" in line
    # the transforms changed what the model heard: at least the codecs and the gate move some score a little
    assert changes[changes["transform"].isin(["opus_16kbps", "noise_gate", "lowpass_4khz"])]["change"].abs().max() > 0


def test_robustness_is_not_measured_when_asked_not_to(tiny_run, tmp_path):
    from coughreg.artifacts import ROBUSTNESS

    config = tiny_run["config"].model_copy(update={"prediction": tiny_run["config"].prediction.model_copy(
        update={"robustness_recordings": 0})})
    result = evaluate(tiny_run["model"], tiny_run["features"], tiny_run["ingest"], tmp_path, config, workers=1)
    assert "robustness" not in result.metrics and not any(k.startswith("robustness_") for k in result.metrics)
    assert not (tmp_path / ROBUSTNESS).exists() and "Robustness to the recording chain" not in result.report_path.read_text()
