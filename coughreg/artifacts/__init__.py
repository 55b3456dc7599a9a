"""The artifact folders the steps hand each other: their names, their readers, what each was made with.

    ingest   -> manifest.parquet (written last), audio/, ingest_report.json, quality_report.html
    features -> shards.json (the shard index, written last), shards/<set>/part-*.parquet, features_report.json
    train    -> model.json (written last), fold<k>_seed<i>/model.safetensors, predictions.parquet,
                folds.parquet, history.json, training_curves.png
    evaluate -> metrics.json (written last; the quality gate's verdict inside), predictions.parquet, report.html
    export   -> scorer.json (written last), scorer.ts, scorer.pt2, coughscore/, score.py, provenance.json,
                README.md, requirements.txt
    score    -> test_predictions.parquet (the test table scored with the exported scorer)

Every folder also holds ``config.yaml``: the keys that shaped it (its step's and its upstream
steps', see ``coughreg.config.ownership``). A later step reads its upstream keys from there, never
from its own config, and refuses a folder that does not fit with a message naming both values.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from coughreg.audio.feature_spec import feature_parameters
from coughreg.config.loading import CONFIG_FILE_NAME, load_config
from coughreg.config.schema import ExperimentConfig
from coughreg.runtime.errors import CoughPipelineError
from coughreg.scoring import readback
from coughreg.scoring.folder import SCORER_INFO, sha256_file

CONFIG = CONFIG_FILE_NAME

MANIFEST = "manifest.parquet"
INGEST_REPORT = "ingest_report.json"
QUALITY_HTML = "quality_report.html"
AUDIO_FOLDER = "audio"

SHARD_INDEX = "shards.json"
FEATURES_REPORT = "features_report.json"
PART_REPORT = "part.json"

MODEL_INFO = "model.json"
PREDICTIONS = "predictions.parquet"
FOLDS = "folds.parquet"
HISTORY = "history.json"
CURVES = "training_curves.png"

METRICS = "metrics.json"
REPORT = "report.html"
ROBUSTNESS = "robustness.parquet"  # each measured clip's score as recorded and through each recording-chain transform

PROVENANCE = "provenance.json"
GATE_NOTE = "quality_gate_failed.txt"  # where the scorer would be, when the model failed the quality gate

TEST_PREDICTIONS = "test_predictions.parquet"

# What marks each step's folder as finished (each step writes it last).
FINISHED = {"ingest": MANIFEST, "features": SHARD_INDEX, "train": MODEL_INFO, "evaluate": METRICS, "export": SCORER_INFO}


def require(folder: str | Path, name: str, step: str) -> Path:
    """The path of ``name`` in a step's output folder; a clear error when it is not there."""
    path = Path(folder) / name
    if not path.exists():
        raise CoughPipelineError(f"{path}: missing; {folder} is not a finished {step} output (run the {step} step into it first)")
    return path


def read_config(folder: str | Path, step: str) -> ExperimentConfig:
    """The config an artifact was made with (its ``config.yaml``)."""
    require(folder, FINISHED[step], step)
    return load_config(require(folder, CONFIG, step))


def read_json(folder: str | Path, name: str, step: str, kind: type = dict):
    """A JSON file of a step's output folder (``coughreg.scoring.readback``: data only, a damaged file named)."""
    return readback.read_json(require(folder, name, step), f"rerun the {step} step", kind)


def read_manifest(folder: str | Path):
    """The manifest of an ingest folder as a DataFrame, and its metadata (source, layout, label and group columns)."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise CoughPipelineError(f"{path}: no manifest; run the ingest step into {folder} first (or it did not finish)")
    table = readback.read_table(path, "rerun the ingest step")
    meta = json.loads((table.schema.metadata or {}).get(b"coughreg.manifest", b"{}"))
    return table.to_pandas(), meta


def recording_path(ingest_dir: str | Path, audio_path: str, identifier: str) -> Path:
    """The recording a manifest row names: a file under the ingest folder's ``audio/``, never anywhere else.

    Every step that reads a recording through a manifest (features, evaluate, test scoring, the report) asks here.
    The path is judged as written (an ingest folder mirrored from S3 is a folder of links into the download
    cache, which are its own).

    Raises:
        CoughPipelineError: ``audio_path`` is absolute or climbs out with ``..``; the message names the manifest,
            the row and the path (the caller refuses that row alone).
    """
    folder = Path(ingest_dir)
    path = folder / str(audio_path)
    inside = os.path.normpath(folder / AUDIO_FOLDER) + os.sep
    if Path(str(audio_path)).is_absolute() or not os.path.normpath(path).startswith(inside):
        raise CoughPipelineError(f"{folder / MANIFEST}: the row of {identifier!r} names audio_path {str(audio_path)!r}, which is "
                                 f"outside {folder / AUDIO_FOLDER}; that row is refused (the manifest was changed after "
                                 "ingest: run the ingest step again)")
    return path


def recording_sources(ingest_dir: str | Path, rows) -> list[tuple[str, object]]:
    """``(id, path)`` of each ``(id, audio_path)`` manifest row, for ``Scorer.score_paths``; a row whose path leaves
    the ingest folder gets a source that fails with the reason (``recording_path``), so it is one failed row."""
    items: list[tuple[str, object]] = []
    for identifier, audio_path in rows:
        try:
            items.append((identifier, recording_path(ingest_dir, audio_path, identifier)))
        except CoughPipelineError as exc:
            items.append((identifier, _refused(exc)))
    return items


def _refused(error: CoughPipelineError):
    def fetch():
        raise error

    return fetch


def read_shard_index(folder: str | Path) -> dict:
    return read_json(folder, SHARD_INDEX, "features")


def shard_paths(folder: str | Path) -> list[Path]:
    """The shards of a features folder, from its index."""
    return [Path(folder) / name for name in read_shard_index(folder)["shards"]]


def view_shard_paths(folder: str | Path) -> list[Path]:
    """The shards of a features folder's recording-chain copies (``augmentation.recording_chain_views``; none: [])."""
    return [Path(folder) / name for name in read_shard_index(folder).get("view_shards", [])]


MODEL_KEYS = {"members": list, "backbone": str, "label_columns": list, "label_range": list}


def read_model_info(folder: str | Path) -> dict:
    """A train output's ``model.json``, with every member's weights file present: a folder whose training did
    not finish (or lost a file) is named here, before anything reads it or is written from it."""
    path = Path(folder) / MODEL_INFO
    info = readback.require_keys(read_json(folder, MODEL_INFO, "train"), MODEL_KEYS, path, "rerun the train step")
    for member in info["members"]:
        weights = member.get("weights") if isinstance(member, dict) else None
        if not isinstance(weights, str) or not (Path(folder) / weights).is_file():
            raise CoughPipelineError(f"{Path(folder) / str(weights)}: missing; {folder} is not a finished train output "
                                     f"(its {MODEL_INFO} names a member without its weights); rerun the train step")
    return info


def model_weights_sha256(model_dir: str | Path, info: dict) -> dict[str, str]:
    """The SHA-256 of each member's weights file named in a model folder's ``model.json``."""
    return {m["weights"]: sha256_file(Path(model_dir) / m["weights"]) for m in info["members"]}


def expected_feature_parameters(config: ExperimentConfig) -> dict:
    """The shard parameters a config asks for: the front end's and the length limit features honours."""
    return {**feature_parameters(config.audio), "max_seconds": float(config.prediction.max_inference_chunk_seconds)}


def _config_key(parameter: str) -> str:
    if parameter == "max_seconds":
        return "prediction.max_inference_chunk_seconds"
    return f"audio.{parameter}" if parameter in ExperimentConfig.model_fields["audio"].annotation.model_fields else parameter


def check_shards_fit(index: dict, config: ExperimentConfig, folder: str | Path) -> None:
    """Refuse shards made with other audio parameters than the config asks for, naming both values."""
    made = index.get("feature_parameters", {})
    asked = expected_feature_parameters(config)
    differences = [
        f"{_config_key(key)}: the shards were made with {made.get(key)!r}, the config says {value!r}"
        for key, value in asked.items()
        if made.get(key) != value
    ]
    if differences:
        raise CoughPipelineError(
            f"{folder}: these shards do not fit the config:\n  " + "\n  ".join(differences)
            + "\nRun the features step with these values, or train with the values the shards were made with."
        )


def check_same_shards(model_info: dict, index: dict, model_dir: str | Path, features_dir: str | Path) -> None:
    """A model is evaluated on the shard set it was trained on."""
    trained_on, given = model_info.get("shard_set"), index.get("shard_set")
    if trained_on is not None and trained_on != given:
        raise CoughPipelineError(
            f"{features_dir}: shard set {given} is not the one {model_dir} was trained on ({trained_on}); "
            "pass the features folder of the same run"
        )
