"""Where a command writes, checked before any work is done: a file's folder must be a folder, a folder
must not be a file. The message names the argument and the path and says what to give instead."""

from __future__ import annotations

from pathlib import Path

from .errors import CoughPipelineError


def output_file(path: str | Path, argument: str = "--out") -> Path:
    """``path`` as a file to write: not a folder, and inside an existing folder."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise CoughPipelineError(f"{argument} {target}: is a folder; name a file in it")
    if not target.parent.exists():
        raise CoughPipelineError(f"{argument} {target}: the folder {target.parent} does not exist")
    if not target.parent.is_dir():
        raise CoughPipelineError(f"{argument} {target}: {target.parent} is a file, not a folder; name a file in a folder")
    return target


def output_folder(path: str | Path, argument: str = "--out") -> Path:
    """``path`` as a folder to write into: a folder, or a path that can become one (nothing is created here)."""
    target = Path(path).expanduser()
    existing = next((p for p in (target, *target.parents) if p.exists()), None)
    if existing == target and not target.is_dir():
        raise CoughPipelineError(f"{argument} {target}: is a file; name a folder (it is created when missing)")
    if existing is not None and not existing.is_dir():
        raise CoughPipelineError(f"{argument} {target}: {existing} is a file, not a folder; name a folder")
    return target
