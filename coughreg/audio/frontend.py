"""The mel front end: one implementation, used by the features step and inside the exported scorer.

The log-mel follows librosa's defaults for mel filters (Slaney scale and area normalization) so
numbers can be checked against an independent implementation, and is expressed in decibels
(power, floor 1e-10). Shards store this raw log-mel; normalization (per clip or with data-set
statistics) is applied by the model, so shards never depend on training choices.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from coughreg.audio.feature_spec import AMIN, FLOOR_DB, FRONTEND_VERSION, feature_hash, feature_parameters  # noqa: F401 - one place
from coughreg.config.schema import AudioConfig


class LogMel(nn.Module):
    """Raw mono waveform -> log-mel spectrogram in dB."""

    def __init__(
        self,
        sample_rate: int,
        stft_window_size: int,
        hop_size: int,
        mel_frequency_bins: int,
        minimum_frequency: float,
        maximum_frequency: float,
    ) -> None:
        super().__init__()
        import torchaudio

        self.sample_rate = sample_rate
        self.hop_size = hop_size
        self.n_fft = stft_window_size
        self.mel_frequency_bins = mel_frequency_bins
        self.register_buffer("window", torch.hann_window(stft_window_size), persistent=False)
        filters = torchaudio.functional.melscale_fbanks(
            n_freqs=stft_window_size // 2 + 1, f_min=float(minimum_frequency), f_max=float(maximum_frequency),
            n_mels=mel_frequency_bins, sample_rate=sample_rate, norm="slaney", mel_scale="slaney",
        )
        self.register_buffer("mel_filters", filters, persistent=False)  # (freqs, mels)

    @classmethod
    def from_config(cls, audio: AudioConfig) -> LogMel:
        return cls(
            sample_rate=audio.sample_rate,
            stft_window_size=audio.stft_window_size,
            hop_size=audio.hop_size,
            mel_frequency_bins=audio.mel_frequency_bins,
            minimum_frequency=audio.minimum_frequency,
            maximum_frequency=audio.maximum_frequency,
        )

    def number_of_frames(self, number_of_samples: int) -> int:
        return number_of_samples // self.hop_size + 1

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        # (batch, samples) -> (batch, mels, frames)
        return self._decibels(self._stft(waveform.float(), center=True))

    def frames_of_padded(self, padded: torch.Tensor) -> torch.Tensor:
        """The log-mel frames of a stretch of the zero-padded signal ``forward`` sees (``n_fft // 2`` zeros each side):
        (batch, samples) -> (batch, mels, 1 + (samples - n_fft) // hop). Frame k starts at sample k * hop of the stretch."""
        return self._decibels(self._stft(padded.float(), center=False))

    def _stft(self, waveform: torch.Tensor, center: bool) -> torch.Tensor:
        return torch.stft(
            waveform, self.n_fft, hop_length=self.hop_size, win_length=self.n_fft, window=self.window,
            center=center, pad_mode="constant",  # reflect padding fails on clips shorter than half a window
            normalized=False, onesided=True, return_complex=True,
        )  # (batch, freqs, frames) complex

    def _decibels(self, spectrum: torch.Tensor) -> torch.Tensor:
        power = spectrum.real.square() + spectrum.imag.square()  # |X|^2 without a square root and back
        mel = torch.matmul(power.transpose(1, 2), self.mel_filters).transpose(1, 2)  # (batch, mels, frames)
        return 10.0 * torch.log10(torch.clamp(mel, min=AMIN))


SILENCE_MARGIN_DB = 0.1  # above the floor by less is silence: float16 shards and bf16 autocast round the floor by ~0.06 dB
CLIP_TOP_DB = 80.0  # 'Clip' treats cells this far below the clip's loudest as silence (librosa's top_db)
CLIP_SILENCE = -2.0  # where 'Clip' puts silence: the value of a cell CLIP_TOP_DB below the loudest, for every clip
NORMALIZER_VERSION = 2  # 2: 'Clip' relative to the loudest cell; 1: mean and spread of the sounding cells


class SpectrogramNormalizer(nn.Module):
    """'No', 'Clip' (each clip in dB relative to its loudest cell) or 'Dataset' (stored training statistics).

    'Clip' is librosa's ``power_to_db(ref=np.max, top_db=80)`` brought to about unit scale: a cell becomes
    ``(level - loudest + CLIP_TOP_DB / 2) / (CLIP_TOP_DB / 4)``, so the loudest cell is 2 and a cell
    ``CLIP_TOP_DB`` below it is -2. Cells further down, or at the front end's floor (digital silence: a browser's
    noise gate, the bands above a codec's cut-off, padding), become ``CLIP_SILENCE`` (-2). The reference is the
    loudest cell, not the mean and spread of the clip: a gate that silences the quiet stretches between coughs
    takes cells away from a mean and a spread and so moved every cough cell with them, while the loudest cell
    (a cough's, or a distractor's) stays where it was. A change of gain moves every cell and the reference by
    the same number of dB and leaves the normalized clip as it was, unless the clip's loudest cell ends up
    within ``CLIP_TOP_DB`` of the front end's floor or a sample clips at full scale.
    """

    def __init__(self, mode: str = "No", mean: float = 0.0, std: float = 1.0) -> None:
        super().__init__()
        if mode not in ("No", "Clip", "Dataset"):
            raise ValueError(f"unknown spectrogram_normalization {mode!r}")
        self.mode = mode
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, log_mel: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # (batch, mels, frames), mask (batch, 1, frames) of real frames -> (batch, mels, frames)
        if self.mode == "Clip":
            if mask is None:
                mask = torch.ones_like(log_mel[:, :1, :], dtype=torch.bool)
            loudest = log_mel.masked_fill(~mask.expand_as(log_mel), FLOOR_DB).amax(dim=(1, 2), keepdim=True)
            floor = torch.clamp(loudest - CLIP_TOP_DB, min=FLOOR_DB + SILENCE_MARGIN_DB)
            sounding = mask.expand_as(log_mel) & (log_mel > floor)
            normalized = (log_mel - loudest + CLIP_TOP_DB / 2) / (CLIP_TOP_DB / 4)
            return torch.where(sounding, normalized, torch.full_like(normalized, CLIP_SILENCE))
        if self.mode == "Dataset":
            return (log_mel - self.mean) / self.std.clamp(min=1e-3)
        return log_mel


def windowed_log_mel(module: LogMel, blocks: Iterable[np.ndarray], window_frames: int,
                     max_samples: int | None = None) -> np.ndarray:
    """``module(samples)`` of the samples ``blocks`` give one after another, computed ``window_frames`` frames at a
    time: memory stays at a window's STFT, however long the recording, and the result equals the whole clip's.

    The whole clip's frame k covers samples [k * hop - n_fft // 2, k * hop + n_fft // 2) of the signal with zeros
    outside it; each window takes exactly those samples (consecutive windows share n_fft - hop of them), and the
    last one ends with the same zeros ``forward`` pads with. With ``max_samples`` (at most that many come), the
    frames go straight into one array sized for them, of which only the part written is ever resident.

    Returns:
        (mels, frames) float32.
    """
    hop, half = module.hop_size, module.n_fft // 2
    window_frames = max(1, window_frames)
    needed = module.n_fft + (window_frames - 1) * hop  # samples of one window of frames
    pending: list[np.ndarray] = [np.zeros(half, dtype=np.float32)]  # the padded signal from the next frame's start
    count = half
    out = _Frames(module.mel_frequency_bins, None if max_samples is None else max_samples // hop + 1)

    def frames(stretch: np.ndarray) -> None:
        with torch.inference_mode():
            out.add(module.frames_of_padded(torch.from_numpy(stretch)[None])[0].numpy())

    for block in blocks:
        pending.append(np.asarray(block, dtype=np.float32))
        count += block.size
        if count >= needed:
            stretch = np.concatenate(pending)
            start = 0
            while stretch.size - start >= needed:
                frames(stretch[start : start + needed])
                start += window_frames * hop
            pending, count = [stretch[start:]], stretch.size - start
    pending.append(np.zeros(half, dtype=np.float32))
    stretch = np.concatenate(pending)
    if stretch.size >= module.n_fft:  # the frames left: all of them end in the closing zeros
        frames(stretch)
    return out.result()


class _Frames:
    """Log-mel windows gathered side by side. A clip of one window is that window. From the second window on,
    when ``capacity`` (the most frames that can come) is known, they go into one array of that many frames: no
    copy at the end and nothing between the windows to fragment the heap; the array is frame-major, so only the
    frames written are ever touched (resident). Without ``capacity``, a list joined at the end."""

    def __init__(self, mels: int, capacity: int | None) -> None:
        self.mels = mels
        self.capacity = capacity
        self.array: np.ndarray | None = None
        self.parts: list[np.ndarray] = []
        self.count = 0

    def add(self, window: np.ndarray) -> None:
        frames = window.shape[1]
        if self.array is None and len(self.parts) == 1 and self.capacity is not None and self.count + frames <= self.capacity:
            self.array = np.empty((self.capacity, self.mels), dtype=np.float32)
            self.array[: self.count] = self.parts.pop().T
        if self.array is not None and self.count + frames <= self.array.shape[0]:
            self.array[self.count : self.count + frames] = window.T
        else:
            if self.array is not None:  # more frames than announced: the list from here on
                self.parts, self.array = [self.array[: self.count].T], None
            self.parts.append(window)
        self.count += frames

    def result(self) -> np.ndarray:
        if self.array is not None:
            return self.array[: self.count].T
        if not self.parts:
            return np.zeros((self.mels, 0), dtype=np.float32)
        return np.concatenate(self.parts, axis=1) if len(self.parts) > 1 else self.parts[0]
