"""Step 4, evaluation: the validation recordings scored as users will score them -> metrics with intervals
beside baselines, the quality gate, and the report.

Each validation recording is decoded from the ingested audio and scored by its fold's models with the
scoring pipeline's own code (``coughreg.scoring``: the same decoding, chunking and padding as the
exported scorer, whose numbers it matches), so the metrics are those of the model that ships. The
model is compared with predicting the training labels' mean and median (per fold, from the rows that
fold trained on), every metric with a bootstrap 95% interval (``coughreg.evaluation.intervals``); the quality gate
(``coughreg.evaluation.gate``) decides from that whether it ships. The report (``coughreg.evaluation.report``)
shows it all to the people who decide.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from coughreg import artifacts
from coughreg.artifacts import model_weights_sha256
from coughreg.audio.frontend import LogMel
from coughreg.config.loading import save_config
from coughreg.config.ownership import chain_keys, with_upstream
from coughreg.config.schema import ExperimentConfig
from coughreg.evaluation import gate, lineage, robustness
from coughreg.evaluation.intervals import flat_scalars, metrics_with_intervals
from coughreg.evaluation.report import ReportInputs, build
from coughreg.io.storage import atomic_path, atomic_write_text
from coughreg.model.metrics import metric_value, regression_metrics
from coughreg.model.network import CoughScorer
from coughreg.runtime.errors import CoughPipelineError
from coughreg.scoring import readback
from coughreg.scoring.cpus import plan_threads
from coughreg.scoring.policy import Policy
from coughreg.scoring.scorer import Scorer
from coughreg.training import load_members
from coughreg.training.factories import autocast_dtype

log = logging.getLogger(__name__)


@dataclass
class EvaluationResult:
    metrics: dict
    metrics_path: Path
    report_path: Path
    predictions_path: Path

    @property
    def gate(self) -> dict:
        return self.metrics["quality_gate"]


SCORE_COLUMNS = ["duration_s", "n_chunks", "truncated", "status", "reason"]


def scoring_policy(config: ExperimentConfig) -> Policy:
    """The chunking the config asks for: the evaluation step's and, through it, the exported scorer's."""
    prediction = config.prediction
    return Policy(config.audio.sample_rate, prediction.inference_chunk_seconds, prediction.max_inference_chunk_seconds)


def score_validation(model_dir: Path, ingest_dir: Path, trained: pd.DataFrame, info: dict, config: ExperimentConfig,
                     workers: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every validation recording decoded from the ingested audio and scored by its own fold's models (the
    seeds averaged) through the scoring pipeline: one row each, with the training's id, fold and labels.

    Up to ``prediction.robustness_recordings`` of them are also scored through each recording-chain transform
    (``coughreg.evaluation.robustness``): the second table, one row per clip, transform and label."""
    manifest, _ = artifacts.read_manifest(ingest_dir)
    audio = manifest[(manifest["status"] == "ok") & (manifest["split"] != "test")].set_index("id")["audio_path"]
    missing = sorted(set(trained["id"]) - set(audio.index))
    if missing:
        raise CoughPipelineError(f"{ingest_dir}: {len(missing)} validation recording(s) of {model_dir} are not in this ingest "
                                 f"output (first: {missing[0]}); pass the ingest output of the same run")
    labels = info["label_columns"]
    members = load_members(model_dir)
    policy = scoring_policy(config)
    # The exported scorer runs on the CPU in fp32; on a GPU, full fp32 (no TF32) unless mixed precision is asked for.
    device = torch.device("cuda" if torch.cuda.is_available() and config.environment.gpus else "cpu")
    amp = autocast_dtype(device, config.environment.mixed_precision_inference) if device.type == "cuda" else None
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    threads = torch.get_num_threads()
    workers = plan_threads(workers)
    measured = set(robustness.choose(sorted(trained["id"]), config.prediction.robustness_recordings)) \
        if config.prediction.robustness_recordings else set()
    try:
        parts, changes = [], []
        for fold, rows in trained.groupby("fold", sort=True):
            ensemble = CoughScorer(LogMel.from_config(config.audio),
                                   [m for m, meta in zip(members, info["members"], strict=True) if meta["fold"] == fold]).eval().to(device)

            def predict(batch: np.ndarray, model=ensemble) -> np.ndarray:
                waveform = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(device)
                with torch.inference_mode(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    return model(waveform).float().cpu().numpy()

            scorer = Scorer.from_predict(predict, policy, labels)
            log.info("fold %s: scoring %d validation recordings from audio", fold, len(rows))
            scored = scorer.score_paths(artifacts.recording_sources(ingest_dir, [(i, audio[i]) for i in rows["id"]]), workers)
            frame = rows.drop(columns=[c for c in rows.columns if c.startswith("pred_")]).reset_index(drop=True)
            table = pd.DataFrame(scored)
            for label in labels:
                frame[f"pred_{label}"] = table[label].to_numpy(dtype=float)
            for column in SCORE_COLUMNS:
                frame[column] = table[column].to_numpy()
            parts.append(frame)
            chosen = [i for i in rows["id"] if i in measured]
            if chosen:
                fold_scorer = robustness.FoldScorer(int(fold), lambda samples, s=scorer: s.score_samples(samples)[0],
                                                    policy.sample_rate, policy.max_seconds)
                sources = dict(artifacts.recording_sources(ingest_dir, [(i, audio[i]) for i in chosen]))
                changes.append(robustness.measure(fold_scorer, list(sources.items()), labels, workers=workers))
    finally:
        torch.set_num_threads(threads)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    changes = pd.concat(changes, ignore_index=True) if changes else pd.DataFrame(columns=robustness.CHANGE_COLUMNS)
    return pd.concat(parts, ignore_index=True), changes


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
    """Metrics of the scored rows beside the baselines on the same rows, with bootstrap 95% intervals, overall,
    per label and per fold (a recording that could not be scored is counted, not scored as anything).

    The headline numbers are also flat keys (``validation_mae``, ``baseline_median_mae``, ...): KFP's
    ``Metrics`` shows scalars only, and the quality gate reads them.
    """
    labels = info["label_columns"]
    unscored = int((predictions["status"] != "ok").sum()) if "status" in predictions else 0
    if unscored:
        predictions = predictions[predictions["status"] == "ok"]
    if predictions.empty:
        raise CoughPipelineError("no validation recording could be scored (see the reasons in the evaluation's predictions.parquet)")
    truth = predictions[labels].to_numpy(dtype=float)
    predicted = predictions[[f"pred_{label}" for label in labels]].to_numpy(dtype=float)
    baselines = _baseline_predictions(predictions, info, labels)
    model = regression_metrics(truth, predicted)
    flat_baselines = {kind: regression_metrics(truth, values) for kind, values in baselines.items()}
    detailed = metrics_with_intervals(
        truth, {"model": predicted, "baseline_mean": baselines["mean"], "baseline_median": baselines["median"]},
        predictions["fold"].to_numpy(), labels, first=config.prediction.metric.lower(), seed=int(info["seed"]) % 2**32,
    )
    for kind in ("baseline_mean", "baseline_median"):
        _without_correlations(detailed[kind])
    return {
        "validation_rows": len(predictions),
        "validation_unscored": unscored,
        "metric": config.prediction.metric,
        "metric_value": metric_value(model, config.prediction.metric),
        **{f"validation_{k}": v for k, v in model.items()},
        **{f"baseline_{kind}_{k}": v for kind, values in flat_baselines.items() for k, v in values.items()},
        **{k: v for k, v in flat_scalars(detailed).items() if k not in ("validation_mae", "validation_rmse", "validation_r2")},
        "mae_vs_median_baseline": model["mae"] / flat_baselines["median"]["mae"] if flat_baselines["median"]["mae"] > 0 else float("nan"),
        "folds": sorted(int(f) for f in predictions["fold"].unique()),
        "validation_scheme": info.get("validation_scheme", ""),
        **detailed,
    }


def _without_correlations(tree: dict) -> None:
    """A baseline predicts one number per fold: across folds its correlation only says how the folds' constants
    line up with the truth, so it is left undefined rather than shown as if it meant something."""
    for key, value in tree.items():
        if key in ("pearson", "spearman"):
            tree[key] = {"value": float("nan"), "ci95": [float("nan"), float("nan")]}
        elif isinstance(value, dict):
            _without_correlations(value)


def json_ready(value):
    """NaN and infinities become null: ``metrics.json`` is strict JSON that every parser reads."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def noise_floor(ingest_dir: Path) -> float | None:
    """The generator's expected noise floor (best reachable MAE) when the data is the project's own generated data."""
    path = ingest_dir / artifacts.INGEST_REPORT
    generator = readback.read_json(path, "rerun the ingest step").get("generator") if path.exists() else None
    value = generator.get("noise_floor_mae_expected") if isinstance(generator, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def evaluate(model_dir: str | Path, features_dir: str | Path, ingest_dir: str | Path, out_dir: str | Path,
             config: ExperimentConfig, workers: int | None = None) -> EvaluationResult:
    """Score the validation recordings of a train step from audio; write predictions, metrics, the gate's verdict and the report.

    Args:
        model_dir: the train step's output (``model.json``, the weights, which rows each fold validated on).
        features_dir: the features step's output the model was trained on (spectrograms for the report).
        ingest_dir: the ingest step's output the features were made from (the recordings themselves).
        out_dir: where ``predictions.parquet``, ``metrics.json`` and ``report.html`` go.
        config: the evaluate step's keys (``prediction.inference_chunk_*``, ``prediction.max_mae_to_median_baseline``,
            ``logging.number_of_audios``, ``training.run_interpretations``, ``experiment_name``); the model is
            rebuilt from the config saved beside it.
        workers: recordings scored at once (default: one per CPU).
    """
    model_dir, features_dir, ingest_dir, out_dir = Path(model_dir), Path(features_dir), Path(ingest_dir), Path(out_dir)
    config = with_upstream(config, "evaluate", artifacts.read_config(model_dir, "train"))
    info = artifacts.read_model_info(model_dir)
    artifacts.check_same_shards(info, artifacts.read_shard_index(features_dir), model_dir, features_dir)
    trained = readback.read_table(artifacts.require(model_dir, artifacts.PREDICTIONS, "train"), "rerun the train step").to_pandas()
    predictions, changes = score_validation(model_dir, ingest_dir, trained, info, config, workers)
    history = artifacts.read_json(model_dir, artifacts.HISTORY, "train", list) if (model_dir / artifacts.HISTORY).exists() else []
    metrics = compute_metrics(predictions, info, config)
    verdict = gate.decide(metrics, config.prediction.max_mae_to_median_baseline)
    metrics.update(quality_gate=verdict, quality_gate_passed=int(verdict["passed"]),
                   max_mae_to_median_baseline=verdict["threshold"], model_weights_sha256=model_weights_sha256(model_dir, info),
                   validation_truncated=int(predictions["truncated"].sum()), noise_floor_mae=noise_floor(ingest_dir))
    if config.prediction.robustness_recordings:
        metrics["robustness"] = robustness.summarize(changes, info["label_columns"], sample_rate=config.audio.sample_rate)
        metrics.update(robustness.flat(metrics["robustness"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    predictions_path = out_dir / artifacts.PREDICTIONS
    with atomic_path(predictions_path) as tmp:
        predictions.to_parquet(tmp, index=False)
    if config.prediction.robustness_recordings:
        with atomic_path(out_dir / artifacts.ROBUSTNESS) as tmp:
            changes.to_parquet(tmp, index=False)
    report_path = out_dir / artifacts.REPORT
    scored = predictions[predictions["status"] == "ok"].reset_index(drop=True)
    config_path = save_config(config, out_dir, chain_keys("evaluate"))
    facts = lineage.collect(ingest_dir, features_dir, model_dir, info, config_path.read_text())
    metrics["lineage"] = {k: v for k, v in facts.items() if k != "config"}
    atomic_write_text(report_path, build(ReportInputs(scored, metrics, history, info, config, ingest_dir, features_dir, model_dir, facts,
                                                      changes)))
    metrics_path = out_dir / artifacts.METRICS
    atomic_write_text(metrics_path, json.dumps(json_ready(metrics), indent=2, allow_nan=False))  # last: the folder is finished
    log.info(
        "evaluation: validation MAE %.4f (median baseline %.4f, mean baseline %.4f) on %d recordings -> %s",
        metrics["validation_mae"], metrics["baseline_median_mae"], metrics["baseline_mean_mae"], metrics["validation_rows"], report_path,
    )
    log.info("quality gate %s: %s", verdict["verdict"], verdict["message"])
    return EvaluationResult(metrics, metrics_path, report_path, predictions_path)
