"""The network: shapes, bounded finite outputs, gradients everywhere, padding that changes nothing."""

from __future__ import annotations

import pytest
import torch

from coughreg.frontend import LogMel
from coughreg.model import PAD_DB, CoughRegressor, CoughScorer


@pytest.mark.parametrize("pool", ["Average", "Max", "GeM"])
def test_shapes_bounds_and_gradients(pool):
    torch.manual_seed(0)
    model = CoughRegressor("test_resnet", num_outputs=2, dropout=0.1, pool=pool, normalization="Clip")
    log_mel = torch.randn(3, 64, 150) * 10 - 40  # (batch, mels, frames)
    lengths = torch.tensor([150, 90, 40])
    out = model(log_mel, lengths)
    assert out.shape == (3, 2)
    assert torch.isfinite(out).all() and (out >= 0).all() and (out <= 1).all()
    out.sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


@pytest.mark.parametrize("pool", ["Average", "Max", "GeM"])
@pytest.mark.parametrize("normalization", ["No", "Clip"])
def test_padding_does_not_move_the_prediction_much(pool, normalization):
    """A clip alone and the same clip padded in a batch get (nearly) the same score: the mask hides padding."""
    torch.manual_seed(1)
    model = CoughRegressor("test_resnet", 1, pool=pool, normalization=normalization).eval()
    clip = torch.randn(1, 64, 96) * 10 - 40
    padded = torch.full((1, 64, 288), PAD_DB)
    padded[:, :, :96] = clip
    with torch.inference_mode():
        alone = model(clip, torch.tensor([96]))
        in_batch = model(padded, torch.tensor([96]))
        unmasked = model(padded, torch.tensor([288]))
    # Convolutions see a little padding at the clip's edge; without the mask the error is much larger.
    assert abs(float(alone - in_batch)) < 0.5 * abs(float(alone - unmasked)) + 1e-3


def test_label_range_is_inside_the_model():
    model = CoughRegressor("test_resnet", 1, label_min=2.0, label_max=5.0).eval()
    with torch.inference_mode():
        out = model(torch.randn(4, 32, 50) * 30)
    assert ((out >= 2.0) & (out <= 5.0)).all()


def test_the_scorer_takes_a_raw_waveform():
    frontend = LogMel(48000, 2048, 512, 128, 50, 24000)
    scorer = CoughScorer(frontend, [CoughRegressor("test_resnet", 1), CoughRegressor("test_resnet", 1)]).eval()
    waveform = torch.randn(2, 48000) * 0.1  # (batch, samples)
    with torch.inference_mode():
        out = scorer(waveform)
        members = torch.stack([m(frontend(waveform)) for m in scorer.regressors]).mean(0)
    assert out.shape == (2, 1)
    torch.testing.assert_close(out, members)


def test_an_unknown_backbone_is_named():
    from coughreg.errors import CoughPipelineError

    with pytest.raises(CoughPipelineError, match="architecture.backbone"):
        CoughRegressor("resnet_does_not_exist", 1)
