"""What the model listened to: occlusion over time-frequency patches of the log-mel spectrogram.

Each patch (a band of mel filters over a slice of time) is replaced by the clip's own background
there (each mel band's median over the clip: its steady noise, not digital silence, whose sharp
edges would themselves look like sound events) and the change of the prediction is recorded.
A positive value means the patch raised the prediction: the model relies on it. Occlusion needs
no gradients and reads the same for every backbone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Attribution:
    """Prediction change per patch, and the patch grid, for one clip and one label."""

    values: np.ndarray  # (bands, segments): prediction - prediction with that patch occluded
    band_edges: np.ndarray  # (bands + 1,) mel-filter indices
    time_edges: np.ndarray  # (segments + 1,) frame indices
    prediction: float

    def per_pixel(self) -> np.ndarray:
        """The patch values spread over the spectrogram's (mels, frames) grid, for drawing beside it."""
        rows = np.repeat(np.arange(len(self.band_edges) - 1), np.diff(self.band_edges))
        columns = np.repeat(np.arange(len(self.time_edges) - 1), np.diff(self.time_edges))
        return self.values[np.ix_(rows, columns)]


BATCH_CELLS = 4_000_000  # spectrogram cells scored at once (~16 MB of input; bounds memory on long clips)


def occlusion_map(regressors: Sequence[torch.nn.Module], log_mel: np.ndarray, label: int = 0, bands: int = 8,
                  segments: int = 16, batch_cells: int = BATCH_CELLS) -> Attribution:
    """Occlude each time-frequency patch of one clip in turn; the ensemble's prediction change per patch.

    Args:
        regressors: the trained members (``(batch, mels, frames) -> (batch, labels)``); their mean is the prediction.
        log_mel: the clip's log-mel spectrogram, (mels, frames), in dB.
        label: which output to explain.
        bands, segments: the patch grid (fewer where the spectrogram has fewer mels or frames).
        batch_cells: spectrogram cells scored at once: the batch holds as many occluded copies as fit.
    """
    mels, frames = log_mel.shape
    batch_size = max(1, batch_cells // (mels * frames))
    band_edges = np.linspace(0, mels, min(bands, mels) + 1).astype(int)
    time_edges = np.linspace(0, frames, min(segments, frames) + 1).astype(int)
    background = np.median(log_mel, axis=1, keepdims=True).astype(np.float32)  # (mels, 1)
    patches = [(b, t) for b in range(len(band_edges) - 1) for t in range(len(time_edges) - 1)]

    def occluded(patch: tuple[int, int] | None) -> np.ndarray:
        copy = log_mel.astype(np.float32, copy=True)
        if patch is not None:
            b, t = patch
            rows = slice(band_edges[b], band_edges[b + 1])
            copy[rows, time_edges[t] : time_edges[t + 1]] = background[rows]
        return copy

    jobs = [None, *patches]  # the clip as is first
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(jobs), batch_size):
            batch = torch.from_numpy(np.stack([occluded(p) for p in jobs[start : start + batch_size]]))
            # (batch, mels, frames) -> (batch,): the members' mean for one label
            outputs.append(torch.stack([r(batch)[:, label] for r in regressors]).mean(dim=0).float().numpy())
    scores = np.concatenate(outputs)
    change = (scores[0] - scores[1:]).reshape(len(band_edges) - 1, len(time_edges) - 1)
    return Attribution(change, band_edges, time_edges, float(scores[0]))
