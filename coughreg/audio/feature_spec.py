"""What a spectrogram depends on, without importing torch (the features step's parent process stays light).

The numbers themselves are computed by ``coughreg.audio.frontend.LogMel``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from coughreg.config.schema import AudioConfig

FRONTEND_VERSION = 1
AMIN = 1e-10
FLOOR_DB = -100.0  # 10 * log10(AMIN): digital silence in the front end's units


def feature_parameters(audio: AudioConfig) -> dict[str, Any]:
    """Everything a shard's numbers depend on; stored in every shard's metadata."""
    return {
        "frontend_version": FRONTEND_VERSION,
        "sample_rate": audio.sample_rate,
        "stft_window_size": audio.stft_window_size,
        "hop_size": audio.hop_size,
        "mel_frequency_bins": audio.mel_frequency_bins,
        "minimum_frequency": float(audio.minimum_frequency),
        "maximum_frequency": float(audio.maximum_frequency),
        "mel_scale": "slaney",
        "mel_norm": "slaney",
        "power": 2.0,
        "log": "10*log10(max(power, 1e-10))",
        "center": True,
        "pad_mode": "constant",
        "resampler": "ffmpeg swresample",
        "dtype": "float16",
    }


def feature_hash(audio: AudioConfig) -> str:
    payload = json.dumps(feature_parameters(audio), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
