"""A scorer folder's contract: its file names, ``scorer.json`` read and checked, each file's SHA-256.

What the export step writes and every reader of a scorer folder checks (the scorer, its worker processes,
the lineage of an evaluation). Nothing here loads a program.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .errors import CoughPipelineError
from .readback import read_json, require_keys

MODEL_NAME = "cough-regression"  # the served model, unless its scorer.json names another
SCORER_INFO = "scorer.json"
SCORER_FORMAT = 2
PROGRAMS = {"torchscript": "scorer.ts", "export": "scorer.pt2"}


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(2**20):
            digest.update(block)
    return digest.hexdigest()


AGAIN = "export the scorer again, or copy the whole scorer folder again"
INFO_KEYS = {"format": int, "programs": dict, "files": dict, "label_columns": list, "sample_rate": (int, float),
             "inference_chunk_seconds": (int, float), "max_inference_chunk_seconds": (int, float)}


def read_info(folder: str | Path) -> dict:
    """A scorer folder's ``scorer.json``; a clear error when the folder is not a whole scorer."""
    path = Path(folder) / SCORER_INFO
    if not path.is_file():
        raise CoughPipelineError(f"{path}: missing; {folder} is not a scorer folder (the export step writes one)")
    info = read_json(path, AGAIN)
    if info.get("format") != SCORER_FORMAT:
        raise CoughPipelineError(f"{path}: scorer format {info.get('format', '?')}, not {SCORER_FORMAT}; {AGAIN}")
    return require_keys(info, INFO_KEYS, path, AGAIN)


def verify_files(folder: str | Path, info: dict, program: str) -> None:
    """Every file ``scorer.json`` lists has the SHA-256 it records (but the other programs, which are not
    loaded); a file missing, changed or outside the folder is named. ``program`` (a file name) must be listed."""
    folder = Path(folder)
    if program not in info["files"]:
        raise CoughPipelineError(f"{folder / SCORER_INFO}: records no SHA-256 for {program}, which is never loaded "
                                 f"unchecked; {AGAIN}")
    others = {str(file) for file in info["programs"].values()} - {program}
    for name, expected in sorted(info["files"].items()):
        if name in others:
            continue
        path = folder / str(name)
        inside = not Path(str(name)).is_absolute() and ".." not in Path(str(name)).parts
        if not inside or not path.is_file() or sha256_file(path) != expected:
            raise CoughPipelineError(f"{path}: missing or damaged (its SHA-256 is not the {expected} the export recorded); "
                                     "copy the scorer folder again")
