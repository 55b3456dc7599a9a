"""Where an evaluation came from: the data, every artifact's content hash, the config, the software and the machine.

Read from the artifacts themselves (never recomputed from a config), so the report names exactly what
was evaluated, and a reader can check any of it against the pipeline root with ``sha256sum``.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path

from coughreg import artifacts
from coughreg.runtime.env import IMAGE_ENV
from coughreg.scoring.folder import sha256_file

LIBRARIES = ("coughreg", "torch", "timm", "kfp", "numpy", "pandas", "pyarrow", "av", "scikit-learn", "scipy",
             "safetensors", "pydantic", "matplotlib")


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def device_description() -> str:
    import torch

    if torch.cuda.is_available():
        return f"CUDA: {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}, torch {torch.__version__})"
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def _hashes(folder: Path, names: list[str]) -> dict[str, str]:
    return {name: sha256_file(folder / name) for name in names if (folder / name).is_file()}


def collect(ingest_dir: Path, features_dir: Path, model_dir: Path, info: dict, config_yaml: str) -> dict:
    """Every fact of the report's lineage section, JSON-ready."""
    ingest_report = artifacts.read_json(ingest_dir, artifacts.INGEST_REPORT, "ingest") if (ingest_dir / artifacts.INGEST_REPORT).exists() else {}
    index = artifacts.read_shard_index(features_dir)
    shards = [path.relative_to(features_dir).as_posix()
              for path in (*artifacts.shard_paths(features_dir), *artifacts.view_shard_paths(features_dir))]
    return {
        "source": {"uri": ingest_report.get("source", ""), "content_identity": ingest_report.get("source_version", "")},
        "ingest": _hashes(ingest_dir, [artifacts.MANIFEST, artifacts.INGEST_REPORT]),
        "features": {"shard_set": index.get("shard_set", ""), **_hashes(features_dir, [artifacts.SHARD_INDEX, *shards])},
        "model": {"backbone": info["backbone"], "seed": info["seed"], "trained_on": info.get("device", ""),
                  **_hashes(model_dir, [artifacts.MODEL_INFO, *(m["weights"] for m in info["members"])])},
        "config": config_yaml,
        "libraries": library_versions(),
        "python": f"{platform.python_implementation()} {sys.version.split()[0]}",
        "evaluated_on": device_description(),
        "image": os.environ.get(IMAGE_ENV, "none (run outside a container)"),
    }
