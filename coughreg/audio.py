"""Audio files: what a recording's header says (``probe_audio``), and decoding, which lives with the
scoring package (``coughreg.scoring.decode``) so that features, evaluation and every scorer decode alike."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from coughreg.errors import AudioDecodeError
from coughreg.scoring.decode import AUDIO_SUFFIXES, decode, decode_audio, is_audio_name  # noqa: F401 - one place
from coughreg.scoring.decode import _name, _open


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

    The duration comes from the header when the container has one; browser WebM files from
    MediaRecorder often do not, and then the packets are demuxed (not decoded) to find the end.
    One packet is decoded to prove the codec really reads the data.

    Raises:
        AudioDecodeError: naming the file when it is not readable audio.
    """
    import av

    name = _name(source)
    try:
        with _open(source) as container:
            if not container.streams.audio:
                raise AudioDecodeError(f"{name}: no audio stream in the file")
            stream = container.streams.audio[0]
            codec = stream.codec_context.codec.canonical_name  # "mp3", not the decoder "mp3float"
            rate = int(stream.codec_context.sample_rate or stream.rate or 0)
            channels = int(stream.codec_context.channels or 0)
            duration = None
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / av.time_base
            decoded_one = False
            end = 0.0
            needs_scan = duration is None or duration <= 0
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                if not decoded_one:
                    for frame in packet.decode():
                        decoded_one = True
                        rate = rate or frame.sample_rate
                        channels = channels or len(frame.layout.channels)
                    if not needs_scan and decoded_one:
                        break
                if needs_scan and packet.pts is not None and packet.time_base is not None:
                    packet_end = float((packet.pts + (packet.duration or 0)) * packet.time_base)
                    end = max(end, packet_end)
            if needs_scan:
                duration = end
            if not decoded_one:
                raise AudioDecodeError(f"{name}: no decodable audio frames ({codec})")
            format_name = container.format.name.split(",")[0]
    except AudioDecodeError:
        raise
    except (av.FFmpegError, OSError, ValueError, IndexError) as exc:
        raise AudioDecodeError(f"{name}: not readable audio: {exc}") from None
    return AudioInfo(float(duration or 0.0), rate, channels, codec, format_name)
