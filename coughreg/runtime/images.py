"""Container image references, built in one place: the Makefile, the Docker build and every component use these.

A reference is immutable: its tag carries the package version and a digest of everything the image is
built from (the pins, the Dockerfile, the sources), so changed code is a new tag, and so a new KFP cache
key, and a tag never names two different images. ``COUGHREG_CPU_IMAGE`` / ``COUGHREG_GPU_IMAGE`` override
the whole reference (for example pinned by digest: ``registry/coughreg@sha256:...``); ``COUGHREG_REGISTRY``
sets the registry; ``COUGHREG_IMAGE_TAG`` replaces the tag (then keeping it immutable is yours to do).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from coughreg.runtime.env import CPU_IMAGE_ENV, GPU_IMAGE_ENV, IMAGE_TAG_ENV, REGISTRY_ENV

VERSION = "0.1.0"
ROOT = Path(__file__).resolve().parents[2]
# What an image is built from (docker/Dockerfile copies these).
BUILD_INPUTS = ("requirements.txt", "pyproject.toml", "docker/Dockerfile", "pipeline.py", "coughreg", "components")


def _build_files(root: Path) -> list[Path]:
    """The files the image is built from: git's tracked files when this is a checkout (so an editor's backup or
    a stray file does not make a tag that was never pushed), else every file under the build inputs."""
    import subprocess

    try:
        listed = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--", *BUILD_INPUTS],
                                capture_output=True, check=True, timeout=30).stdout.decode().split("\0")
        return sorted(root / name for name in listed if name and (root / name).is_file())
    except (OSError, subprocess.SubprocessError):
        files = []
        for name in BUILD_INPUTS:
            path = root / name
            files += [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts] if path.is_dir() else [path]
        return sorted(files)


def source_digest(root: Path = ROOT) -> str | None:
    """SHA-256 over the image's build inputs (names and contents); None outside a checkout."""
    if not (root / "requirements.txt").exists():
        return None
    digest = hashlib.sha256()
    for file in _build_files(root):
        digest.update(file.relative_to(root).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def _tag() -> str:
    if os.environ.get(IMAGE_TAG_ENV):
        return os.environ[IMAGE_TAG_ENV]
    digest = source_digest()
    return f"{VERSION}-{digest[:12]}" if digest else VERSION


REGISTRY = os.environ.get(REGISTRY_ENV, "ghcr.io/coughreg")
TAG = _tag()
CPU_IMAGE = os.environ.get(CPU_IMAGE_ENV) or f"{REGISTRY}/coughreg:{TAG}-cpu"
GPU_IMAGE = os.environ.get(GPU_IMAGE_ENV) or f"{REGISTRY}/coughreg:{TAG}-cuda"
