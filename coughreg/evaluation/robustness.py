"""How far the scores move when only the recording chain changes: each validation clip scored as recorded and
through each transform of ``coughreg.audio.recording_chain.STANDARD`` (quieter, band-limited, gated, re-encoded,
knocked on), by the same fold's model and the same scoring code as the predictions.

A model that describes the cough, not the phone, gives (nearly) the same score either way. The summary is,
per transform and label, the mean and the largest absolute change of the score, and which clip moved most.
"""

from __future__ import annotations

import logging
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from coughreg.audio.recording_chain import STANDARD, Transform, slug
from coughreg.scoring.decode import decode
from coughreg.scoring.errors import CoughPipelineError

log = logging.getLogger(__name__)

CHANGE_COLUMNS = ["id", "fold", "transform", "label", "original", "transformed", "change"]
MAX_SECONDS = 60.0  # of each recording: what is measured (and shown), so a long recording costs a bounded amount


def window_seconds(max_seconds: float) -> float:
    """How much of each recording is scored as recorded and changed: at most ``MAX_SECONDS``."""
    return min(MAX_SECONDS, max_seconds)


def clip_rng(identifier: str) -> np.random.Generator:
    """The generator a transform draws from for one clip (where the knock goes): the same in every evaluation."""
    return np.random.default_rng(zlib.crc32(str(identifier).encode()))


def choose(ids: list[str], limit: int) -> list[str]:
    """At most ``limit`` of the ids (all when 0 or fewer than that), chosen by a hash of the id: the same clips
    whatever order they come in, and a fair sample of the folds."""
    if limit <= 0 or len(ids) <= limit:
        return list(ids)
    return sorted(ids, key=lambda i: zlib.crc32(str(i).encode()))[:limit]


@dataclass
class FoldScorer:
    """What scores one fold's clips: ``score(samples) -> (labels,) values`` and the rate it wants."""

    fold: int
    score: object
    sample_rate: int
    max_seconds: float


def measure(scorer: FoldScorer, items: list[tuple[str, object]], labels: list[str], transforms=STANDARD,
            workers: int = 1) -> pd.DataFrame:
    """Every item (id, recording source) scored as recorded and through each transform, over its first
    ``window_seconds(scorer.max_seconds)``: one row per clip, transform and label (``CHANGE_COLUMNS``). A recording
    that cannot be decoded is left out (the predictions already say why); one the scorer or a transform fails on
    is left out (of that transform), with a warning naming both. A transform that cannot change a clip at the
    scorer's rate (a low-pass above its Nyquist frequency) is not measured."""
    seconds = window_seconds(scorer.max_seconds)

    def one(item) -> list[list]:
        identifier, source = item
        try:
            if callable(source):  # fetched on demand (an object in S3), or a row refused with its reason
                with source() as local:
                    samples = decode(Path(local), scorer.sample_rate, max_seconds=seconds).samples
            else:
                samples = decode(Path(source), scorer.sample_rate, max_seconds=seconds).samples
        except CoughPipelineError:
            return []
        if samples.size == 0:
            return []
        try:
            original = np.asarray(scorer.score(samples), dtype=float)
        except Exception as exc:  # noqa: BLE001 - one clip the scorer cannot take must not stop the evaluation
            log.warning("robustness: %s could not be scored as recorded, left out: %s", identifier, exc)
            return []
        rows = []
        for transform in transforms:
            if not transform.applies(scorer.sample_rate):
                continue  # nothing to measure at this rate: summarize says so
            try:
                changed = transform(samples, scorer.sample_rate, clip_rng(identifier))
                values = np.asarray(scorer.score(changed), dtype=float)
            except Exception as exc:  # noqa: BLE001 - one clip a transform cannot take must not stop the evaluation
                log.warning("robustness: %s could not be measured under %s: %s", identifier, transform.name, exc)
                continue
            for k, label in enumerate(labels):
                rows.append([identifier, scorer.fold, slug(transform), label, original[k], values[k], values[k] - original[k]])
        return rows

    started = time.perf_counter()
    rows: list[list] = []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for number, result in enumerate(pool.map(one, items), 1):
            rows.extend(result)
            if number % 50 == 0 or number == len(items):
                elapsed = time.perf_counter() - started
                rate = number / max(elapsed, 1e-9)
                log.info("robustness, fold %s: %d/%d clips x %d transforms (%.1f clips/s, ETA %.0f s)", scorer.fold, number,
                         len(items), len(transforms), rate, (len(items) - number) / rate)
    return pd.DataFrame(rows, columns=CHANGE_COLUMNS)


def summarize(changes: pd.DataFrame, labels: list[str], transforms: tuple[Transform, ...] = STANDARD,
              sample_rate: int | None = None) -> dict:
    """Per transform and label: the clips measured, the mean, 95th percentile and largest absolute change, and the
    clip that moved most. A transform with no clip measured has ``None`` figures and a ``note`` that says why.

    Returns ``{"recordings": n, "transforms": {slug: {"name", "description", "labels": {label: {...}}}}}``.
    """
    out = {"recordings": int(changes["id"].nunique()) if len(changes) else 0, "transforms": {}}
    for transform in transforms:
        key = slug(transform)
        entry = {"name": transform.name, "description": transform.describe(), "labels": {}}
        if sample_rate is not None and not transform.applies(sample_rate):
            entry["note"] = f"cannot change a clip at the {sample_rate} Hz sample rate: not measured"
        for label in labels:
            rows = changes[(changes["transform"] == key) & (changes["label"] == label)]
            moved = rows["change"].abs().to_numpy(dtype=float)
            if moved.size == 0:
                entry["labels"][label] = {"clips": 0, "mean_change": None, "p95_change": None, "max_change": None,
                                          "most_moved": None}
                entry.setdefault("note", "no clip could be measured")
                continue
            worst = int(np.argmax(moved))
            entry["labels"][label] = {
                "clips": int(moved.size), "mean_change": float(moved.mean()), "p95_change": float(np.percentile(moved, 95)),
                "max_change": float(moved.max()), "most_moved": str(rows["id"].iloc[worst]),
            }
        out["transforms"][key] = entry
    return out


def flat(summary: dict) -> dict[str, float]:
    """``robustness_<transform>_<label>_mean_change`` and ``..._max_change``: scalars for KFP's Metrics (a transform
    that measured nothing has none)."""
    values = {}
    for key, entry in summary.get("transforms", {}).items():
        for label, numbers in entry["labels"].items():
            if numbers["mean_change"] is None:
                continue
            values[f"robustness_{key}_{label}_mean_change"] = numbers["mean_change"]
            values[f"robustness_{key}_{label}_max_change"] = numbers["max_change"]
    return values


def headline(metrics: dict) -> str | None:
    """One line from ``metrics.json``: the transform that moves scores most on average, and the largest single move."""
    transforms = (metrics.get("robustness") or {}).get("transforms") or {}
    moves = [(numbers.get("mean_change"), numbers.get("max_change"), entry["name"], label)
             for entry in transforms.values() for label, numbers in entry["labels"].items()]
    moves = [m for m in moves if m[0] is not None and m[1] is not None]
    if not moves:
        return None
    mean, maximum = max(moves, key=lambda m: m[0]), max(moves, key=lambda m: m[1])
    several = len({m[3] for m in moves}) > 1

    def where(move) -> str:
        return f"{move[2]}, {move[3]}" if several else move[2]

    return f"mean change at most {mean[0]:.3f} ({where(mean)}), largest single change {maximum[1]:.3f} ({where(maximum)})"


def most_moved(changes: pd.DataFrame, label: str, count: int) -> list[tuple[str, str, float]]:
    """The ``count`` clips whose score of ``label`` moved most under any transform: (id, transform slug, change)."""
    rows = changes[changes["label"] == label]
    if rows.empty:
        return []
    rows = rows.assign(moved=rows["change"].abs()).sort_values("moved", ascending=False, kind="stable")
    rows = rows.drop_duplicates("id")
    return [(str(r.id), str(r.transform), float(r.change)) for r in rows.head(count).itertuples()]
