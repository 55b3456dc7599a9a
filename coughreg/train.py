"""Step 3, training: spectrogram shards -> one timm regressor per selected fold (and seed).

Folds are assigned here, deterministically from the recorded seed (group k-fold on
``dataset.group_fold_column``), and written with the validation predictions. The loop is short
because the pieces are factories (``create_loader``, ``create_optimizer``, ``create_scheduler``,
``create_loss``), as in timm's ``train.py``; one epoch returns a dict of metrics.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from coughreg.config import ExperimentConfig, save_config
from coughreg.errors import CoughPipelineError
from coughreg.features import INDEX_NAME, shard_paths
from coughreg.metrics import regression_metrics
from coughreg.model import PAD_DB, CoughRegressor, create_model, load_pretrained_backbone
from coughreg.shards import SpectrogramShardReader
from coughreg.storage import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

MODEL_INFO = "model.json"
PREDICTIONS = "predictions.parquet"
HISTORY = "history.json"


@dataclass
class TrainResult:
    out_dir: Path
    members: list[dict]
    predictions_path: Path
    history: list[dict]


# ---------------------------------------------------------------- folds


def assign_folds(groups: pd.Series, n_folds: int, seed: int) -> np.ndarray:
    """Group k-fold: every group in exactly one fold, folds as equal in size as the groups allow.

    Groups are shuffled by the seed, then placed largest first into the currently smallest fold
    (ties keep the shuffled order), so the split is balanced and deterministic for a seed.
    """
    codes, _ = pd.factorize(groups.astype(str))
    n_groups = int(codes.max()) + 1 if len(codes) else 0
    if n_groups < n_folds:
        raise CoughPipelineError(
            f"dataset.group_fold_column: {n_groups} distinct groups cannot fill {n_folds} folds "
            f"(validation_size); use fewer folds or another group column"
        )
    sizes = np.bincount(codes, minlength=n_groups)
    shuffled = np.random.default_rng(seed).permutation(n_groups)
    order = shuffled[np.argsort(-sizes[shuffled], kind="stable")]
    fold_of_group = np.empty(n_groups, dtype=np.int64)
    load = np.zeros(n_folds, dtype=np.int64)
    for group in order:
        fold = int(np.argmin(load))
        fold_of_group[group] = fold
        load[fold] += sizes[group]
    return fold_of_group[codes]


def selected_folds(config: ExperimentConfig) -> list[int]:
    n_folds = config.dataset.number_of_folds
    if "-1" in config.dataset.selected_folds:
        return list(range(n_folds))
    return sorted({int(f) for f in config.dataset.selected_folds})


# ---------------------------------------------------------------- data


class SpectrogramDataset(Dataset):
    """Rows of the shards as (log-mel float32 (mels, frames), labels); opens the shards per process."""

    def __init__(self, paths: list[Path], rows: np.ndarray, labels: np.ndarray, crop_frames: int | None, seed: int) -> None:
        self.paths = [str(p) for p in paths]
        self.rows = np.asarray(rows, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.float32)
        self.crop_frames = crop_frames
        self.seed = seed
        self.epoch = 0
        self._reader: SpectrogramShardReader | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.rows)

    def _open(self) -> SpectrogramShardReader:
        if self._reader is None or self._pid != os.getpid():  # a fork must not share the parent's handles
            self._reader = SpectrogramShardReader([Path(p) for p in self.paths])
            self._pid = os.getpid()
        return self._reader

    def __getitem__(self, i: int):
        spectrogram = self._open().spectrogram(int(self.rows[i]))  # (mels, frames) float16
        frames = spectrogram.shape[1]
        if self.crop_frames is not None and frames > self.crop_frames:
            rng = np.random.default_rng((self.seed, self.epoch, int(self.rows[i])))
            start = int(rng.integers(0, frames - self.crop_frames + 1))
            spectrogram = spectrogram[:, start : start + self.crop_frames]
        return torch.from_numpy(spectrogram.astype(np.float32)), torch.tensor(self.labels[i]), i


def collate_spectrograms(batch):
    """Pad to the batch's longest clip with digital silence; lengths let the model ignore padding."""
    spectrograms, labels, indices = zip(*batch)
    frames = max(s.shape[1] for s in spectrograms)
    padded = torch.full((len(batch), spectrograms[0].shape[0], frames), PAD_DB)  # (batch, mels, frames)
    for k, spectrogram in enumerate(spectrograms):
        padded[k, :, : spectrogram.shape[1]] = spectrogram
    lengths = torch.tensor([s.shape[1] for s in spectrograms])
    return padded, lengths, torch.stack(labels), torch.tensor(indices)


class LengthBucketBatchSampler(Sampler):
    """Batches of similar length, so little of each batch is padding; random order in training.

    Training: shuffle, cut into pools of ``pool_batches`` batches, sort each pool by length, cut it
    into batches and shuffle the batches (a new order every epoch, from the seed). Inference: one
    pool, sorted, in order.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, train: bool, drop_last: bool, seed: int, pool_batches: int = 32) -> None:
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.train = train
        self.drop_last = drop_last
        self.seed = seed
        self.pool_batches = pool_batches
        self.epoch = 0

    def _batches(self) -> list[np.ndarray]:
        n = len(self.lengths)
        if not self.train:
            order = np.argsort(self.lengths, kind="stable")
            return [order[i : i + self.batch_size] for i in range(0, n, self.batch_size)]
        rng = np.random.default_rng((self.seed, self.epoch))
        order = rng.permutation(n)
        pool = self.batch_size * self.pool_batches
        batches = []
        for start in range(0, n, pool):
            chunk = order[start : start + pool]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            for i in range(0, len(chunk), self.batch_size):
                batch = chunk[i : i + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        rng.shuffle(batches)
        return batches

    def __iter__(self):
        for batch in self._batches():
            yield batch.tolist()

    def __len__(self) -> int:
        return len(self._batches())


def create_loader(
    dataset: SpectrogramDataset, lengths: np.ndarray, config: ExperimentConfig, train: bool, device: torch.device, seed: int
) -> DataLoader:
    # Reading float16 from memory-mapped shards is cheap: leave two cores to the training process itself.
    workers = min(config.environment.number_of_workers, max(0, (os.cpu_count() or 1) - 2))
    drop_last = train and config.training.drop_last_batch and len(dataset) > config.training.batch_size
    sampler = LengthBucketBatchSampler(lengths, config.training.batch_size, train, drop_last, seed)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=collate_spectrograms,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )


# ---------------------------------------------------------------- optimisation


def create_loss(name: str) -> nn.Module:
    if name == "MAE":
        return nn.L1Loss()
    if name == "MSE":
        return nn.MSELoss()
    if name == "Huber":
        return nn.HuberLoss(delta=0.1)  # labels live in 0..1: quadratic only for small errors
    if name == "RMSE":

        class RMSELoss(nn.Module):
            def forward(self, prediction, target):
                return torch.sqrt(nn.functional.mse_loss(prediction, target) + 1e-8)

        return RMSELoss()
    raise CoughPipelineError(f"training.loss_function: unknown loss {name!r}")


def create_optimizer(model: nn.Module, config: ExperimentConfig) -> torch.optim.Optimizer:
    """The config's optimizer; parameters under ``differential_learning_rate_layers`` get their own rate."""
    training = config.training
    prefixes = tuple(training.differential_learning_rate_layers)
    differential = [p for n, p in model.named_parameters() if prefixes and n.startswith(prefixes)]
    special = {id(p) for p in differential}
    rest = [p for p in model.parameters() if id(p) not in special]
    if prefixes and not differential:
        raise CoughPipelineError(
            f"training.differential_learning_rate_layers {list(prefixes)} match no parameter "
            "(use module names such as 'backbone' or 'head')"
        )
    groups = [{"params": rest, "lr": training.learning_rate}]
    if differential:
        groups.append({"params": differential, "lr": training.differential_learning_rate})
    if training.optimizer == "AdamW":
        return torch.optim.AdamW(groups, weight_decay=training.weight_decay)
    if training.optimizer == "Adam":
        return torch.optim.Adam(groups, weight_decay=training.weight_decay)
    return torch.optim.SGD(groups, momentum=0.9, nesterov=True, weight_decay=training.weight_decay)


def create_scheduler(optimizer: torch.optim.Optimizer, config: ExperimentConfig, steps_per_epoch: int):
    """Per optimizer step: linear warm-up for ``warmup_epochs``, then Cosine, Linear or Constant."""
    total = max(1, config.training.epochs * steps_per_epoch)
    warmup = int(round(config.training.warmup_epochs * steps_per_epoch))
    schedule = config.training.schedule

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "Cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if schedule == "Linear":
            return 1.0 - progress
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# ---------------------------------------------------------------- loop


def train_one_epoch(model, loader, optimizer, scheduler, loss_fn, scaler, device, amp_dtype, config, epoch, fold) -> dict:
    model.train()
    accumulation = config.training.grad_accumulation
    started = time.perf_counter()
    seen, loss_sum, steps = 0, 0.0, len(loader)
    optimizer.zero_grad(set_to_none=True)
    for step, (spectrograms, lengths, labels, _) in enumerate(loader, 1):
        spectrograms = spectrograms.to(device, non_blocking=True)
        lengths, labels = lengths.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            predictions = model(spectrograms, lengths)
            loss = loss_fn(predictions.float(), labels)
        if not torch.isfinite(loss):
            raise CoughPipelineError(f"fold {fold}, epoch {epoch}, step {step}: the loss is {loss.item()}; lower training.learning_rate")
        scaler.scale(loss / accumulation).backward()
        if step % accumulation == 0 or step == steps:
            if config.training.gradient_clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), config.training.gradient_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        seen += len(labels)
        loss_sum += loss.item() * len(labels)
        if step % 20 == 0 or step == steps:
            elapsed = time.perf_counter() - started
            log.info(
                "fold %d epoch %d step %d/%d loss %.4f lr %.2e %.1f samples/s ETA %.0f s",
                fold, epoch, step, steps, loss_sum / seen, optimizer.param_groups[0]["lr"], seen / elapsed,
                elapsed / step * (steps - step),
            )
    return {"train_loss": loss_sum / max(seen, 1), "train_samples_per_s": seen / max(time.perf_counter() - started, 1e-9)}


@torch.inference_mode()
def predict(model: nn.Module, loader: DataLoader, device: torch.device, amp_dtype) -> np.ndarray:
    model.eval()
    out = np.zeros((len(loader.dataset), model.head.out_features), dtype=np.float32)
    for spectrograms, lengths, _, indices in loader:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            predictions = model(spectrograms.to(device, non_blocking=True), lengths.to(device, non_blocking=True))
        out[indices.numpy()] = predictions.float().cpu().numpy()
    return out


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


def _device(config: ExperimentConfig) -> torch.device:
    if config.environment.gpus and torch.cuda.is_available():
        return torch.device("cuda", int(config.environment.gpus[0]) if config.environment.gpus[0].isdigit() else 0)
    return torch.device("cpu")


def _subsample(rows: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    if fraction >= 1.0:
        return rows
    rng = np.random.default_rng(seed)
    keep = max(1, int(round(len(rows) * fraction)))
    return np.sort(rng.choice(rows, size=keep, replace=False))


def train(features_dir: str | Path, out_dir: str | Path, config: ExperimentConfig) -> TrainResult:
    """Train the selected folds (x ``number_of_seeds_per_run`` seeds) on the spectrogram shards.

    Args:
        features_dir: the features step's output (``shards.json`` and the shards).
        out_dir: the model artifact folder.
        config: the resolved experiment config.
    """
    features_dir, out_dir = Path(features_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed = config.seed
    paths = shard_paths(features_dir)
    index = json.loads((features_dir / INDEX_NAME).read_text())
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

    custom = config.dataset.validation_strategy == "custom" or (labelled["split"] == "validation").any()
    if custom:
        folds = np.where(labelled["split"] == "validation", 0, -1)
        fold_list = [0]
        scheme = "custom holdout (validation_dataframe)"
    else:
        folds = assign_folds(labelled["group"], config.dataset.number_of_folds, seed)
        fold_list = selected_folds(config)
        scheme = f"group k-fold on '{config.dataset.group_fold_column}' ({config.dataset.number_of_folds} folds)"
    labelled["fold"] = folds
    log.info("validation: %s; training folds %s; seed %d", scheme, fold_list, seed)

    device = _device(config)
    amp_dtype = autocast_dtype(device, config.environment.mixed_precision_training)
    amp_inference = autocast_dtype(device, config.environment.mixed_precision_inference)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    frames_per_second = index["feature_parameters"]["sample_rate"] / index["feature_parameters"]["hop_size"]
    crop_frames = int(config.audio.training_chunk_seconds * frames_per_second) + 1
    label_range = (config.ingest.label_min, config.ingest.label_max)

    members, history, predictions = [], [], []
    for fold in fold_list:
        validation_rows = labelled.index[labelled["fold"] == fold].to_numpy()
        train_rows = labelled.index[labelled["fold"] != fold].to_numpy()
        if config.training.train_validation_data:
            train_rows = labelled.index.to_numpy()
        if "Train" in config.dataset.data_sample_choice:
            train_rows = _subsample(train_rows, config.dataset.data_sample, seed + 17 * fold)
        if "Validation" in config.dataset.data_sample_choice:
            validation_rows = _subsample(validation_rows, config.dataset.data_sample, seed + 17 * fold + 1)
        if len(train_rows) == 0 or len(validation_rows) == 0:
            raise CoughPipelineError(f"fold {fold}: {len(train_rows)} training and {len(validation_rows)} validation rows")
        train_labels = table.loc[train_rows, labels_cols].to_numpy(dtype=np.float32)
        validation_labels = table.loc[validation_rows, labels_cols].to_numpy(dtype=np.float32)
        seed_predictions = []
        for seed_index in range(config.environment.number_of_seeds_per_run):
            member_seed = seed + 1000 * fold + seed_index
            torch.manual_seed(member_seed)
            np.random.seed(member_seed % 2**32)
            model = create_model(config, label_range)
            pretrained_from = None
            if config.architecture.pretrained:
                pretrained_from = load_pretrained_backbone(model, config)
            if config.audio.spectrogram_normalization == "Dataset":
                mean, std = dataset_statistics(reader, train_rows)
                model.normalizer.mean.fill_(mean)
                model.normalizer.std.fill_(std)
            model.to(device)
            if device.type == "cuda":
                model = model.to(memory_format=torch.channels_last)
            train_set = SpectrogramDataset(paths, train_rows, train_labels, crop_frames, member_seed)
            validation_set = SpectrogramDataset(paths, validation_rows, validation_labels, None, member_seed)
            frames = table["n_frames"].to_numpy()
            train_loader = create_loader(train_set, np.minimum(frames[train_rows], crop_frames), config, True, device, member_seed)
            validation_loader = create_loader(validation_set, frames[validation_rows], config, False, device, member_seed)
            steps_per_epoch = max(1, math.ceil(len(train_loader) / config.training.grad_accumulation))
            optimizer = create_optimizer(model, config)
            scheduler = create_scheduler(optimizer, config, steps_per_epoch)
            scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
            loss_fn = create_loss(config.training.loss_function)
            log.info(
                "fold %d seed %d: %d train / %d validation recordings, %s on %s%s, %d epochs",
                fold, member_seed, len(train_rows), len(validation_rows), config.architecture.backbone, device,
                f" ({amp_dtype})" if amp_dtype else "", config.training.epochs,
            )
            epochs_between = config.training.evaluation_epochs
            next_evaluation = epochs_between
            validation = None
            for epoch in range(1, config.training.epochs + 1):
                train_set.epoch = epoch
                train_loader.batch_sampler.epoch = epoch
                epoch_metrics = train_one_epoch(
                    model, train_loader, optimizer, scheduler, loss_fn, scaler, device, amp_dtype, config, epoch, fold
                )
                record = {"fold": fold, "seed": member_seed, "epoch": epoch, **epoch_metrics}
                if epoch >= next_evaluation or epoch == config.training.epochs:
                    next_evaluation += epochs_between
                    validation = predict(model, validation_loader, device, amp_inference)
                    record.update({f"validation_{k}": v for k, v in regression_metrics(validation_labels, validation).items()})
                    log.info("fold %d epoch %d: validation MAE %.4f", fold, epoch, record["validation_mae"])
                history.append(record)
            if validation is None:  # no epoch ran
                validation = predict(model, validation_loader, device, amp_inference)
            seed_predictions.append(validation)
            member_dir = out_dir / f"fold{fold}_seed{seed_index}"
            _save_member(model, member_dir)
            members.append({
                "fold": fold, "seed": member_seed, "weights": f"{member_dir.name}/model.safetensors",
                "pretrained_from": pretrained_from,
                "normalization": {"mode": config.audio.spectrogram_normalization,
                                  "mean": float(model.normalizer.mean), "std": float(model.normalizer.std)},
                "train_rows": int(len(train_rows)), "validation_rows": int(len(validation_rows)),
                "train_label_mean": train_labels.mean(axis=0).tolist(),
                "train_label_median": np.median(train_labels, axis=0).tolist(),
            })
        fold_prediction = np.mean(seed_predictions, axis=0)
        frame = table.loc[validation_rows, ["id", "split", "group", "duration_s", *labels_cols]].reset_index(drop=True)
        frame.insert(1, "fold", fold)
        for k, label in enumerate(labels_cols):
            frame[f"pred_{label}"] = fold_prediction[:, k]
        predictions.append(frame)

    all_predictions = pd.concat(predictions, ignore_index=True)
    folds_frame = labelled[["id", "fold"]].reset_index(drop=True)
    with atomic_path(out_dir / PREDICTIONS) as tmp:
        all_predictions.to_parquet(tmp, index=False)
    with atomic_path(out_dir / "folds.parquet") as tmp:
        folds_frame.to_parquet(tmp, index=False)
    info = {
        "backbone": config.architecture.backbone,
        "label_columns": labels_cols,
        "label_range": list(label_range),
        "validation_scheme": scheme,
        "seed": seed,
        "device": str(device),
        "mixed_precision": str(amp_dtype) if amp_dtype else None,
        "feature_parameters": index["feature_parameters"],
        "members": members,
    }
    atomic_write_text(out_dir / HISTORY, json.dumps(history, indent=2))
    atomic_write_text(out_dir / MODEL_INFO, json.dumps(info, indent=2))
    save_config(config, out_dir)
    return TrainResult(out_dir, members, out_dir / PREDICTIONS, history)


def _save_member(model: CoughRegressor, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(state, str(tmp))


def load_members(model_dir: str | Path, config: ExperimentConfig) -> list[CoughRegressor]:
    """The trained regressors of a model artifact folder, in eval mode on the CPU."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    info_path = model_dir / MODEL_INFO
    if not info_path.exists():
        raise CoughPipelineError(f"{info_path}: no model description; run the train step into {model_dir} first")
    info = json.loads(info_path.read_text())
    regressors = []
    for member in info["members"]:
        model = create_model(config, tuple(info["label_range"]))
        model.load_state_dict(load_file(str(model_dir / member["weights"])))
        regressors.append(model.eval())
    return regressors
