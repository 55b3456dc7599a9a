"""The documented step-by-step path, run exactly as docs/pipeline.md prints it, on generated data in the use
case's layout (a COUGHVID zip) and with the default config every command starts from."""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys

import pandas as pd

from tests.conftest import PROJECT

PAGE = PROJECT / "docs" / "pipeline.md"


def _documented_commands() -> list[list[str]]:
    block = PAGE.read_text().split("<!-- step-by-step:start -->", 1)[1].split("<!-- step-by-step:end -->", 1)[0]
    lines = [line for line in block.splitlines() if line.strip() and not line.startswith("```")]
    commands = [shlex.split(line) for line in lines]
    assert commands and all(c[:2] == [".venv/bin/python", "pipeline.py"] for c in commands), lines
    return [[sys.executable, str(PROJECT / "pipeline.py"), *c[2:]] for c in commands]  # this interpreter, this checkout


def test_the_documented_step_by_step_path_runs_as_printed(tmp_path):
    commands = _documented_commands()
    assert [c[2:4] for c in commands if c[2] == "step"] == [
        ["step", "ingest"], ["step", "features"], ["step", "train"], ["step", "evaluate"], ["step", "export"],
        ["step", "score-test-table"]]
    for command in commands:
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{shlex.join(command[2:])}\n{done.stderr[-3000:]}"
        if command[2] == "step" and command[3] != "score-test-table":  # every step that takes config keys says which
            assert "config: coughvid_ht.yaml (the default config)" in done.stderr.splitlines()[0], done.stderr[:500]
    manifest = pd.read_parquet(tmp_path / "out" / "ingest" / "manifest.parquet")
    assert (manifest["status"] == "ok").sum() >= 50  # the use case's layout, read by the default config
    metrics = json.loads((tmp_path / "out" / "evaluation" / "metrics.json").read_text())
    assert math.isfinite(metrics["validation_mae"]) and metrics["quality_gate"]["verdict"] in ("passed", "failed")
    assert (tmp_path / "out" / "scorer" / "scorer.json").is_file()  # 48 training recordings need not beat the median
    assert (tmp_path / "out" / "test-predictions" / "test_predictions.parquet").is_file()
