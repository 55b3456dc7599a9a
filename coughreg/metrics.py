"""Regression metrics and baselines, shared by training (per epoch) and evaluation."""

from __future__ import annotations

import numpy as np


def regression_metrics(truth: np.ndarray, prediction: np.ndarray) -> dict[str, float]:
    """MAE, MSE, RMSE and R² averaged over label columns. Arrays are (rows,) or (rows, labels)."""
    truth = np.asarray(truth, dtype=np.float64).reshape(len(truth), -1)
    prediction = np.asarray(prediction, dtype=np.float64).reshape(len(prediction), -1)
    error = prediction - truth
    mse = np.mean(error**2, axis=0)
    variance = np.var(truth, axis=0)
    r2 = np.where(variance > 0, 1.0 - mse / np.where(variance > 0, variance, 1.0), np.nan)
    return {
        "mae": float(np.mean(np.abs(error))),
        "mse": float(np.mean(mse)),
        "rmse": float(np.mean(np.sqrt(mse))),
        "r2": float(np.nanmean(r2)) if np.isfinite(r2).any() else float("nan"),
    }


def metric_value(metrics: dict[str, float], name: str) -> float:
    """The config's ``prediction.metric`` (MAE, MSE, RMSE, R2) from a metrics dict."""
    return metrics[name.lower()]


def constant_baselines(train_labels: np.ndarray, truth: np.ndarray) -> dict[str, dict[str, float]]:
    """Predict-the-training-mean and predict-the-training-median, scored on ``truth``."""
    train_labels = np.asarray(train_labels, dtype=np.float64).reshape(len(train_labels), -1)
    truth = np.asarray(truth, dtype=np.float64).reshape(len(truth), -1)
    baselines = {}
    for name, value in (("mean", train_labels.mean(axis=0)), ("median", np.median(train_labels, axis=0))):
        baselines[name] = regression_metrics(truth, np.broadcast_to(value, truth.shape))
    return baselines
