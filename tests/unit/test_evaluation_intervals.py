"""Validation metrics with bootstrap intervals: the values against scikit-learn and scipy, the resamples
(reproducible, paired across predictions, stratified by fold, as computed on the materialised resample), the
intervals' coverage, undefined correlations, and the flat scalars for KFP."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import mean_absolute_error, mean_squared_error, median_absolute_error, r2_score

from coughreg.evaluation import intervals
from coughreg.evaluation.intervals import METRIC_NAMES, _label_statistics, flat_scalars, metrics_with_intervals
from coughreg.model.metrics import regression_metrics

LABELS = ["cough_detected", "dyspnea", "wheezing"]


def _data(rows=90, labels=3, folds=3, seed=0):
    rng = np.random.default_rng(seed)
    truth = rng.uniform(0, 1, (rows, labels))
    model = truth + rng.normal(0, 0.25, (rows, labels))
    fold = rng.permutation(np.arange(rows) % folds)
    mean = np.stack([truth[fold != f].mean(axis=0) for f in fold])  # each fold's training mean, as evaluation has it
    return truth, {"model": model, "baseline_mean": mean}, fold


def _expected(truth: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """One label's metrics, by scikit-learn and scipy."""
    return {
        "mae": mean_absolute_error(truth, predicted),
        "mse": mean_squared_error(truth, predicted),
        "rmse": math.sqrt(mean_squared_error(truth, predicted)),
        "r2": r2_score(truth, predicted),
        "pearson": pearsonr(truth, predicted).statistic,
        "spearman": spearmanr(truth, predicted).statistic,
        "median_ae": median_absolute_error(truth, predicted),
    }


def _same(a, b, rel: float = 1e-9) -> bool:
    """Equal results to float64 rounding, NaN included: the same figures computed through matrix products of
    another shape (other blocks of resamples, other models beside) may differ in their last bits with the
    BLAS kernel of the machine, never by more."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k], rel) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=rel, abs=1e-12)
    return a == b


def _values(figures: dict) -> dict[str, float]:
    return {metric: figure["value"] for metric, figure in figures.items()}


def _assert_scope_matches_references(scope: dict, truth: np.ndarray, predicted: np.ndarray, labels: list[str]) -> None:
    per_label = [_expected(truth[:, j], predicted[:, j]) for j in range(truth.shape[1])]
    for j, label in enumerate(labels):
        assert _values(scope["per_label"][label]) == pytest.approx(per_label[j], rel=1e-10, abs=1e-12)
    overall = _values(scope["overall"])
    reference = regression_metrics(truth, predicted)  # the training's own figures, unchanged
    assert {m: overall[m] for m in reference} == pytest.approx(reference, rel=1e-10, abs=1e-12)
    assert overall["mae"] == pytest.approx(mean_absolute_error(truth, predicted), rel=1e-12)
    for metric in ("pearson", "spearman", "median_ae"):
        assert overall[metric] == pytest.approx(np.mean([p[metric] for p in per_label]), rel=1e-10)


def test_values_match_scikit_learn_and_scipy_overall_per_label_and_per_fold():
    truth, predictions, folds = _data()
    result = metrics_with_intervals(truth, predictions, folds, LABELS, resamples=50)
    model = predictions["model"]
    _assert_scope_matches_references(result["model"], truth, model, LABELS)
    assert list(result["model"]["per_fold"]) == ["0", "1", "2"]
    for fold, scope in result["model"]["per_fold"].items():
        rows = folds == int(fold)
        _assert_scope_matches_references(scope, truth[rows], model[rows], LABELS)


def test_single_label_values_match_scikit_learn_and_scipy():
    truth, predictions, folds = _data(rows=70, labels=1, folds=2, seed=3)
    result = metrics_with_intervals(truth[:, 0], {"model": predictions["model"][:, 0]}, folds, ["cough"], resamples=20)
    expected = _expected(truth[:, 0], predictions["model"][:, 0])
    assert _values(result["model"]["overall"]) == pytest.approx(expected, rel=1e-10)
    assert _values(result["model"]["per_label"]["cough"]) == pytest.approx(expected, rel=1e-10)
    rows = folds == 1
    fold = _expected(truth[rows, 0], predictions["model"][rows, 0])
    assert _values(result["model"]["per_fold"]["1"]["overall"]) == pytest.approx(fold, rel=1e-10)


def test_ties_and_even_counts_match_scipy_and_scikit_learn():
    rng = np.random.default_rng(5)
    truth = rng.integers(0, 4, (40, 2)).astype(float)  # scores on a scale: many ties on both sides
    predicted = np.round(truth + rng.normal(0, 1, truth.shape))
    result = metrics_with_intervals(truth, {"model": predicted}, np.zeros(40, dtype=int), ["a", "b"], resamples=10)
    for j, label in enumerate(["a", "b"]):
        assert _values(result["model"]["per_label"][label]) == pytest.approx(_expected(truth[:, j], predicted[:, j]), rel=1e-10)


def test_resample_statistics_equal_those_of_the_materialised_resample():
    rng = np.random.default_rng(11)
    truth = np.round(rng.uniform(0, 1, (25, 2)), 1)  # ties, which resampling multiplies
    predicted = np.round(truth + rng.normal(0, 0.3, truth.shape), 1)
    drawn = rng.integers(0, 25, (200, 25))
    drawn[0] = 3  # a resample of one recording repeated: every correlation and R² undefined
    drawn[1, :24] = 4  # two distinct recordings
    counts = np.stack([np.bincount(row, minlength=25) for row in drawn]).astype(float)
    statistics = _label_statistics(counts, truth, predicted)
    for b, rows in enumerate(drawn):
        for j in range(2):
            t, p = truth[rows, j], predicted[rows, j]
            varies = np.ptp(t) > 0 and np.ptp(p) > 0
            expected = {
                "mae": mean_absolute_error(t, p), "mse": mean_squared_error(t, p),
                "rmse": math.sqrt(mean_squared_error(t, p)),
                "r2": r2_score(t, p) if np.ptp(t) > 0 else np.nan,
                "pearson": pearsonr(t, p).statistic if varies else np.nan,
                "spearman": spearmanr(t, p).statistic if varies else np.nan,
                "median_ae": median_absolute_error(t, p),
            }
            got = {metric: statistics[metric][b, j] for metric in METRIC_NAMES}
            assert got == pytest.approx(expected, rel=1e-9, abs=1e-12, nan_ok=True), (b, j)


def test_seeded_intervals_are_reproducible_and_the_seed_changes_them():
    truth, predictions, folds = _data()
    first = metrics_with_intervals(truth, predictions, folds, LABELS, resamples=200, seed=7)
    assert _same(metrics_with_intervals(truth, predictions, folds, LABELS, resamples=200, seed=7), first)
    other = metrics_with_intervals(truth, predictions, folds, LABELS, resamples=200, seed=8)
    assert other["model"]["overall"]["mae"]["ci95"] != first["model"]["overall"]["mae"]["ci95"]
    assert other["model"]["overall"]["mae"]["value"] == first["model"]["overall"]["mae"]["value"]


def test_values_lie_within_their_intervals_on_typical_data():
    truth, predictions, folds = _data(rows=300)
    result = metrics_with_intervals(truth, predictions, folds, LABELS, resamples=500)
    scopes = [result["model"], *result["model"]["per_fold"].values()]
    figures = [f for s in scopes for f in (s["overall"], *s["per_label"].values())]
    assert len(figures) == 16
    for metrics in figures:
        for metric, figure in metrics.items():
            low, high = figure["ci95"]
            assert low <= figure["value"] <= high, metric
            assert low < high, metric


def test_every_prediction_is_scored_on_the_same_resamples():
    truth, predictions, folds = _data()
    model = predictions["model"]
    result = metrics_with_intervals(truth, {"model": model, "twin": model.copy(), **predictions}, folds, LABELS,
                                    resamples=200)
    assert _same(result["twin"], result["model"])
    alone = metrics_with_intervals(truth, {"model": model}, folds, LABELS, resamples=200)
    assert _same(alone["model"], result["model"])  # the draws do not depend on what else is scored


def test_overall_resamples_are_stratified_by_fold():
    truth = np.zeros((40, 1))
    predicted = np.r_[np.zeros(10), np.ones(30)][:, None]  # fold 0 exact, fold 1 off by one everywhere
    folds = np.r_[np.zeros(10, dtype=int), np.ones(30, dtype=int)]
    result = metrics_with_intervals(truth, {"model": predicted}, folds, ["x"], resamples=300)
    # every resample keeps 10 rows of fold 0 and 30 of fold 1: the overall MAE cannot move
    assert result["model"]["overall"]["mae"] == {"value": 0.75, "ci95": [0.75, 0.75]}


def test_blocks_of_resamples_give_the_same_intervals(monkeypatch):
    truth, predictions, folds = _data()
    whole = metrics_with_intervals(truth, predictions, folds, LABELS, resamples=100, seed=2)
    monkeypatch.setattr(intervals, "_BLOCK_CELLS", 7 * len(truth))  # blocks of 7 resamples, the last one of 2
    assert _same(metrics_with_intervals(truth, predictions, folds, LABELS, resamples=100, seed=2), whole)


def test_mae_interval_covers_the_true_value_about_95_percent_of_the_time():
    sigma, rows, datasets = 0.3, 200, 200
    true_mae = sigma * math.sqrt(2 / math.pi)  # E|e| for e ~ N(0, sigma)
    rng = np.random.default_rng(2024)
    folds = np.arange(rows) % 2
    covered = 0
    for k in range(datasets):
        truth = rng.uniform(0, 1, (rows, 1))
        predicted = truth + rng.normal(0, sigma, (rows, 1))
        result = metrics_with_intervals(truth, {"model": predicted}, folds, ["x"], resamples=400, seed=k)
        low, high = result["model"]["overall"]["mae"]["ci95"]
        covered += low <= true_mae <= high
    assert 0.90 <= covered / datasets <= 0.99


def test_constant_predictions_have_undefined_correlations_without_warnings():
    truth, predictions, folds = _data()
    constant = np.broadcast_to(np.median(truth, axis=0), truth.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = metrics_with_intervals(truth, {"model": predictions["model"], "baseline_median": constant}, folds,
                                        LABELS, resamples=100)
    baseline = result["baseline_median"]
    scopes = [baseline, *baseline["per_fold"].values()]
    for metrics in [f for s in scopes for f in (s["overall"], *s["per_label"].values())]:
        for metric in ("pearson", "spearman"):
            assert math.isnan(metrics[metric]["value"]) and all(math.isnan(x) for x in metrics[metric]["ci95"])
        assert math.isfinite(metrics["mae"]["value"]) and math.isfinite(metrics["median_ae"]["ci95"][0])
    # a per-fold baseline is constant within each fold only
    per_fold = result["model"]["per_fold"]["0"]["per_label"]["dyspnea"]["pearson"]["value"]
    assert math.isfinite(per_fold)
    flat = flat_scalars(result)
    assert "baseline_median_mae" in flat and "baseline_median_mae_ci95_low" in flat
    assert not any(name.startswith(("baseline_median_pearson", "baseline_median_spearman")) for name in flat)
    assert all(math.isfinite(value) for value in flat.values())


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # scikit-learn's, in regression_metrics
def test_a_constant_truth_leaves_its_label_out_of_r2_and_the_correlations():
    truth, predictions, folds = _data(labels=2)
    truth[:, 1] = 0.5
    result = metrics_with_intervals(truth, predictions, folds, ["a", "b"], resamples=50)
    model = result["model"]
    assert math.isnan(model["per_label"]["b"]["r2"]["value"]) and math.isnan(model["per_label"]["b"]["pearson"]["value"])
    assert model["overall"]["r2"]["value"] == pytest.approx(model["per_label"]["a"]["r2"]["value"])
    assert model["overall"]["r2"]["value"] == pytest.approx(regression_metrics(truth, predictions["model"])["r2"])
    assert model["overall"]["spearman"] == model["per_label"]["a"]["spearman"]


def test_a_fold_of_one_recording_has_no_r2_or_correlation():
    truth, predictions, folds = _data(rows=31, folds=2)
    folds[-1] = 9
    result = metrics_with_intervals(truth, predictions, folds, LABELS, resamples=50)
    lonely = result["model"]["per_fold"]["9"]["overall"]
    for metric in ("r2", "pearson", "spearman"):
        assert math.isnan(lonely[metric]["value"]) and all(math.isnan(x) for x in lonely[metric]["ci95"])
    expected = np.mean(np.abs(truth[-1] - predictions["model"][-1]))
    assert lonely["mae"] == {"value": pytest.approx(expected), "ci95": [pytest.approx(expected)] * 2}
    assert math.isnan(regression_metrics(truth[-1:], predictions["model"][-1:])["r2"])


@pytest.mark.parametrize("first", ["mae", "RMSE", "r2", "mse"])
def test_the_ranking_metric_comes_first_then_the_others_in_order(first):
    truth, predictions, folds = _data(rows=30)
    result = metrics_with_intervals(truth, predictions, folds, LABELS, first=first, resamples=10)
    expected = [first.lower(), *(m for m in METRIC_NAMES if m != first.lower())]
    model = result["model"]
    for metrics in (model["overall"], model["per_label"]["dyspnea"], model["per_fold"]["1"]["overall"]):
        assert list(metrics) == expected
    assert list(flat_scalars(result))[:3] == [f"validation_{expected[0]}", f"validation_{expected[0]}_ci95_low",
                                              f"validation_{expected[0]}_ci95_high"]


def test_the_result_is_plain_json_and_its_shape_is_documented():
    truth, predictions, folds = _data()
    predictions["baseline_median"] = np.broadcast_to(np.median(truth, axis=0), truth.shape)
    result = metrics_with_intervals(truth, predictions, folds, LABELS, resamples=30, seed=4)
    assert list(result) == ["intervals", "model", "baseline_mean", "baseline_median"]
    assert result["intervals"]["resamples"] == 30 and result["intervals"]["seed"] == 4 and result["intervals"]["level"] == 0.95
    assert "bootstrap" in result["intervals"]["method"] and "within" in result["intervals"]["method"]
    assert list(result["model"]) == ["overall", "per_label", "per_fold"]
    assert list(result["model"]["per_label"]) == LABELS
    assert list(result["model"]["per_fold"]["2"]) == ["overall", "per_label"]

    def plain(node):
        if isinstance(node, dict):
            return all(isinstance(k, str) and plain(v) for k, v in node.items())
        if isinstance(node, list):
            return all(plain(v) for v in node)
        return type(node) in (float, int, str)

    assert plain(result)
    read_back = json.loads(json.dumps(result))
    assert flat_scalars(read_back) == flat_scalars(result)


def test_flat_scalars_hold_the_headline_numbers():
    truth, predictions, folds = _data()
    result = metrics_with_intervals(truth, predictions, folds, LABELS, resamples=30)
    flat = flat_scalars(result)
    assert flat["validation_mae"] == result["model"]["overall"]["mae"]["value"]
    assert [flat["validation_r2_ci95_low"], flat["validation_r2_ci95_high"]] == result["model"]["overall"]["r2"]["ci95"]
    assert flat["baseline_mean_median_ae"] == result["baseline_mean"]["overall"]["median_ae"]["value"]
    assert flat["fold2_validation_spearman"] == result["model"]["per_fold"]["2"]["overall"]["spearman"]["value"]
    assert not any(name.startswith("fold") and "baseline" in name for name in flat)
    assert not any("ci95" in name for name in flat if name.startswith("fold"))
    # two predictions' overall figures with bounds (the per-fold mean baseline varies overall: correlations defined),
    # and the model's value in each of 3 folds
    assert len(flat) == 2 * 3 * len(METRIC_NAMES) + 3 * len(METRIC_NAMES)
    assert all(type(value) is float for value in flat.values())


def test_another_level_is_named_by_it_and_narrower():
    truth, predictions, folds = _data(rows=200)
    wide = metrics_with_intervals(truth, predictions, folds, LABELS, resamples=300)["model"]["overall"]["mae"]["ci95"]
    result = metrics_with_intervals(truth, predictions, folds, LABELS, resamples=300, level=0.9)
    narrow = result["model"]["overall"]["mae"]["ci90"]
    assert wide[0] < narrow[0] < narrow[1] < wide[1]
    assert "validation_mae_ci90_low" in flat_scalars(result)


@pytest.mark.parametrize(("change", "message"), [
    ({"first": "auc"}, "first must be one of"),
    ({"resamples": 0}, "resamples must be at least 1"),
    ({"level": 95}, "level must be between 0 and 1"),
    ({"labels": ["a", "b"]}, "labels must name truth's 3 column"),
    ({"predictions": {}}, "no predictions"),
    ({"predictions": {"intervals": np.zeros((90, 3))}}, "cannot be named 'intervals'"),
    ({"predictions": {"model": np.zeros((90, 2))}}, "prediction 'model' has shape"),
    ({"predictions": {"model": np.full((90, 3), np.nan)}}, "non-finite"),
    ({"folds": np.zeros(90)}, "folds must be"),
    ({"folds": np.zeros(89, dtype=int)}, "folds must be"),
])
def test_inputs_that_cannot_be_scored_are_refused(change, message):
    truth, predictions, folds = _data()
    arguments = {"truth": truth, "predictions": predictions, "folds": folds, "labels": LABELS, "resamples": 5} | change
    with pytest.raises(ValueError, match=message):
        metrics_with_intervals(**arguments)


@pytest.mark.parametrize("change", [{"seed": None}, {"seed": 1.5}, {"resamples": 100.0}, {"resamples": True}])
def test_a_seed_or_resample_count_that_is_not_an_integer_is_refused(change):
    truth, predictions, folds = _data(rows=20)
    with pytest.raises(TypeError, match="must be an integer"):
        metrics_with_intervals(truth, predictions, folds, LABELS, **change)
