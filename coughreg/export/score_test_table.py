"""The test table scored with the exported scorer, as Hydrogen Torch scores ``dataset.test_dataframe``.

Every test row of the ingest manifest becomes one row of ``test_predictions.parquet``: the row's id and
file name, ``pred_<label>`` for each label, ``duration_s``, ``n_chunks``, ``truncated``, ``status`` and
``reason``. A recording the ingest step rejected keeps its row with ingest's reason; one the scorer
cannot read is a failed row. When the test table carries labels, its metrics are computed too.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from coughreg import artifacts
from coughreg.io.storage import atomic_path, atomic_write_text
from coughreg.model.metrics import regression_metrics
from coughreg.scoring.cpus import plan_threads
from coughreg.scoring.scorer import Scorer
from coughreg.scoring.table import TAIL_COLUMNS

log = logging.getLogger(__name__)

SUMMARY = "test_summary.json"


def score_test_table(scorer_dir: str | Path, ingest_dir: str | Path, out_dir: str | Path, workers: int | None = None) -> dict:
    """Write ``test_predictions.parquet`` and ``test_summary.json`` into ``out_dir``; return the summary."""
    scorer_dir, ingest_dir, out_dir = Path(scorer_dir), Path(ingest_dir), Path(out_dir)
    scorer = Scorer(scorer_dir)
    labels = scorer.label_columns
    manifest, _ = artifacts.read_manifest(ingest_dir)
    test = manifest[manifest["split"] == "test"].reset_index(drop=True)
    accepted = test["status"] == "ok"
    log.info("test table: %d rows, %d recordings accepted by ingest", len(test), int(accepted.sum()))
    scored = scorer.score_paths(artifacts.recording_sources(ingest_dir, [(row.id, row.audio_path) for row in test[accepted].itertuples()]),
                                plan_threads(workers))
    by_id = {row["path"]: row for row in scored}
    rows = []
    for record in test.to_dict("records"):
        row = by_id.get(record["id"]) or scorer.failed_row(record["id"], f"not ingested: {record['reason']}")
        rows.append({"id": record["id"], "source_name": record["source_name"],
                     **{f"pred_{label}": row[label] for label in labels}, **{column: row[column] for column in TAIL_COLUMNS}})
    table = pd.DataFrame(rows, columns=["id", "source_name", *[f"pred_{label}" for label in labels], *TAIL_COLUMNS])
    summary = {"test_rows": len(table), "test_scored": int((table["status"] == "ok").sum()),
               "test_failed": int((table["status"] != "ok").sum()), "test_truncated": int(table["truncated"].sum())}
    known = [label for label in labels if label in test.columns and np.isfinite(test[label].to_numpy(dtype=float)).any()]
    if known:  # a labelled test table: how the scorer does on it
        ok = (table["status"] == "ok") & np.isfinite(test[known].to_numpy(dtype=float)).all(axis=1)
        if ok.any():
            values = regression_metrics(test.loc[ok, known].to_numpy(dtype=float), table.loc[ok, [f"pred_{k}" for k in known]].to_numpy())
            summary.update({f"test_{name}": value for name, value in values.items()})
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / artifacts.TEST_PREDICTIONS) as tmp:
        table.to_parquet(tmp, index=False)
    atomic_write_text(out_dir / SUMMARY, json.dumps(summary, indent=2))
    for row in rows:
        if row["status"] != "ok":
            log.warning("test row %s not scored: %s", row["id"], row["reason"])
    log.info("test table: %d scored, %d failed -> %s", summary["test_scored"], summary["test_failed"], out_dir / artifacts.TEST_PREDICTIONS)
    return summary
