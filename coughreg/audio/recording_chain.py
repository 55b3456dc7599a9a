"""The recording chain between a cough and the file we get: gain, band limits, a browser's noise gate, lossy
codecs and knocks in the room, as real signal processing on waveforms (one implementation for all of it).

Three places use it:

- **evaluation** scores every validation clip once as recorded and once through each of ``STANDARD`` (the
  fixed set below) and reports how far each transform moves the scores (``coughreg.evaluation.robustness``);
- **training** learns from copies of the training recordings passed through chains drawn by ``draw_chain``
  (``augmentation.recording_chain_views``: the features step writes them, the training loop picks one);
- **the generator** (``coughreg.synth.coughvid``) puts its recordings through the same gate.

Every transform maps mono float32 samples at ``sample_rate`` to as many samples, and is deterministic given
the numpy generator it is handed (only ``Transient`` draws from it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from coughreg.runtime.errors import CoughPipelineError

CHAIN_VERSION = 1  # bump when a transform or the law of draw_chain changes: cached augmented views are remade
FRAME_SECONDS = 0.010  # the noise gate's level meter


class Transform(ABC):
    """One stage of a recording chain: ``transform(samples, sample_rate, rng) -> samples`` (same length)."""

    name: str = ""

    @abstractmethod
    def __call__(self, samples: np.ndarray, sample_rate: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """Mono float32 samples at ``sample_rate`` -> as many float32 samples."""

    def describe(self) -> dict:
        return {"transform": type(self).__name__, **{k: v for k, v in vars(self).items() if k != "name"}}

    def applies(self, sample_rate: int) -> bool:
        """False where the transform cannot change a clip at ``sample_rate`` (a measured change of 0 would mislead)."""
        return True


@dataclass
class Gain(Transform):
    """The whole clip ``db`` louder (negative: quieter), as microphone gain or distance does; clipped at full scale."""

    db: float
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        self.name = self.name or f"gain {self.db:+g} dB"

    def __call__(self, samples, sample_rate, rng=None):
        return np.clip(samples * np.float32(10 ** (self.db / 20)), -1.0, 1.0).astype(np.float32)


@dataclass
class LowPass(Transform):
    """Everything above ``cutoff_hz`` removed, as a narrow-band codec or a cheap microphone does: a zero-phase
    Butterworth filter (order 8, applied forward and backward), -3 dB at the cut-off, over 60 dB down at 1.5x."""

    cutoff_hz: float
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        self.name = self.name or f"low-pass {self.cutoff_hz / 1000:g} kHz"

    def applies(self, sample_rate: int) -> bool:
        return self.cutoff_hz < sample_rate / 2

    def __call__(self, samples, sample_rate, rng=None):
        from scipy.signal import butter, sosfiltfilt

        if not self.applies(sample_rate) or samples.size < 64:
            return samples.astype(np.float32, copy=True)
        sos = butter(8, self.cutoff_hz, btype="low", fs=sample_rate, output="sos")
        return sosfiltfilt(sos, samples.astype(np.float64), padlen=min(samples.size - 1, sample_rate // 10)).astype(np.float32)


@dataclass
class NoiseGate(Transform):
    """A browser's noise suppression as heard in COUGHVID: stretches that stay near the clip's noise floor become
    digital silence (exact zeros), the rest passes untouched but for the gate's fades.

    The level is metered in 10 ms frames; the noise floor is the 10th percentile of the frames that are not
    already silent. A frame opens the gate when it is ``open_above_floor_db`` above that floor; the gate stays
    open ``hold_seconds`` after the last such frame. Each open stretch fades in over its first and out over its
    last ``ramp_seconds`` (a linear ramp from zero), as a real gate does to avoid clicks.
    """

    open_above_floor_db: float = 10.0
    hold_seconds: float = 0.08
    ramp_seconds: float = 0.005
    name: str = field(default="noise gate", compare=False)

    def __call__(self, samples, sample_rate, rng=None):
        return (samples * self.gain(samples, sample_rate)).astype(np.float32)

    def gain(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        """The gate's gain over time (0 closed, 1 open, the fades between) for these samples."""
        frame = max(1, round(FRAME_SECONDS * sample_rate))
        frames = -(-samples.size // frame)
        padded = np.zeros(frames * frame, dtype=np.float64)
        padded[: samples.size] = samples
        level = 10 * np.log10(np.mean(padded.reshape(frames, frame) ** 2, axis=1) + 1e-20)  # dBFS per frame
        sounding = level > -190
        if not sounding.any():
            return np.ones(samples.size)
        floor = np.percentile(level[sounding], 10)
        open_frames = level > floor + self.open_above_floor_db
        hold = round(self.hold_seconds / FRAME_SECONDS)
        if hold:  # a frame stays open while any of the `hold` frames before it opened the gate
            open_frames = np.convolve(open_frames.astype(float), np.ones(hold + 1))[:frames] > 0
        is_open = np.repeat(open_frames, frame)[: samples.size]
        ramp = max(1, round(self.ramp_seconds * sample_rate))
        # the distance (in samples) of every sample to the nearest closed one: the fades in and out
        index = np.arange(samples.size)
        far = samples.size + ramp
        last_closed = np.maximum.accumulate(np.where(is_open, -far, index))
        next_closed = np.minimum.accumulate(np.where(is_open, 2 * far, index)[::-1])[::-1]
        distance = np.minimum(index - last_closed, next_closed - index)
        return np.where(is_open, np.minimum(1.0, distance / ramp), 0.0)


CODEC_MIN_SECONDS = 0.1  # shorter clips are padded with silence for the codec (and cut back after)
CODEC_CONTAINERS = {"opus": ("ogg", "libopus"), "mp3": ("mp3", "libmp3lame")}
CODEC_RATES = {"opus": (8000, 12000, 16000, 24000, 48000), "mp3": (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)}


@dataclass
class Codec(Transform):
    """A round trip through a lossy codec at ``bitrate`` bit/s with PyAV's FFmpeg: ``opus`` (libopus in Ogg, as
    browsers record) or ``mp3`` (LAME). The result is decoded back to ``sample_rate``, aligned and as long."""

    codec: str
    bitrate: int
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.codec not in CODEC_CONTAINERS:
            raise ValueError(f"unknown codec {self.codec!r}; one of {sorted(CODEC_CONTAINERS)}")
        self.name = self.name or f"{'Opus' if self.codec == 'opus' else 'MP3'} {self.bitrate // 1000} kbit/s"

    def __call__(self, samples, sample_rate, rng=None):
        from coughreg.audio.files import decode_audio, encode_mono

        if samples.size == 0:
            return samples.astype(np.float32, copy=True)
        container, encoder = CODEC_CONTAINERS[self.codec]
        # the codec's own rate: the clip's when the codec takes it, else 48 kHz (and back to the clip's after decoding)
        rate = sample_rate if sample_rate in CODEC_RATES[self.codec] else 48000
        clip = np.ascontiguousarray(samples, dtype=np.float32)
        if rate != sample_rate:
            clip = _resample(clip, sample_rate, rate)
        # a clip shorter than a few codec frames is encoded with silence after it (a codec emits whole frames)
        clip = np.pad(clip, (0, max(0, int(rate * CODEC_MIN_SECONDS) - clip.size)))
        try:
            decoded = decode_audio(encode_mono(clip, rate, container, encoder, self.bitrate), sample_rate)
        except Exception as exc:  # noqa: BLE001 - named: which codec, at which rate, failed on what
            raise CoughPipelineError(f"{self.name} round trip at {rate} Hz failed on {samples.size} samples: {exc}") from exc
        out_samples = np.zeros(samples.size, dtype=np.float32)
        out_samples[: min(samples.size, decoded.size)] = decoded[: samples.size]
        return out_samples


@dataclass
class Transient(Transform):
    """A knock on a door or a table somewhere in the clip: a short broadband thud whose peak is ``level_db``
    relative to the clip's own peak (-20 dBFS in a silent clip), at a position drawn from ``rng`` (the only stage
    that draws)."""

    level_db: float = -6.0
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        self.name = self.name or "door knock"

    def __call__(self, samples, sample_rate, rng=None):
        rng = rng if rng is not None else np.random.default_rng(0)
        out = samples.astype(np.float32, copy=True)
        knock = knock_sound(rng, sample_rate)
        if samples.size == 0:
            return out
        peak = float(np.max(np.abs(samples))) or 10 ** (-20 / 20)
        knock = knock[: samples.size] * (peak * 10 ** (self.level_db / 20))
        start = int(rng.integers(0, samples.size - knock.size + 1))
        out[start : start + knock.size] += knock.astype(np.float32)
        return np.clip(out, -1.0, 1.0)


def knock_sound(rng: np.random.Generator, sample_rate: int) -> np.ndarray:
    """One knock (peak 1): a few milliseconds of decaying noise in a band around a low resonance, with a click."""
    from scipy.signal import butter, sosfilt

    length = max(8, int(sample_rate * rng.uniform(0.02, 0.06)))
    t = np.arange(length) / sample_rate
    hit = rng.standard_normal(length) * np.exp(-t / rng.uniform(0.004, 0.012))
    nyquist = sample_rate / 2
    centre = min(rng.uniform(150.0, 1500.0), nyquist * 0.3)
    sos = butter(2, [centre * 0.5, min(centre * 3.0, nyquist * 0.95)], btype="band", fs=sample_rate, output="sos")
    thud = sosfilt(sos, hit)
    thud[: max(1, length // 100)] += rng.standard_normal(max(1, length // 100)) * 0.3  # the click of contact
    return thud / (np.max(np.abs(thud)) + 1e-12)


def _resample(samples: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    from math import gcd

    from scipy.signal import resample_poly

    common = gcd(rate_in, rate_out)
    return resample_poly(samples, rate_out // common, rate_in // common).astype(np.float32)


@dataclass
class Chain(Transform):
    """Stages applied in order (a room, then a microphone, then a browser, then a codec)."""

    stages: tuple[Transform, ...] = ()
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        self.name = self.name or (" + ".join(stage.name for stage in self.stages) or "as recorded")

    def __call__(self, samples, sample_rate, rng=None):
        out = samples.astype(np.float32, copy=True)
        for stage in self.stages:
            out = stage(out, sample_rate, rng)
        return out

    def describe(self) -> dict:
        return {"transform": "Chain", "stages": [stage.describe() for stage in self.stages]}


# What every evaluation measures: the phones, browsers and rooms the data comes from, one at a time.
STANDARD: tuple[Transform, ...] = (
    Gain(-12.0),
    Gain(-24.0),
    LowPass(8000.0),
    LowPass(4000.0),
    NoiseGate(),
    Codec("opus", 16000),
    Codec("mp3", 32000),
    Transient(),
)


def slug(transform: Transform) -> str:
    """A name for metric keys: ``gain_-12db``, ``lowpass_4khz``, ``noise_gate``, ``opus_16kbps``, ``door_knock``."""
    if isinstance(transform, Gain):
        return f"gain_{transform.db:+g}db".replace("+", "")
    if isinstance(transform, LowPass):
        return f"lowpass_{transform.cutoff_hz / 1000:g}khz"
    if isinstance(transform, Codec):
        return f"{transform.codec}_{transform.bitrate // 1000}kbps"
    return transform.name.replace(" ", "_").lower()


def draw_chain(rng: np.random.Generator) -> Chain:
    """A random recording chain for a training view (law version ``CHAIN_VERSION``).

    Each stage independently: a knock with probability 0.4 (-18..0 dB from the clip's peak); a gain of
    -30..+6 dB always; the noise gate with probability 0.4 (opening 6..14 dB above the floor); a low-pass
    with probability 0.35 (cut-off log-uniform 3.5..12 kHz); a codec with probability 0.5 (Opus at 12..32
    kbit/s or MP3 at 32..64 kbit/s, even odds).
    """
    stages: list[Transform] = []
    if rng.random() < 0.4:
        stages.append(Transient(level_db=round(float(rng.uniform(-18.0, 0.0)), 1)))
    stages.append(Gain(round(float(rng.uniform(-30.0, 6.0)), 1)))
    if rng.random() < 0.4:
        stages.append(NoiseGate(open_above_floor_db=round(float(rng.uniform(6.0, 14.0)), 1)))
    if rng.random() < 0.35:
        stages.append(LowPass(round(float(np.exp(rng.uniform(np.log(3500.0), np.log(12000.0)))), -2)))
    if rng.random() < 0.5:
        if rng.random() < 0.5:
            stages.append(Codec("opus", int(rng.choice([12000, 16000, 24000, 32000]))))
        else:
            stages.append(Codec("mp3", int(rng.choice([32000, 48000, 64000]))))
    return Chain(tuple(stages))
