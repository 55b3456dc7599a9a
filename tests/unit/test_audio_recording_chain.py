"""The recording chain: each transform changes a recording as its name says, with real filters and real codecs,
on generated clips and on the REAL recordings; the random chains of training follow their stated law."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from scipy.signal import welch

from coughreg.audio.recording_chain import (
    CHAIN_VERSION,
    STANDARD,
    Chain,
    Codec,
    Gain,
    LowPass,
    NoiseGate,
    Transient,
    draw_chain,
    slug,
)
from coughreg.scoring.decode import decode_audio
from coughreg.synth.coughvid import cough_event
from tests.conftest import REAL_COUGHS

RATE = 48000


def _noise(seconds: float = 2.0, level: float = 0.05, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(RATE * seconds)) * level).astype(np.float32)


def _band_db(samples: np.ndarray, low: float, high: float) -> float:
    freqs, power = welch(samples, RATE, nperseg=4096)  # Hann windows: no leakage from the loud bands
    return float(10 * np.log10(power[(freqs >= low) & (freqs < high)].mean() + 1e-30))


def _cough_in_quiet_room(seed: int = 1) -> tuple[np.ndarray, slice]:
    """Half a second of room noise at -60 dBFS, a cough at about -12 dBFS, then room noise again."""
    rng = np.random.default_rng(seed)
    room = (rng.standard_normal(RATE * 2) * 10 ** (-60 / 20)).astype(np.float32)
    event = cough_event(rng).astype(np.float32)
    event = event / np.abs(event).max() * 10 ** (-12 / 20)
    where = slice(RATE // 2, RATE // 2 + event.size)
    room[where] += event
    return room, where


def test_gain_scales_every_sample_by_its_decibels_and_clips_at_full_scale():
    clip = _noise()
    quieter = Gain(-12.0)(clip, RATE)
    assert quieter.dtype == np.float32 and quieter.shape == clip.shape
    np.testing.assert_allclose(quieter, clip * 10 ** (-12 / 20), rtol=1e-6)
    loud = Gain(+40.0)(clip, RATE)
    assert np.abs(loud).max() == pytest.approx(1.0)  # a real converter clips; it does not wrap


@pytest.mark.parametrize("cutoff", [4000.0, 8000.0])
def test_low_pass_keeps_the_band_below_and_removes_the_bands_above(cutoff):
    clip = _noise(seconds=3.0)
    out = LowPass(cutoff)(clip, RATE)
    assert out.shape == clip.shape
    assert abs(_band_db(out, 100, cutoff / 2) - _band_db(clip, 100, cutoff / 2)) < 0.2  # the pass band untouched
    assert _band_db(out, cutoff * 1.5, RATE / 2) - _band_db(clip, cutoff * 1.5, RATE / 2) < -60  # gone above
    tone = np.sin(2 * np.pi * 440 * np.arange(RATE) / RATE).astype(np.float32)
    assert np.max(np.abs(LowPass(cutoff)(tone, RATE) - tone)[1000:-1000]) < 1e-3  # zero phase: a tone stays in place


def test_the_noise_gate_turns_the_room_into_digital_silence_and_keeps_the_cough():
    clip, cough = _cough_in_quiet_room()
    out = NoiseGate()(clip, RATE)
    assert out.shape == clip.shape
    before = out[: cough.start - int(0.02 * RATE)]  # the room before the cough (the gate opens ~10 ms early at most)
    after = out[cough.stop + int(0.2 * RATE):]  # the room after it, past the hold
    assert np.all(before == 0.0) and np.all(after == 0.0)
    loud = np.abs(clip[cough]) > 10 ** (-30 / 20)
    inner = slice(cough.start + int(0.01 * RATE), cough.stop - int(0.01 * RATE))
    loud_inner = np.abs(clip[inner]) > 10 ** (-30 / 20)
    np.testing.assert_array_equal(out[inner][loud_inner], clip[inner][loud_inner])  # the cough passes untouched
    assert loud.any()
    silent = np.zeros(RATE, dtype=np.float32)
    assert np.array_equal(NoiseGate()(silent, RATE), silent)  # nothing to gate in a silent clip


def test_the_gate_fades_in_and_out_without_a_step_and_holds_after_the_sound():
    clip, _ = _cough_in_quiet_room(seed=2)
    gate = NoiseGate(hold_seconds=0.08, ramp_seconds=0.005)
    out = gate(clip, RATE)
    gain = np.divide(out, clip, out=np.zeros_like(out), where=clip != 0)
    opens = np.flatnonzero(np.diff((out != 0).astype(int)) == 1) + 1
    closes = np.flatnonzero(np.diff((out != 0).astype(int)) == -1) + 1
    ramp = int(0.005 * RATE)
    assert opens.size >= 1 and closes.size >= 1
    first, last = opens[0], closes[-1]
    assert gain[first] <= 1.5 / ramp  # the fade starts from (nearly) zero: no click
    np.testing.assert_allclose(gain[first : first + ramp], np.arange(1, ramp + 1) / ramp, atol=1e-4)  # a linear ramp
    np.testing.assert_allclose(gain[last - ramp : last], np.arange(ramp, 0, -1) / ramp, atol=1e-4)
    loud_frames = np.flatnonzero(np.abs(clip) > 10 ** (-30 / 20))
    assert (last - loud_frames[-1]) / RATE >= 0.08 - 0.011  # open for the hold after the last loud frame


@pytest.mark.parametrize("rate", [RATE, 16000, 11025])
@pytest.mark.parametrize("size", [0, 1, 5, 100, 239, 481])
def test_every_transform_takes_a_clip_of_any_length(size, rate):
    clip = _noise(seconds=1.0)[:size]
    for transform in STANDARD:
        out = transform(clip, rate, np.random.default_rng(0))
        assert out.shape == clip.shape and np.isfinite(out).all(), transform.name


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 96000])
def test_the_codecs_and_the_knock_work_at_any_sample_rate(rate):
    clip = (np.random.default_rng(0).standard_normal(rate) * 0.05).astype(np.float32)
    for transform in (Codec("opus", 16000), Codec("mp3", 32000), Transient(), NoiseGate(), LowPass(4000.0)):
        out = transform(clip, rate, np.random.default_rng(0))
        assert out.shape == clip.shape and np.isfinite(out).all(), (transform.name, rate)


@pytest.mark.parametrize("codec", [Codec("opus", 16000), Codec("mp3", 32000)], ids=lambda c: c.name)
def test_a_codec_round_trip_is_a_real_lossy_encoding_aligned_with_the_input(codec):
    clip, _ = _cough_in_quiet_room(seed=3)
    out = codec(clip, RATE)
    assert out.shape == clip.shape and out.dtype == np.float32
    assert not np.allclose(out, clip, atol=1e-4)  # lossy
    def envelope(x):  # 10 ms levels: a low-bitrate codec keeps the sound's shape in time, not its waveform
        return np.sqrt(np.mean(x[: x.size // 480 * 480].reshape(-1, 480) ** 2, axis=1))

    assert np.corrcoef(envelope(out), envelope(clip))[0, 1] > 0.95  # the same sound, in the same place
    assert np.corrcoef(out, clip)[0, 1] > 0.6
    lag = np.argmax(np.correlate(out[RATE // 2 - 2000 : RATE // 2 + 6000], clip[RATE // 2 : RATE // 2 + 4000], "valid")) - 2000
    assert abs(lag) <= 2


def test_mp3_at_32_kbit_s_cuts_the_top_of_the_spectrum():
    clip = _noise(seconds=3.0)
    out = Codec("mp3", 32000)(clip, RATE)
    assert _band_db(out, 12000, 20000) - _band_db(clip, 12000, 20000) < -40
    assert abs(_band_db(out, 200, 4000) - _band_db(clip, 200, 4000)) < 3


def test_a_knock_is_added_once_at_its_level_and_nowhere_else():
    clip, _ = _cough_in_quiet_room(seed=4)
    out = Transient(level_db=-6.0)(clip, RATE, np.random.default_rng(9))
    again = Transient(level_db=-6.0)(clip, RATE, np.random.default_rng(9))
    np.testing.assert_array_equal(out, again)  # the clip's generator decides where
    changed = np.flatnonzero(out != clip)
    assert changed.size and (changed[-1] - changed[0]) / RATE <= 0.06  # one short thud
    added = (out - clip)[changed[0] : changed[-1] + 1]
    assert 20 * np.log10(np.abs(added).max() / np.abs(clip).max()) == pytest.approx(-6.0, abs=0.5)


def test_the_standard_set_has_unique_metric_names():
    names = [slug(t) for t in STANDARD]
    assert names == ["gain_-12db", "gain_-24db", "lowpass_8khz", "lowpass_4khz", "noise_gate", "opus_16kbps", "mp3_32kbps",
                     "door_knock"]


@pytest.mark.parametrize("path", sorted(REAL_COUGHS.glob("*.mp3")), ids=lambda p: p.name)
def test_every_transform_runs_on_the_real_recordings(path):
    samples = decode_audio(path, RATE, max_seconds=4.0)
    for transform in STANDARD:
        out = transform(samples, RATE, np.random.default_rng(0))
        assert out.shape == samples.shape and out.dtype == np.float32 and np.isfinite(out).all(), transform.name
        assert np.abs(out).max() <= 1.5 * max(np.abs(samples).max(), 1e-3)  # filters and codecs overshoot a little, no more


def test_training_chains_follow_their_law_and_repeat_from_their_seed():
    chains = [draw_chain(np.random.default_rng(seed)) for seed in range(3000)]
    assert all(isinstance(c, Chain) for c in chains)
    assert draw_chain(np.random.default_rng(42)) == draw_chain(np.random.default_rng(42))

    def share(kind):
        return np.mean([any(isinstance(s, kind) for s in c.stages) for c in chains])

    assert share(Gain) == 1.0
    assert share(Transient) == pytest.approx(0.4, abs=0.03)
    assert share(NoiseGate) == pytest.approx(0.4, abs=0.03)
    assert share(LowPass) == pytest.approx(0.35, abs=0.03)
    assert share(Codec) == pytest.approx(0.5, abs=0.03)
    gains = [s.db for c in chains for s in c.stages if isinstance(s, Gain)]
    assert -30 <= min(gains) and max(gains) <= 6
    cutoffs = [s.cutoff_hz for c in chains for s in c.stages if isinstance(s, LowPass)]
    assert 3500 <= min(cutoffs) and max(cutoffs) <= 12000
    clip = _noise(seconds=1.0)
    chain = draw_chain(np.random.default_rng(7))
    np.testing.assert_array_equal(chain(clip, RATE, np.random.default_rng(1)), chain(clip, RATE, np.random.default_rng(1)))


# The law of draw_chain, as the hash of 500 drawn chains, for each CHAIN_VERSION. Copies written under one version are
# reused by the features step while the version stands, so a change of the law must come with a new version.
LAW_HASHES = {1: "e938d26b412664b9fd636196d15142bc026228b08f8d6e919b9968f43b5e8f5f"}


def test_the_law_of_the_training_chains_changes_only_with_its_version():
    drawn = [draw_chain(np.random.default_rng(seed)).describe() for seed in range(500)]
    law = hashlib.sha256(json.dumps(drawn, sort_keys=True).encode()).hexdigest()
    assert law == LAW_HASHES.get(CHAIN_VERSION), (
        f"draw_chain's law changed under CHAIN_VERSION {CHAIN_VERSION}: bump the version (cached copies are remade) "
        f"and add {law} for it to LAW_HASHES"
    )
