"""Validation metrics with percentile-bootstrap confidence intervals: overall, per label and per fold.

The figures are those of ``coughreg.model.metrics.regression_metrics`` (MAE, MSE, RMSE, R² averaged over label
columns the same way) plus Pearson's and Spearman's correlation and the median absolute error, each with
the interval a percentile bootstrap over recordings gives it.

Resampling. Every resample draws each fold's recordings with replacement from that fold, as many as it
has (``np.random.default_rng(seed)``, one independent stream per fold). A fold's own figures use its draw;
the overall and per-label figures use all folds' draws together, so the overall resamples are stratified by
fold: each keeps the folds' sizes, as the cross-validation did. Every prediction (the model and the
baselines) is scored on the same resamples, so their intervals are paired and can be compared. A resample
is a count of how often each recording was drawn, and the statistics are computed from those counts
(matrix products, cumulative sums), exactly equal to computing them on the materialised resample, without
building it; resamples are processed in blocks so that memory stays bounded for large validation sets.

``value`` is the metric of the actual rows, not the mean of the resamples. A metric that is undefined on
the rows (the correlation of a constant prediction, R² of a constant truth or of one row) is NaN, with a
[NaN, NaN] interval; where it is undefined only on some resamples, those resamples are left out of the
percentiles.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

METRIC_NAMES = ("mae", "mse", "rmse", "r2", "pearson", "spearman", "median_ae")

METHOD = (
    "percentile bootstrap over recordings: each resample draws every fold's recordings with replacement within "
    "that fold; per-fold figures use that fold's draw, overall and per-label figures all folds' draws together "
    "(resampled within each fold); the model and the baselines are scored on the same resamples"
)

_BLOCK_CELLS = 1 << 22  # (resample, row) cells scored at once: about 32 MiB per float64 array of a block

_CORRELATIONS = ("r2", "pearson", "spearman")  # undefined for some inputs: averaged over the labels that have one


def metrics_with_intervals(
    truth: np.ndarray,
    predictions: Mapping[str, np.ndarray],
    folds: np.ndarray,
    labels: Sequence[str],
    *,
    first: str = "mae",
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Every prediction's metrics with bootstrap intervals, overall, per label, per fold and per fold and label.

    The overall figures average over label columns as ``regression_metrics`` does: MAE over all cells,
    MSE the mean of the labels' MSEs, RMSE the mean of the labels' RMSEs, and R², Pearson's r and
    Spearman's rho the mean over the labels where they are defined (a constant truth or prediction leaves
    its label out; NaN when no label has one). The median absolute error is the mean of the labels' ones.
    A baseline that predicts each fold's training mean is constant within a fold, so its correlations are
    NaN per fold but defined overall, where they only say how the folds' constants line up with the truth.

    Args:
        truth: (rows, labels) true values, or (rows,) for one label. Finite.
        predictions: name -> predictions of the same shape as ``truth``, on the same rows, e.g. ``{"model": ...,
            "baseline_mean": ..., "baseline_median": ...}``. All are scored on the same resamples. Finite.
        folds: (rows,) integer fold of each row.
        labels: the label columns' names, in the order of ``truth``'s columns.
        first: the metric listed first in every metric dict (the config's ``prediction.metric``, any case);
            the others follow in ``METRIC_NAMES`` order.
        resamples: bootstrap resamples (at least 1).
        seed: the seed of ``np.random.default_rng``: the same inputs and seed give the same intervals.
        level: the intervals' confidence level, in (0, 1); 0.95 gives the 2.5th and 97.5th percentiles,
            under the key ``"ci95"`` (``"ci90"`` for 0.9).

    Returns:
        A JSON-serialisable dict (Python floats, ints, strs and lists; NaN where undefined)::

            {"intervals": {"method": str, "resamples": int, "seed": int, "level": float},
             "<prediction>": {
                 "overall": {"<metric>": {"value": float, "ci95": [low, high]}, ...},
                 "per_label": {"<label>": {"<metric>": ...}, ...},
                 "per_fold": {"<fold>": {"overall": {...}, "per_label": {...}}, ...}},
             ...}

        Folds are keyed by their number as a string, in increasing order.

    Raises:
        ValueError: inputs of the wrong shape, non-finite values, an unknown ``first`` metric, an empty
            ``predictions``, a prediction named ``"intervals"``, or ``resamples`` or ``level`` out of range.
        TypeError: ``resamples`` or ``seed`` not an integer.
    """
    first = str(first).lower()
    if first not in METRIC_NAMES:
        raise ValueError(f"first must be one of {', '.join(METRIC_NAMES)}, not {first!r}")
    for name, number in (("resamples", resamples), ("seed", seed)):
        if isinstance(number, bool) or not isinstance(number, int | np.integer):
            raise TypeError(f"{name} must be an integer, not {number!r}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, not {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1, not {level!r}")
    truth, predictions, folds, labels = _validated(truth, predictions, folds, labels)
    names = (first, *(m for m in METRIC_NAMES if m != first))
    key = interval_key(level)
    tails = (50 * (1 - level), 50 * (1 + level))

    order = np.argsort(folds, kind="stable")  # each fold's rows together: a fold is a slice
    truth, folds = truth[order], folds[order]
    predictions = {name: values[order] for name, values in predictions.items()}
    fold_ids, starts, sizes = np.unique(folds, return_index=True, return_counts=True)
    scopes = {None: slice(0, len(truth))} | {
        int(f): slice(int(s), int(s + c)) for f, s, c in zip(fold_ids, starts, sizes, strict=True)
    }

    values, draws = {}, {}
    for scope, rows in scopes.items():
        for name, predicted in predictions.items():
            everything = np.ones((1, rows.stop - rows.start))
            values[scope, name] = _label_statistics(everything, truth[rows], predicted[rows])
            draws[scope, name] = []
    streams = np.random.default_rng(seed).spawn(len(fold_ids))
    block = max(1, _BLOCK_CELLS // len(truth))
    for done in range(0, int(resamples), block):
        size = min(block, int(resamples) - done)
        counts = [_draw_counts(stream, int(rows), size) for stream, rows in zip(streams, sizes, strict=True)]
        for k, (scope, rows) in enumerate(scopes.items()):
            weights = np.concatenate(counts, axis=1) if scope is None else counts[k - 1]
            for name, predicted in predictions.items():
                draws[scope, name].append(_label_statistics(weights, truth[rows], predicted[rows]))

    def figures(scope, name) -> dict:
        value, drawn = values[scope, name], draws[scope, name]
        drawn = {m: np.concatenate([part[m] for part in drawn]) for m in METRIC_NAMES}
        overall_value, overall_drawn = _average_over_labels(value), _average_over_labels(drawn)
        columns = [(m, None) for m in names] + [(m, j) for j in range(len(labels)) for m in names]
        low, high = _percentiles(np.stack([
            overall_drawn[m] if j is None else drawn[m][:, j] for m, j in columns], axis=1), tails)
        figure = {
            (m, j): {"value": float(overall_value[m][0] if j is None else value[m][0, j]), key: [float(lo), float(hi)]}
            for (m, j), lo, hi in zip(columns, low, high, strict=True)
        }
        return {
            "overall": {m: figure[m, None] for m in names},
            "per_label": {label: {m: figure[m, j] for m in names} for j, label in enumerate(labels)},
        }

    result: dict = {"intervals": {"method": METHOD, "resamples": int(resamples), "seed": int(seed), "level": float(level)}}
    for name in predictions:
        result[name] = {
            **figures(None, name),
            "per_fold": {str(fold): figures(fold, name) for fold in scopes if fold is not None},
        }
    return result


def flat_scalars(result: Mapping) -> dict[str, float]:
    """The headline numbers of ``metrics_with_intervals`` as one flat dict, e.g. for KFP Metrics scalars.

    Every prediction's overall metrics with their interval bounds (``validation_mae``,
    ``validation_mae_ci95_low``, ``validation_mae_ci95_high``, ..., the model being ``validation`` and the
    others keeping their names: ``baseline_median_mae``, ...), and the model's value per fold
    (``fold0_validation_mae``, ...). Non-finite numbers are left out (KFP rejects NaN).

    Args:
        result: what ``metrics_with_intervals`` returned (or its JSON, read back).

    Returns:
        name -> finite float, in the result's order.
    """
    key = interval_key(result["intervals"]["level"])
    flat: dict[str, float] = {}
    for name, figures in result.items():
        if name == "intervals":
            continue
        prefix = "validation" if name == "model" else name
        for metric, figure in figures["overall"].items():
            low, high = figure[key]
            flat[f"{prefix}_{metric}"] = figure["value"]
            flat[f"{prefix}_{metric}_{key}_low"] = low
            flat[f"{prefix}_{metric}_{key}_high"] = high
    for fold, figures in result.get("model", {}).get("per_fold", {}).items():
        for metric, figure in figures["overall"].items():
            flat[f"fold{fold}_validation_{metric}"] = figure["value"]
    return {name: float(value) for name, value in flat.items() if value is not None and math.isfinite(value)}


def interval_key(level: float) -> str:
    """The key of an interval at ``level``: ``"ci95"`` for 0.95, ``"ci90"`` for 0.9, ``"ci97.5"`` for 0.975."""
    return f"ci{100 * float(level):g}"


def _label_statistics(weights: np.ndarray, truth: np.ndarray, prediction: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric of every label on every resample, from how often each row was drawn.

    Args:
        weights: (resamples, rows) counts, each row of them summing to ``rows`` (all ones: the rows themselves).
        truth: (rows, labels) true values.
        prediction: (rows, labels) predictions.

    Returns:
        metric -> (resamples, labels), for each name in ``METRIC_NAMES``; NaN where a metric is undefined
        on a resample (R² of a constant truth, a correlation with a constant side).
    """
    rows, width = truth.shape
    n = float(rows)
    error = prediction - truth
    centred_truth = truth - truth.mean(axis=0)  # centred: the moments below lose no precision to the mean
    centred_prediction = prediction - prediction.mean(axis=0)
    sums = weights @ np.concatenate([
        np.abs(error), error**2, centred_truth, centred_truth**2,
        centred_prediction, centred_prediction**2, centred_truth * centred_prediction,
    ], axis=1)
    absolute, squared, sum_t, sum_tt, sum_p, sum_pp, sum_tp = np.split(sums, 7, axis=1)
    spread_t = sum_tt - sum_t**2 / n  # sums of squared deviations from each resample's mean
    spread_p = sum_pp - sum_p**2 / n
    co_spread = sum_tp - sum_t * sum_p / n

    shape = (len(weights), width)
    r2, pearson, spearman, median = np.full(shape, np.nan), np.full(shape, np.nan), np.full(shape, np.nan), np.empty(shape)
    for j in range(width):
        true_ties = _Ties.of(truth[:, j])
        true_counts = true_ties.counts(weights)
        true_varies = (np.count_nonzero(true_counts, axis=1) > 1) & (spread_t[:, j] > 0)
        r2[true_varies, j] = 1 - squared[true_varies, j] / spread_t[true_varies, j]
        median[:, j] = _weighted_median(weights, np.abs(error[:, j]))
        predicted_ties = _Ties.of(prediction[:, j])
        if len(predicted_ties.starts) < 2 or not true_varies.any():
            continue  # a constant prediction (a baseline) or truth: no correlation on any resample
        predicted_counts = predicted_ties.counts(weights)
        both_vary = true_varies & (np.count_nonzero(predicted_counts, axis=1) > 1) & (spread_p[:, j] > 0)
        pearson[both_vary, j] = np.clip(
            co_spread[both_vary, j] / np.sqrt(spread_t[both_vary, j] * spread_p[both_vary, j]), -1.0, 1.0)
        true_ranks = _centred_ranks(true_counts, true_ties.inverse, n)
        predicted_ranks = _centred_ranks(predicted_counts, predicted_ties.inverse, n)
        rank_tp = np.einsum("ij,ij,ij->i", weights, true_ranks, predicted_ranks)
        rank_tt = np.einsum("ij,ij,ij->i", weights, true_ranks, true_ranks)
        rank_pp = np.einsum("ij,ij,ij->i", weights, predicted_ranks, predicted_ranks)
        spearman[both_vary, j] = np.clip(rank_tp[both_vary] / np.sqrt(rank_tt[both_vary] * rank_pp[both_vary]), -1.0, 1.0)
    mse = squared / n
    return {
        "mae": absolute / n, "mse": mse, "rmse": np.sqrt(mse), "r2": r2,
        "pearson": pearson, "spearman": spearman, "median_ae": median,
    }


def _average_over_labels(per_label: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The overall figures from the per-label ones ((resamples, labels) -> (resamples,)), as ``regression_metrics``
    averages: a plain mean, except R² and the correlations, averaged over the labels where they are defined."""
    overall = {}
    for metric in METRIC_NAMES:
        values = per_label[metric]
        if metric in _CORRELATIONS:
            defined = np.isfinite(values)
            count = defined.sum(axis=1)
            total = np.where(defined, values, 0.0).sum(axis=1)
            overall[metric] = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        else:
            overall[metric] = values.mean(axis=1)
    return overall


@dataclass(frozen=True)
class _Ties:
    """One column's rows grouped by equal value: what ranks with ties, and whether a resample is constant, need."""

    order: np.ndarray  # the rows, sorted by value
    starts: np.ndarray  # where each distinct value begins in ``order``
    inverse: np.ndarray  # each row's distinct value, as an index into ``starts``

    @classmethod
    def of(cls, column: np.ndarray) -> _Ties:
        order = np.argsort(column, kind="stable")
        ordered = column[order]
        new = np.concatenate([[True], ordered[1:] != ordered[:-1]])
        inverse = np.empty(len(column), dtype=np.intp)
        inverse[order] = np.cumsum(new) - 1
        return cls(order, np.flatnonzero(new), inverse)

    def counts(self, weights: np.ndarray) -> np.ndarray:
        """(resamples, distinct values): how many drawn rows have each value."""
        return np.add.reduceat(weights[:, self.order], self.starts, axis=1)


def _centred_ranks(counts: np.ndarray, inverse: np.ndarray, n: float) -> np.ndarray:
    """(resamples, rows): each row's average rank (ties share their mean rank, as scipy's rankdata) among the
    drawn rows, minus the mean rank (n + 1) / 2. Rows not drawn get a rank too, weighted by zero."""
    through = np.cumsum(counts, axis=1)  # drawn rows with a value up to each distinct value
    return (through - (counts - 1) / 2 - (n + 1) / 2)[:, inverse]


def _weighted_median(weights: np.ndarray, values: np.ndarray) -> np.ndarray:
    """(resamples,): the median of each resample (the mean of the two middle values for an even count)."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    through = np.cumsum(weights[:, order], axis=1)
    rows = len(values)
    lower = np.count_nonzero(through < (rows + 1) // 2, axis=1)  # index of the ((rows + 1) // 2)-th smallest
    upper = np.count_nonzero(through < rows // 2 + 1, axis=1)
    return (ordered[lower] + ordered[upper]) / 2


def _draw_counts(stream: np.random.Generator, rows: int, size: int) -> np.ndarray:
    """(size, rows) float counts: ``size`` resamples of ``rows`` rows with replacement."""
    drawn = stream.integers(0, rows, size=(size, rows)) + rows * np.arange(size)[:, None]
    return np.bincount(drawn.ravel(), minlength=size * rows).reshape(size, rows).astype(np.float64)


def _percentiles(drawn: np.ndarray, tails: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(resamples, columns) -> each column's two percentiles over its finite values (NaN, NaN if it has none)."""
    finite = np.isfinite(drawn)
    bounds = np.full((2, drawn.shape[1]), np.nan)
    whole = finite.all(axis=0)
    if whole.any():
        bounds[:, whole] = np.percentile(drawn[:, whole], tails, axis=0)
    for j in np.flatnonzero(~whole & finite.any(axis=0)):
        bounds[:, j] = np.percentile(drawn[finite[:, j], j], tails)
    return bounds[0], bounds[1]


def _validated(truth, predictions, folds, labels):
    truth = np.asarray(truth, dtype=np.float64)
    truth = truth.reshape(len(truth), -1) if truth.ndim == 1 else truth
    if truth.ndim != 2 or truth.shape[0] == 0 or truth.shape[1] == 0:
        raise ValueError(f"truth must be (rows, labels) with at least one of each, not of shape {truth.shape}")
    if not np.isfinite(truth).all():
        raise ValueError("truth has non-finite values")
    labels = [str(label) for label in labels]
    if len(labels) != truth.shape[1] or len(set(labels)) != len(labels):
        raise ValueError(f"labels must name truth's {truth.shape[1]} column(s) once each, not {labels}")
    if not predictions:
        raise ValueError("no predictions to score")
    checked = {}
    for name, values in predictions.items():
        if not isinstance(name, str) or name == "intervals":
            raise ValueError(f"a prediction cannot be named {name!r}")
        values = np.asarray(values, dtype=np.float64)
        values = values.reshape(len(values), -1) if values.ndim == 1 else values
        if values.shape != truth.shape:
            raise ValueError(f"prediction {name!r} has shape {values.shape}, truth {truth.shape}")
        if not np.isfinite(values).all():
            raise ValueError(f"prediction {name!r} has non-finite values")
        checked[name] = values
    folds = np.asarray(folds)
    if folds.shape != (len(truth),) or folds.dtype.kind not in "iu":
        raise ValueError(f"folds must be ({len(truth)},) integers, not {folds.dtype} of shape {folds.shape}")
    return truth, checked, folds.astype(np.int64), labels
