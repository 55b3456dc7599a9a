"""The ingest step's data-quality report: counts by status and reason, label and duration
histograms, sample rates, channels, codecs and containers seen, as JSON and an HTML page."""

from __future__ import annotations

import html

import numpy as np
import pandas as pd

from coughreg.io import html_page


def _histogram(values: np.ndarray, bins: np.ndarray) -> dict:
    counts, edges = np.histogram(values[np.isfinite(values)], bins=bins)
    return {"edges": [round(float(e), 4) for e in edges], "counts": counts.tolist()}


def quality_summary(frame: pd.DataFrame, label_columns: list[str], label_range: tuple[float, float]) -> dict:
    """Everything a person checks before training, from the manifest."""
    ok = frame[frame["status"] == "ok"]
    rejected = frame[frame["status"] != "ok"]
    kinds = rejected["reason"].str.split(":").str[0].str.replace(r" \(.*", "", regex=True)
    durations = ok["duration_s"].to_numpy(dtype=float)
    summary = {
        "by_status": frame["status"].value_counts().to_dict(),
        "by_reason": kinds.value_counts().to_dict(),
        "by_split": ok["split"].value_counts().to_dict(),
        "sample_rates": {str(k): int(v) for k, v in ok["sample_rate"].value_counts().items()},
        "channels": {str(k): int(v) for k, v in ok["channels"].value_counts().items()},
        "codecs": ok["codec"].value_counts().to_dict(),
        "containers": ok["container"].value_counts().to_dict(),
        "duration_s": {
            "total_hours": round(float(np.nansum(durations)) / 3600, 3),
            "min": float(np.nanmin(durations)) if len(durations) else None,
            "median": float(np.nanmedian(durations)) if len(durations) else None,
            "max": float(np.nanmax(durations)) if len(durations) else None,
            "histogram": _histogram(durations, np.linspace(0, max(10.0, float(np.nanmax(durations)) if len(durations) else 10.0), 21)),
        },
        "labels": {},
    }
    low, high = label_range
    for label in label_columns:
        values = ok[label].to_numpy(dtype=float)
        summary["labels"][label] = {
            "mean": float(np.nanmean(values)) if len(values) else None,
            "median": float(np.nanmedian(values)) if len(values) else None,
            "quartile_1": float(np.nanquantile(values, 0.25)) if len(values) else None,
            "histogram": _histogram(values, np.linspace(low, high, 21)),
        }
    return summary


def quality_page(summary: dict, header: dict) -> str:
    import matplotlib.pyplot as plt

    html_page.matplotlib_agg()
    sections = []
    overview = html_page.table(
        [(k, header[k]) for k in ("source", "layout", "rows", "ok", "rejected", "metadata_rows_without_recording",
                                   "unusable_fraction_of_present", "seconds")],
        ["", "value"],
    )
    sections.append(("Overview", overview))
    if summary["by_reason"]:
        sections.append(("Rejected, by reason", html_page.table(sorted(summary["by_reason"].items(), key=lambda kv: -kv[1]), ["reason", "rows"])))
    labels = list(summary["labels"].items())
    figure, axes = plt.subplots(1, 1 + len(labels), figsize=(6 * (1 + len(labels)), 3.8), squeeze=False)
    duration = summary["duration_s"]["histogram"]
    axes[0, 0].stairs(duration["counts"], duration["edges"], fill=True, color="tab:blue")
    axes[0, 0].set(title="Duration of accepted recordings", xlabel="seconds", ylabel="recordings")
    for axis, (label, values) in zip(axes[0, 1:], labels):
        histogram = values["histogram"]
        axis.stairs(histogram["counts"], histogram["edges"], fill=True, color="tab:orange")
        axis.set(title=f"{label} of accepted recordings", xlabel=label, ylabel="recordings")
    sections.append(("Distributions", html_page.figure_to_img(figure, "duration and label histograms")))
    formats = "".join(
        f"<h3>{html.escape(name.replace('_', ' '))}</h3>" + html_page.table(sorted(summary[name].items()), [name, "recordings"])
        for name in ("sample_rates", "channels", "codecs", "containers")
    )
    sections.append(("Formats seen", formats))
    return html_page.page("Ingest: data quality", sections)
