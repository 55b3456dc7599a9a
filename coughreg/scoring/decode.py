"""Audio decoding with PyAV (FFmpeg inside the wheel): WebM/Opus, Ogg/Opus/Vorbis, MP3, WAV, FLAC, M4A.

Decoding mixes to mono and resamples with FFmpeg's swresample (a windowed-sinc, band-limited
resampler) in the same pass, so a recording becomes one float32 array at the scorer's rate.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import AudioDecodeError

AUDIO_SUFFIXES = (".webm", ".ogg", ".oga", ".opus", ".mp3", ".wav", ".flac", ".m4a", ".mp4", ".aac", ".weba")


def is_audio_name(name: str) -> bool:
    return Path(name).suffix.lower() in AUDIO_SUFFIXES


def _open(source: str | Path | bytes):
    import av

    data = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source)
    return av.open(data, mode="r", metadata_errors="ignore")


def _name(source) -> str:
    return "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)


@dataclass(frozen=True)
class Decoded:
    """Mono float32 samples, and what the decoder could not give."""

    samples: np.ndarray
    sample_rate: int
    beyond_limit: bool  # audio past ``max_seconds`` was left undecoded
    cut_short: str | None  # the file ended in an error after these samples (a truncated upload)

    @property
    def seconds(self) -> float:
        return self.samples.size / self.sample_rate


def _mono(planar: np.ndarray) -> np.ndarray:
    # (channels, samples) -> (samples,)
    return planar[0] if planar.shape[0] == 1 else planar.mean(axis=0, dtype=np.float32)


def _direct_mono(frame, sample_rate: int) -> np.ndarray | None:
    """Samples straight from the decoder's buffers when no conversion is needed (the common case:
    Opus and Vorbis decode to planar float at 48 kHz); None when the resampler must convert."""
    if frame.sample_rate != sample_rate:
        return None
    count = frame.samples
    if frame.format.name == "fltp":
        planes = [np.frombuffer(plane, dtype=np.float32, count=count) for plane in frame.planes]
        return planes[0].copy() if len(planes) == 1 else np.mean(planes, axis=0, dtype=np.float32)
    if frame.format.name == "flt":
        channels = len(frame.layout.channels)
        packed = np.frombuffer(frame.planes[0], dtype=np.float32, count=count * channels)
        return packed.copy() if channels == 1 else packed.reshape(count, channels).mean(axis=1, dtype=np.float32)
    return None


def decode(source: str | Path | bytes, sample_rate: int, max_seconds: float | None = None) -> Decoded:
    """Decode a recording to mono float32 at ``sample_rate``, saying what was left out.

    Args:
        source: a file path or the file's bytes.
        sample_rate: the output rate; FFmpeg's band-limited resampler converts on the fly.
        max_seconds: stop decoding after this much audio (None: the whole file).

    Raises:
        AudioDecodeError: naming the file when it cannot be decoded or holds no samples.
    """
    import av

    name = _name(source)
    limit = None if max_seconds is None else int(max_seconds * sample_rate)
    chunks: list[np.ndarray] = []
    total = 0
    beyond_limit, cut_short = False, None
    try:
        with _open(source) as container:
            if not container.streams.audio:
                raise AudioDecodeError(f"{name}: no audio stream in the file")
            stream = container.streams.audio[0]
            resampler = None
            for frame in container.decode(stream):
                frame.pts = None  # timestamps from browsers are often broken; samples are what count
                direct = _direct_mono(frame, sample_rate) if resampler is None else None
                if direct is not None:
                    chunks.append(direct)
                else:
                    # Planar float at the target rate, channels kept: the mono mix is their plain average
                    # (FFmpeg's own downmix scales each side by 1/sqrt(2), which changes levels).
                    resampler = resampler or av.AudioResampler(format="fltp", rate=sample_rate)
                    chunks.extend(_mono(out.to_ndarray()) for out in resampler.resample(frame))
                total += chunks[-1].size if chunks else 0
                if limit is not None and total >= limit:
                    beyond_limit = total > limit  # the last frame reached past the limit: there is more audio
                    break
            else:
                if resampler is not None:
                    chunks.extend(_mono(out.to_ndarray()) for out in resampler.resample(None))
    except AudioDecodeError:
        raise
    except (av.FFmpegError, OSError, ValueError) as exc:
        if not chunks:
            raise AudioDecodeError(f"{name}: cannot decode audio: {exc}") from None
        # A truncated tail (common in crowdsourced uploads) keeps the samples decoded so far, and says so.
        cut_short = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    if not chunks:
        raise AudioDecodeError(f"{name}: no audio samples")
    samples = np.concatenate(chunks).astype(np.float32, copy=False)
    if limit is not None:
        samples = samples[:limit]
    if samples.size == 0:
        raise AudioDecodeError(f"{name}: no audio samples")
    if not np.all(np.isfinite(samples)):
        raise AudioDecodeError(f"{name}: decoded samples are not finite")
    return Decoded(samples, sample_rate, beyond_limit, cut_short)


def decode_audio(source: str | Path | bytes, sample_rate: int, max_seconds: float | None = None) -> np.ndarray:
    """Decode a recording to mono float32 at ``sample_rate`` (the samples only; see ``decode``)."""
    return decode(source, sample_rate, max_seconds).samples
