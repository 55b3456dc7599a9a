"""Score rows as a table: one row per input, written as CSV or Parquet (by the file's suffix)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import CoughPipelineError
from .filenames import temporary_file
from .outputs import output_file

TAIL_COLUMNS = ["duration_s", "n_chunks", "truncated", "status", "reason"]
FORMATS = (".csv", ".parquet")


def frame(rows: list[dict], label_columns: list[str]):
    import pandas as pd

    return pd.DataFrame(rows, columns=["path", *label_columns, *TAIL_COLUMNS])


def check_target(path: str | Path | None) -> None:
    """Refuse an output file the scores could not be written to, before anything is scored."""
    if path is None:
        return
    target = output_file(path)
    if target.suffix.lower() not in FORMATS:
        raise CoughPipelineError(f"--out {target}: name a .csv or a .parquet file")


def write(table, path: str | Path | None) -> None:
    """The table to ``path`` (atomically) or, without one, as CSV on standard output."""
    if path is None:
        table.to_csv(sys.stdout, index=False)
        return
    target = Path(path)
    tmp = temporary_file(target)
    try:
        if target.suffix.lower() == ".parquet":
            table.to_parquet(tmp, index=False)
        else:
            table.to_csv(tmp, index=False)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def failed_row(path: str, reason: str, label_columns: list[str]) -> dict:
    """The row of a recording that could not be scored: no values, the reason."""
    return {"path": path, **{label: float("nan") for label in label_columns}, "duration_s": float("nan"),
            "n_chunks": 0, "truncated": False, "status": "failed", "reason": reason}
