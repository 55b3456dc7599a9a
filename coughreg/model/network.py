"""The network: a timm image backbone on one-channel log-mel spectrograms, and the raw-audio scorer.

``CoughRegressor`` takes log-mel spectrograms (what the shards hold) and the number of valid
frames of each; padding never reaches the prediction (masked pooling). Its output is bounded to
the label range inside the model, so every scorer agrees with evaluation. ``CoughScorer`` puts the
same ``LogMel`` front end in front of an ensemble of regressors: it takes a raw mono waveform.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from coughreg.audio.feature_spec import FLOOR_DB
from coughreg.audio.frontend import LogMel, SpectrogramNormalizer
from coughreg.config.schema import ExperimentConfig
from coughreg.runtime.errors import CoughPipelineError

log = logging.getLogger(__name__)

PAD_DB = FLOOR_DB  # padding is digital silence in the front end's units


def frame_mask(lengths: torch.Tensor, frames: int) -> torch.Tensor:
    # (batch,) -> (batch, frames) True where a frame is real audio
    return torch.arange(frames, device=lengths.device)[None, :] < lengths[:, None]


class MaskedPool(nn.Module):
    """Global pooling over (mels, time) that ignores time steps made of padding."""

    def __init__(self, kind: str, gem_p: float = 3.0) -> None:
        super().__init__()
        if kind not in ("Average", "Max", "GeM"):
            raise ValueError(f"unknown pool {kind!r}")
        self.kind = kind
        self.gem_p = nn.Parameter(torch.tensor(gem_p)) if kind == "GeM" else None

    def forward(self, features: torch.Tensor, valid_fraction: torch.Tensor) -> torch.Tensor:
        # (batch, channels, h, w), (batch,) -> (batch, channels)
        width = features.shape[-1]
        valid = torch.clamp(torch.ceil(valid_fraction * width), min=1).long()
        mask = frame_mask(valid, width)[:, None, None, :]  # (batch, 1, 1, w)
        if self.kind == "Max":
            return features.masked_fill(~mask, float("-inf")).amax(dim=(-2, -1))
        count = mask.sum(dim=(-2, -1)).clamp(min=1) * features.shape[-2]  # (batch, 1)
        if self.kind == "GeM":
            p = self.gem_p.clamp(min=1.0)
            powered = features.clamp(min=1e-6).pow(p) * mask
            return (powered.sum(dim=(-2, -1)) / count).pow(1.0 / p)
        return (features * mask).sum(dim=(-2, -1)) / count


class CoughRegressor(nn.Module):
    """Log-mel spectrograms -> label values in [label_min, label_max]."""

    def __init__(
        self,
        backbone: str,
        num_outputs: int,
        dropout: float = 0.0,
        pool: str = "Average",
        normalization: str = "No",
        label_min: float = 0.0,
        label_max: float = 1.0,
    ) -> None:
        super().__init__()
        import timm

        self.backbone_name = backbone
        try:
            self.backbone = timm.create_model(backbone, pretrained=False, in_chans=1, num_classes=0, global_pool="")
        except RuntimeError as exc:  # timm: "Unknown model (...)"
            raise CoughPipelineError(f"architecture.backbone: {exc}") from None
        self.normalizer = SpectrogramNormalizer(normalization)
        self.pool = MaskedPool(pool)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.backbone.num_features, num_outputs)
        self.register_buffer("label_min", torch.tensor(float(label_min)))
        self.register_buffer("label_max", torch.tensor(float(label_max)))

    def forward(self, log_mel: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        # (batch, mels, frames), (batch,) -> (batch, outputs)
        frames = log_mel.shape[-1]
        if lengths is None:
            lengths = torch.full((log_mel.shape[0],), frames, device=log_mel.device)
        mask = frame_mask(lengths, frames)[:, None, :]  # (batch, 1, frames)
        x = self.normalizer(log_mel, mask)
        x = x.masked_fill(~mask, 0.0).unsqueeze(1)  # (batch, 1, mels, frames); padding at the normalized zero
        features = self.backbone.forward_features(x)  # (batch, channels, h, w)
        pooled = self.pool(features, lengths.float() / frames)  # (batch, channels)
        raw = self.head(self.dropout(pooled))  # (batch, outputs)
        return self.label_min + (self.label_max - self.label_min) * torch.sigmoid(raw)


class CoughScorer(nn.Module):
    """Raw mono waveform at the config's rate -> label values (an ensemble's mean)."""

    def __init__(self, frontend: LogMel, regressors: list[CoughRegressor]) -> None:
        super().__init__()
        self.frontend = frontend
        self.regressors = nn.ModuleList(regressors)

    def forward(self, waveform: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        # (batch, samples), (batch,) samples -> (batch, outputs)
        log_mel = self.frontend(waveform)  # (batch, mels, frames)
        frame_lengths = None
        if lengths is not None:
            frame_lengths = torch.clamp(lengths // self.frontend.hop_size + 1, max=log_mel.shape[-1])
        outputs = [regressor(log_mel, frame_lengths) for regressor in self.regressors]
        return torch.stack(outputs).mean(dim=0)


def create_model(
    config: ExperimentConfig, label_range: tuple[float, float] | None = None, pretrained: bool = False
) -> CoughRegressor:
    """The regressor the config describes: random weights, or pretrained backbone weights when ``pretrained``."""
    low, high = label_range or (config.ingest.label_min, config.ingest.label_max)
    model = CoughRegressor(
        backbone=config.architecture.backbone,
        num_outputs=len(config.dataset.label_columns),
        dropout=config.architecture.dropout,
        pool=config.architecture.pool,
        normalization=config.audio.spectrogram_normalization,
        label_min=low,
        label_max=high,
    )
    model.pretrained_from = load_pretrained_backbone(model, config) if pretrained else None
    return model


def _fits(path: Path, backbone: str, pretrained_cfg: dict):
    """A timm ``filter_fn`` that refuses a checkpoint whose tensors do not fit the backbone (timm itself
    loads non-strictly once it drops the classifier, so a wrong file would load half)."""

    def check(state_dict: dict, model: nn.Module) -> dict:
        if any(key.startswith("backbone.") for key in state_dict):  # a coughreg model's own weights
            state_dict = {k.removeprefix("backbone."): v for k, v in state_dict.items() if k.startswith("backbone.")}
        classifiers = pretrained_cfg.get("classifier") or ()
        classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
        dropped = {f"{name}.{part}" for name in classifiers for part in ("weight", "bias")}
        first = pretrained_cfg.get("first_conv") or ()
        stems = {f"{name}.weight" for name in ((first,) if isinstance(first, str) else first)}
        own = model.state_dict()
        problem = None
        for key, value in own.items():
            if key.endswith("num_batches_tracked"):
                continue
            if key not in state_dict:
                problem = f"'{key}' is missing from the file"
            else:
                theirs = tuple(state_dict[key].shape)
                mine = tuple(value.shape)
                same = theirs[:1] + theirs[2:] == mine[:1] + mine[2:] if key in stems else theirs == mine
                if not same:
                    problem = f"'{key}' has shape {theirs} in the file, {mine} in the backbone"
            if problem:
                break
        if problem is None:
            extra = sorted(k for k in state_dict if k not in own and k not in dropped)
            problem = f"'{extra[0]}' is in the file but not in the backbone" if extra else None
        if problem:
            raise CoughPipelineError(
                f"{path}: these weights do not fit backbone '{backbone}': {problem}. "
                "Point architecture.pretrained_weights at this backbone's weights, or set architecture.pretrained=false"
            )
        return state_dict

    return check


def load_pretrained_backbone(model: CoughRegressor, config: ExperimentConfig) -> str:
    """Load pretrained backbone weights with timm (``coughreg.model.weights`` finds them): the stem adapted to one
    input channel and the classifier dropped (timm's ``load_pretrained``). Returns where they came from.

    Raises:
        CoughPipelineError: no weights are found (saying where to put them), they are not the ones the run
            resolved (``architecture.pretrained_sha256``), or they do not fit the backbone (naming the file,
            the backbone and the first tensor that does not fit).
    """
    from timm.models import load_pretrained

    from coughreg.model.weights import resolve

    backbone = config.architecture.backbone
    weights = resolve(config)
    pretrained_cfg = {**(getattr(model.backbone, "pretrained_cfg", None) or {}), "file": str(weights.path), "source": ""}
    load_pretrained(model.backbone, pretrained_cfg=pretrained_cfg, num_classes=0, in_chans=1,
                    filter_fn=_fits(weights.path, backbone, pretrained_cfg), strict=True)
    log.info("pretrained weights for %s from %s (sha256 %s)", backbone, weights.source, weights.sha256)
    return f"{weights.source} sha256:{weights.sha256}"
