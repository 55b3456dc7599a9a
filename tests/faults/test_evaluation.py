"""Evaluation faults: a manifest row outside the ingest folder is refused alone."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.faults


def _tampered_ingest(tiny_run, tmp_path: Path, how: str, test_rows: int = 0, among: set | None = None) -> tuple[Path, str, str]:
    """A copy of the tiny run's ingest folder whose manifest sends one accepted row (of ``among``, when given) to a
    REAL recording outside the folder (reading it would succeed); ``test_rows`` rows (that one first) become test
    rows. Returns the folder, the row's id and the path written."""
    ingest = tmp_path / "ingest"
    shutil.copytree(tiny_run["ingest"], ingest)
    table = pq.read_table(ingest / "manifest.parquet")
    frame = table.to_pandas()
    ok = list(frame.index[(frame["status"] == "ok") & (frame["id"].isin(among) if among else True)])
    victim = frame.loc[ok[0], "id"]
    outside = tmp_path / "outside.webm"
    shutil.copy(ingest / frame.loc[ok[0], "audio_path"], outside)
    path = {"climbs-out": "audio/../../outside.webm", "absolute": str(outside)}[how]
    frame.loc[ok[0], "audio_path"] = path
    frame.loc[ok[:test_rows], "split"] = "test"
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(table.schema.metadata),
                   ingest / "manifest.parquet")
    return ingest, victim, path


def _refusal(ingest: Path, victim: str, path: str) -> str:
    return (f"{ingest / 'manifest.parquet'}: the row of {victim!r} names audio_path {path!r}, which is outside "
            f"{ingest / 'audio'}; that row is refused (the manifest was changed after ingest: run the ingest step again)")


def test_evaluate_refuses_a_manifest_row_outside_the_ingest_folder(tiny_run, tmp_path):
    from coughreg.evaluation.evaluate import evaluate

    validated = set(pd.read_parquet(tiny_run["model"] / "predictions.parquet")["id"])
    ingest, victim, path = _tampered_ingest(tiny_run, tmp_path, "climbs-out", among=validated)
    result = evaluate(tiny_run["model"], tiny_run["features"], ingest, tmp_path / "evaluation", tiny_run["config"], workers=1)
    rows = pd.read_parquet(result.predictions_path).set_index("id")
    assert rows.loc[victim, "status"] == "failed" and rows.loc[victim, "reason"] == _refusal(ingest, victim, path)
    assert (rows.drop(index=victim)["status"] == "ok").all()
    assert result.metrics["validation_unscored"] == 1
