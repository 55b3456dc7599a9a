"""One member of a training run: a model for one fold and one seed, fitted, validated and saved.

A finished member is kept and skipped on a rerun; an interrupted one resumes from its checkpoint;
on CUDA out-of-memory the batch is halved when ``training.automatically_adjust_batch_size`` asks.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from coughreg.artifacts.shards import SpectrogramShardReader
from coughreg.config.schema import ExperimentConfig
from coughreg.io.storage import atomic_path, atomic_write_text
from coughreg.model.metrics import baseline_constants, regression_metrics
from coughreg.model.network import CoughRegressor, create_model
from coughreg.runtime.errors import CoughPipelineError
from coughreg.scoring import readback
from coughreg.training import checkpoints
from coughreg.training.augment import SpectrogramAugmenter
from coughreg.training.augment import enabled as augmentation_enabled
from coughreg.training.data import ChainViews, SpectrogramDataset, create_loader
from coughreg.training.distributed import distributed_context, is_main_process
from coughreg.training.factories import create_loss, create_optimizer, create_scheduler
from coughreg.training.loop import predict, train_one_epoch

log = logging.getLogger(__name__)

MEMBER_DONE = "member.json"
MEMBER_WEIGHTS = "model.safetensors"
MEMBER_VALIDATION = "validation.npy"


@dataclass
class TrainingRun:
    """What every member of a training run shares."""

    config: ExperimentConfig
    paths: list[Path]
    table: pd.DataFrame
    reader: SpectrogramShardReader
    device: torch.device
    amp_dtype: torch.dtype | None
    amp_inference: torch.dtype | None
    crop_frames: int
    label_range: tuple[float, float]
    out_dir: Path
    seed: int
    shard_set: str = ""
    views: ChainViews | None = None  # the recording-chain copies training may draw from


def train_member(run: TrainingRun, fold: int, seed_index: int, train_rows: np.ndarray, validation_rows: np.ndarray):
    """One model -> (its description, its validation predictions (rows, labels), its history)."""
    config = run.config
    member_dir = run.out_dir / f"fold{fold}_seed{seed_index}"
    batch_size = config.training.batch_size
    if (member_dir / MEMBER_DONE).exists():
        again = "delete the member's folder to train it again"
        done = readback.require_keys(readback.read_json(member_dir / MEMBER_DONE, again), {"member": dict, "history": list},
                                     member_dir / MEMBER_DONE, again)
        made_with = checkpoints.fingerprint(config, run.shard_set, train_rows, done["member"].get("batch_size", batch_size))
        if done.get("fingerprint") == made_with:
            log.info("fold %d seed %d: already trained, kept (%s)", fold, done["member"].get("seed"), member_dir)
            return done["member"], readback.read_array(member_dir / MEMBER_VALIDATION, again), done["history"]
        log.warning("%s: trained with another config or data; training this member again", member_dir)
        (member_dir / MEMBER_DONE).unlink()
    while True:
        try:
            return _fit(run, fold, seed_index, train_rows, validation_rows, member_dir, batch_size)
        except torch.cuda.OutOfMemoryError:
            if not config.training.automatically_adjust_batch_size or batch_size == 1:
                raise CoughPipelineError(
                    f"fold {fold}: out of GPU memory at batch_size {batch_size}; lower training.batch_size or set "
                    "training.automatically_adjust_batch_size"
                ) from None
            batch_size //= 2
            torch.cuda.empty_cache()
            (member_dir / checkpoints.CHECKPOINT).unlink(missing_ok=True)
            log.warning("fold %d: out of GPU memory; retrying with batch_size %d", fold, batch_size)


def dataset_statistics(reader: SpectrogramShardReader, rows: np.ndarray, limit: int = 2000) -> tuple[float, float]:
    """Mean and std of the training rows' log-mel values (streamed, up to ``limit`` rows)."""
    total = 0.0
    total_sq = 0.0
    count = 0
    for row in rows[:limit]:
        values = reader.spectrogram(int(row)).astype(np.float64)
        total += values.sum()
        total_sq += np.square(values).sum()
        count += values.size
    mean = total / max(count, 1)
    return float(mean), float(math.sqrt(max(total_sq / max(count, 1) - mean**2, 1e-12)))


def create_ema(model: torch.nn.Module, decay: float):
    """timm's ModelEmaV3: every float in the state dict (BatchNorm statistics included), with a warm-up of the decay."""
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay, use_warmup=True, warmup_power=3 / 4)


def _fit(run: TrainingRun, fold, seed_index, train_rows, validation_rows, member_dir: Path, batch_size: int):
    config, table, device = run.config, run.table, run.device
    labels_cols = config.dataset.label_columns
    member_seed = run.seed + 1000 * fold + seed_index
    train_labels = table.loc[train_rows, labels_cols].to_numpy(dtype=np.float32)
    validation_labels = table.loc[validation_rows, labels_cols].to_numpy(dtype=np.float32)
    torch.manual_seed(member_seed)
    np.random.seed(member_seed % 2**32)
    model = create_model(config, run.label_range, pretrained=config.architecture.pretrained)
    if config.audio.spectrogram_normalization == "Dataset":
        mean, std = dataset_statistics(run.reader, train_rows)
        model.normalizer.mean.fill_(mean)
        model.normalizer.std.fill_(std)
    model.to(device).to(memory_format=torch.channels_last)  # faster convolutions on CUDA and oneDNN CPUs alike
    trainer = model
    if distributed_context()[1] > 1:  # one of several ranks: gradients averaged across them
        from torch.nn.parallel import DistributedDataParallel

        trainer = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    main = is_main_process()
    frames = table["n_frames"].to_numpy()
    train_set = SpectrogramDataset(run.paths, train_rows, train_labels, run.crop_frames, member_seed, run.views,
                                   config.augmentation.recording_chain_probability,
                                   pairs=config.augmentation.recording_chain_consistency > 0)
    validation_set = SpectrogramDataset(run.paths, validation_rows, validation_labels, None, member_seed)
    train_loader = create_loader(
        train_set, np.minimum(frames[train_rows], run.crop_frames), config, True, device, member_seed, batch_size,
        blocks=run.reader.blocks[train_rows],
    )
    validation_loader = create_loader(validation_set, frames[validation_rows], config, False, device, member_seed, batch_size)
    steps_per_epoch = max(1, math.ceil(len(train_loader) / config.training.grad_accumulation))
    optimizer = create_optimizer(model, config)
    scheduler = create_scheduler(optimizer, config, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=run.amp_dtype == torch.float16)
    loss_fn = create_loss(config.training.loss_function)
    augmenter = SpectrogramAugmenter(config.augmentation, config.audio) if augmentation_enabled(config.augmentation) else None
    ema = create_ema(model, config.training.ema_decay) if config.training.ema_decay > 0 else None
    kept = ema.module if ema is not None else model  # the weights that are validated and saved
    metric = config.prediction.metric.lower()
    higher_is_better = metric == "r2"

    history: list[dict] = []
    best = {"value": None, "epoch": None, "state": None, "validation": None}
    start_epoch, validation = 1, None
    key = checkpoints.fingerprint(config, run.shard_set, train_rows, batch_size)
    checkpoint_path = member_dir / checkpoints.CHECKPOINT
    remote = checkpoints.remote_location(config.cluster.checkpoint_uri, key, member_dir.name)
    fetched = not checkpoint_path.exists() and remote is not None and checkpoints.fetch(remote, checkpoint_path)
    if checkpoint_path.exists():
        try:
            checkpoint = checkpoints.load(checkpoint_path, device)
        except CoughPipelineError as exc:
            log.warning("%s%s; this member starts afresh (its first checkpoint replaces the file)", exc,
                        f" (fetched from {remote})" if fetched else "")
            checkpoint = {}
        if checkpoint.get("fingerprint") == key:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            scaler.load_state_dict(checkpoint["scaler"])
            if ema is not None:
                ema.load_state_dict(checkpoint["ema"])
            checkpoints.set_rng_state(checkpoint["rng"])
            history, best, validation = checkpoint["history"], checkpoint["best"], checkpoint["validation"]
            start_epoch = checkpoint["epoch"] + 1
            log.info("fold %d seed %d: resuming after epoch %d from %s", fold, member_seed, checkpoint["epoch"], checkpoint_path)
        elif checkpoint:
            log.warning("%s: written for another config or data; starting this member afresh", checkpoint_path)
    log.info(
        "fold %d seed %d: %d train / %d validation recordings, %s on %s%s, batch %d, %d epochs",
        fold, member_seed, len(train_rows), len(validation_rows), config.architecture.backbone, device,
        f" ({run.amp_dtype})" if run.amp_dtype else "", batch_size, config.training.epochs,
    )

    def validate(epoch: int, record: dict) -> np.ndarray:
        predicted = predict(kept, validation_loader, device, run.amp_inference)
        record.update({f"validation_{k}": v for k, v in regression_metrics(validation_labels, predicted).items()})
        value = record[f"validation_{metric}"]
        log.info("fold %d epoch %d: validation MAE %.4f", fold, epoch, record["validation_mae"])
        if best["value"] is None or (value > best["value"] if higher_is_better else value < best["value"]):
            best.update(value=value, epoch=epoch, validation=predicted)
            if config.training.save_best_checkpoint:
                best["state"] = {k: v.detach().cpu().clone() for k, v in kept.state_dict().items()}
        return predicted

    if start_epoch == 1 and config.training.evaluate_before_training:
        record = {"fold": fold, "seed": member_seed, "epoch": 0}
        validate(0, record)
        history.append(record)
    every = config.training.evaluation_epochs
    for epoch in range(start_epoch, config.training.epochs + 1):
        train_set.epoch = epoch
        train_loader.batch_sampler.epoch = epoch
        record = {"fold": fold, "seed": member_seed, "epoch": epoch, **train_one_epoch(
            trainer, train_loader, optimizer, scheduler, loss_fn, scaler, device, run.amp_dtype, config, epoch, fold, member_seed,
            augmenter, ema,
        )}
        if epoch == config.training.epochs or math.floor(epoch / every) > math.floor((epoch - 1) / every):
            validation = validate(epoch, record)
        history.append(record)
        if not main:
            continue
        member_dir.mkdir(parents=True, exist_ok=True)
        checkpoints.save(checkpoint_path, {  # every epoch: a restarted step or a retried pod resumes here
            "fingerprint": key, "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": checkpoints.rng_state(),
            "history": history, "best": best, "validation": validation,
            "ema": ema.state_dict() if ema is not None else None,
        })
        if remote is not None:
            checkpoints.store(checkpoint_path, remote)
    if validation is None:  # no epoch ran
        validation = validate(0, {})
    if config.training.save_best_checkpoint and best["state"] is not None:
        kept.load_state_dict(best["state"])
        validation = best["validation"]
        log.info("fold %d seed %d: keeping the best epoch %d (%s %.4f)", fold, member_seed, best["epoch"], metric, best["value"])
    member = {
        "fold": fold, "seed": member_seed, "weights": f"{member_dir.name}/{MEMBER_WEIGHTS}",
        "pretrained_from": getattr(model, "pretrained_from", None), "batch_size": batch_size,
        "best_epoch": best["epoch"] if config.training.save_best_checkpoint else config.training.epochs,
        "normalization": {"mode": config.audio.spectrogram_normalization,
                          "mean": float(kept.normalizer.mean), "std": float(kept.normalizer.std)},
        "weights_kind": f"moving average (decay {config.training.ema_decay})" if ema is not None else "last step",
        "train_rows": int(len(train_rows)), "validation_rows": int(len(validation_rows)),
        **{f"train_label_{kind}": value.tolist() for kind, value in baseline_constants(train_labels).items()},
    }
    if main:  # one writer among the ranks
        save_weights(kept, member_dir / MEMBER_WEIGHTS)
        with atomic_path(member_dir / MEMBER_VALIDATION) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, validation)
        done = {"member": member, "history": history, "fingerprint": key}
        atomic_write_text(member_dir / MEMBER_DONE, json.dumps(done, indent=2))
        checkpoint_path.unlink(missing_ok=True)
    return member, validation, history


def save_weights(model: CoughRegressor, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
