"""The exported scoring pipeline: raw audio in, label values out.

A scorer folder holds ``scorer.safetensors`` (the mel front end and every trained regressor),
``scorer.json`` (what to build and how to chunk), ``config.yaml`` and, when the backbone allows
it, ``scorer.pt2`` (a ``torch.export`` program that needs only torch). Long audio is split into
chunks of ``prediction.inference_chunk_seconds`` (method ``Fix``), each scored, and the chunk
scores averaged weighted by length; audio beyond ``max_inference_chunk_seconds`` is not scored.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from coughreg.artifacts import CONFIG, SCORER_INFO, SCORER_WEIGHTS
from coughreg.audio import decode_audio
from coughreg.config import load_config
from coughreg.errors import AudioDecodeError, CoughPipelineError
from coughreg.frontend import LogMel
from coughreg.model import CoughScorer, create_model

log = logging.getLogger(__name__)

SCORER_FORMAT = 1
MIN_SECONDS = 0.35  # shorter clips are padded with silence (the backbone's strides need this much)


def chunk_bounds(n_samples: int, sample_rate: int, chunk_seconds: float, max_seconds: float) -> list[tuple[int, int]]:
    """Fixed-size chunks over the first ``max_seconds``; a tail shorter than a quarter chunk joins the one before."""
    total = min(n_samples, int(max_seconds * sample_rate))
    size = max(1, int(chunk_seconds * sample_rate))
    bounds = [(start, min(start + size, total)) for start in range(0, total, size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < size // 4:
        last = bounds.pop()
        bounds[-1] = (bounds[-1][0], last[1])
    return bounds or [(0, total)]


class Scorer:
    """Load a scorer folder and score waveforms or files."""

    def __init__(self, folder: str | Path, device: str | None = None) -> None:
        from safetensors.torch import load_file

        self.folder = Path(folder)
        info_path = self.folder / SCORER_INFO
        if not info_path.exists():
            raise CoughPipelineError(f"{info_path}: not a scorer folder (run the export step)")
        self.info = json.loads(info_path.read_text())
        if self.info.get("format") != SCORER_FORMAT:
            raise CoughPipelineError(f"{info_path}: scorer format {self.info.get('format')} is not {SCORER_FORMAT}")
        self.config = load_config(self.folder / CONFIG)
        regressors = [create_model(self.config, tuple(self.info["label_range"])) for _ in range(self.info["members"])]
        self.model = CoughScorer(LogMel.from_config(self.config.audio), regressors)
        self.model.load_state_dict(load_file(str(self.folder / SCORER_WEIGHTS)))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device).eval()
        self.sample_rate = self.config.audio.sample_rate
        self.label_columns = list(self.info["label_columns"])
        self.amp = self.device.type == "cuda" and self.config.environment.mixed_precision_inference

    @torch.inference_mode()
    def score_waveform(self, samples: np.ndarray) -> np.ndarray:
        """Mono float samples at the scorer's rate -> (labels,) values."""
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if samples.size == 0:
            raise CoughPipelineError("cannot score an empty waveform")
        prediction = self.config.prediction
        bounds = chunk_bounds(samples.size, self.sample_rate, prediction.inference_chunk_seconds, prediction.max_inference_chunk_seconds)
        minimum = int(MIN_SECONDS * self.sample_rate)
        scores, weights = [], []
        for start, end in bounds:
            chunk = samples[start:end]
            if chunk.size < minimum:
                chunk = np.pad(chunk, (0, minimum - chunk.size))
            waveform = torch.from_numpy(chunk)[None].to(self.device)  # (1, samples)
            with torch.autocast(self.device.type, enabled=self.amp):
                scores.append(self.model(waveform)[0].float().cpu().numpy())  # (labels,)
            weights.append(end - start)
        return np.average(np.stack(scores), axis=0, weights=np.asarray(weights, dtype=float))

    def score_file(self, path: str | Path) -> dict[str, float]:
        samples = decode_audio(path, self.sample_rate, max_seconds=self.config.prediction.max_inference_chunk_seconds)
        return dict(zip(self.label_columns, self.score_waveform(samples).tolist()))

    def score_files(self, paths: list[str | Path]) -> pd.DataFrame:
        """One row per file: scores, or ``status`` 'failed' with the reason (a bad file never stops the batch)."""
        rows = []
        for path in paths:
            row = {"path": str(path), "status": "ok", "reason": ""}
            try:
                row.update(self.score_file(path))
            except AudioDecodeError as exc:
                row.update(status="failed", reason=str(exc), **{label: np.nan for label in self.label_columns})
                log.warning("not scored: %s", exc)
            rows.append(row)
        return pd.DataFrame(rows, columns=["path", *self.label_columns, "status", "reason"])


def load_scorer(folder: str | Path, device: str | None = None) -> Scorer:
    return Scorer(folder, device)
