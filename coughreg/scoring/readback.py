"""Reading back what the product wrote: one loader per format, none of which runs code.

JSON and safetensors hold data only; numpy arrays are read with ``allow_pickle=False``; torch files
(training checkpoints) with ``weights_only=True``, which unpickles tensors, numbers, strings, lists,
tuples and dicts and refuses anything else (a planted object whose unpickling would run code is an
error, not a call). Parquet tables are data. A file that is missing, truncated or of the wrong shape
raises ``CoughPipelineError`` naming it and saying what to do (``remedy``), never a traceback.

The scorer's programs (TorchScript, torch.export) are code by design and are not read here:
``coughreg.scoring.scorer`` loads one only from a folder whose every file matches the SHA-256 that
its ``scorer.json`` records.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import CoughPipelineError


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _refuse(path: Path, what: str, exc: BaseException | None, remedy: str) -> CoughPipelineError:
    cause = f" ({_first_line(exc)})" if exc is not None else ""
    return CoughPipelineError(f"{path}: {what}{cause}; {remedy}")


def _existing(path: str | Path, remedy: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise _refuse(path, "missing" if not path.exists() else "not a file", None, remedy)
    return path


def read_json(path: str | Path, remedy: str, kind: type = dict) -> Any:
    """A JSON file whose top level is a ``kind`` (an object unless told)."""
    path = _existing(path, remedy)
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _refuse(path, "not readable JSON", exc, remedy) from None
    if not isinstance(value, kind):
        raise _refuse(path, f"holds a JSON {type(value).__name__}, not the {kind.__name__} expected", None, remedy)
    return value


def require_keys(info: dict, keys: dict[str, type | tuple[type, ...]], path: str | Path, remedy: str) -> dict:
    """``info`` when each of ``keys`` is present with its type; else an error naming the file and the key."""
    for key, kind in keys.items():
        value = info.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            found = "missing" if key not in info else f"a {type(value).__name__}"
            raise _refuse(Path(path), f"'{key}' is {found}, not a {expected}", None, remedy)
    return info


def read_array(path: str | Path, remedy: str):
    """A ``.npy`` array, never a pickled object."""
    import numpy as np

    path = _existing(path, remedy)
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise _refuse(path, "not a readable numpy array", exc, remedy) from None


def read_tensors(path: str | Path, remedy: str) -> dict:
    """The tensors of a safetensors file, on the CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = _existing(path, remedy)
    try:
        return load_file(str(path))
    except (OSError, SafetensorError, ValueError, RuntimeError) as exc:
        raise _refuse(path, "not a readable safetensors file (truncated or damaged?)", exc, remedy) from None


def read_weights_only(path: str | Path, remedy: str, map_location=None) -> Any:
    """A torch file holding tensors and plain values, read without running code (``weights_only=True``)."""
    import torch

    path = _existing(path, remedy)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged file and a refused object are one message, not a traceback
        raise _refuse(path, "not a file of tensors and plain values (damaged, or holding objects that would run "
                      "code when read, which are never loaded)", exc, remedy) from None


def read_table(path: str | Path, remedy: str, columns: list[str] | None = None):
    """A Parquet file as a pyarrow table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = _existing(path, remedy)
    try:
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise _refuse(path, "not a readable Parquet table", exc, remedy) from None
