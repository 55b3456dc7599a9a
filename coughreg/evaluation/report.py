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
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from coughreg import artifacts
from coughreg.config.schema import ExperimentConfig
from coughreg.evaluation.robustness_section import robustness_section
from coughreg.io import html_page
from coughreg.scoring import readback

log = logging.getLogger(__name__)

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
    changes: pd.DataFrame | None = None  # robustness: each measured clip's scores as recorded and transformed


MAX_LABELS_SHOWN = 6  # labels drawn one figure each (the metrics tables list every label)
MAX_AUDIOS = 32  # recordings a report shows at most (each adds ~300 kB of pictures and sound)
MAX_WINDOW_SECONDS = 20.0  # the stretch of a recording shown, explained and played


def _finite(value) -> bool:
    return value is not None and np.isfinite(value)


def _number(value, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if _finite(value) else "n/a"


def _interval(entry: dict) -> str:
    value, (low, high) = entry["value"], entry["ci95"]
    if not _finite(value):
        return "n/a"
    if not (_finite(low) and _finite(high)):
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
    folds = ", ".join(str(f) for f in metrics["folds"])
    text = (
        f"On {metrics['validation_rows']} validation recordings (fold{'s' if len(metrics['folds']) > 1 else ''} {folds} of "
        f"{html.escape(metrics['validation_scheme'] or 'held-out rows')}), the model predicts {html.escape(what)} with a mean "
        f"absolute error of <strong>{_number(mae)}</strong> (95% interval {_number(low)} to {_number(high)})"
    )
    if _finite(metrics["mae_vs_median_baseline"]):
        text += f", {metrics['mae_vs_median_baseline']:.2f}× the {median['mae']['value']:.3f} of always predicting the training median"
    else:
        text += f"; always predicting the training median scores {_number(median['mae']['value'])}"
    if _finite(metrics.get("noise_floor_mae")):
        text += f"; the best any model can reach on this generated data is {metrics['noise_floor_mae']:.3f}"
    text += f". R² {_number(overall['r2']['value'], 2)}, Spearman ρ {_number(overall['spearman']['value'], 2)}"
    if first not in ("mae", "r2"):
        text += f", {METRIC_TITLES[first]} {_number(overall[first]['value'])} (the config's ranking metric)"
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
    parts = [html_page.table(rows, header)]
    intervals = metrics["intervals"]
    parts.append(
        f"<p class='note'>Value [95% interval]: a {html.escape(intervals['method'])}, {intervals['resamples']} resamples, "
        f"seed {intervals['seed']}. Baselines predict one number per fold (its training labels' mean or "
        f"median), so a correlation says nothing of them (n/a). Each recording was decoded and scored as the exported scorer scores it: "
        f"chunks of {inputs.config.prediction.inference_chunk_seconds:g} s, at most the first "
        f"{inputs.config.prediction.max_inference_chunk_seconds:g} s ({metrics['validation_truncated']} recording(s) longer); "
        f"{metrics['validation_unscored']} could not be scored. Backbone {html.escape(inputs.info['backbone'])}, seed "
        f"{inputs.info['seed']}.</p>"
    )
    labels = inputs.info["label_columns"]
    if len(labels) > 1:
        rows = [[label, *(_interval(metrics["model"]["per_label"][label][n]) for n in names),
                 _interval(metrics["baseline_median"]["per_label"][label]["mae"])] for label in labels]
        parts.append("<h3>Per label</h3>" + html_page.table(rows, ["label", *(METRIC_TITLES.get(n, n) for n in names), "median baseline MAE"]))
    counts = inputs.predictions.groupby("fold").size()
    rows = []
    for fold, per_fold in metrics["model"]["per_fold"].items():
        overall = per_fold["overall"]
        baseline = metrics["baseline_median"]["per_fold"][fold]["overall"]["mae"]
        rows.append([fold, int(counts.get(int(fold), 0)), *(_interval(overall[n]) for n in names), _interval(baseline)])
    parts.append("<h3>Per fold</h3>" + html_page.table(rows, ["fold", "recordings", *(METRIC_TITLES.get(n, n) for n in names),
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
    allowed = verdict["threshold"] * inputs.metrics["baseline_median"]["overall"]["mae"]["value"]

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
                      label=f"± the mean |error| the gate allows ({allowed:.3f}; an average, not a per-recording bound)"
                      if sign > 0 else None)
    axis.set(xlabel=f"true {label}", ylabel=f"predicted {label}", title="Predicted vs true", xlim=(low, high), ylim=(low, high))
    axis.legend(fontsize=8, loc="upper left")

    axis = axes[0, 1]
    axis.hist(residual, bins=40, color="tab:orange")
    axis.axvline(0, color="k", lw=1)
    bias = residual.mean()
    leaning = "over-predicts" if bias > 0 else "under-predicts" if bias < 0 else "no bias"
    axis.set(xlabel="predicted - true", ylabel="recordings", title=f"Residuals (mean {bias:+.3f}: {leaning} on average)")

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
    scored = inputs.predictions
    folds_path = inputs.model_dir / artifacts.FOLDS
    if folds_path.exists():  # every labelled row and its fold: the training side of each fold
        from coughreg.artifacts.shards import SpectrogramShardReader

        assignment = readback.read_table(folds_path, "rerun the train step").to_pandas()
        every = SpectrogramShardReader(artifacts.shard_paths(inputs.features_dir)).index[["id", *labels]]
        index = assignment.merge(every, on="id", how="inner")
    else:
        index = scored[["id", "fold", *labels]]
    all_rows = inputs.config.training.train_validation_data
    folds = sorted(scored["fold"].unique())
    shown = labels[:MAX_LABELS_SHOWN]
    figure, axes = plt.subplots(len(shown), len(folds), figsize=(3.6 * len(folds), 2.8 * len(shown)), squeeze=False)
    low, high = inputs.info["label_range"]
    bins = np.linspace(low, high, 26)
    for r, label in enumerate(shown):
        for c, fold in enumerate(folds):
            axis = axes[r, c]
            train = index[label].to_numpy(float) if all_rows else index.loc[index["fold"] != fold, label].to_numpy(float)
            validation = scored.loc[scored["fold"] == fold, label].to_numpy(float)
            axis.hist(train, bins=bins, density=True, alpha=0.5, color="tab:blue", label=f"train ({len(train)})")
            axis.hist(validation, bins=bins, density=True, histtype="step", lw=2, color="tab:red", label=f"validation ({len(validation)})")
            axis.set(title=f"fold {fold}", xlabel=label, ylabel="density" if c == 0 else None)
            axis.legend(fontsize=7)
    if inputs.config.dataset.data_sample < 1 and "Train" in inputs.config.dataset.data_sample_choice:
        figure.suptitle(f"training rows before dataset.data_sample ({inputs.config.dataset.data_sample:g}) was drawn", fontsize=9)
    figure.tight_layout()
    return figure


def choose_recordings(predictions: pd.DataFrame, labels: list[str] | str, count: int, seed: int,
                      label_range: tuple[float, float] = (0.0, 1.0)) -> list[tuple[int, str]]:
    """``count`` rows to look at: the worst, the best and a random few (row position, why chosen), by the
    absolute error averaged over the labels (in units of the label range)."""
    if count <= 0 or predictions.empty:
        return []
    labels = [labels] if isinstance(labels, str) else labels
    span = (label_range[1] - label_range[0]) or 1.0
    error = np.mean([np.abs(predictions[f"pred_{label}"].to_numpy(float) - predictions[label].to_numpy(float)) / span
                     for label in labels], axis=0)
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
    (``training.run_interpretations``) on one scale shared by every clip, the values, and the clip to play.

    A recording is explained by its own fold's models (those that made its prediction), over the first
    ``MAX_WINDOW_SECONDS`` of its first scored chunk.
    """
    import matplotlib.pyplot as plt

    from coughreg.artifacts.shards import SpectrogramShardReader
    from coughreg.evaluation.occlusion import occlusion_map
    from coughreg.scoring.decode import decode
    from coughreg.training import load_members

    config, info = inputs.config, inputs.info
    labels = info["label_columns"]
    label = labels[0]
    wanted = config.logging.number_of_audios
    count = min(wanted, MAX_AUDIOS)
    chosen = choose_recordings(inputs.predictions, labels, count, info["seed"], tuple(info["label_range"]))
    if not chosen:
        return "", 0
    reader = SpectrogramShardReader(artifacts.shard_paths(inputs.features_dir))
    row_of = {identifier: row for row, identifier in enumerate(reader.index["id"])}
    manifest, _ = artifacts.read_manifest(inputs.ingest_dir)
    audio_of = manifest.set_index("id")["audio_path"]
    hop, rate = info["feature_parameters"]["hop_size"], info["feature_parameters"]["sample_rate"]
    window = min(MAX_WINDOW_SECONDS, config.prediction.inference_chunk_seconds)
    frames = max(1, int(window * rate / hop))
    members = load_members(inputs.model_dir) if config.training.run_interpretations else []
    fold_members = {}
    for member, meta in zip(members, info["members"], strict=True):
        fold_members.setdefault(int(meta["fold"]), []).append(member)

    clips = []
    for number, (row, why) in enumerate(chosen, 1):
        identifier = inputs.predictions["id"].iloc[row]
        spectrogram = reader.spectrogram(row_of[identifier])[:, :frames].astype(np.float32)
        regressors = fold_members.get(int(inputs.predictions["fold"].iloc[row]))
        attribution = occlusion_map(regressors, spectrogram) if regressors else None
        if attribution is not None:
            log.info("explained recording %d/%d (%s)", number, len(chosen), identifier)
        clips.append((row, why, identifier, spectrogram, attribution))
    scale = max((float(np.abs(a.values).max()) for *_, a in clips if a is not None), default=0.0) or 1e-6
    decibels = np.concatenate([s.ravel() for _, _, _, s, _ in clips])
    db_low, db_high = np.percentile(decibels, [1, 99.9])

    parts = []
    if members:
        parts.append(
            "<p class='note'>How to read the right-hand map (occlusion): the spectrogram was cut into patches (mel bands × slices of time) "
            "and each patch in turn replaced by the clip's own background there (each band's median); the colour is how much "
            f"the prediction of {html.escape(label)} by the recording's own fold's model fell when that patch was hidden. "
            "<span style='color:#b2182b'>Red</span>: the patch raised the prediction (the model relies on it); "
            "<span style='color:#2166ac'>blue</span>: it lowered it; white: the model ignored it. Every map uses the same "
            f"scale (±{scale:.3f}), so colours compare across recordings.</p>")
    parts.append(
        "<p class='note'>Spectrograms: log-mel power in dB, on one colour scale for every recording. The worst and best "
        + ("predictions (the error averaged over the labels) " if len(labels) > 1 else "predictions ")
        + f"first, then a few drawn at random. Pictures and sound cover the first {window:g} s of each recording."
        + (f" {count} of the {wanted} recordings logging.number_of_audios asks for are shown (at most {MAX_AUDIOS})." if wanted > count else "")
        + "</p>")
    for row, why, identifier, spectrogram, attribution in clips:
        values = "; ".join(
            f"{html.escape(name)}: true {inputs.predictions[name].iloc[row]:.3f}, predicted {inputs.predictions[f'pred_{name}'].iloc[row]:.3f}"
            for name in labels)
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
            decoded = decode(artifacts.recording_path(inputs.ingest_dir, audio_of[identifier], identifier), rate, max_seconds=window)
            player = html_page.audio_tag(decoded.samples, rate, f"recording {identifier}", max_seconds=window)
        except Exception as exc:  # noqa: BLE001 - a clip that cannot be played still has its pictures
            player = f"<p class='note'>The recording cannot be played here: {html.escape(str(exc))}</p>"
        parts.append(
            f"<div class='clip'><h3>{html.escape(str(identifier))}: {values} ({why}), fold {inputs.predictions['fold'].iloc[row]}, "
            f"{inputs.predictions['duration_s'].iloc[row]:.1f} s</h3>{player}"
            f"{html_page.figure_to_img(figure, f'spectrogram of {identifier}')}</div>"
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
        html_page.table(rows, ["what", "value"], "left")
        + "<h3>Content hashes (SHA-256)</h3>" + html_page.table(hashes, ["file", "SHA-256"], "left")
        + "<h3>Libraries</h3>" + html_page.table(code_rows(lineage["libraries"]), ["package", "version"], "left")
        + html_page.details("The resolved config the evaluation ran with", html_page.preformatted(lineage["config"]))
    )


def build(inputs: ReportInputs) -> str:
    """The whole page."""
    html_page.matplotlib_agg()
    labels = inputs.info["label_columns"]
    sections = [("Quality gate", gate_section(inputs.metrics)), ("Metrics", metrics_section(inputs))]
    for label in labels[:MAX_LABELS_SHOWN]:
        title = "Where the errors are" + (f": {label}" if len(labels) > 1 else "")
        sections.append((title, html_page.figure_to_img(error_figures(inputs, label), f"errors of {label}")))
    if len(labels) > MAX_LABELS_SHOWN:
        note = (f"<p class='note'>{len(labels) - MAX_LABELS_SHOWN} more labels are in the metrics tables above; "
                f"the figures show the first {MAX_LABELS_SHOWN}.</p>")
        sections.append(("Labels not drawn", note))
    sections.append(("Folds", html_page.figure_to_img(fold_figure(inputs), "MAE per fold")
                     + html_page.figure_to_img(label_distribution_figure(inputs), "label distributions")))
    if inputs.history:
        figure = html_page.training_curves(inputs.history, inputs.config.training.loss_function,
                                        inputs.metrics["baseline_median"]["overall"]["mae"]["value"])
        sections.append(("Training curves", html_page.figure_to_img(figure, "training curves")))
    robust = robustness_section(inputs)
    if robust:
        sections.append(("Robustness to the recording chain", robust))
    clips, count = recordings_section(inputs)
    if count:
        sections.append((f"Recordings ({count}, logging.number_of_audios)", clips))
    sections.append(("Lineage", lineage_section(inputs.lineage)))
    return html_page.page(f"{inputs.config.experiment_name}: evaluation", sections, lead=summary_sentence(inputs))
