"""Step 5 when the model failed the quality gate: a note where the scorer would be."""

from __future__ import annotations

import logging
from pathlib import Path

from coughreg import artifacts
from coughreg.io.storage import atomic_write_text
from coughreg.steps.harness import setup_logging

log = logging.getLogger(__name__)


def gate_failed_step(evaluation: str | Path, out: str | Path) -> str:
    """What a run whose model failed the quality gate leaves where the scorer would be: a note saying why."""
    setup_logging()
    verdict = artifacts.read_json(evaluation, artifacts.METRICS, "evaluate")["quality_gate"]
    message = f"quality gate failed: {verdict['message']}"
    Path(out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out) / artifacts.GATE_NOTE, message + "\nNo scorer was exported; see the evaluation report.\n")
    log.warning("%s", message)
    return message
