"""Audio decoding with PyAV (FFmpeg inside the wheel): WebM/Opus, Ogg/Opus/Vorbis, MP3, WAV, FLAC, M4A.

Decoding mixes to mono and resamples with FFmpeg's swresample (a windowed-sinc, band-limited
resampler) in the same pass, so a recording becomes float32 samples at the scorer's rate: block by
block (``DecodedStream``, which the features step turns into a log-mel window by window) or as one
array (``decode``). FFmpeg reads a recording as data only: a local file or bytes, through the
demuxers of the audio containers, never a URL or a playlist that names one.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import AudioDecodeError

AUDIO_SUFFIXES = (".webm", ".ogg", ".oga", ".opus", ".mp3", ".wav", ".flac", ".m4a", ".mp4", ".aac", ".weba",
                  ".3gp", ".amr", ".caf", ".aif", ".aiff")
# FFmpeg's demuxers for those containers, and no other: a playlist (HLS, DASH), a concat list, an SDP file or the
# like would make FFmpeg open further files or URLs, so a recording is never read as one, whatever its name says.
DEMUXERS = "matroska,webm,ogg,mp3,wav,flac,mov,mp4,m4a,3gp,aac,amr,caf,aiff"


def is_audio_name(name: str) -> bool:
    return Path(name).suffix.lower() in AUDIO_SUFFIXES


def _open(source: str | Path | bytes):
    """A recording opened by FFmpeg as data only: a path is a local file (``file:`` and nothing else, so a name such
    as ``http:/host/x.mp3``, ``pipe:0`` or ``10:30.webm`` is never taken for a URL or a protocol), bytes are read
    from memory, and only the demuxers of ``DEMUXERS`` may read either."""
    import av

    data = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else "file:" + os.path.abspath(source)
    return av.open(data, mode="r", metadata_errors="ignore",
                   container_options={"protocol_whitelist": "file", "format_whitelist": DEMUXERS})


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


def _mono(frame) -> np.ndarray:
    """The mono mix of a packed float frame (what the resampler gives): the plain average of its channels."""
    channels = len(frame.layout.channels)
    packed = frame.to_ndarray().reshape(-1, channels)  # (1, samples x channels) -> (samples, channels)
    return packed[:, 0].copy() if channels == 1 else packed.mean(axis=1, dtype=np.float32)


def _direct_mono(frame, sample_rate: int) -> np.ndarray | None:
    """Samples straight from the decoder's buffers when no conversion is needed (the common case:
    Opus and Vorbis decode to planar float at 48 kHz); None when the resampler must convert.

    Only the first ``channels`` planes are read: PyAV lists one plane too many for a planar frame of eight
    channels or more, and reading that one crashes the process."""
    if frame.sample_rate != sample_rate:
        return None
    count = frame.samples
    channels = len(frame.layout.channels)
    if frame.format.name == "fltp":
        planes = [np.frombuffer(plane, dtype=np.float32, count=count) for plane in frame.planes[:channels]]
        return planes[0].copy() if len(planes) == 1 else np.mean(planes, axis=0, dtype=np.float32)
    if frame.format.name == "flt":
        packed = np.frombuffer(frame.planes[0], dtype=np.float32, count=count * channels)
        return packed.copy() if channels == 1 else packed.reshape(count, channels).mean(axis=1, dtype=np.float32)
    return None


class DecodedStream:
    """A recording decoded block by block: mono float32 arrays at ``sample_rate``, in order, never the whole at once.

    After the iteration, ``beyond_limit`` and ``cut_short`` say what the decoder could not give (see ``Decoded``).

    Args:
        source: a file path or the file's bytes.
        sample_rate: the output rate; FFmpeg's band-limited resampler converts on the fly.
        max_seconds: stop decoding after this much audio (None: the whole file).

    Raises (while iterating):
        AudioDecodeError: naming the file when it cannot be decoded, holds no samples or decodes to non-finite ones.
    """

    def __init__(self, source: str | Path | bytes, sample_rate: int, max_seconds: float | None = None) -> None:
        self.source = source
        self.sample_rate = sample_rate
        self.limit = None if max_seconds is None else int(max_seconds * sample_rate)
        self.samples = 0  # given so far
        self.beyond_limit = False
        self.cut_short: str | None = None

    def _take(self, block: np.ndarray) -> np.ndarray:
        """The part of ``block`` within the limit, checked."""
        if self.limit is not None and self.samples + block.size > self.limit:
            self.beyond_limit = True  # the frame reached past the limit: there is more audio
            block = block[: self.limit - self.samples]
        if not np.all(np.isfinite(block)):
            raise AudioDecodeError(f"{_name(self.source)}: decoded samples are not finite")
        self.samples += block.size
        return block

    def _full(self) -> bool:
        return self.limit is not None and self.samples >= self.limit

    def __iter__(self) -> Iterator[np.ndarray]:
        import av

        name = _name(self.source)
        try:
            with _open(self.source) as container:
                if not container.streams.audio:
                    raise AudioDecodeError(f"{name}: no audio stream in the file")
                stream = container.streams.audio[0]
                resampler = None
                for frame in container.decode(stream):
                    frame.pts = None  # timestamps from browsers are often broken; samples are what count
                    direct = _direct_mono(frame, self.sample_rate) if resampler is None else None
                    if direct is not None:
                        blocks = [direct]
                    else:
                        # Packed float at the target rate, channels kept: the mono mix is their plain average
                        # (FFmpeg's own downmix scales each side by 1/sqrt(2), which changes levels). Packed, not
                        # planar: one plane whatever the channels (see ``_direct_mono``).
                        resampler = resampler or av.AudioResampler(format="flt", rate=self.sample_rate)
                        blocks = [_mono(out) for out in resampler.resample(frame)]
                    for block in blocks:
                        if block.size and not self._full():
                            yield self._take(block)
                    if self._full():
                        break
                else:
                    if resampler is not None:
                        for block in (_mono(out) for out in resampler.resample(None)):
                            if block.size and not self._full():
                                yield self._take(block)
        except AudioDecodeError:
            raise
        except (av.FFmpegError, OSError, ValueError) as exc:
            if not self.samples:
                raise AudioDecodeError(f"{name}: cannot decode audio: {exc}") from None
            # A truncated tail (common in crowdsourced uploads) keeps the samples decoded so far, and says so.
            self.cut_short = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        if not self.samples:
            raise AudioDecodeError(f"{name}: no audio samples")


def decode(source: str | Path | bytes, sample_rate: int, max_seconds: float | None = None) -> Decoded:
    """Decode a recording to mono float32 at ``sample_rate``, saying what was left out (``DecodedStream``, joined).

    Raises:
        AudioDecodeError: naming the file when it cannot be decoded or holds no samples.
    """
    stream = DecodedStream(source, sample_rate, max_seconds)
    samples = np.concatenate(list(stream)).astype(np.float32, copy=False)
    return Decoded(samples, sample_rate, stream.beyond_limit, stream.cut_short)


def decode_audio(source: str | Path | bytes, sample_rate: int, max_seconds: float | None = None) -> np.ndarray:
    """Decode a recording to mono float32 at ``sample_rate`` (the samples only; see ``decode``)."""
    return decode(source, sample_rate, max_seconds).samples
