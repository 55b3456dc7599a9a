"""Audio files: what a recording is (``probe_audio``: container, codec and the duration that decodes), and decoding, which lives with the
scoring package (``coughreg.scoring.decode``) so that features, evaluation and every scorer decode alike."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from coughreg.runtime.errors import AudioDecodeError
from coughreg.scoring.decode import AUDIO_SUFFIXES, DecodedStream, _name, _open, decode, decode_audio, is_audio_name  # noqa: F401 - one place


def encode_mono(samples, sample_rate: int, container: str, encoder: str, bitrate: int, bitexact: bool = False) -> bytes:
    """Mono float samples as one file in ``container`` by FFmpeg's ``encoder`` (PyAV), at ``sample_rate`` (which the
    encoder must take) and ``bitrate`` bit/s; ``bitexact``: the same samples always give the same bytes."""
    import io

    import av
    import numpy as np

    buffer = io.BytesIO()
    options = {"fflags": "+bitexact"} if bitexact else {}
    with av.open(buffer, mode="w", format=container, container_options=options) as out:
        stream = out.add_stream(encoder, rate=sample_rate, layout="mono")
        stream.bit_rate = int(bitrate)
        if bitexact:
            stream.codec_context.flags |= av.codec.context.Flags.bitexact
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples, dtype=np.float32).reshape(1, -1), format="flt",
                                           layout="mono")
        frame.sample_rate = sample_rate
        frame.pts = 0
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buffer.getvalue()

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AudioInfo:
    """What a recording's container says about it, read without decoding the whole file."""

    duration_s: float
    sample_rate: int
    channels: int
    codec: str
    container: str

    def as_dict(self) -> dict:
        return asdict(self)


def probe_audio(source: str | Path | bytes) -> AudioInfo:
    """Container, codec, rate, channels and duration of a recording.

    The duration is what decodes: every packet is decoded (nothing resampled or kept) and the samples counted,
    so a header that promises more (a truncated upload, a WAV whose header gives a bogus size, a WebM from
    MediaRecorder with no duration at all) never reaches the manifest. A file whose end does not decode keeps
    the duration of what did, as the features step will.

    Raises:
        AudioDecodeError: naming the file when it is not readable audio.
    """
    import av

    name = _name(source)
    seconds = 0.0
    try:
        with _open(source) as container:
            if not container.streams.audio:
                raise AudioDecodeError(f"{name}: no audio stream in the file")
            stream = container.streams.audio[0]
            codec = stream.codec_context.codec.canonical_name  # "mp3", not the decoder "mp3float"
            rate = int(stream.codec_context.sample_rate or stream.rate or 0)
            channels = int(stream.codec_context.channels or 0)
            format_name = container.format.name.split(",")[0]
            try:
                for frame in container.decode(stream):
                    rate = rate or frame.sample_rate
                    channels = channels or len(frame.layout.channels)
                    seconds += frame.samples / frame.sample_rate
            except (av.FFmpegError, OSError, ValueError):
                if not seconds:
                    raise
                log.debug("%s: the end does not decode; %.3f s did", name, seconds)
            if not seconds:
                raise AudioDecodeError(f"{name}: no decodable audio frames ({codec})")
    except AudioDecodeError:
        raise
    except (av.FFmpegError, OSError, ValueError, IndexError) as exc:
        raise AudioDecodeError(f"{name}: not readable audio: {exc}") from None
    return AudioInfo(seconds, rate, channels, codec, format_name)
