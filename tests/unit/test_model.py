"""The network: shapes, bounded finite outputs, gradients everywhere, padding that changes nothing."""

from __future__ import annotations

import pytest
import torch

from coughreg.audio.frontend import LogMel
from coughreg.model.network import PAD_DB, CoughRegressor, CoughScorer


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
    from coughreg.runtime.errors import CoughPipelineError

    with pytest.raises(CoughPipelineError, match="architecture.backbone"):
        CoughRegressor("resnet_does_not_exist", 1)


def test_clip_normalization_ignores_gain_and_digital_silence():
    from coughreg.audio.feature_spec import FLOOR_DB
    from coughreg.audio.frontend import CLIP_SILENCE, CLIP_TOP_DB, SpectrogramNormalizer

    normalizer = SpectrogramNormalizer("Clip")
    rng = torch.Generator().manual_seed(0)
    clip = -40.0 + 12.0 * torch.randn(1, 16, 50, generator=rng)  # (batch, mels, frames) dB
    clip[:, 12:, :] = FLOOR_DB  # a codec's empty bands
    clip[:, :, 30:40] = FLOOR_DB  # a stretch a gate silenced
    clip[:, 0, 0] = clip.max() - CLIP_TOP_DB - 5  # a cell far below the loudest: silence too
    normalized = normalizer(clip)
    sounding = (clip > FLOOR_DB + 0.1) & (clip > clip.max() - CLIP_TOP_DB)
    assert torch.all(normalized[~sounding] == CLIP_SILENCE)
    assert normalized[sounding].max() == 2.0 and normalized[sounding].min() > CLIP_SILENCE  # the loudest is 2
    torch.testing.assert_close(normalized[sounding], (clip[sounding] - clip.max() + 40) / 20)
    gated = torch.where(clip < -50, torch.full_like(clip, FLOOR_DB), clip)  # a gate silences the quiet cells...
    kept = gated > FLOOR_DB + 0.1
    assert torch.equal(normalizer(gated)[kept], normalized[kept])  # ...and the cells it kept do not move
    quieter = torch.where(clip > FLOOR_DB + 0.1, clip - 24.0, clip)  # 24 dB quieter: every sounding cell moves by 24 dB
    torch.testing.assert_close(normalizer(quieter), normalized, rtol=0, atol=1e-4)
    silent = torch.full((1, 16, 50), FLOOR_DB)
    assert torch.all(normalizer(silent) == CLIP_SILENCE)
