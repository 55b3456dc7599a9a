"""Spectrogram augmentations for training: what changes between phones, browsers and rooms, not what
makes a cough.

All of them work on a batch of raw log-mel spectrograms in dB, ``(batch, mels, frames)``, on the
training device, after the batch is padded (and after Mixup/Cutmix), and keep digital silence (the
front end's floor, which is also the padding) exactly where it was:

- **gain** (``augmentation.gain_db``): each clip louder or quieter by up to this many dB, as a
  different microphone gain or distance would make it. A level shift is a constant in dB.
- **low-pass** (``augmentation.lowpass_probability``): a clip loses everything above a random
  cut-off between 4 kHz and the top mel band, as a band-limited codec (MP3 at 16 kHz, Opus in
  narrow- or wide-band mode) or a phone's microphone leaves it: those bands become digital silence.
- **SpecAugment masks** (``frequency_masks`` of up to ``frequency_mask_bins`` mel bands,
  ``time_masks`` of up to ``time_mask_frames`` frames): spans replaced by the clip's mean level, so
  the model cannot lean on one band or one instant.

Draws come from the numpy generator the loop passes in, so a resumed epoch repeats them exactly.
"""

from __future__ import annotations

import numpy as np
import torch

from coughreg.audio.feature_spec import FLOOR_DB
from coughreg.config.schema import AudioConfig, AugmentationConfig

LOWPASS_MIN_HZ = 4000.0


def enabled(augmentation: AugmentationConfig) -> bool:
    return (
        augmentation.gain_db > 0
        or augmentation.lowpass_probability > 0
        or (augmentation.frequency_masks > 0 and augmentation.frequency_mask_bins > 0)
        or (augmentation.time_masks > 0 and augmentation.time_mask_frames > 0)
    )


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    # Slaney: linear below 1 kHz, logarithmic above (the front end's scale)
    hz = np.asarray(hz, dtype=float)
    mel = hz / (200.0 / 3)
    log_part = 15.0 + np.log(np.maximum(hz, 1e-9) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(hz >= 1000.0, log_part, mel)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=float)
    return np.where(mel >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (mel - 15.0)), mel * (200.0 / 3))


def mel_band_centers(audio: AudioConfig) -> np.ndarray:
    """Centre frequency (Hz) of each mel band of the front end."""
    edges = np.linspace(_hz_to_mel(audio.minimum_frequency), _hz_to_mel(audio.maximum_frequency), audio.mel_frequency_bins + 2)
    return _mel_to_hz(edges[1:-1])


class SpectrogramAugmenter:
    """The configured augmentations for one training run (see the module docstring)."""

    def __init__(self, augmentation: AugmentationConfig, audio: AudioConfig) -> None:
        self.config = augmentation
        centers = mel_band_centers(audio)
        # the lowest band a low-pass may start at: the first band centred at or above 4 kHz
        self.lowpass_first_band = int(np.searchsorted(centers, min(LOWPASS_MIN_HZ, centers[-1])))

    def __call__(self, spectrograms: torch.Tensor, lengths: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        # (batch, mels, frames) dB, (batch,) frames -> (batch, mels, frames) dB
        augmentation = self.config
        batch, mels, frames = spectrograms.shape
        device = spectrograms.device
        silent = spectrograms <= FLOOR_DB + 1e-3  # digital silence and padding stay silent
        valid = (torch.arange(frames, device=device)[None, :] < lengths[:, None])[:, None, :]  # (batch, 1, frames)
        out = spectrograms
        if augmentation.gain_db > 0:
            gain = rng.uniform(-augmentation.gain_db, augmentation.gain_db, size=batch)
            out = out + torch.as_tensor(gain, dtype=out.dtype, device=device)[:, None, None]
        fill = self._clip_mean(out, silent, valid)  # (batch, 1, 1)
        if augmentation.frequency_masks > 0 and augmentation.frequency_mask_bins > 0:
            masked = self._spans(rng, batch, mels, augmentation.frequency_masks, augmentation.frequency_mask_bins, device)
            out = torch.where(masked[:, :, None] & ~silent, fill, out)
        if augmentation.time_masks > 0 and augmentation.time_mask_frames > 0:
            masked = self._spans(rng, batch, frames, augmentation.time_masks, augmentation.time_mask_frames, device, lengths)
            out = torch.where(masked[:, None, :] & ~silent, fill, out)
        out = torch.where(silent, torch.full_like(out, FLOOR_DB), out.clamp(min=FLOOR_DB))
        if augmentation.lowpass_probability > 0:
            cut = rng.integers(self.lowpass_first_band, mels, size=batch)  # first silent band
            cut = np.where(rng.random(batch) < augmentation.lowpass_probability, cut, mels)
            above = torch.arange(mels, device=device)[None, :] >= torch.as_tensor(cut, device=device)[:, None]
            out = out.masked_fill(above[:, :, None], FLOOR_DB)
        return out

    @staticmethod
    def _clip_mean(spectrograms: torch.Tensor, silent: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        # the mean level of each clip's sounding cells: what a masked span is replaced by
        counted = valid & ~silent
        total = (spectrograms * counted).sum(dim=(1, 2))
        count = counted.sum(dim=(1, 2)).clamp(min=1)
        return (total / count)[:, None, None]

    @staticmethod
    def _spans(rng: np.random.Generator, batch: int, size: int, count: int, max_width: int, device, lengths=None) -> torch.Tensor:
        # (batch, size) True inside `count` random spans of width 0..max_width per row (within the clip's length)
        limits = np.full(batch, size) if lengths is None else lengths.cpu().numpy()
        mask = np.zeros((batch, size), dtype=bool)
        for row in range(batch):
            limit = int(limits[row])
            for _ in range(count):
                width = int(rng.integers(0, min(max_width, limit // 4) + 1))  # never more than a quarter
                if width == 0:
                    continue
                start = int(rng.integers(0, limit - width + 1))
                mask[row, start : start + width] = True
        return torch.from_numpy(mask).to(device)
