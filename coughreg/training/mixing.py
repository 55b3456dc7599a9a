"""Mixup and Cutmix of the clips of a batch (``augmentation.mix_*``)."""

from __future__ import annotations

import numpy as np
import torch

from coughreg.audio.feature_spec import AMIN
from coughreg.config.schema import ExperimentConfig


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

