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

from coughreg.config import ExperimentConfig
from coughreg.errors import CoughPipelineError
from coughreg.feature_spec import FLOOR_DB
from coughreg.frontend import LogMel, SpectrogramNormalizer

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


def create_model(config: ExperimentConfig, label_range: tuple[float, float] | None = None) -> CoughRegressor:
    """The regressor the config describes (weights random until trained or loaded)."""
    low, high = label_range or (config.ingest.label_min, config.ingest.label_max)
    return CoughRegressor(
        backbone=config.architecture.backbone,
        num_outputs=len(config.dataset.label_columns),
        dropout=config.architecture.dropout,
        pool=config.architecture.pool,
        normalization=config.audio.spectrogram_normalization,
        label_min=low,
        label_max=high,
    )


def _find_hf_cache_weights(backbone: str) -> list[Path]:
    """timm's Hugging Face cache for this backbone (never downloads)."""
    import os

    roots = []
    if os.environ.get("HF_HUB_CACHE"):
        roots.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        roots.append(Path(os.environ["HF_HOME"]) / "hub")
    roots.append(Path.home() / ".cache" / "huggingface" / "hub")
    name = backbone.split(".")[0]
    found = []
    for root in roots:
        for folder in sorted(root.glob(f"models--timm--{name}*")):
            found.extend(sorted(folder.glob("snapshots/*/model.safetensors")) + sorted(folder.glob("snapshots/*/pytorch_model.bin")))
    return found


def _weights_file(source: str | Path) -> Path:
    from coughreg.storage import download_s3_object, is_s3_uri, local_path

    if is_s3_uri(str(source)):
        return download_s3_object(str(source))
    path = local_path(source)
    if path.is_dir():
        candidates = sorted(path.rglob("model.safetensors")) + sorted(path.rglob("*.safetensors")) + sorted(path.rglob("pytorch_model.bin")) + sorted(path.rglob("*.pth"))
        if not candidates:
            raise CoughPipelineError(f"architecture.pretrained_weights: no weights file (*.safetensors, *.pth, pytorch_model.bin) in {path}")
        return candidates[0]
    if not path.exists():
        raise CoughPipelineError(f"architecture.pretrained_weights: {path} does not exist")
    return path


def load_pretrained_backbone(model: CoughRegressor, config: ExperimentConfig) -> str:
    """Load pretrained backbone weights named by the config (file, HF cache folder, s3://); never downloads.

    Three-channel stem weights are summed into one channel (timm's adapt_input_conv); the
    classifier is dropped. Returns where the weights came from.

    Raises:
        CoughPipelineError: when weights are asked for and none are found, saying where to put them.
    """
    from timm.models import adapt_input_conv

    source = config.architecture.pretrained_weights
    if source is None:
        cached = _find_hf_cache_weights(config.architecture.backbone)
        if not cached:
            raise CoughPipelineError(
                f"architecture.pretrained is true but no weights for '{config.architecture.backbone}' were found: "
                "set architecture.pretrained_weights to a file, a Hugging Face cache folder or an s3:// URI, "
                "put timm's weights in ~/.cache/huggingface/hub (HF_HOME), or set architecture.pretrained=false "
                "to start from random weights"
            )
        path = cached[0]
    else:
        path = _weights_file(source)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    own = model.backbone.state_dict()
    adapted = {}
    for key, value in state.items():
        key = key.removeprefix("module.").removeprefix("backbone.")
        if key not in own:
            continue
        if value.ndim == 4 and own[key].ndim == 4 and value.shape[1] != own[key].shape[1]:
            value = adapt_input_conv(own[key].shape[1], value)
        if value.shape == own[key].shape:
            adapted[key] = value
    if not adapted:
        raise CoughPipelineError(f"{path}: no tensor matches backbone '{config.architecture.backbone}'; wrong weights file?")
    missing = [k for k in own if k not in adapted]
    model.backbone.load_state_dict(adapted, strict=False)
    log.info("pretrained weights from %s: %d tensors loaded, %d left random", path, len(adapted), len(missing))
    return str(path)
