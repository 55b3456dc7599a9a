"""Step 4, evaluation: validation predictions -> metrics beside baselines, and an HTML report.

The model is compared with predicting the training labels' mean and median (per fold, from the
rows that fold trained on). The report shows predicted vs true, residuals, training curves and,
for ``logging.number_of_audios`` recordings, the spectrogram with what the model listened to
(occlusion: how much the prediction moves when a slice of time is replaced by silence).
"""

from __future__ import annotations

import html
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from coughreg import artifacts, report
from coughreg.config import ExperimentConfig, save_config
from coughreg.metrics import metric_value, regression_metrics
from coughreg.shards import SpectrogramShardReader
from coughreg.step_config import chain_keys, with_upstream
from coughreg.storage import atomic_write_text
from coughreg.training import load_members

log = logging.getLogger(__name__)


@dataclass
class EvaluationResult:
    metrics: dict
    metrics_path: Path
    report_path: Path


def _baseline_predictions(predictions: pd.DataFrame, info: dict, labels: list[str]) -> dict[str, np.ndarray]:
    by_fold = {}
    for member in info["members"]:  # every seed of a fold saw the same rows
        by_fold.setdefault(member["fold"], member)
    out = {}
    for kind in ("mean", "median"):
        values = np.stack([np.asarray(by_fold[f][f"train_label_{kind}"], dtype=float) for f in predictions["fold"]])
        out[kind] = values.reshape(len(predictions), len(labels))
    return out


def compute_metrics(predictions: pd.DataFrame, info: dict, config: ExperimentConfig) -> dict:
    labels = info["label_columns"]
    truth = predictions[labels].to_numpy(dtype=float)
    predicted = predictions[[f"pred_{label}" for label in labels]].to_numpy(dtype=float)
    model = regression_metrics(truth, predicted)
    baselines = {kind: regression_metrics(truth, values) for kind, values in _baseline_predictions(predictions, info, labels).items()}
    metrics = {
        "validation_rows": int(len(predictions)),
        "metric": config.prediction.metric,
        "metric_value": metric_value(model, config.prediction.metric),
        **{f"validation_{k}": v for k, v in model.items()},
        **{f"baseline_{kind}_{k}": v for kind, values in baselines.items() for k, v in values.items()},
        "mae_vs_median_baseline": model["mae"] / baselines["median"]["mae"] if baselines["median"]["mae"] > 0 else float("nan"),
        "folds": sorted(int(f) for f in predictions["fold"].unique()),
        "validation_scheme": info.get("validation_scheme", ""),
    }
    if len(labels) > 1:
        metrics["per_label"] = {
            label: regression_metrics(truth[:, k], predicted[:, k]) for k, label in enumerate(labels)
        }
    return metrics


def _occlusion(regressors, spectrogram: np.ndarray, segments: int = 24) -> tuple[np.ndarray, float]:
    """Prediction drop when each slice of time is replaced by the clip's background: (segments,), prediction.

    The fill is each mel band's median over the clip (its steady background), not digital silence:
    a hole of silence would itself create sharp edges that look like sound events.
    """
    frames = spectrogram.shape[1]
    edges = np.linspace(0, frames, min(segments, frames) + 1).astype(int)
    background = np.median(spectrogram, axis=1, keepdims=True).astype(np.float32)  # (mels, 1)
    batch = np.repeat(spectrogram[None].astype(np.float32), len(edges), axis=0)  # row 0: the clip as is
    for k in range(len(edges) - 1):
        batch[k + 1, :, edges[k] : edges[k + 1]] = background
    with torch.inference_mode():
        x = torch.from_numpy(batch)
        predictions = torch.stack([r(x) for r in regressors]).mean(dim=0)[:, 0].numpy()
    return predictions[0] - predictions[1:], float(predictions[0])


def build_report(predictions, metrics, history, info, config, features_dir, model_dir) -> str:
    import matplotlib.pyplot as plt

    report.matplotlib_agg()
    labels = info["label_columns"]
    first = labels[0]
    truth = predictions[first].to_numpy(float)
    predicted = predictions[f"pred_{first}"].to_numpy(float)
    residual = predicted - truth
    sections = []

    rows = [
        ("model", metrics["validation_mae"], metrics["validation_rmse"], metrics["validation_r2"]),
        ("predict the training mean", metrics["baseline_mean_mae"], metrics["baseline_mean_rmse"], metrics["baseline_mean_r2"]),
        ("predict the training median", metrics["baseline_median_mae"], metrics["baseline_median_rmse"], metrics["baseline_median_r2"]),
    ]
    summary = report.table(rows, ["", "MAE", "RMSE", "R²"])
    summary += (
        f"<p class='note'>{metrics['validation_rows']} validation recordings; {html.escape(metrics['validation_scheme'])}; "
        f"folds {metrics['folds']}; backbone {html.escape(info['backbone'])}; seed {info['seed']}; "
        f"ranking metric {metrics['metric']} = {metrics['metric_value']:.4f}.</p>"
    )
    sections.append(("Validation metrics", summary))

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    low, high = info["label_range"]
    axes[0].scatter(truth, predicted, s=10, alpha=0.6)
    axes[0].plot([low, high], [low, high], color="k", lw=1)
    axes[0].set(xlabel=f"true {first}", ylabel=f"predicted {first}", title="Predicted vs true", xlim=(low, high), ylim=(low, high))
    axes[1].hist(residual, bins=40, color="tab:orange")
    axes[1].set(xlabel="prediction - truth", ylabel="recordings", title="Residuals")
    axes[2].scatter(truth, residual, s=10, alpha=0.6, color="tab:green")
    axes[2].axhline(0, color="k", lw=1)
    axes[2].set(xlabel=f"true {first}", ylabel="prediction - truth", title="Residual vs true")
    sections.append(("Predictions", report.figure_to_img(figure, "predicted vs true and residuals")))

    if history:
        figure = report.training_curves(history, config.training.loss_function, metrics["baseline_median_mae"])
        sections.append(("Training curves", report.figure_to_img(figure, "training curves")))

    count = min(config.logging.number_of_audios, len(predictions))
    if count:
        order = np.argsort(-np.abs(residual))
        chosen = list(dict.fromkeys([*order[: count // 2], *np.linspace(0, len(predictions) - 1, count).astype(int)]))[:count]
        reader = SpectrogramShardReader(artifacts.shard_paths(features_dir))
        row_of = {identifier: row for row, identifier in enumerate(reader.index["id"])}
        regressors = load_members(model_dir) if config.training.run_interpretations else None
        figure, axes = plt.subplots(len(chosen), 1, figsize=(12, 2.6 * len(chosen)), squeeze=False)
        for axis, k in zip(axes[:, 0], chosen):
            identifier = predictions["id"].iloc[k]
            spectrogram = reader.spectrogram(row_of[identifier]).astype(np.float32)
            seconds = spectrogram.shape[1] * info["feature_parameters"]["hop_size"] / info["feature_parameters"]["sample_rate"]
            axis.imshow(spectrogram, origin="lower", aspect="auto", cmap="magma", extent=(0, seconds, 0, spectrogram.shape[0]))
            title = f"{identifier}: true {truth[k]:.3f}, predicted {predicted[k]:.3f}"
            if regressors is not None:
                importance, _ = _occlusion(regressors, spectrogram)
                times = np.linspace(0, seconds, len(importance) + 1)
                twin = axis.twinx()
                twin.step(times[:-1], importance, where="post", color="cyan", lw=1.5)
                twin.axhline(0, color="cyan", lw=0.5, ls=":")
                twin.set_ylabel("Δ prediction", color="cyan")
                title += " (cyan: prediction drop when that time is replaced by background)"
            axis.set(title=title, xlabel="seconds", ylabel="mel band")
        figure.tight_layout()
        note = (
            "<p class='note'>The recordings with the largest errors first, then a spread over the validation set. "
            "Interpretation by occlusion: each slice of time is replaced by the clip's background (each mel band's "
            "median) and the drop of the prediction is drawn; a cough the model relies on shows as a peak.</p>"
        )
        sections.append((f"Recordings ({count}, logging.number_of_audios)", note + report.figure_to_img(figure, "spectrograms")))

    return report.page(f"{config.experiment_name}: evaluation", sections)


def evaluate(model_dir: str | Path, features_dir: str | Path, out_dir: str | Path, config: ExperimentConfig) -> EvaluationResult:
    """Score the validation predictions of a train step and write metrics and the report.

    Args:
        model_dir: the train step's output (``predictions.parquet``, ``model.json``, weights).
        features_dir: the features step's output the model was trained on (spectrograms for the report).
        out_dir: where ``metrics.json`` and ``report.html`` go.
        config: the evaluate step's keys (``logging.number_of_audios``, ``training.run_interpretations``,
            ``experiment_name``); the model is rebuilt from the config saved beside it.
    """
    model_dir, features_dir, out_dir = Path(model_dir), Path(features_dir), Path(out_dir)
    config = with_upstream(config, "evaluate", artifacts.read_config(model_dir, "train"))
    info = artifacts.read_model_info(model_dir)
    artifacts.check_same_shards(info, artifacts.read_shard_index(features_dir), model_dir, features_dir)
    predictions = pd.read_parquet(artifacts.require(model_dir, artifacts.PREDICTIONS, "train"))
    history_path = model_dir / artifacts.HISTORY
    history = json.loads(history_path.read_text()) if history_path.exists() else []
    metrics = compute_metrics(predictions, info, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    report_path = out_dir / artifacts.REPORT
    atomic_write_text(report_path, build_report(predictions, metrics, history, info, config, features_dir, model_dir))
    save_config(config, out_dir, chain_keys("evaluate"))
    metrics_path = out_dir / artifacts.METRICS
    atomic_write_text(metrics_path, json.dumps(metrics, indent=2))  # last: the folder is finished
    log.info(
        "evaluation: validation MAE %.4f (median baseline %.4f, mean baseline %.4f) on %d recordings -> %s",
        metrics["validation_mae"], metrics["baseline_median_mae"], metrics["baseline_mean_mae"], metrics["validation_rows"], report_path,
    )
    return EvaluationResult(metrics, metrics_path, report_path)
