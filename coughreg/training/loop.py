"""One training epoch (returns a dict of metrics) and inference over a loader."""

from __future__ import annotations

import copy
import logging
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from coughreg.runtime.errors import CoughPipelineError
from coughreg.training.mixing import mix_batch

log = logging.getLogger("coughreg.train")


def pair_disagreement(predictions: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between the scores of B copies and of their B recordings, for a batch that holds
    the recordings as recorded and then a copy of each (``SpectrogramDataset(pairs=True)``).

    The recordings' scores are held fixed (no gradient reaches them through this term): the copy is drawn to what
    the recording says, which the task loss fits, and not the recording to the copy.
    """
    recorded, copied = predictions.chunk(2)
    return (copied - recorded.detach()).abs().mean()


def train_one_epoch(
    model, loader, optimizer, scheduler, loss_fn, scaler, device, amp_dtype, config, epoch, fold, seed,
    augmenter=None, ema=None,
) -> dict:
    model.train()
    training = config.training
    accumulation = training.grad_accumulation
    mixing = np.random.default_rng((seed, epoch, 7))
    started = time.perf_counter()
    seen, loss_sum, steps = 0, 0.0, len(loader)
    absolute_error, grad_norms = 0.0, []
    consistency, disagreement_sum = config.augmentation.recording_chain_consistency, 0.0
    optimizer.zero_grad(set_to_none=True)
    for step, (spectrograms, lengths, labels, _) in enumerate(loader, 1):
        spectrograms = spectrograms.to(device, non_blocking=True)
        lengths, labels = lengths.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        spectrograms, lengths, labels = mix_batch(spectrograms, lengths, labels, config, mixing)
        if augmenter is not None and consistency > 0:  # a recording and its copy get the same gain, low-pass and
            # masks (the copy's generator starts where the recording's does): the pair differs by the chain alone
            recorded, copied = spectrograms.chunk(2)
            recorded_lengths, copied_lengths = lengths.chunk(2)
            twin = copy.deepcopy(mixing)
            spectrograms = torch.cat([augmenter(recorded, recorded_lengths, mixing), augmenter(copied, copied_lengths, twin)])
        elif augmenter is not None:
            spectrograms = augmenter(spectrograms, lengths, mixing)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            predictions = model(spectrograms, lengths)
            loss = loss_fn(predictions.float(), labels)
        if consistency > 0:
            disagreement = pair_disagreement(predictions.float())
            loss = loss + consistency * disagreement
            disagreement_sum += disagreement.item() * (len(labels) // 2)
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
            if ema is not None:  # timm's ModelEmaV3; the step drives its warm-up
                ema.update(model.module if hasattr(model, "module") else model, step=scheduler.last_epoch)
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
    if consistency > 0:
        metrics["train_pair_disagreement"] = 2 * disagreement_sum / max(seen, 1)  # seen counts both halves
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


