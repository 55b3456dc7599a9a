"""What to score: files, folders (every non-hidden file below, recursively), quoted globs.

An argument that names nothing, or a URL (this scorer reads local paths only), is an unusable
argument: the command stops before scoring anything (exit status 2).
"""

from __future__ import annotations

import glob
from pathlib import Path

from .errors import CoughPipelineError


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def expand(arguments: list[str]) -> list[tuple[str, Path]]:
    """``(name, path)`` of every recording the arguments name, in the order given (folders sorted)."""
    found: list[tuple[str, Path]] = []
    for argument in arguments:
        if "://" in argument:
            scheme = argument.split("://", 1)[0]
            raise CoughPipelineError(f"{argument}: {scheme}:// is not read here; score local files, folders or globs")
        path = Path(argument).expanduser()
        if path.is_dir():
            found += [(str(p), p) for p in sorted(path.rglob("*")) if p.is_file() and not _hidden(p, path)]
        elif path.is_file():
            found.append((str(path), path))
        elif glob.has_magic(argument):
            matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True))
            found += [(str(p), p) for p in matches if p.is_file()]
            if not matches:
                raise CoughPipelineError(f"{argument}: the pattern matches no file")
        else:
            raise CoughPipelineError(f"{argument}: no such file or folder")
    return found
