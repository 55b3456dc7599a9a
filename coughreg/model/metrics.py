"""Regression metrics and baselines (scikit-learn's), shared by training (per epoch) and evaluation."""

from __future__ import annotations

import numpy as np


def regression_metrics(truth: np.ndarray, prediction: np.ndarray) -> dict[str, float]:
    """MAE, MSE, RMSE and R² averaged over label columns. Arrays are (rows,) or (rows, labels).

    R² of a label whose true values are all equal is undefined (NaN), and left out of the average.
    """
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    truth = np.asarray(truth, dtype=np.float64).reshape(len(truth), -1)
    prediction = np.asarray(prediction, dtype=np.float64).reshape(len(prediction), -1)
    mse = mean_squared_error(truth, prediction, multioutput="raw_values")
    with np.errstate(divide="ignore", invalid="ignore"):  # a constant label: R² undefined, NaN below
        r2 = r2_score(truth, prediction, multioutput="raw_values", force_finite=False) if len(truth) > 1 else np.full(truth.shape[1], np.nan)
    r2 = np.where(np.isfinite(r2) & (np.var(truth, axis=0) > 0), r2, np.nan)
    return {
        "mae": float(mean_absolute_error(truth, prediction)),
        "mse": float(np.mean(mse)),
        "rmse": float(np.mean(np.sqrt(mse))),
        "r2": float(np.nanmean(r2)) if np.isfinite(r2).any() else float("nan"),
    }


def metric_value(metrics: dict[str, float], name: str) -> float:
    """The config's ``prediction.metric`` (MAE, MSE, RMSE, R2) from a metrics dict."""
    return metrics[name.lower()]


def baseline_constants(train_labels: np.ndarray) -> dict[str, np.ndarray]:
    """The training labels' mean and median (scikit-learn's DummyRegressor): the predictions a model must beat, (labels,) each."""
    from sklearn.dummy import DummyRegressor

    train_labels = np.asarray(train_labels, dtype=np.float64).reshape(len(train_labels), -1)
    placeholder = np.zeros((len(train_labels), 1))  # a DummyRegressor ignores its inputs
    return {
        strategy: np.asarray(DummyRegressor(strategy=strategy).fit(placeholder, train_labels).constant_, dtype=np.float64).ravel()
        for strategy in ("mean", "median")
    }


def constant_baselines(train_labels: np.ndarray, truth: np.ndarray) -> dict[str, dict[str, float]]:
    """Predict-the-training-mean and predict-the-training-median, scored on ``truth``."""
    truth = np.asarray(truth, dtype=np.float64).reshape(len(truth), -1)
    return {
        strategy: regression_metrics(truth, np.broadcast_to(value, truth.shape))
        for strategy, value in baseline_constants(train_labels).items()
    }
