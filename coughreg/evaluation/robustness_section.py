"""The report's robustness section: how far the scores move when only the recording chain changes
(``coughreg.evaluation.robustness``), as a table, a picture of every clip's change, and the clips that moved most, heard
and seen as recorded and as transformed."""

from __future__ import annotations

import html
import logging

import numpy as np
import pandas as pd

from coughreg import artifacts
from coughreg.audio.recording_chain import STANDARD, slug
from coughreg.evaluation.robustness import clip_rng, most_moved, window_seconds
from coughreg.io import html_page

log = logging.getLogger(__name__)

SHOWN_CLIPS = 3  # the clips that moved most, shown with their spectrograms
WINDOW_SECONDS = 20.0  # of each clip, drawn and played


def robustness_section(inputs) -> str:
    """The section, or '' when the evaluation measured nothing (``prediction.robustness_recordings: 0``)."""
    summary = inputs.metrics.get("robustness")
    changes = inputs.changes
    if not summary or changes is None or changes.empty:
        return ""
    labels = inputs.info["label_columns"]
    label = labels[0]
    parts = [(
        f"<p>Each of {summary['recordings']} validation recordings was scored as recorded and again after each change "
        "below, one at a time, by its own fold's model: changes of the phone, the browser and the room, not of the cough. "
        "A model that describes the cough gives the same score either way; the table says how far the scores moved "
        "(absolute change of the score, on the label's own scale).</p>"
    )]
    rows = []
    for entry in summary["transforms"].values():
        for name in labels:
            numbers = entry["labels"][name]
            if numbers["mean_change"] is None:
                figures = [f"n/a: {entry.get('note', 'not measured')}", "", "", ""]
            else:
                figures = [numbers["mean_change"], numbers["p95_change"], numbers["max_change"], str(numbers["most_moved"])]
            rows.append([entry["name"], *([name] if len(labels) > 1 else []), numbers.get("clips", ""), *figures])
    header = ["transform", *(["label"] if len(labels) > 1 else []), "clips", "mean change", "95th percentile", "largest",
              "moved most"]
    parts.append(html_page.table(rows, header))
    parts.append(html_page.figure_to_img(change_figure(changes, label), f"score changes of {label} per transform"))
    parts.append(_moved_clips(inputs, changes, label))
    return f"<div class='robustness'>{''.join(parts)}</div>"


def change_figure(changes: pd.DataFrame, label: str):
    """Every clip's change of ``label`` under each transform (points), with the mean (a bar)."""
    import matplotlib.pyplot as plt

    keys = [slug(t) for t in STANDARD if slug(t) in set(changes["transform"])]
    names = {slug(t): t.name for t in STANDARD}
    figure, axis = plt.subplots(figsize=(9.0, 0.45 * len(keys) + 1.2))
    rng = np.random.default_rng(0)
    for position, key in enumerate(keys):
        moved = changes[(changes["transform"] == key) & (changes["label"] == label)]["change"].to_numpy(dtype=float)
        axis.barh(position, np.abs(moved).mean(), color="#9ecae1", height=0.7)
        axis.scatter(moved, position + rng.uniform(-0.25, 0.25, moved.size), s=6, color="#08519c", alpha=0.5)
    axis.axvline(0.0, color="black", linewidth=0.8)
    axis.set_yticks(range(len(keys)), [names[k] for k in keys])
    axis.invert_yaxis()
    axis.set(xlabel=f"change of predicted {label} (points: clips; bar: mean absolute change)",
              title="How far each clip's score moved")
    figure.tight_layout()
    return figure


def _moved_clips(inputs, changes: pd.DataFrame, label: str) -> str:
    import matplotlib.pyplot as plt
    import torch

    from coughreg.audio.frontend import LogMel
    from coughreg.scoring.decode import decode

    transforms = {slug(t): t for t in STANDARD}
    manifest, _ = artifacts.read_manifest(inputs.ingest_dir)
    audio_of = manifest.set_index("id")["audio_path"]
    rate = inputs.info["feature_parameters"]["sample_rate"]
    hop = inputs.info["feature_parameters"]["hop_size"]
    front = LogMel.from_config(inputs.config.audio).eval()
    parts = [(f"<h3>The clips that moved most</h3><p class='note'>Log-mel spectrograms (dB) of the first {WINDOW_SECONDS:g} s, "
              "as recorded and after the change that moved the score most, on one colour scale.</p>")]
    for identifier, key, change in most_moved(changes, label, SHOWN_CLIPS):
        row = changes[(changes["id"] == identifier) & (changes["transform"] == key) & (changes["label"] == label)].iloc[0]
        transform = transforms[key]
        try:  # what was measured (the same stretch, the same draws), then its start shown
            samples = decode(artifacts.recording_path(inputs.ingest_dir, audio_of[identifier], identifier), rate,
                             max_seconds=window_seconds(inputs.config.prediction.max_inference_chunk_seconds)).samples
            changed = transform(samples, rate, clip_rng(identifier))
        except Exception as exc:  # noqa: BLE001 - the table above still names the clip
            parts.append(f"<p class='note'>{html.escape(identifier)} cannot be shown here: {html.escape(str(exc))}</p>")
            continue
        shown = int(WINDOW_SECONDS * rate)
        samples, changed = samples[:shown], changed[:shown]
        with torch.inference_mode():
            pictures = [front(torch.from_numpy(x)[None])[0].numpy() for x in (samples, changed)]
        low, high = np.percentile(np.concatenate([p.ravel() for p in pictures]), [1, 99.9])
        figure, axes = plt.subplots(1, 2, figsize=(12.4, 3.0))
        seconds = pictures[0].shape[1] * hop / rate
        for axis, picture, title in zip(axes, pictures, ("as recorded", transform.name), strict=True):
            shown = axis.imshow(picture, origin="lower", aspect="auto", cmap="magma", vmin=low, vmax=high,
                                extent=(0, seconds, 0, picture.shape[0]))
            axis.set(xlabel="seconds", ylabel="mel band", title=title)
        figure.colorbar(shown, ax=axes, label="dB")
        players = "".join(f"<p class='note'>{html.escape(what)}</p>"
                          + html_page.audio_tag(x, rate, f"{identifier} {what}", max_seconds=WINDOW_SECONDS)
                          for x, what in ((samples, "as recorded"), (changed, f"after {transform.name}")))
        parts.append(
            f"<div class='clip moved'><h4>{html.escape(identifier)}: {html.escape(label)} {row['original']:.3f} as recorded, "
            f"{row['transformed']:.3f} after {html.escape(transform.name)} ({change:+.3f})</h4>{players}"
            f"{html_page.figure_to_img(figure, f'{identifier} as recorded and after {transform.name}')}</div>")
    return "".join(parts)
