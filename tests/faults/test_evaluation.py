"""Evaluation faults: a manifest row outside the ingest folder is refused alone."""

from __future__ import annotations

import pandas as pd
import pytest

from tests.helpers.faults import refusal, tampered_ingest

pytestmark = pytest.mark.faults


def test_evaluate_refuses_a_manifest_row_outside_the_ingest_folder(tiny_run, tmp_path):
    from coughreg.evaluation.evaluate import evaluate

    validated = set(pd.read_parquet(tiny_run["model"] / "predictions.parquet")["id"])
    ingest, victim, path = tampered_ingest(tiny_run, tmp_path, "climbs-out", among=validated)
    result = evaluate(tiny_run["model"], tiny_run["features"], ingest, tmp_path / "evaluation", tiny_run["config"], workers=1)
    rows = pd.read_parquet(result.predictions_path).set_index("id")
    assert rows.loc[victim, "status"] == "failed" and rows.loc[victim, "reason"] == refusal(ingest, victim, path)
    assert (rows.drop(index=victim)["status"] == "ok").all()
    assert result.metrics["validation_unscored"] == 1
