"""The mel front end: one implementation, used by the features step and inside the exported scorer.

The log-mel follows librosa's defaults for mel filters (Slaney scale and area normalization) so
numbers can be checked against an independent implementation, and is expressed in decibels
(power, floor 1e-10). Shards store this raw log-mel; normalization (per clip or with data-set
statistics) is applied by the model, so shards never depend on training choices.
"""

from __future__ import annotations

import torch
from torch import nn

from coughreg.config import AudioConfig
from coughreg.feature_spec import AMIN, FRONTEND_VERSION, feature_hash, feature_parameters  # noqa: F401 - one place


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
        spectrum = torch.stft(
            waveform.float(), self.n_fft, hop_length=self.hop_size, win_length=self.n_fft, window=self.window,
            center=True, pad_mode="constant",  # reflect padding fails on clips shorter than half a window
            normalized=False, onesided=True, return_complex=True,
        )  # (batch, freqs, frames) complex
        power = spectrum.real.square() + spectrum.imag.square()  # |X|^2 without a square root and back
        mel = torch.matmul(power.transpose(1, 2), self.mel_filters).transpose(1, 2)  # (batch, mels, frames)
        return 10.0 * torch.log10(torch.clamp(mel, min=AMIN))


class SpectrogramNormalizer(nn.Module):
    """'No', 'Clip' (each clip to zero mean, unit variance) or 'Dataset' (stored training statistics)."""

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
            weight = mask.to(log_mel.dtype).expand_as(log_mel)
            count = weight.sum(dim=(1, 2), keepdim=True).clamp(min=1)
            mean = (log_mel * weight).sum(dim=(1, 2), keepdim=True) / count
            var = (((log_mel - mean) * weight) ** 2).sum(dim=(1, 2), keepdim=True) / count
            return (log_mel - mean) / var.sqrt().clamp(min=1e-3)
        if self.mode == "Dataset":
            return (log_mel - self.mean) / self.std.clamp(min=1e-3)
        return log_mel
