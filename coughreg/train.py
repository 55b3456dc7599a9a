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

from coughreg import report
from coughreg.augment import SpectrogramAugmenter
from coughreg.augment import enabled as augmentation_enabled
from coughreg.config import ExperimentConfig, save_config
from coughreg.errors import CoughPipelineError
from coughreg.feature_spec import AMIN
from coughreg.features import INDEX_NAME, shard_paths
from coughreg.metrics import regression_metrics
from coughreg.model import PAD_DB, CoughRegressor, create_model, load_pretrained_backbone
from coughreg.shards import SpectrogramShardReader
from coughreg.storage import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

MODEL_INFO = "model.json"
PREDICTIONS = "predictions.parquet"
HISTORY = "history.json"
CURVES = "training_curves.png"


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


def truncate_groups(groups: pd.Series, unit: str) -> pd.Series:
    """Group values read as times and truncated to ``unit``; values that are not times stay as they are."""
    times = pd.to_datetime(groups, utc=True, errors="coerce", format="mixed")
    frequency = {"hour": "h", "day": "D", "week": "W", "month": "M"}[unit]
    truncated = times.dt.to_period(frequency).astype(str) if unit in ("week", "month") else times.dt.floor(frequency).astype(str)
    return truncated.where(times.notna(), groups.astype(str))


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

    Training: the rows are cut into pools, each pool sorted by length and cut into batches, and
    the batches shuffled (a new order every epoch, from the seed). When ``blocks`` (each row's
    Parquet row group) is given, a pool is ``pool_blocks`` randomly chosen row groups, so every
    row group is read once per epoch instead of once per row (a shuffle buffer, as streaming
    loaders do); otherwise a pool is ``pool_batches`` batches of randomly chosen rows.
    Inference: sorted by length, in order, and only clips of the same length share a batch: no
    padding ever reaches a prediction (a convolution's receptive field reaches past the masked
    pooling into the padding), so validation predictions are what the exported scorer gives for
    each clip alone.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, train: bool, drop_last: bool, seed: int,
                 pool_batches: int = 32, blocks: np.ndarray | None = None, pool_blocks: int = 16) -> None:
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.train = train
        self.drop_last = drop_last
        self.seed = seed
        self.pool_batches = pool_batches
        self.blocks = None if blocks is None else np.asarray(blocks)
        self.pool_blocks = pool_blocks
        self.epoch = 0
        self.rank, self.world, _ = distributed_context()

    def _pools(self, rng: np.random.Generator) -> list[np.ndarray]:
        n = len(self.lengths)
        if self.blocks is None:
            order = rng.permutation(n)
            size = self.batch_size * self.pool_batches
            return [order[i : i + size] for i in range(0, n, size)]
        ids = np.unique(self.blocks)
        chosen = rng.permutation(ids)
        pools = []
        for i in range(0, len(chosen), self.pool_blocks):
            members = np.flatnonzero(np.isin(self.blocks, chosen[i : i + self.pool_blocks]))
            pools.append(rng.permutation(members))
        return pools

    def _batches(self) -> list[np.ndarray]:
        if not self.train:
            order = np.argsort(self.lengths, kind="stable")
            same_length = np.split(order, np.flatnonzero(np.diff(self.lengths[order])) + 1)
            return [group[i : i + self.batch_size] for group in same_length for i in range(0, len(group), self.batch_size)]
        rng = np.random.default_rng((self.seed, self.epoch))
        batches = []
        for pool in self._pools(rng):
            pool = pool[np.argsort(self.lengths[pool], kind="stable")]
            pool_batches = [pool[i : i + self.batch_size] for i in range(0, len(pool), self.batch_size)]
            rng.shuffle(pool_batches)
            batches.extend(b for b in pool_batches if len(b) == self.batch_size or not self.drop_last)
        if self.world > 1:  # DistributedDataParallel: every rank the same number of different batches
            usable = len(batches) // self.world * self.world
            batches = batches[self.rank : usable : self.world]
        return batches

    def __iter__(self):
        for batch in self._batches():
            yield batch.tolist()

    def __len__(self) -> int:
        return len(self._batches())


def create_loader(
    dataset: SpectrogramDataset, lengths: np.ndarray, config: ExperimentConfig, train: bool, device: torch.device, seed: int,
    batch_size: int | None = None, blocks: np.ndarray | None = None,
) -> DataLoader:
    # Reading float16 from memory-mapped shards is cheap: leave two cores to the training process itself.
    workers = min(config.environment.number_of_workers, max(0, (os.cpu_count() or 1) - 2))
    batch_size = batch_size or config.training.batch_size
    drop_last = train and config.training.drop_last_batch and len(dataset) > batch_size
    sampler = LengthBucketBatchSampler(lengths, batch_size, train, drop_last, seed, blocks=blocks)
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


def distributed_context() -> tuple[int, int, int]:
    """(rank, world size, local rank) under torchrun; (0, 1, 0) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    return distributed_context()[0] == 0


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


def cpu_has_native_bf16() -> bool:
    """True on CPUs whose oneDNN kernels run bf16 natively (AVX512-BF16 or AMX), where it pays off."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and (
            torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        )
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """The mixed-precision type for a device: bf16 (fp16 on GPUs without bf16) on CUDA, bf16 on CPUs
    with native bf16 units, none elsewhere (emulated bf16 is slower than fp32)."""
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


# ---------------------------------------------------------------- loop


def mix_batch(spectrograms, lengths, labels, config: ExperimentConfig, rng: np.random.Generator):
    """Mixup (in the power domain: the spectrogram of two clips played together) or Cutmix (a span of
    time from another clip), ``mix_iterations`` times with probability ``mix_probability``.

    Shapes are kept: (batch, mels, frames), (batch,), (batch, labels).
    """
    augmentation = config.augmentation
    if augmentation.mix_audio == "Disabled" or len(labels) < 2 or rng.random() >= augmentation.mix_probability:
        return spectrograms, lengths, labels
    for _ in range(augmentation.mix_iterations):
        order = torch.from_numpy(rng.permutation(len(labels))).to(spectrograms.device)
        share = float(rng.beta(augmentation.mix_concentration, augmentation.mix_concentration))
        other, other_labels = spectrograms[order], labels[order]
        if augmentation.mix_audio == "Mixup":
            power = share * torch.pow(10.0, spectrograms / 10) + (1 - share) * torch.pow(10.0, other / 10)
            spectrograms = 10.0 * torch.log10(power.clamp(min=AMIN))
            lengths = torch.maximum(lengths, lengths[order])
        else:  # Cutmix along time: the other clip's share of the frames
            frames = spectrograms.shape[-1]
            width = int(round((1 - share) * frames))
            start = int(rng.integers(0, frames - width + 1))
            spectrograms = spectrograms.clone()
            spectrograms[:, :, start : start + width] = other[:, :, start : start + width]
            share = 1 - width / frames
            lengths = torch.maximum(lengths, torch.clamp(lengths[order], max=start + width))
        if augmentation.mix_target == "Max":
            labels = torch.maximum(labels, other_labels)
        else:
            labels = share * labels + (1 - share) * other_labels
    return spectrograms, lengths, labels


class ModelEma:
    """An exponential moving average of a model's weights (and float buffers, so BatchNorm statistics
    follow), as timm's ``ModelEmaV3``; the decay warms up as ``(1 + n) / (10 + n)`` so the random
    start does not linger."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        import copy

        self.module = copy.deepcopy(model).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for averaged, current in zip(self.module.state_dict().values(), model.state_dict().values()):
            if averaged.dtype.is_floating_point:
                averaged.lerp_(current.detach(), 1.0 - decay)
            else:
                averaged.copy_(current)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = state["updates"]


def train_one_epoch(
    model, loader, optimizer, scheduler, loss_fn, scaler, device, amp_dtype, config, epoch, fold, seed,
    augmenter=None, ema: ModelEma | None = None,
) -> dict:
    model.train()
    training = config.training
    accumulation = training.grad_accumulation
    mixing = np.random.default_rng((seed, epoch, 7))
    started = time.perf_counter()
    seen, loss_sum, steps = 0, 0.0, len(loader)
    absolute_error, grad_norms = 0.0, []
    optimizer.zero_grad(set_to_none=True)
    for step, (spectrograms, lengths, labels, _) in enumerate(loader, 1):
        spectrograms = spectrograms.to(device, non_blocking=True)
        lengths, labels = lengths.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        spectrograms, lengths, labels = mix_batch(spectrograms, lengths, labels, config, mixing)
        if augmenter is not None:
            spectrograms = augmenter(spectrograms, lengths, mixing)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            predictions = model(spectrograms, lengths)
            loss = loss_fn(predictions.float(), labels)
        if not torch.isfinite(loss):
            raise CoughPipelineError(
                f"fold {fold}, epoch {epoch}, step {step}: the loss is {loss.item()}; the last good checkpoint is kept. "
                "Lower training.learning_rate or set training.gradient_clip"
            )
        scaler.scale(loss / accumulation).backward()
        if step % accumulation == 0 or step == steps:
            if training.gradient_clip > 0 or config.logging.log_grad_norm:
                scaler.unscale_(optimizer)
                limit = training.gradient_clip if training.gradient_clip > 0 else float("inf")
                grad_norms.append(float(nn.utils.clip_grad_norm_(model.parameters(), limit)))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if ema is not None:
                ema.update(model.module if hasattr(model, "module") else model)  # the DDP wrapper's module
        seen += len(labels)
        loss_sum += loss.item() * len(labels)
        if training.calculate_train_metric:
            absolute_error += float((predictions.detach().float() - labels).abs().mean(dim=1).sum())
        if step % 20 == 0 or step == steps:
            elapsed = time.perf_counter() - started
            log.info(
                "fold %d epoch %d step %d/%d loss %.4f lr %.2e%s %.1f samples/s ETA %.0f s",
                fold, epoch, step, steps, loss_sum / seen, optimizer.param_groups[0]["lr"],
                f" grad-norm {grad_norms[-1]:.3f}" if config.logging.log_grad_norm and grad_norms else "",
                seen / elapsed, elapsed / step * (steps - step),
            )
    metrics = {"train_loss": loss_sum / max(seen, 1), "train_samples_per_s": seen / max(time.perf_counter() - started, 1e-9),
               "lr": optimizer.param_groups[0]["lr"]}
    if training.calculate_train_metric:
        metrics["train_mae"] = absolute_error / max(seen, 1)
    if grad_norms:
        metrics["grad_norm_mean"] = float(np.mean(grad_norms))
    return metrics


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
    _, world, local_rank = distributed_context()
    if world > 1 and config.environment.gpus and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if config.environment.gpus and torch.cuda.is_available():
        return torch.device("cuda", int(config.environment.gpus[0]) if config.environment.gpus[0].isdigit() else 0)
    return torch.device("cpu")


def _subsample(rows: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    if fraction >= 1.0:
        return rows
    rng = np.random.default_rng(seed)
    keep = max(1, int(round(len(rows) * fraction)))
    return np.sort(rng.choice(rows, size=keep, replace=False))


@dataclass
class _Run:
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


CHECKPOINT = "checkpoint.pt"
MEMBER_DONE = "member.json"


def _rng_state() -> dict:
    import random

    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def _set_rng_state(state: dict) -> None:
    import random

    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _fingerprint(run: _Run, train_rows: np.ndarray, batch_size: int) -> str:
    import hashlib

    payload = json.dumps(
        {"config": run.config.model_dump(mode="json", exclude={"resolved"}), "rows": train_rows.tolist(), "batch": batch_size},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _remote_checkpoint(config: ExperimentConfig, fingerprint: str, member: str) -> str | None:
    """Where this member's checkpoint also lives outside the pod: keyed by everything that shapes it."""
    base = config.cluster.checkpoint_uri
    if not base:
        return None
    return f"{base.rstrip('/')}/{fingerprint[:16]}/{member}/{CHECKPOINT}"


def _fetch_checkpoint(remote: str, local: Path) -> None:
    import shutil

    from coughreg.errors import StorageError
    from coughreg.storage import download_s3_object, is_s3_uri, local_path

    try:
        source = download_s3_object(remote) if is_s3_uri(remote) else local_path(remote)
    except StorageError as exc:
        if "no such object" in str(exc):
            return  # nothing stored yet: a first run
        raise
    if source.exists():
        local.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(local) as tmp:
            shutil.copyfile(source, tmp)
        log.info("checkpoint fetched from %s", remote)


def _store_checkpoint(local: Path, remote: str) -> None:
    import shutil

    from coughreg.storage import is_s3_uri, local_path, upload_file

    if is_s3_uri(remote):
        upload_file(local, remote)  # one PUT: the object is replaced whole or not at all
    else:
        with atomic_path(local_path(remote)) as tmp:
            shutil.copyfile(local, tmp)


def _train_member(run: _Run, fold: int, seed_index: int, train_rows: np.ndarray, validation_rows: np.ndarray):
    """One model: resumes a finished member or an interrupted one; halves the batch on CUDA out-of-memory when asked."""
    config = run.config
    member_dir = run.out_dir / f"fold{fold}_seed{seed_index}"
    if (member_dir / MEMBER_DONE).exists():
        done = json.loads((member_dir / MEMBER_DONE).read_text())
        log.info("fold %d seed %d: already trained, kept (%s)", fold, done["member"]["seed"], member_dir)
        return done["member"], np.load(member_dir / "validation.npy"), done["history"]
    batch_size = config.training.batch_size
    while True:
        try:
            return _fit_member(run, fold, seed_index, train_rows, validation_rows, member_dir, batch_size)
        except torch.cuda.OutOfMemoryError:
            if not config.training.automatically_adjust_batch_size or batch_size == 1:
                raise CoughPipelineError(
                    f"fold {fold}: out of GPU memory at batch_size {batch_size}; lower training.batch_size or set "
                    "training.automatically_adjust_batch_size"
                ) from None
            batch_size //= 2
            torch.cuda.empty_cache()
            (member_dir / CHECKPOINT).unlink(missing_ok=True)
            log.warning("fold %d: out of GPU memory; retrying with batch_size %d", fold, batch_size)


def _fit_member(run: _Run, fold, seed_index, train_rows, validation_rows, member_dir: Path, batch_size: int):
    config, table, device = run.config, run.table, run.device
    labels_cols = config.dataset.label_columns
    member_seed = run.seed + 1000 * fold + seed_index
    train_labels = table.loc[train_rows, labels_cols].to_numpy(dtype=np.float32)
    validation_labels = table.loc[validation_rows, labels_cols].to_numpy(dtype=np.float32)
    torch.manual_seed(member_seed)
    np.random.seed(member_seed % 2**32)
    model = create_model(config, run.label_range)
    pretrained_from = load_pretrained_backbone(model, config) if config.architecture.pretrained else None
    if config.audio.spectrogram_normalization == "Dataset":
        mean, std = dataset_statistics(run.reader, train_rows)
        model.normalizer.mean.fill_(mean)
        model.normalizer.std.fill_(std)
    model.to(device).to(memory_format=torch.channels_last)  # faster convolutions on CUDA and oneDNN CPUs alike
    trainer = model
    if distributed_context()[1] > 1:  # under torchrun: gradients averaged across ranks
        from torch.nn.parallel import DistributedDataParallel

        trainer = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    main = is_main_process()
    frames = table["n_frames"].to_numpy()
    train_set = SpectrogramDataset(run.paths, train_rows, train_labels, run.crop_frames, member_seed)
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
    ema = ModelEma(model, config.training.ema_decay) if config.training.ema_decay > 0 else None
    kept = ema.module if ema is not None else model  # the weights that are validated and saved
    metric = config.prediction.metric.lower()
    higher_is_better = metric == "r2"

    history: list[dict] = []
    best = {"value": None, "epoch": None, "state": None, "validation": None}
    start_epoch, validation = 1, None
    fingerprint = _fingerprint(run, train_rows, batch_size)
    checkpoint_path = member_dir / CHECKPOINT
    remote = _remote_checkpoint(config, fingerprint, member_dir.name)
    if not checkpoint_path.exists() and remote is not None:
        _fetch_checkpoint(remote, checkpoint_path)
    if checkpoint_path.exists():
        checkpoint = torch.load(checkpoint_path, map_location=device, weights_only=False)
        if checkpoint.get("fingerprint") == fingerprint:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            scaler.load_state_dict(checkpoint["scaler"])
            if ema is not None:
                ema.load_state_dict(checkpoint["ema"])
            _set_rng_state(checkpoint["rng"])
            history, best, validation = checkpoint["history"], checkpoint["best"], checkpoint["validation"]
            start_epoch = checkpoint["epoch"] + 1
            log.info("fold %d seed %d: resuming after epoch %d from %s", fold, member_seed, checkpoint["epoch"], checkpoint_path)
        else:
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
        with atomic_path(checkpoint_path) as tmp:  # every epoch: a retried pod resumes here
            torch.save({
                "fingerprint": fingerprint, "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": _rng_state(),
                "history": history, "best": best, "validation": validation,
                "ema": ema.state_dict() if ema is not None else None,
            }, tmp)
        if remote is not None:
            _store_checkpoint(checkpoint_path, remote)
    if validation is None:  # no epoch ran
        validation = validate(0, {})
    if config.training.save_best_checkpoint and best["state"] is not None:
        kept.load_state_dict(best["state"])
        validation = best["validation"]
        log.info("fold %d seed %d: keeping the best epoch %d (%s %.4f)", fold, member_seed, best["epoch"], metric, best["value"])
    member = {
        "fold": fold, "seed": member_seed, "weights": f"{member_dir.name}/model.safetensors",
        "pretrained_from": pretrained_from, "batch_size": batch_size,
        "best_epoch": best["epoch"] if config.training.save_best_checkpoint else config.training.epochs,
        "normalization": {"mode": config.audio.spectrogram_normalization,
                          "mean": float(kept.normalizer.mean), "std": float(kept.normalizer.std)},
        "weights_kind": f"moving average (decay {config.training.ema_decay})" if ema is not None else "last step",
        "train_rows": int(len(train_rows)), "validation_rows": int(len(validation_rows)),
        "train_label_mean": train_labels.mean(axis=0).tolist(),
        "train_label_median": np.median(train_labels, axis=0).tolist(),
    }
    if main:  # one writer under torchrun
        _save_member(kept, member_dir)
        with atomic_path(member_dir / "validation.npy") as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, validation)
        atomic_write_text(member_dir / MEMBER_DONE, json.dumps({"member": member, "history": history}, indent=2))
        checkpoint_path.unlink(missing_ok=True)
    return member, validation, history


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
    started_group = False
    if distributed_context()[1] > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if config.environment.gpus and torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(distributed_context()[2])
        torch.distributed.init_process_group(backend=backend)
        started_group = True
        log.info("distributed training: rank %d of %d (%s)", *distributed_context()[:2], backend)
    try:
        return _train(features_dir, out_dir, config, seed)
    finally:
        if started_group:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def _train(features_dir: Path, out_dir: Path, config: ExperimentConfig, seed: int) -> TrainResult:
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
        groups = labelled["group"]
        grouping = f"'{config.dataset.group_fold_column}'"
        if config.dataset.group_fold_truncate:
            groups = truncate_groups(groups, config.dataset.group_fold_truncate)
            grouping += f" truncated to the {config.dataset.group_fold_truncate}"
        folds = assign_folds(groups, config.dataset.number_of_folds, seed)
        fold_list = selected_folds(config)
        scheme = f"group k-fold on {grouping} ({config.dataset.number_of_folds} folds, {groups.nunique()} groups)"
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

    run = _Run(config, paths, table, reader, device, amp_dtype, amp_inference, crop_frames, label_range, out_dir, seed)
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
        seed_predictions = []
        for seed_index in range(config.environment.number_of_seeds_per_run):
            member, validation, records = _train_member(run, fold, seed_index, train_rows, validation_rows)
            members.append(member)
            seed_predictions.append(validation)
            history.extend(records)
        fold_prediction = np.mean(seed_predictions, axis=0)
        frame = table.loc[validation_rows, ["id", "split", "group", "duration_s", *labels_cols]].reset_index(drop=True)
        frame.insert(1, "fold", fold)
        for k, label in enumerate(labels_cols):
            frame[f"pred_{label}"] = fold_prediction[:, k]
        predictions.append(frame)

    all_predictions = pd.concat(predictions, ignore_index=True)
    if not is_main_process():
        return TrainResult(out_dir, members, out_dir / PREDICTIONS, history)
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
    if history:
        report.save_png(report.training_curves(history, config.training.loss_function), out_dir / CURVES)
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
