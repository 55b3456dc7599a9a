"""Score rows as a table: one row per input, written as CSV or Parquet (by the file's suffix)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from .errors import CoughPipelineError

TAIL_COLUMNS = ["duration_s", "n_chunks", "truncated", "status", "reason"]
FORMATS = (".csv", ".parquet")


def frame(rows: list[dict], label_columns: list[str]):
    import pandas as pd

    return pd.DataFrame(rows, columns=["path", *label_columns, *TAIL_COLUMNS])


def check_target(path: str | Path | None) -> None:
    """Refuse an output file the scores could not be written to, before anything is scored."""
    if path is None:
        return
    target = Path(path)
    if target.suffix.lower() not in FORMATS:
        raise CoughPipelineError(f"--out {target}: name a .csv or a .parquet file")
    if target.is_dir():
        raise CoughPipelineError(f"--out {target}: is a folder; name a file in it")
    if not target.parent.exists():
        raise CoughPipelineError(f"--out {target}: the folder {target.parent} does not exist")


def write(table, path: str | Path | None) -> None:
    """The table to ``path`` (atomically) or, without one, as CSV on standard output."""
    if path is None:
        table.to_csv(sys.stdout, index=False)
        return
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(fd)
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
