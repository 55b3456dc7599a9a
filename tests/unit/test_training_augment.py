"""Spectrogram augmentations change level, bandwidth and spans, and never touch digital silence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchaudio

from coughreg.audio.feature_spec import AMIN
from coughreg.config.loading import load_resolved_config
from coughreg.runtime.errors import ConfigError
from coughreg.training.augment import FLOOR_DB, SpectrogramAugmenter, enabled, mel_band_centers
from tests.conftest import HT_YAML


def test_the_silence_floor_is_the_front_ends():
    assert FLOOR_DB == pytest.approx(10 * np.log10(AMIN))


def _augmenter(*overrides):
    config = load_resolved_config(HT_YAML, list(overrides))
    return SpectrogramAugmenter(config.augmentation, config.audio), config


def _batch():
    # four clips of noise in dB; clip 0 ends in padding, clip 1 starts with digital silence
    generator = torch.Generator().manual_seed(0)
    spectrograms = torch.randn(4, 128, 300, generator=generator) * 10 - 40
    spectrograms[0, :, 250:] = FLOOR_DB
    spectrograms[1, :, :100] = FLOOR_DB
    return spectrograms, torch.tensor([250, 300, 300, 300])


def test_off_unless_asked_for():
    config = load_resolved_config(HT_YAML, [])
    assert not enabled(config.augmentation)  # the user's experiment trains exactly as written
    assert enabled(load_resolved_config(HT_YAML, ["augmentation.gain_db=6"]).augmentation)
    assert not enabled(load_resolved_config(HT_YAML, ["augmentation.time_masks=2"]).augmentation)  # no width
    with pytest.raises(ConfigError, match="augmentation.lowpass_probability"):
        load_resolved_config(HT_YAML, ["augmentation.lowpass_probability=1.5"])


def test_band_centres_are_the_front_ends():
    config = load_resolved_config(HT_YAML, [])
    audio = config.audio
    filters = torchaudio.functional.melscale_fbanks(
        audio.stft_window_size // 2 + 1, float(audio.minimum_frequency), float(audio.maximum_frequency),
        audio.mel_frequency_bins, audio.sample_rate, norm="slaney", mel_scale="slaney",
    )
    peaks = filters.argmax(dim=0).numpy() * audio.sample_rate / audio.stft_window_size
    resolution = audio.sample_rate / audio.stft_window_size
    assert np.abs(mel_band_centers(audio) - peaks)[8:].max() <= resolution  # above the lowest, coarsely sampled bands


def test_gain_shifts_sound_and_keeps_silence():
    augmenter, _ = _augmenter("augmentation.gain_db=12")
    spectrograms, lengths = _batch()
    out = augmenter(spectrograms, lengths, np.random.default_rng(3))
    silent = spectrograms == FLOOR_DB
    assert (out[silent] == FLOOR_DB).all()
    shift = (out - spectrograms)[~silent].reshape(-1)
    per_clip = [(out[k] - spectrograms[k])[~silent[k]] for k in range(4)]
    assert all(torch.allclose(d, d[0].expand_as(d), atol=1e-4) for d in per_clip)  # one constant per clip
    assert shift.abs().max() <= 12 + 1e-4 and len({round(float(d[0]), 3) for d in per_clip}) == 4
    again = augmenter(spectrograms, lengths, np.random.default_rng(3))
    assert torch.equal(out, again)  # same draws, same result: a resumed epoch repeats itself


def test_lowpass_silences_the_bands_above_a_cut_between_4_khz_and_the_top():
    augmenter, config = _augmenter("augmentation.lowpass_probability=1")
    spectrograms, lengths = _batch()
    out = augmenter(spectrograms, lengths, np.random.default_rng(5))
    centers = mel_band_centers(config.audio)
    for k in range(4):
        silent_bands = (out[k] == FLOOR_DB).all(dim=1).numpy()
        cut = int(np.argmax(silent_bands)) if silent_bands.any() else len(centers)
        assert silent_bands[cut:].all() and centers[min(cut, len(centers) - 1)] >= 4000 - 1
        assert torch.equal(out[k, :cut, : int(lengths[k])], spectrograms[k, :cut, : int(lengths[k])])


def test_masks_fill_spans_with_the_clip_mean_inside_the_clip():
    augmenter, _ = _augmenter("augmentation.frequency_masks=2", "augmentation.frequency_mask_bins=20",
                              "augmentation.time_masks=2", "augmentation.time_mask_frames=30")
    spectrograms, lengths = _batch()
    out = augmenter(spectrograms, lengths, np.random.default_rng(7))
    silent = spectrograms == FLOOR_DB
    assert (out[silent] == FLOOR_DB).all()
    changed = (out != spectrograms) & ~silent
    assert changed.any()
    for k in range(4):
        mean = spectrograms[k][~silent[k]].mean()
        assert torch.allclose(out[k][changed[k]], mean.expand(int(changed[k].sum())), atol=1e-3)
    frames_touched = changed.all(dim=1)  # frames masked in every sounding band: a time mask
    assert not frames_touched[0, 250:].any()  # never in the padding
    assert int(frames_touched.sum(dim=1).max()) <= 2 * 30
