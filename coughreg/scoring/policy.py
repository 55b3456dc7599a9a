"""One chunking and padding policy, for the evaluation step and every scorer alike.

A recording is scored on its first ``max_inference_chunk_seconds``, cut into fixed chunks of
``inference_chunk_seconds`` (method ``Fix``); a tail shorter than a quarter chunk joins the chunk
before it. A chunk shorter than the network's minimum (``min_seconds``: the backbone's strides need
that much) is padded with digital silence. Each chunk is scored alone (no padding from a longer clip
reaches it) and the chunk scores are averaged weighted by their length.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

MIN_SECONDS = 0.35


@dataclass(frozen=True)
class Policy:
    sample_rate: int
    chunk_seconds: float
    max_seconds: float
    min_seconds: float = MIN_SECONDS

    @classmethod
    def from_info(cls, info: dict) -> Policy:
        """The policy a scorer folder's ``scorer.json`` records."""
        return cls(int(info["sample_rate"]), float(info["inference_chunk_seconds"]), float(info["max_inference_chunk_seconds"]),
                   float(info.get("min_seconds", MIN_SECONDS)))


def chunk_bounds(n_samples: int, sample_rate: int, chunk_seconds: float, max_seconds: float) -> list[tuple[int, int]]:
    """Fixed-size chunks over the first ``max_seconds``; a tail shorter than a quarter chunk joins the one before."""
    total = min(n_samples, int(max_seconds * sample_rate))
    size = max(1, int(chunk_seconds * sample_rate))
    bounds = [(start, min(start + size, total)) for start in range(0, total, size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < size // 4:
        last = bounds.pop()
        bounds[-1] = (bounds[-1][0], last[1])
    return bounds or [(0, total)]


def score_samples(predict: Callable[[np.ndarray], np.ndarray], samples: np.ndarray, policy: Policy) -> tuple[np.ndarray, int]:
    """Mono float32 samples at the policy's rate -> ((labels,) values, number of chunks).

    ``predict`` maps a batch of equal-length waveforms (batch, samples) to (batch, labels); chunks of
    one length go through it together.
    """
    samples = np.asarray(samples, dtype=np.float32).reshape(-1)
    if samples.size == 0:
        raise ValueError("cannot score an empty waveform")
    bounds = chunk_bounds(samples.size, policy.sample_rate, policy.chunk_seconds, policy.max_seconds)
    minimum = int(policy.min_seconds * policy.sample_rate)
    chunks = []
    for start, end in bounds:
        chunk = samples[start:end]
        chunks.append(np.pad(chunk, (0, minimum - chunk.size)) if chunk.size < minimum else chunk)
    scores: list[np.ndarray | None] = [None] * len(chunks)
    for length in sorted({c.size for c in chunks}):
        members = [k for k, c in enumerate(chunks) if c.size == length]
        values = np.asarray(predict(np.stack([chunks[k] for k in members])), dtype=np.float64)  # (members, labels)
        for k, value in zip(members, values, strict=True):
            scores[k] = value
    weights = np.asarray([end - start for start, end in bounds], dtype=np.float64)
    return np.average(np.stack(scores), axis=0, weights=weights), len(bounds)
