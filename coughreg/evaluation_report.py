"""The evaluation report: one self-contained HTML page for the person who decides whether the model ships
and the clinician who asks where it fails and why.

From top to bottom: a sentence that says how good the model is, against what, on how many recordings and
whether it passed the quality gate; the gate; the metrics with bootstrap 95% intervals beside the
baselines (and the generator's noise floor on the project's own generated data), per label and per fold;
where the errors are (predicted vs true, residuals, error by label decile and by clip duration); the
label distributions the folds trained and validated on; the training curves; recordings to look at and
listen to, with what the model listened to; and the lineage (data, hashes, config, software, machine).
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from coughreg import artifacts, report
from coughreg.config import ExperimentConfig
from coughreg.scoring import readback

METRIC_TITLES = {"mae": "MAE", "mse": "MSE", "rmse": "RMSE", "r2": "R²", "pearson": "Pearson r", "spearman": "Spearman ρ",
                 "median_ae": "median |error|"}
PREDICTORS = {"model": "model", "baseline_mean": "predict the training mean", "baseline_median": "predict the training median"}


@dataclass
class ReportInputs:
    """What the report is drawn from: the scored validation rows and the evaluation's metrics, plus the artifacts."""

    predictions: pd.DataFrame  # scored validation rows: id, fold, labels, pred_<label>, duration_s, ...
    metrics: dict
    history: list[dict]
    info: dict  # the model's model.json
    config: ExperimentConfig
    ingest_dir: Path
    features_dir: Path
    model_dir: Path
    lineage: dict


def _interval(entry: dict) -> str:
    value, (low, high) = entry["value"], entry["ci95"]
    if not np.isfinite(value):
        return "n/a"
    if not (np.isfinite(low) and np.isfinite(high)):
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def summary_sentence(inputs: ReportInputs) -> str:
    metrics, labels = inputs.metrics, inputs.info["label_columns"]
    overall = metrics["model"]["overall"]
    median = metrics["baseline_median"]["overall"]
    first = metrics["metric"].lower()
    verdict = metrics["quality_gate"]
    what = labels[0] if len(labels) == 1 else f"{len(labels)} labels ({', '.join(labels)})"
    mae, (low, high) = overall["mae"]["value"], overall["mae"]["ci95"]
    text = (
        f"On {metrics['validation_rows']} validation recordings ({len(metrics['folds'])} fold(s), "
        f"{html.escape(metrics['validation_scheme'] or 'held-out rows')}), the model predicts {html.escape(what)} with a mean "
        f"absolute error of <strong>{mae:.3f}</strong> (95% interval {low:.3f} to {high:.3f}), "
        f"{metrics['mae_vs_median_baseline']:.2f}× the {median['mae']['value']:.3f} of always predicting the training median"
    )
    if metrics.get("noise_floor_mae") is not None:
        text += f"; the best any model can reach on this generated data is {metrics['noise_floor_mae']:.3f}"
    text += f". R² {overall['r2']['value']:.2f}, Spearman ρ {overall['spearman']['value']:.2f}"
    if first not in ("mae", "r2"):
        text += f", {METRIC_TITLES[first]} {overall[first]['value']:.3f} (the config's ranking metric)"
    text += ". "
    text += ("It <strong>passed</strong> the quality gate and ships." if verdict["passed"]
             else "It <strong>failed</strong> the quality gate and does not ship.")
    return text


def gate_section(metrics: dict) -> str:
    verdict = metrics["quality_gate"]
    badge = "pass" if verdict["passed"] else "fail"
    return (
        f"<p class='gate {badge}'><strong>{'Passed' if verdict['passed'] else 'Failed'}</strong>: {html.escape(verdict['message'])}. "
        + ("The scorer is exported." if verdict["passed"] else "No scorer is exported and the test table is not scored.")
        + "</p>"
    )


def metrics_section(inputs: ReportInputs) -> str:
    metrics = inputs.metrics
    first = metrics["metric"].lower()
    names = [n for n in metrics["model"]["overall"] if n != "mse" or first == "mse"]  # MSE only when it ranks models
    rows = [[title, *(_interval(metrics[key]["overall"][name]) for name in names)] for key, title in PREDICTORS.items()]
    if metrics.get("noise_floor_mae") is not None:
        rows.append(["noise floor (the generator's best reachable)", *(f"{metrics['noise_floor_mae']:.3f}" if n == "mae" else "" for n in names)])
    header = ["", *(METRIC_TITLES.get(n, n) for n in names)]
    parts = [report.table(rows, header)]
    intervals = metrics["intervals"]
    parts.append(
        f"<p class='note'>Value [95% interval]: a {html.escape(intervals['method'])}, {intervals['resamples']} resamples, "
        f"seed {intervals['seed']}. Baselines predict one number for every recording (each fold's training labels' mean or "
        f"median), so they have no correlation. Each recording was decoded and scored as the exported scorer scores it: "
        f"chunks of {inputs.config.prediction.inference_chunk_seconds:g} s, at most the first "
        f"{inputs.config.prediction.max_inference_chunk_seconds:g} s ({metrics['validation_truncated']} recording(s) longer); "
        f"{metrics['validation_unscored']} could not be scored. Backbone {html.escape(inputs.info['backbone'])}, seed "
        f"{inputs.info['seed']}.</p>"
    )
    labels = inputs.info["label_columns"]
    if len(labels) > 1:
        rows = [[label, *(_interval(metrics["model"]["per_label"][label][n]) for n in names),
                 _interval(metrics["baseline_median"]["per_label"][label]["mae"])] for label in labels]
        parts.append("<h3>Per label</h3>" + report.table(rows, ["label", *(METRIC_TITLES.get(n, n) for n in names), "median baseline MAE"]))
    counts = inputs.predictions.groupby("fold").size()
    rows = []
    for fold, per_fold in metrics["model"]["per_fold"].items():
        overall = per_fold["overall"]
        baseline = metrics["baseline_median"]["per_fold"][fold]["overall"]["mae"]
        rows.append([fold, int(counts.get(int(fold), 0)), *(_interval(overall[n]) for n in names), _interval(baseline)])
    parts.append("<h3>Per fold</h3>" + report.table(rows, ["fold", "recordings", *(METRIC_TITLES.get(n, n) for n in names),
                                                              "median baseline MAE"]))
    return "".join(parts)


def _bin_errors(values: np.ndarray, errors: dict[str, np.ndarray], bins: np.ndarray) -> tuple[list[str], dict[str, list[float]], list[int]]:
    """Mean absolute error per bin of ``values`` (bins: edges), for each predictor; empty bins left out."""
    which = np.clip(np.searchsorted(bins, values, side="right") - 1, 0, len(bins) - 2)
    names, means, counts = [], {k: [] for k in errors}, []
    for b in range(len(bins) - 1):
        inside = which == b
        if not inside.any():
            continue
        names.append(f"{bins[b]:.2f}–{bins[b + 1]:.2f}")
        counts.append(int(inside.sum()))
        for key, error in errors.items():
            means[key].append(float(error[inside].mean()))
    return names, means, counts


def _bar_pair(axis, names, means, counts, xlabel: str, title: str) -> None:
    x = np.arange(len(names))
    width = 0.4
    axis.bar(x - width / 2, means["model"], width, label="model", color="tab:blue")
    axis.bar(x + width / 2, means["median"], width, label="median baseline", color="lightgray")
    axis.set_xticks(x, [f"{name}\n({count})" for name, count in zip(names, counts, strict=True)], rotation=45, ha="right", fontsize=7)
    axis.set(xlabel=xlabel, ylabel="mean |error|", title=title)
    axis.legend(fontsize=8)


def error_figures(inputs: ReportInputs, label: str):
    """Predicted vs true with the gate, residuals, and the error by label decile and by clip duration."""
    import matplotlib.pyplot as plt

    frame = inputs.predictions
    truth = frame[label].to_numpy(float)
    predicted = frame[f"pred_{label}"].to_numpy(float)
    k = inputs.info["label_columns"].index(label)
    median = np.asarray([_median_constant(inputs.info, fold)[k] for fold in frame["fold"]])
    residual = predicted - truth
    low, high = inputs.info["label_range"]
    verdict = inputs.metrics["quality_gate"]
    allowed = verdict["threshold"] * inputs.metrics["baseline_median"]["per_label"][label]["mae"]["value"] \
        if "per_label" in inputs.metrics["baseline_median"] else np.nan

    figure, axes = plt.subplots(2, 2, figsize=(13, 10))
    axis = axes[0, 0]
    if len(truth) >= 300:
        shown = axis.hexbin(truth, predicted, gridsize=30, extent=(low, high, low, high), mincnt=1, cmap="Blues")
        figure.colorbar(shown, ax=axis, label="recordings")
    else:
        axis.scatter(truth, predicted, s=14, alpha=0.7)
    axis.plot([low, high], [low, high], color="k", lw=1, label="perfect")
    if np.isfinite(allowed):
        for sign in (-1, 1):
            axis.plot([low, high], [low + sign * allowed, high + sign * allowed], color="tab:red", ls="--", lw=1,
                      label=f"± the gate's allowed MAE ({allowed:.3f})" if sign > 0 else None)
    axis.set(xlabel=f"true {label}", ylabel=f"predicted {label}", title="Predicted vs true", xlim=(low, high), ylim=(low, high))
    axis.legend(fontsize=8, loc="upper left")

    axis = axes[0, 1]
    axis.hist(residual, bins=40, color="tab:orange")
    axis.axvline(0, color="k", lw=1)
    axis.set(xlabel="predicted - true", ylabel="recordings",
             title=f"Residuals (mean {residual.mean():+.3f}: {'over' if residual.mean() > 0 else 'under'}-predicts on average)")

    errors = {"model": np.abs(residual), "median": np.abs(median - truth)}
    deciles = np.unique(np.quantile(truth, np.linspace(0, 1, 11)))
    if len(deciles) < 2:
        deciles = np.array([truth.min(), truth.min() + 1e-9])
    _bar_pair(axes[1, 0], *_bin_errors(truth, errors, deciles), f"true {label} (deciles; recordings)", "Error by label range")
    durations = frame["duration_s"].to_numpy(float)
    edges = np.unique(np.quantile(durations, np.linspace(0, 1, 7)))
    if len(edges) < 2:
        edges = np.array([durations.min(), durations.min() + 1e-9])
    _bar_pair(axes[1, 1], *_bin_errors(durations, errors, edges), "clip duration, s (sextiles; recordings)", "Error by clip duration")
    figure.tight_layout()
    return figure


def _median_constant(info: dict, fold) -> list[float]:
    for member in info["members"]:
        if int(member["fold"]) == int(fold):
            return member["train_label_median"]
    raise KeyError(fold)


def fold_figure(inputs: ReportInputs):
    """Each fold's MAE with its interval beside the median baseline's."""
    import matplotlib.pyplot as plt

    folds = list(inputs.metrics["model"]["per_fold"])
    figure, axis = plt.subplots(figsize=(max(5, 1.4 * len(folds) + 2), 3.6))
    x = np.arange(len(folds))
    for offset, key, color in ((-0.15, "model", "tab:blue"), (0.15, "baseline_median", "gray")):
        entries = [inputs.metrics[key]["per_fold"][f]["overall"]["mae"] for f in folds]
        values = np.array([e["value"] for e in entries])
        lows = np.array([e["ci95"][0] for e in entries])
        highs = np.array([e["ci95"][1] for e in entries])
        spread = np.nan_to_num(np.vstack([values - lows, highs - values]), nan=0.0).clip(min=0)
        axis.errorbar(x + offset, values, yerr=spread, fmt="o", capsize=4, color=color, label=PREDICTORS[key])
    axis.set_xticks(x, [f"fold {f}" for f in folds])
    axis.set(ylabel="MAE (95% interval)", title="MAE per fold", ylim=(0, None))
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def label_distribution_figure(inputs: ReportInputs):
    """The labels each fold trained on (the other folds' rows) beside those it was validated on."""
    import matplotlib.pyplot as plt

    labels = inputs.info["label_columns"]
    folds_path = inputs.model_dir / artifacts.FOLDS
    index = pd.DataFrame(inputs.predictions[["id", *labels]])
    if folds_path.exists():
        from coughreg.shards import SpectrogramShardReader

        assignment = readback.read_table(folds_path, "rerun the train step").to_pandas()
        every = SpectrogramShardReader(artifacts.shard_paths(inputs.features_dir)).index[["id", *labels]]
        index = assignment.merge(every, on="id", how="inner")
    else:
        index = inputs.predictions[["id", "fold", *labels]]
    folds = sorted(inputs.predictions["fold"].unique())
    shown = labels[:3]
    figure, axes = plt.subplots(len(shown), len(folds), figsize=(3.6 * len(folds), 2.8 * len(shown)), squeeze=False)
    low, high = inputs.info["label_range"]
    bins = np.linspace(low, high, 26)
    for r, label in enumerate(shown):
        for c, fold in enumerate(folds):
            axis = axes[r, c]
            train = index.loc[index["fold"] != fold, label].to_numpy(float)
            validation = index.loc[index["fold"] == fold, label].to_numpy(float)
            axis.hist(train, bins=bins, density=True, alpha=0.5, color="tab:blue", label=f"train ({len(train)})")
            axis.hist(validation, bins=bins, density=True, histtype="step", lw=2, color="tab:red", label=f"validation ({len(validation)})")
            axis.set(title=f"fold {fold}", xlabel=label, ylabel="density" if c == 0 else None)
            axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def choose_recordings(predictions: pd.DataFrame, label: str, count: int, seed: int) -> list[tuple[int, str]]:
    """``count`` rows to look at: the worst, the best and a random few (row position, why chosen)."""
    if count <= 0 or predictions.empty:
        return []
    error = np.abs(predictions[f"pred_{label}"].to_numpy(float) - predictions[label].to_numpy(float))
    order = np.argsort(-error, kind="stable")
    worst = max(1, count // 3)
    best = max(1, count // 3) if count > 1 else 0
    chosen: dict[int, str] = {}
    for row in order[:worst]:
        chosen.setdefault(int(row), "among the worst")
    for row in order[::-1][:best]:
        chosen.setdefault(int(row), "among the best")
    rest = [int(r) for r in np.random.default_rng(seed).permutation(len(predictions)) if int(r) not in chosen]
    for row in rest[: max(0, count - len(chosen))]:
        chosen[row] = "drawn at random"
    return list(chosen.items())[:count]


def recordings_section(inputs: ReportInputs) -> tuple[str, int]:
    """For ``logging.number_of_audios`` recordings: the spectrogram with a dB scale, what the model listened to
    (``training.run_interpretations``) on one scale shared by every clip, the values, and the clip to play."""
    import matplotlib.pyplot as plt

    from coughreg.interpret import occlusion_map
    from coughreg.scoring.decode import decode
    from coughreg.shards import SpectrogramShardReader
    from coughreg.training import load_members

    config, info = inputs.config, inputs.info
    label = info["label_columns"][0]
    chosen = choose_recordings(inputs.predictions, label, config.logging.number_of_audios, info["seed"])
    if not chosen:
        return "", 0
    reader = SpectrogramShardReader(artifacts.shard_paths(inputs.features_dir))
    row_of = {identifier: row for row, identifier in enumerate(reader.index["id"])}
    manifest, _ = artifacts.read_manifest(inputs.ingest_dir)
    audio_of = manifest.set_index("id")["audio_path"]
    regressors = load_members(inputs.model_dir) if config.training.run_interpretations else None
    hop, rate = info["feature_parameters"]["hop_size"], info["feature_parameters"]["sample_rate"]

    clips = []
    for row, why in chosen:
        identifier = inputs.predictions["id"].iloc[row]
        spectrogram = reader.spectrogram(row_of[identifier]).astype(np.float32)
        attribution = occlusion_map(regressors, spectrogram) if regressors is not None else None
        clips.append((row, why, identifier, spectrogram, attribution))
    scale = max((float(np.abs(a.values).max()) for *_, a in clips if a is not None), default=0.0) or 1e-6
    decibels = np.concatenate([s.ravel() for _, _, _, s, _ in clips])
    db_low, db_high = np.percentile(decibels, [1, 99.9])

    parts = []
    if regressors is not None:
        parts.append(
            "<p class='note'>How to read the right-hand map (occlusion): the spectrogram was cut into patches (mel bands × slices of time) "
            "and each patch in turn replaced by the clip's own background there (each band's median); the colour is how much "
            f"the prediction of {html.escape(label)} fell when that patch was hidden. <span style='color:#b2182b'>Red</span>: the "
            "patch raised the prediction (the model relies on it); <span style='color:#2166ac'>blue</span>: it lowered it; white: "
            f"the model ignored it. Every map uses the same scale (±{scale:.3f}), so colours compare across recordings.</p>")
    parts.append("<p class='note'>Spectrograms: log-mel power in dB, on one colour scale for every recording. "
                 "The worst and best predictions first, then a few drawn at random.</p>")
    for row, why, identifier, spectrogram, attribution in clips:
        true, predicted = inputs.predictions[label].iloc[row], inputs.predictions[f"pred_{label}"].iloc[row]
        seconds = spectrogram.shape[1] * hop / rate
        panels = 2 if attribution is not None else 1
        figure, axes = plt.subplots(1, panels, figsize=(6.2 * panels, 3.0), squeeze=False)
        shown = axes[0, 0].imshow(spectrogram, origin="lower", aspect="auto", cmap="magma", vmin=db_low, vmax=db_high,
                                  extent=(0, seconds, 0, spectrogram.shape[0]))
        figure.colorbar(shown, ax=axes[0, 0], label="dB")
        axes[0, 0].set(xlabel="seconds", ylabel="mel band", title="log-mel spectrogram")
        if attribution is not None:
            shown = axes[0, 1].imshow(attribution.per_pixel(), origin="lower", aspect="auto", cmap="RdBu_r", vmin=-scale, vmax=scale,
                                      extent=(0, seconds, 0, spectrogram.shape[0]))
            figure.colorbar(shown, ax=axes[0, 1], label=f"Δ predicted {label}")
            axes[0, 1].set(xlabel="seconds", ylabel="mel band", title="what the model listened to (occlusion)")
        figure.tight_layout()
        try:
            decoded = decode(inputs.ingest_dir / audio_of[identifier], rate, max_seconds=30.0)
            player = report.audio_tag(decoded.samples, rate, f"recording {identifier}")
        except Exception as exc:  # noqa: BLE001 - a clip that cannot be played still has its pictures
            player = f"<p class='note'>The recording cannot be played here: {html.escape(str(exc))}</p>"
        parts.append(
            f"<div class='clip'><h3>{html.escape(str(identifier))}: true {true:.3f}, predicted {predicted:.3f} "
            f"(error {predicted - true:+.3f}; {why}), fold {inputs.predictions['fold'].iloc[row]}, "
            f"{inputs.predictions['duration_s'].iloc[row]:.1f} s</h3>{player}"
            f"{report.figure_to_img(figure, f'spectrogram of {identifier}')}</div>"
        )
    return "".join(parts), len(clips)


def lineage_section(lineage: dict) -> str:
    def code_rows(group: dict) -> list[list[str]]:
        return [[name, value] for name, value in group.items()]

    source = lineage["source"]
    rows = [["source", source["uri"]], ["content identity", source["content_identity"]],
            ["features shard set", lineage["features"].get("shard_set", "")],
            ["backbone, seed", f"{lineage['model']['backbone']}, {lineage['model']['seed']}"],
            ["trained on", lineage["model"].get("trained_on", "")], ["evaluated on", lineage["evaluated_on"]],
            ["image", lineage["image"]], ["Python", lineage["python"]]]
    hashes = [[f"ingest/{n}", h] for n, h in lineage["ingest"].items()]
    hashes += [[f"features/{n}", h] for n, h in lineage["features"].items() if n != "shard_set"]
    hashes += [[f"model/{n}", h] for n, h in lineage["model"].items() if n not in ("backbone", "seed", "trained_on")]
    return (
        report.table(rows, ["what", "value"], "left")
        + "<h3>Content hashes (SHA-256)</h3>" + report.table(hashes, ["file", "SHA-256"], "left")
        + "<h3>Libraries</h3>" + report.table(code_rows(lineage["libraries"]), ["package", "version"], "left")
        + report.details("The resolved config the evaluation ran with", report.preformatted(lineage["config"]))
    )


def build(inputs: ReportInputs) -> str:
    """The whole page."""
    report.matplotlib_agg()
    labels = inputs.info["label_columns"]
    sections = [("Quality gate", gate_section(inputs.metrics)), ("Metrics", metrics_section(inputs))]
    for label in labels[:3]:
        title = "Where the errors are" + (f": {label}" if len(labels) > 1 else "")
        sections.append((title, report.figure_to_img(error_figures(inputs, label), f"errors of {label}")))
    sections.append(("Folds", report.figure_to_img(fold_figure(inputs), "MAE per fold")
                     + report.figure_to_img(label_distribution_figure(inputs), "label distributions")))
    if inputs.history:
        figure = report.training_curves(inputs.history, inputs.config.training.loss_function,
                                        inputs.metrics["baseline_median"]["overall"]["mae"]["value"])
        sections.append(("Training curves", report.figure_to_img(figure, "training curves")))
    clips, count = recordings_section(inputs)
    if count:
        sections.append((f"Recordings ({count}, logging.number_of_audios)", clips))
    sections.append(("Lineage", lineage_section(inputs.lineage)))
    return report.page(f"{inputs.config.experiment_name}: evaluation", sections, lead=summary_sentence(inputs))
