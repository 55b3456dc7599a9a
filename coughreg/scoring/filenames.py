"""The names this product gives files: temporary names beside what is being written, and names that fit.

A file system limits one name to 255 bytes (most Linux file systems; fewer on some), counted in the
bytes of its encoding: 128 accented letters are already too many. Every temporary name is made here,
from at most the first 64 bytes of the final name, a random part and a suffix (``.partial``), so it
fits whatever the final name is. A name over the limit is shortened here too, and tagged with a digest
of the whole name so that two long names that begin alike stay apart.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import tempfile
from pathlib import Path

NAME_BYTES = 255  # the longest name (one path component) a common file system takes
KEPT_BYTES = 64  # of a final name, inside a temporary name
DIGEST_CHARS = 16  # the digest that tags a shortened name


def _encoded(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")  # os.fsencode on Linux: bytes a listing could not decode kept


def _cut(name: str, limit: int) -> str:
    """The longest start of ``name`` whose encoding has at most ``limit`` bytes, in whole characters."""
    return _encoded(name)[: max(0, limit)].decode("utf-8", "ignore")


def fits(name: str) -> bool:
    """Whether one path component is short enough for the file system."""
    return len(_encoded(name)) <= NAME_BYTES


def fitting_name(name: str) -> str:
    """``name`` itself when it fits, else its start, ``~``, a digest of the whole name and its suffix (kept
    when short), which always fits and is the same for the same name."""
    if fits(name):
        return name
    suffix = Path(name).suffix if len(_encoded(Path(name).suffix)) <= 16 else ""
    tag = "~" + hashlib.sha256(_encoded(name)).hexdigest()[:DIGEST_CHARS]
    stem = name[: len(name) - len(suffix)] if suffix else name
    return _cut(stem, NAME_BYTES - len(tag) - len(_encoded(suffix))) + tag + suffix


def fitting_path(relative: str) -> str:
    """A relative posix path with every component made to fit (``fitting_name``)."""
    return "/".join(fitting_name(part) for part in relative.split("/"))


def _prefix(target: Path) -> str:
    return f".{_cut(target.name, KEPT_BYTES)}."


def temporary_file(target: str | Path) -> Path:
    """A new empty file beside ``target`` under a temporary name that fits (mode 0600, as ``mkstemp`` makes it)."""
    target = Path(target)
    fd, name = tempfile.mkstemp(prefix=_prefix(target), suffix=".partial", dir=target.parent)
    os.close(fd)
    return Path(name)


def temporary_folder(target: str | Path, suffix: str = ".partial") -> Path:
    """A new empty folder beside ``target`` under a temporary name that fits."""
    target = Path(target)
    return Path(tempfile.mkdtemp(prefix=_prefix(target), suffix=suffix, dir=target.parent))


def temporary_name(target: str | Path, suffix: str) -> Path:
    """A path beside ``target`` that fits and is not likely to exist; nothing is created (for a link
    that is made and then renamed over ``target``)."""
    target = Path(target)
    return target.parent / f"{_prefix(target)}{secrets.token_hex(6)}{suffix}"
