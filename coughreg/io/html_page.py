"""Self-contained HTML reports: pictures are PNGs and sounds Ogg/Opus, embedded as base64, so one file tells the story offline."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable


def figure_to_img(figure, alt: str) -> str:
    """A matplotlib figure as an <img> tag (the figure is closed)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    data = base64.b64encode(buffer.getvalue()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def audio_tag(samples, sample_rate: int, label: str, max_seconds: float = 30.0, bitrate: int = 48_000) -> str:
    """Mono float samples as an ``<audio controls>`` element holding an Ogg/Opus file (the first ``max_seconds``).

    Opus at 48 kbit/s keeps a cough intelligible at about 6 kB per second, so a report with a dozen clips
    stays small; every current browser plays it.
    """
    data = base64.b64encode(encode_ogg_opus(samples, sample_rate, max_seconds, bitrate)).decode()
    return (f'<audio controls preload="metadata" aria-label="{html.escape(label)}" '
            f'src="data:audio/ogg;codecs=opus;base64,{data}"></audio>')


def encode_ogg_opus(samples, sample_rate: int, max_seconds: float = 30.0, bitrate: int = 48_000) -> bytes:
    """Encode mono float samples in [-1, 1] as Ogg/Opus with PyAV (resampled to Opus's 48 kHz)."""
    import av
    import numpy as np

    samples = np.clip(np.asarray(samples, dtype=np.float32)[: int(max_seconds * sample_rate)], -1.0, 1.0)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="ogg") as container:
        stream = container.add_stream("libopus", rate=48_000, layout="mono")
        stream.bit_rate = bitrate
        resampler = av.AudioResampler(format="flt", layout="mono", rate=48_000)
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="flt", layout="mono")
        frame.sample_rate = sample_rate
        for piece in [*resampler.resample(frame), *resampler.resample(None)]:
            for packet in stream.encode(piece):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()


def details(summary: str, content: str) -> str:
    """A collapsed block (long text a reader opens when wanted)."""
    return f"<details><summary>{html.escape(summary)}</summary>{content}</details>"


def preformatted(text: str) -> str:
    return f"<pre>{html.escape(text)}</pre>"


def save_png(figure, path) -> None:
    """A matplotlib figure as a PNG file, written atomically (the figure is closed)."""
    import matplotlib.pyplot as plt

    from coughreg.io.storage import atomic_path

    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)


def training_curves(history: list[dict], loss_name: str, baseline_mae: float | None = None):
    """Train loss and validation MAE per epoch, one line per (fold, seed): a matplotlib figure."""
    import matplotlib.pyplot as plt
    import pandas as pd

    matplotlib_agg()
    frame = pd.DataFrame(history)
    figure, axes = plt.subplots(1, 2, figsize=(12, 4))
    for (fold, seed), part in frame.groupby(["fold", "seed"]):
        axes[0].plot(part["epoch"], part["train_loss"], marker="o", label=f"fold {fold} seed {seed}")
        if "validation_mae" in part:
            valid = part.dropna(subset=["validation_mae"])
            axes[1].plot(valid["epoch"], valid["validation_mae"], marker="o", label=f"fold {fold} seed {seed}")
    if baseline_mae is not None:
        axes[1].axhline(baseline_mae, color="gray", ls="--", label="median baseline")
    axes[0].set(xlabel="epoch", ylabel=f"train loss ({loss_name})", title="Training loss")
    axes[1].set(xlabel="epoch", ylabel="validation MAE", title="Validation MAE")
    axes[0].legend()
    axes[1].legend()
    return figure


def table(rows: Iterable[Iterable], header: Iterable[str], css_class: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    attribute = f' class="{css_class}"' if css_class else ""
    return f"<table{attribute}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def page(title: str, sections: list[tuple[str, str]], lead: str = "") -> str:
    """One HTML page: a title, an optional lead paragraph (HTML), then the named sections (HTML each)."""
    style = (
        "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}"
        "h1{font-size:1.6em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}"
        "th{background:#f3f3f3}img{max-width:100%}.note{color:#555;font-size:.9em}"
        ".gate{padding:.6em 1em;border-radius:4px}.gate.pass{background:#e6f4ea;border:1px solid #8c8}"
        ".gate.fail{background:#fdecea;border:1px solid #d88}"
        ".lead{font-size:1.1em;line-height:1.5;background:#f6f8fa;padding:.8em 1em;border-left:4px solid #4a7}"
        "table.left td,table.left th{text-align:left}code{font-size:.85em;word-break:break-all}"
        "pre{background:#f6f8fa;padding:1em;overflow-x:auto;font-size:.8em}"
        ".clip{margin:1.5em 0;padding-top:.5em;border-top:1px solid #eee}.clip h3{font-size:1em;margin:.3em 0}"
        "audio{display:block;margin:.4em 0}"
    )
    body = "".join(f"<h2>{html.escape(name)}</h2>{content}" for name, content in sections)
    lead = f"<p class='lead'>{lead}</p>" if lead else ""
    return (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{lead}{body}</body></html>"
    )


def matplotlib_agg() -> None:
    import matplotlib

    matplotlib.use("Agg")
