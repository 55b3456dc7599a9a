"""Step 3, training: spectrogram shards -> one timm regressor per selected fold (and seed).

Folds are assigned from the run's seed (``folds``), each member is fitted by ``member``, and the
model folder is written last: validation predictions, folds, history, curves, ``model.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from coughreg import artifacts
from coughreg.artifacts.shards import SpectrogramShardReader
from coughreg.config.loading import save_config
from coughreg.config.ownership import chain_keys
from coughreg.config.schema import ExperimentConfig
from coughreg.io import html_page
from coughreg.io.storage import atomic_path, atomic_write_text
from coughreg.model.network import CoughRegressor, create_model
from coughreg.runtime.errors import CoughPipelineError
from coughreg.scoring import readback
from coughreg.training.data import ChainViews
from coughreg.training.distributed import is_main_process, start_process_group, stop_process_group
from coughreg.training.factories import autocast_dtype, select_device
from coughreg.training.folds import fold_rows, split_folds
from coughreg.training.member import TrainingRun, train_member

log = logging.getLogger(__name__)

SEED_RECORD = "seed.json"


@dataclass
class TrainResult:
    out_dir: Path
    members: list[dict]
    predictions_path: Path
    history: list[dict]
    seed: int


def run_seed(config: ExperimentConfig, out_dir: str | Path, identity: str | None = None) -> ExperimentConfig:
    """The config with a concrete seed: ``environment.seed`` as given, or, for -1, a seed drawn for this run.

    A drawn seed is written to ``seed.json`` in the output folder first, so a step restarted into the
    same folder resumes with it. With an ``identity`` (the KFP output artifact's URI, which a retried
    pod keeps) the seed is derived from it instead of drawn, so a retry on a fresh pod finds the
    same checkpoints; a new run has a new URI and so a new seed.
    """
    if config.environment.seed >= 0:
        return config
    record = Path(out_dir) / SEED_RECORD
    if _ranks_started():  # ranks started by hand (torchrun): rank 0 decides, the others take its seed
        seed, how = _from_rank_zero(lambda: _draw(record, identity))
    else:
        seed, how = _draw(record, identity)
    if is_main_process():
        atomic_write_text(record, json.dumps({"seed": seed, "how": how}))
    log.info("environment.seed is -1: seed %d, %s", seed, how)
    resolved = config.model_copy(deep=True)
    resolved.environment.seed = seed
    resolved.resolved = resolved.resolved.model_copy(update={"seed_drawn": True}) if resolved.resolved else None
    return resolved


def _draw(record: Path, identity: str | None) -> tuple[int, str]:
    if record.exists():
        seed = readback.require_keys(readback.read_json(record, "delete it to draw a new seed"), {"seed": int}, record,
                                     "delete it to draw a new seed")["seed"]
        how = f"the seed drawn for this folder ({record})"
    elif identity:
        seed = int(hashlib.sha256(identity.encode()).hexdigest(), 16) % (2**31 - 1)
        how = f"drawn from the run's output URI {identity}"
    else:
        seed = secrets.randbelow(2**31 - 1)
        how = "drawn at random"
    return seed, how


def _ranks_started() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def _from_rank_zero(decide):
    """What rank 0 decides, on every rank."""
    box = [decide() if is_main_process() else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def train(features_dir: str | Path, out_dir: str | Path, config: ExperimentConfig, identity: str | None = None) -> TrainResult:
    """Train the selected folds (x ``number_of_seeds_per_run`` seeds) on the spectrogram shards.

    Args:
        features_dir: the features step's output (``shards.json`` and the shards).
        out_dir: the model artifact folder.
        config: the config (its audio keys must be those the shards were made with); with
            ``cluster.checkpoint_uri`` set, per-epoch checkpoints are also kept there for retried pods.
        identity: what identifies this run's output across retries (see ``run_seed``).
    """
    features_dir, out_dir = Path(features_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started_group = start_process_group(use_cuda=bool(config.environment.gpus))
    try:
        return _train(features_dir, out_dir, run_seed(config, out_dir, identity))
    finally:
        if started_group:
            stop_process_group()


def _train(features_dir: Path, out_dir: Path, config: ExperimentConfig) -> TrainResult:
    seed = config.seed
    index = artifacts.read_shard_index(features_dir)
    artifacts.check_shards_fit(index, config, features_dir)
    paths = artifacts.shard_paths(features_dir)
    reader = SpectrogramShardReader(paths)
    table = reader.index
    labels_cols = config.dataset.label_columns
    missing = [c for c in labels_cols if c not in table.columns]
    if missing:
        raise CoughPipelineError(f"{features_dir}: label column(s) {missing} are not in the shards (rerun features)")
    labelled = table[table["split"].isin(["train", "validation"])].copy()
    labelled = labelled[np.isfinite(labelled[labels_cols].to_numpy(dtype=float)).all(axis=1)]
    if len(labelled) < 2:
        raise CoughPipelineError(f"{features_dir}: {len(labelled)} labelled recordings; training needs at least 2")
    labelled["fold"], fold_list, scheme = split_folds(labelled, config, seed)
    log.info("validation: %s; training folds %s; seed %d", scheme, fold_list, seed)

    device = select_device(config)
    amp_dtype = autocast_dtype(device, config.environment.mixed_precision_training)
    amp_inference = autocast_dtype(device, config.environment.mixed_precision_inference)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    frames_per_second = index["feature_parameters"]["sample_rate"] / index["feature_parameters"]["hop_size"]
    crop_frames = int(config.audio.training_chunk_seconds * frames_per_second) + 1
    label_range = (config.ingest.label_min, config.ingest.label_max)

    views = None
    chain = config.augmentation
    if chain.recording_chain_probability > 0 or chain.recording_chain_consistency > 0:
        view_paths = artifacts.view_shard_paths(features_dir)
        if not view_paths:
            key, value = next((k, getattr(chain, k)) for k in ("recording_chain_probability", "recording_chain_consistency")
                              if getattr(chain, k) > 0)
            raise CoughPipelineError(
                f"{features_dir}: augmentation.{key} is {value:g} but these features hold no "
                "recording-chain copies; rerun features with augmentation.recording_chain_views")
        views = ChainViews(view_paths, list(table["id"]))
        if chain.recording_chain_consistency > 0:
            log.info("every training clip comes as recorded and as one of its %d recording-chain copies, the copy drawn "
                     "to the recording's score (consistency weight %g)", index["views"], chain.recording_chain_consistency)
        else:
            log.info("training clips come from one of their %d recording-chain copies with probability %g", index["views"],
                     chain.recording_chain_probability)
    run = TrainingRun(config, paths, table, reader, device, amp_dtype, amp_inference, crop_frames, label_range, out_dir, seed,
                      index.get("shard_set", ""), views)
    members, history, predictions = [], [], []
    for fold in fold_list:
        train_rows, validation_rows = fold_rows(labelled, fold, config, seed)
        seed_predictions = []
        for seed_index in range(config.environment.number_of_seeds_per_run):
            member, validation, records = train_member(run, fold, seed_index, train_rows, validation_rows)
            members.append(member)
            seed_predictions.append(validation)
            history.extend(records)
        fold_prediction = np.mean(seed_predictions, axis=0)
        frame = table.loc[validation_rows, ["id", "split", "group", "duration_s", *labels_cols]].reset_index(drop=True)
        frame.insert(1, "fold", fold)
        for k, label in enumerate(labels_cols):
            frame[f"pred_{label}"] = fold_prediction[:, k]
        predictions.append(frame)

    result = TrainResult(out_dir, members, out_dir / artifacts.PREDICTIONS, history, seed)
    if not is_main_process():
        return result
    with atomic_path(out_dir / artifacts.PREDICTIONS) as tmp:
        pd.concat(predictions, ignore_index=True).to_parquet(tmp, index=False)
    with atomic_path(out_dir / artifacts.FOLDS) as tmp:
        labelled[["id", "fold"]].reset_index(drop=True).to_parquet(tmp, index=False)
    atomic_write_text(out_dir / artifacts.HISTORY, json.dumps(history, indent=2))
    if history:
        html_page.save_png(html_page.training_curves(history, config.training.loss_function), out_dir / artifacts.CURVES)
    save_config(config, out_dir, chain_keys("train"))
    info = {
        "backbone": config.architecture.backbone,
        "label_columns": labels_cols,
        "label_range": list(label_range),
        "validation_scheme": scheme,
        "seed": seed,
        "seed_drawn": bool(config.resolved and config.resolved.seed_drawn),
        "device": str(device),
        "mixed_precision": str(amp_dtype) if amp_dtype else None,
        "feature_parameters": index["feature_parameters"],
        "shard_set": index.get("shard_set"),
        "members": members,
    }
    atomic_write_text(out_dir / artifacts.MODEL_INFO, json.dumps(info, indent=2))  # last: the folder is finished
    return result


def load_members(model_dir: str | Path) -> list[CoughRegressor]:
    """The trained regressors of a model folder, built from the config saved beside them, in eval mode on the CPU.

    Raises:
        CoughPipelineError: the folder's training did not finish, or a weights file is damaged (naming it).
    """
    info = artifacts.read_model_info(model_dir)
    config = artifacts.read_config(model_dir, "train")
    regressors = []
    for member in info["members"]:
        model = create_model(config, tuple(info["label_range"]))
        path = Path(model_dir) / member["weights"]
        try:
            model.load_state_dict(readback.read_tensors(path, "rerun the train step"))
        except RuntimeError as exc:  # tensors of another network
            raise CoughPipelineError(f"{path}: does not fit the model its config describes ({str(exc).splitlines()[0][:200]}); "
                                     "rerun the train step") from None
        regressors.append(model.eval())
    return regressors
