"""Generated COUGHVID-format data: the demo's embedded default and the tests' fixture.

The mapping from label to audio is fixed here, once (``MAPPING_VERSION``), and never tuned to a model:

1. The label ``y`` (``cough_detected``) is drawn from the distribution of the real COUGHVID file
   (``REAL_LABEL_QUANTILES``, the percentiles of ``cough_detected`` in the 20,072-row
   ``metadata_compiled.csv``; inverse-CDF sampling), rounded to 4 decimals as in the real file.
2. The clip's cough evidence is ``q = clip(y + e, 0, 1)`` with ``e ~ Normal(0, LABEL_NOISE_SD)``:
   the real label is itself the output of a classifier, not the truth of the sound.
3. The clip holds 1-4 cough events (explosive broadband onset, short noisy decay, often a voiced
   tail) whose level above the background is ``SNR = -25 + 55 q`` dB (inaudible at q = 0, clear
   at q = 1). That level is the only thing in the clip that depends on the label.
4. Everything else is a nuisance drawn independently of ``y`` and ``q``, as phones, browsers and rooms
   are: a background (room tone, pink noise, mains hum or near silence); a distractor 5-25 dB above
   the background with probability 0.6 and a second one with probability 0.3 (speech-like syllables
   with slow or abrupt onsets, breathing, knocks, beeps: neither a sharp onset nor a loud event alone
   means a cough); with probability 0.25 the browser's noise gate of the recording chain
   (``coughreg.audio.recording_chain.NoiseGate``: stretches near the clip's noise floor become digital
   silence); with probability 0.25 a band limit (``LowPass`` at 4-12 kHz, log-uniform), as a cheap
   microphone or a narrow-band codec leaves; the whole clip scaled to a random peak level (-12..-1 dBFS),
   so loudness alone says nothing; and the container and codec (below).

Mapping version 3. Version 2 drew the first distractor with probability ``0.9 - 0.6 q``, so its presence
told a model something about the label (a shortcut no phone offers), and gated with its own gate; version 1
had only speech and breathing distractors and no gate, and taught models that any sharp sound out of
silence is a cough.

The best MAE any model can reach on this data (the noise floor) is the MAE of the Bayes
predictor that knows ``q`` exactly: the posterior median of ``y`` given ``q`` under the prior of
step 1 and the noise of step 2. ``noise_floor`` computes it; the generator reports it with the
data. Per-event level jitter (+-2 dB, zero mean) makes the true floor a little higher still.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import stat
import uuid as uuid_lib
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from coughreg.audio.recording_chain import CHAIN_VERSION, LowPass, NoiseGate
from coughreg.io.storage import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

MAPPING_VERSION = 3
SAMPLE_RATE = 48000
LABEL_NOISE_SD = 0.10
ZIP_DATE = (2020, 9, 10, 0, 0, 0)

# Percentiles 0, 1, ..., 100 of cough_detected in the real COUGHVID metadata_compiled.csv (20,072 rows).
REAL_LABEL_QUANTILES = np.array([
    0.0, 0.0061, 0.0088, 0.0116, 0.0145, 0.017, 0.0205, 0.0239, 0.028, 0.0314, 0.036, 0.0403, 0.0466,
    0.0519, 0.06, 0.066, 0.0742, 0.0829, 0.0951, 0.107, 0.1184, 0.1342, 0.151, 0.1695, 0.1901, 0.2143,
    0.2444, 0.2732, 0.3024, 0.3325, 0.3668, 0.3974, 0.4329, 0.4638, 0.4951, 0.5294, 0.5645, 0.5939,
    0.6226, 0.6483, 0.6714, 0.6973, 0.7197, 0.7421, 0.7627, 0.7781, 0.7923, 0.8065, 0.8187, 0.8324,
    0.8447, 0.8569, 0.8671, 0.8775, 0.8856, 0.8943, 0.9012, 0.9089, 0.9165, 0.9228, 0.9288, 0.9339,
    0.9387, 0.943, 0.9468, 0.9506, 0.9536, 0.9569, 0.9599, 0.9625, 0.9655, 0.968, 0.9703, 0.9723,
    0.9742, 0.976, 0.9778, 0.9792, 0.9806, 0.9819, 0.9831, 0.9843, 0.9855, 0.9867, 0.9877, 0.9887,
    0.9895, 0.9903, 0.9911, 0.9918, 0.9925, 0.9932, 0.9938, 0.9944, 0.995, 0.9955, 0.996, 0.9965,
    0.9971, 0.9979, 0.9994,
])

# The column order of the real metadata_compiled.csv.
COUGHVID_COLUMNS = [
    "uuid", "datetime", "cough_detected", "latitude", "longitude", "age", "gender",
    "respiratory_condition", "fever_muscle_pain", "status",
    "quality_1", "cough_type_1", "dyspnea_1", "wheezing_1", "stridor_1", "choking_1", "congestion_1",
    "nothing_1", "diagnosis_1", "severity_1",
    "quality_2", "cough_type_2", "dyspnea_2", "wheezing_2", "stridor_2", "choking_2", "congestion_2",
    "nothing_2", "diagnosis_2", "severity_2",
    "quality_3", "dyspnea_3", "wheezing_3", "stridor_3", "choking_3", "congestion_3", "nothing_3",
    "cough_type_3", "diagnosis_3", "severity_3",
]

FORMATS = (("webm", "opus", 0.70), ("ogg", "opus", 0.15), ("ogg", "vorbis", 0.15))
BACKGROUNDS = ("room", "pink", "hum", "silence")
DISTRACTORS = ("speech", "breathing", "knocks", "beeps")
GATE_PROBABILITY = 0.25
DISTRACTOR_PROBABILITIES = (0.6, 0.3)  # a first and a second distractor, at every label
BAND_LIMIT_PROBABILITY = 0.25
BAND_LIMIT_HZ = (4000.0, 12000.0)
# Written with the data: every nuisance is drawn at the same odds whatever the label (step 4 of the law above).
NUISANCES = {"nuisances_independent_of_label": True, "distractor_probabilities": list(DISTRACTOR_PROBABILITIES),
             "gate_probability": GATE_PROBABILITY, "band_limit_probability": BAND_LIMIT_PROBABILITY,
             "band_limit_hz": list(BAND_LIMIT_HZ), "recording_chain_version": CHAIN_VERSION}


@dataclass(frozen=True)
class GeneratedClip:
    uuid: str
    label: float
    evidence: float
    container: str
    codec: str
    background: str
    distractor: str
    n_coughs: int
    gated: bool
    band_limit_hz: int
    duration_s: float
    data: bytes
    metadata: dict


# ---------------------------------------------------------------- labels and noise floor


def sample_labels(rng: np.random.Generator, n: int) -> np.ndarray:
    """Labels distributed like the real cough_detected column (inverse-CDF sampling)."""
    u = rng.random(n) * 100.0
    return np.round(np.interp(u, np.arange(101), REAL_LABEL_QUANTILES), 4)


def _prior_grid(points: int = 2001) -> tuple[np.ndarray, np.ndarray]:
    grid = np.linspace(0.0, 1.0, points)
    cdf = np.interp(grid, REAL_LABEL_QUANTILES, np.linspace(0, 1, 101))
    mass = np.diff(cdf, prepend=0.0)
    return grid, mass / mass.sum()


def _posterior_median_exact(evidence: np.ndarray, noise_sd: float) -> np.ndarray:
    from scipy.stats import norm

    grid, prior = _prior_grid()
    q = np.asarray(evidence, dtype=float)[:, None]
    likelihood = np.where(
        q <= 0.0,
        norm.cdf(-grid / noise_sd),
        np.where(q >= 1.0, norm.sf((1.0 - grid) / noise_sd), norm.pdf((q - grid) / noise_sd)),
    )
    cumulative = np.cumsum(likelihood * prior, axis=1)
    cumulative /= cumulative[:, -1:]
    return grid[np.argmax(cumulative >= 0.5, axis=1)]


def posterior_median(evidence: np.ndarray, noise_sd: float = LABEL_NOISE_SD) -> np.ndarray:
    """The Bayes predictor under MAE: the median of y given q = clip(y + e, 0, 1).

    Computed exactly on 1,001 interior values of q and interpolated; q = 0 and q = 1 (where the
    clipping piles up probability) are computed exactly.
    """
    evidence = np.asarray(evidence, dtype=float)
    knots = np.linspace(0.0, 1.0, 1001)[1:-1]
    medians = _posterior_median_exact(knots, noise_sd)
    ends = _posterior_median_exact(np.array([0.0, 1.0]), noise_sd)
    result = np.interp(evidence, knots, medians)
    result[evidence <= 0.0] = ends[0]
    result[evidence >= 1.0] = ends[1]
    return result


def noise_floor(labels: np.ndarray | None = None, evidence: np.ndarray | None = None, seed: int = 0) -> float:
    """Best reachable MAE: realized on given (labels, evidence), or expected (200,000 draws)."""
    if labels is None or evidence is None:
        rng = np.random.default_rng(seed)
        labels = sample_labels(rng, 200_000)
        evidence = np.clip(labels + rng.normal(0, LABEL_NOISE_SD, labels.size), 0, 1)
    return float(np.mean(np.abs(np.asarray(labels) - posterior_median(evidence))))


# ---------------------------------------------------------------- sound sources


def _bandpass(signal: np.ndarray, low: float, high: float, order: int = 2) -> np.ndarray:
    from scipy.signal import butter, sosfilt

    high = min(high, SAMPLE_RATE / 2 * 0.95)
    sos = butter(order, [low, high], btype="bandpass", fs=SAMPLE_RATE, output="sos")
    return sosfilt(sos, signal)


def _pink_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    spectrum[1:] /= np.sqrt(freqs[1:])
    spectrum[0] = 0
    noise = np.fft.irfft(spectrum, n)
    return noise / (np.std(noise) + 1e-12)


def _rms_normalize(signal: np.ndarray) -> np.ndarray:
    return signal / (np.sqrt(np.mean(signal**2)) + 1e-12)


def cough_event(rng: np.random.Generator) -> np.ndarray:
    """One cough: explosive broadband burst, noisy decay, and often a voiced tail."""
    sr = SAMPLE_RATE
    burst_n = int(sr * rng.uniform(0.03, 0.06))
    decay_n = int(sr * rng.uniform(0.10, 0.25))
    t_burst = np.arange(burst_n) / sr
    attack = np.minimum(1.0, t_burst / rng.uniform(0.002, 0.008))
    burst = rng.standard_normal(burst_n) * attack * np.exp(-t_burst / rng.uniform(0.025, 0.05))
    burst = _bandpass(burst, rng.uniform(150, 300), rng.uniform(6000, 12000))
    t_decay = np.arange(decay_n) / sr
    decay = rng.standard_normal(decay_n) * 0.5 * np.exp(-t_decay / rng.uniform(0.04, 0.09))
    formant = rng.uniform(500, 1600)
    decay = 0.6 * _bandpass(decay, formant * 0.6, formant * 1.6) + 0.4 * _bandpass(decay, 200, 5000)
    event = np.concatenate([burst, decay])
    if rng.random() < 0.65:
        tail_n = int(sr * rng.uniform(0.05, 0.2))
        t_tail = np.arange(tail_n) / sr
        f0 = rng.uniform(250, 450) * (1 + 0.02 * rng.standard_normal(tail_n).cumsum() / np.sqrt(tail_n))
        phase = 2 * np.pi * np.cumsum(f0) / sr
        voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
        voiced = voiced * np.exp(-t_tail / rng.uniform(0.04, 0.1)) * 0.4
        start = int(burst_n * 0.8)
        end = min(len(event), start + tail_n)
        event[start:end] += voiced[: end - start]
    return _rms_normalize(event)


def speech_like(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Voiced syllables with formants and slow onsets, a few fricatives: speech-like, not cough-like."""
    sr = SAMPLE_RATE
    out = np.zeros(int(sr * seconds))
    position = 0
    base_f0 = rng.uniform(90, 220)
    while position < len(out):
        syllable_n = int(sr * rng.uniform(0.12, 0.3))
        t = np.arange(syllable_n) / sr
        f0 = base_f0 * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(1, 3) * t + rng.uniform(0, 6)))
        phase = 2 * np.pi * np.cumsum(f0) / sr
        voiced = sum(np.sin(k * phase) / k for k in range(1, 20))
        f1, f2 = rng.uniform(300, 900), rng.uniform(900, 2500)
        syllable = _bandpass(voiced, f1 * 0.7, f1 * 1.4) + 0.6 * _bandpass(voiced, f2 * 0.8, f2 * 1.25)
        if rng.random() < 0.5:
            envelope = np.clip(np.sin(np.pi * t / t[-1]), 0, None) ** 1.5  # slow rise and fall
        else:  # plosive: an abrupt onset, then the vowel's decay
            envelope = np.minimum(1.0, t / 0.004) * np.exp(-t / rng.uniform(0.08, 0.3))
        syllable = syllable * envelope
        if rng.random() < 0.25:
            fricative = _bandpass(rng.standard_normal(syllable_n), 4000, 9000) * 0.3 * envelope
            syllable = syllable + fricative
        end = min(len(out), position + syllable_n)
        out[position:end] += syllable[: end - position]
        position = end + int(sr * rng.uniform(0.03, 0.25))
    return _rms_normalize(out)


def knocks(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """A few short broadband transients (a tap on the phone, a door, a table): sharp, but not coughs."""
    sr = SAMPLE_RATE
    out = np.zeros(int(sr * seconds))
    for _ in range(int(rng.integers(2, 7))):
        length = int(sr * rng.uniform(0.005, 0.03))
        t = np.arange(length) / sr
        hit = rng.standard_normal(length) * np.exp(-t / rng.uniform(0.002, 0.01))
        centre = rng.uniform(150, 3000)
        hit = _bandpass(hit, centre * 0.5, centre * 2.5)
        start = int(rng.integers(0, max(1, len(out) - length)))
        out[start : start + length] += hit / (np.max(np.abs(hit)) + 1e-12)
    return _rms_normalize(out)


def beeps(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """App prompts: one to three pure tones with quick ramps."""
    sr = SAMPLE_RATE
    out = np.zeros(int(sr * seconds))
    for _ in range(int(rng.integers(1, 4))):
        length = min(len(out), int(sr * rng.uniform(0.15, 0.6)))
        t = np.arange(length) / sr
        ramp = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.005)
        tone = np.sin(2 * np.pi * rng.uniform(400, 2000) * t) * ramp
        start = int(rng.integers(0, max(1, len(out) - length)))
        out[start : start + length] += tone
    return _rms_normalize(out)


def breathing(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Band-limited noise with slow inhale/exhale envelopes."""
    sr = SAMPLE_RATE
    n = int(sr * seconds)
    out = np.zeros(n)
    position = int(sr * rng.uniform(0, 0.3))
    while position < n:
        breath_n = int(sr * rng.uniform(0.6, 1.5))
        t = np.arange(breath_n) / sr
        envelope = np.sin(np.pi * t / t[-1]) ** 2
        breath = _bandpass(rng.standard_normal(breath_n), rng.uniform(250, 400), rng.uniform(1800, 3000)) * envelope
        end = min(n, position + breath_n)
        out[position:end] += breath[: end - position]
        position = end + int(sr * rng.uniform(0.2, 0.8))
    return _rms_normalize(out)


def background(rng: np.random.Generator, kind: str, n: int) -> np.ndarray:
    if kind == "room":
        return _pink_noise(rng, n) * 0.5 + _bandpass(rng.standard_normal(n), 100, 1000) * 0.5
    if kind == "pink":
        return _pink_noise(rng, n)
    if kind == "hum":
        mains = rng.choice([50.0, 60.0])
        t = np.arange(n) / SAMPLE_RATE
        hum = sum(np.sin(2 * np.pi * mains * k * t + rng.uniform(0, 6)) / k for k in range(1, 6))
        return _rms_normalize(hum) * 0.8 + _pink_noise(rng, n) * 0.3
    return rng.standard_normal(n) * 0.05  # near silence: a quiet electrical floor


# ---------------------------------------------------------------- one clip


def synthesize_clip(label: float, evidence: float, rng: np.random.Generator,
                    with_coughs: bool = False) -> tuple[np.ndarray, dict]:
    """The waveform for one clip under the fixed mapping; returns samples and what went in.

    With ``with_coughs``, ``info["coughs"]`` is the coughs alone as they are in the clip (the same scaling, gate
    and band limit): what a transform leaves of them can be measured. The clip is the same either way.
    """
    sr = SAMPLE_RATE
    duration = float(rng.uniform(1.0, 10.0))
    n = int(sr * duration)
    kind = str(rng.choice(BACKGROUNDS))
    clip = background(rng, kind, n)
    clip = clip / (np.sqrt(np.mean(clip**2)) + 1e-12)  # background at 0 dB: levels below are relative to it

    distractors = []
    for chance in DISTRACTOR_PROBABILITIES:
        if rng.random() >= chance:
            continue
        kind_of = str(rng.choice(DISTRACTORS))
        seconds = rng.uniform(0.8, min(4.0, duration))
        make = {"speech": speech_like, "breathing": breathing, "knocks": knocks, "beeps": beeps}[kind_of]
        source = make(rng, seconds)
        start = int(rng.uniform(0, max(1, n - len(source))))
        clip[start : start + len(source)] += source[: n - start] * 10 ** (rng.uniform(5, 25) / 20)
        distractors.append(kind_of)
    distractor = "+".join(distractors) or "none"

    snr_db = -25.0 + 55.0 * evidence
    n_coughs = int(rng.integers(1, 5))
    position = int(sr * rng.uniform(0.05, 0.3))
    coughs = np.zeros(n) if with_coughs else None
    for _ in range(n_coughs):
        event = cough_event(rng)
        if position + len(event) > n:
            break
        level = 10 ** ((snr_db + rng.uniform(-2, 2)) / 20)
        clip[position : position + len(event)] += event * level
        if coughs is not None:
            coughs[position : position + len(event)] += event * level
        position += len(event) + int(sr * rng.uniform(0.1, 1.2))

    peak_db = rng.uniform(-12.0, -1.0)
    peak = np.max(np.abs(clip)) + 1e-12
    clip = clip / peak * 10 ** (peak_db / 20)
    gated = bool(rng.random() < GATE_PROBABILITY)
    if gated:
        gain = NoiseGate().gain(clip.astype(np.float32), sr)
        clip = (clip.astype(np.float32) * gain).astype(np.float32).astype(np.float64)
    band_limit = 0.0
    if rng.random() < BAND_LIMIT_PROBABILITY:
        band_limit = float(np.exp(rng.uniform(*np.log(BAND_LIMIT_HZ))))
        clip = LowPass(band_limit)(clip.astype(np.float32), sr).astype(np.float64)
    info = {"background": kind, "distractor": distractor, "n_coughs": n_coughs, "snr_db": snr_db, "gated": gated,
            "band_limit_hz": round(band_limit)}
    if coughs is not None:
        coughs = coughs / peak * 10 ** (peak_db / 20) * (gain if gated else 1.0)
        info["coughs"] = LowPass(band_limit)(coughs.astype(np.float32), sr) if band_limit else coughs.astype(np.float32)
    return clip.astype(np.float32), info


# ---------------------------------------------------------------- encoding


def _ogg_crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else (crc << 1)
        table.append(crc & 0xFFFFFFFF)
    return table


_OGG_CRC = _ogg_crc_table()


def _ogg_crc(page: bytes) -> int:
    crc = 0
    for byte in page:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _OGG_CRC[((crc >> 24) ^ byte) & 0xFF]
    return crc


def set_ogg_serial(data: bytes, serial: int) -> bytes:
    """Rewrite the stream serial number of every Ogg page (and its CRC)."""
    out = bytearray(data)
    position = 0
    while position + 27 <= len(out) and out[position : position + 4] == b"OggS":
        segments = out[position + 26]
        length = 27 + segments + sum(out[position + 27 : position + 27 + segments])
        out[position + 14 : position + 18] = serial.to_bytes(4, "little")
        out[position + 22 : position + 26] = b"\0\0\0\0"
        crc = _ogg_crc(bytes(out[position : position + length]))
        out[position + 22 : position + 26] = crc.to_bytes(4, "little")
        position += length
    return bytes(out)


def encode_audio(samples: np.ndarray, container: str, codec: str, sample_rate: int = SAMPLE_RATE) -> bytes:
    """Encode mono float samples as Opus-in-WebM, Opus-in-Ogg (PyAV) or Vorbis-in-Ogg (soundfile)."""
    if codec == "vorbis":
        import soundfile

        buffer = io.BytesIO()
        soundfile.write(buffer, samples, sample_rate, format="OGG", subtype="VORBIS")
        # libsndfile draws a random Ogg stream serial: fix it so the same seed gives the same bytes.
        return set_ogg_serial(buffer.getvalue(), serial=0x636F7567)
    from coughreg.audio.files import encode_mono

    return encode_mono(samples, sample_rate, container, "libopus", 48000, bitexact=True)


# ---------------------------------------------------------------- metadata


def _metadata_row(rng: np.random.Generator, uid: str, when: datetime, label: float) -> dict:
    row = {column: "" for column in COUGHVID_COLUMNS}
    row.update(uuid=uid, datetime=when.isoformat(), cough_detected=f"{label:.4f}".rstrip("0").rstrip("."))
    if row["cough_detected"] == "":
        row["cough_detected"] = "0"
    if rng.random() > 0.41:
        row["latitude"] = f"{rng.uniform(-40, 60):.1f}"
        row["longitude"] = f"{rng.uniform(-120, 140):.1f}"
    if rng.random() > 0.44:
        row["age"] = str(int(np.clip(rng.normal(35, 12), 12, 90)))
        row["gender"] = rng.choice(["male", "female", "other"], p=[0.64, 0.35, 0.01])
        row["respiratory_condition"] = "TRUE" if rng.random() < 0.19 else "FALSE"
        row["fever_muscle_pain"] = "TRUE" if rng.random() < 0.13 else "FALSE"
        row["status"] = rng.choice(["healthy", "symptomatic", "COVID-19"], p=[0.76, 0.15, 0.09])
    for expert in (1, 2, 3):
        if rng.random() < 0.04:
            row[f"quality_{expert}"] = rng.choice(["good", "ok", "poor", "no_cough"], p=[0.05, 0.7, 0.2, 0.05])
            row[f"cough_type_{expert}"] = rng.choice(["dry", "wet", "unknown"])
            for symptom in ("dyspnea", "wheezing", "stridor", "choking", "congestion", "nothing"):
                row[f"{symptom}_{expert}"] = "TRUE" if rng.random() < 0.05 else "FALSE"
            row[f"diagnosis_{expert}"] = rng.choice(
                ["COVID-19", "healthy_cough", "lower_infection", "upper_infection", "obstructive_disease"]
            )
            row[f"severity_{expert}"] = rng.choice(["mild", "pseudocough", "severe", "unknown"], p=[0.6, 0.3, 0.06, 0.04])
    return row


def _draw(seed: int, index: int, with_coughs: bool = False):
    rng = np.random.default_rng([seed, index])
    uid = str(uuid_lib.UUID(bytes=rng.bytes(16), version=4))
    label = float(sample_labels(rng, 1)[0])
    evidence = float(np.clip(label + rng.normal(0, LABEL_NOISE_SD), 0, 1))
    # Most uploads came in the first weeks; a long tail over the whole collection period.
    day = min(161.0, rng.exponential(30.0))
    when = datetime(2020, 4, 1, tzinfo=UTC) + timedelta(days=float(day), microseconds=int(rng.integers(1e6)))
    choice = rng.choice(len(FORMATS), p=[f[2] for f in FORMATS])
    container, codec, _ = FORMATS[choice]
    samples, info = synthesize_clip(label, evidence, rng, with_coughs)
    return rng, uid, label, evidence, when, container, codec, samples, info


def regenerate_clip(seed: int, index: int) -> tuple[str, np.ndarray, dict]:
    """Clip ``index`` of the data set ``seed`` again: its uuid, its samples before encoding, and what went in,
    with its coughs alone in ``info["coughs"]``."""
    _, uid, *_, samples, info = _draw(seed, index, with_coughs=True)
    return uid, samples, info


def _clip_job(args: tuple[int, int]) -> GeneratedClip:
    seed, index = args
    rng, uid, label, evidence, when, container, codec, samples, info = _draw(seed, index)
    data = encode_audio(samples, container, codec)
    metadata = _metadata_row(rng, uid, when, label)
    return GeneratedClip(
        uuid=uid, label=label, evidence=evidence, container=container, codec=codec,
        background=info["background"], distractor=info["distractor"], n_coughs=info["n_coughs"], gated=info["gated"],
        band_limit_hz=info["band_limit_hz"], duration_s=len(samples) / SAMPLE_RATE, data=data, metadata=metadata,
    )


def _zip_info(name: str, compress: bool) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    return info


def generate_coughvid_zip(
    out: str | Path,
    n: int,
    seed: int = 0,
    workers: int = 1,
    folder: str = "public_dataset",
    with_json: bool = True,
    progress_every: int = 500,
) -> dict:
    """Write a COUGHVID-format zip (metadata_compiled.csv + <uuid>.webm/.ogg + <uuid>.json).

    Deterministic for a given seed (the same bytes for the same seed and n, whatever ``workers``).
    Beside the zip, ``<name>.truth.csv`` keeps each clip's latent evidence and ingredients and
    ``<name>.generator.json`` the mapping version, label statistics and the noise floor.

    Returns:
        The generator report (also written as ``<name>.generator.json``).
    """
    out = Path(out)
    prefix = f"{folder.strip('/')}/" if folder else ""
    truth_rows = []
    metadata_rows = []
    jobs = [(seed, i) for i in range(n)]
    executor = ProcessPoolExecutor(workers) if workers > 1 else None
    clips = executor.map(_clip_job, jobs, chunksize=8) if executor else map(_clip_job, jobs)
    law = {"generator": "coughreg.synth", "mapping_version": MAPPING_VERSION, "label_noise_sd": LABEL_NOISE_SD,
           "noise_floor_mae_expected": round(noise_floor(), 5), **NUISANCES}
    try:
        with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", allowZip64=True) as archive:
            archive.comment = json.dumps(law).encode()  # read back by ingest: the noise floor evaluation shows
            for index, clip in enumerate(clips, 1):
                archive.writestr(_zip_info(f"{prefix}{clip.uuid}.{clip.container}", compress=False), clip.data)
                if with_json:
                    payload = {k: v for k, v in clip.metadata.items() if k != "uuid" and v != ""}
                    archive.writestr(_zip_info(f"{prefix}{clip.uuid}.json", compress=True), json.dumps(payload))
                metadata_rows.append(clip.metadata)
                truth_rows.append({
                    "uuid": clip.uuid, "cough_detected": clip.label, "evidence": round(clip.evidence, 6),
                    "container": clip.container, "codec": clip.codec, "background": clip.background,
                    "distractor": clip.distractor, "n_coughs": clip.n_coughs, "gated": clip.gated,
                    "band_limit_hz": clip.band_limit_hz, "duration_s": round(clip.duration_s, 4),
                })
                if progress_every and index % progress_every == 0:
                    log.info("generated %d/%d clips", index, n)
            table = io.StringIO()
            writer = csv.DictWriter(table, fieldnames=COUGHVID_COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(sorted(metadata_rows, key=lambda r: r["uuid"]))
            archive.writestr(_zip_info(f"{prefix}metadata_compiled.csv", compress=True), table.getvalue())
    finally:
        if executor:
            executor.shutdown()

    labels = np.array([r["cough_detected"] for r in truth_rows])
    evidence = np.array([r["evidence"] for r in truth_rows])
    truth = io.StringIO()
    writer = csv.DictWriter(truth, fieldnames=list(truth_rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(truth_rows)
    atomic_write_text(out.with_suffix(".truth.csv"), truth.getvalue())
    median = float(np.median(labels))
    report = {
        "generator": "coughreg.synth",
        "mapping_version": MAPPING_VERSION,
        **NUISANCES,
        "seed": seed,
        "recordings": n,
        "label_noise_sd": LABEL_NOISE_SD,
        "sample_rate": SAMPLE_RATE,
        "label_median": median,
        "label_quartile_1": float(np.quantile(labels, 0.25)),
        "total_audio_hours": round(sum(r["duration_s"] for r in truth_rows) / 3600, 3),
        "noise_floor_mae_expected": law["noise_floor_mae_expected"],
        "noise_floor_mae_realized": round(noise_floor(labels, evidence), 5),
        "median_baseline_mae_realized": round(float(np.mean(np.abs(labels - median))), 5),
        "formats": {f"{c}/{k}": int(sum(1 for r in truth_rows if (r["container"], r["codec"]) == (c, k))) for c, k, _ in FORMATS},
    }
    atomic_write_text(out.with_suffix(".generator.json"), json.dumps(report, indent=2))
    return report
