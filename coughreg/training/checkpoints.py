"""Per-epoch checkpoints of one member, so an interrupted step resumes where it stopped.

A checkpoint (weights, optimizer, scheduler, grad scaler, weight average, every random state,
history, best epoch) is written atomically after every epoch, and also to
``cluster.checkpoint_uri`` when set (a retried pod starts with an empty folder). It is keyed by a
fingerprint of everything that shapes the member, so a checkpoint of another config or data is
never resumed. It holds tensors, numbers, strings, lists and dicts only and is read with
``torch.load(weights_only=True)`` (``coughreg.scoring.readback``): loading a checkpoint never runs code.
A file that is damaged or holds anything else (a planted object whose unpickling would run code, in
the member's folder or under ``cluster.checkpoint_uri``) is refused with a warning naming it, and the
member starts afresh; its first epoch's checkpoint replaces the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from coughreg.audio.frontend import NORMALIZER_VERSION
from coughreg.audio.recording_chain import CHAIN_VERSION
from coughreg.config.ownership import chain_keys, config_values
from coughreg.config.schema import ExperimentConfig
from coughreg.io.storage import atomic_path
from coughreg.runtime.errors import CoughPipelineError, StorageError
from coughreg.scoring import readback
from coughreg.training.factories import PARAMETER_GROUPS_VERSION

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


def rng_state() -> dict:
    """Every random generator's state, as tensors and plain values."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(position),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "state": list(python_state), "gauss_next": gauss_next},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["state"]), python_state["gauss_next"]))


def fingerprint(config: ExperimentConfig, shard_set: str, train_rows: np.ndarray, batch_size: int) -> str:
    """What shapes a member: the train step's keys and its upstream keys, the data (the shard set, named by
    the hashes of its feature parameters and its manifest), its rows, its batch size, and the version of the
    normaliser's definition, of the training chains' law (the copies it trains on) and of the optimizer's
    parameter groups (a checkpoint made under another one is not resumed)."""
    payload = json.dumps(
        {"config": config_values(config, chain_keys("train")), "data": shard_set, "rows": train_rows.tolist(), "batch": batch_size,
         "normalizer": NORMALIZER_VERSION, "parameter_groups": PARAMETER_GROUPS_VERSION, "chain": CHAIN_VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def remote_location(base: str | None, key: str, member: str) -> str | None:
    """Where a member's checkpoint also lives outside the pod: keyed by everything that shapes it."""
    if not base:
        return None
    return f"{base.rstrip('/')}/{key[:16]}/{member}/{CHECKPOINT}"


def fetch(remote: str, local: Path) -> bool:
    """Copy a stored checkpoint into the member's folder; nothing stored yet is a first run (False)."""
    from coughreg.io.storage import download_s3_object, is_s3_uri, local_path

    try:
        source = download_s3_object(remote) if is_s3_uri(remote) else local_path(remote)
    except StorageError as exc:
        if "no such object" in str(exc):
            return False
        raise
    if source.exists():
        local.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(local) as tmp:
            shutil.copyfile(source, tmp)
        log.info("checkpoint fetched from %s", remote)
        return True
    return False


def store(local: Path, remote: str) -> None:
    from coughreg.io.storage import is_s3_uri, local_path, upload_file

    if is_s3_uri(remote):
        upload_file(local, remote)  # one PUT: the object is replaced whole or not at all
    else:
        with atomic_path(local_path(remote)) as tmp:
            shutil.copyfile(local, tmp)


def _tensors(value):
    """numpy arrays -> tensors, recursively (a weights-only checkpoint holds no numpy objects)."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, dict):
        return {k: _tensors(v) for k, v in value.items()}
    return value


def save(path: Path, state: dict) -> None:
    """Write a checkpoint atomically: a killed write leaves the previous one."""
    state = {**state, "validation": _tensors(state["validation"]), "best": _tensors(state["best"])}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


CHECKPOINT_KEYS = {"fingerprint": str, "epoch": int, "model": dict, "optimizer": dict, "scheduler": dict, "scaler": dict,
                   "rng": dict, "history": list, "best": dict}


def load(path: Path, device: torch.device) -> dict:
    """Read a checkpoint without running code (``weights_only``); numpy arrays come back as numpy arrays.

    Raises:
        CoughPipelineError: the file is damaged, is not a checkpoint, or holds objects whose unpickling
            would run code (never executed: refused); the caller starts the member afresh.
    """
    remedy = "it is not used"
    state = readback.read_weights_only(path, remedy, map_location=device)
    if not isinstance(state, dict):
        raise CoughPipelineError(f"{path}: not a checkpoint (a {type(state).__name__}); {remedy}")
    readback.require_keys(state, CHECKPOINT_KEYS, path, remedy)
    for holder, key in ((state, "validation"), (state["best"], "validation")):
        if isinstance(holder.get(key), torch.Tensor):
            holder[key] = holder[key].cpu().numpy()
    return state
