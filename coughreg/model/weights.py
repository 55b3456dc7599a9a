"""Pretrained backbone weights: where they come from, fetched once, known by their SHA-256.

``architecture.pretrained: true`` resolves, in this order:

1. ``architecture.pretrained_weights``: a file, a folder (a Hugging Face snapshot, or any folder with
   one weights file) or an ``s3://`` URI;
2. the local Hugging Face cache: the backbone's own file, by its exact hub id (``HF_HUB_CACHE`` or
   ``HF_HOME``), never another model's;
3. the store of weights an earlier run fetched (``cluster.weights_uri``, by default ``weights/`` in the
   pipeline root), by hub id: a later run asks the hub nothing;
4. timm's hub (``huggingface_hub``), which honours ``HF_ENDPOINT`` (a mirror), ``HF_HUB_OFFLINE`` and
   ``HF_TOKEN``; huggingface_hub retries a failing connection, and the file lands in the Hugging Face cache.

On a cluster the preflight step resolves them once per run, keeps a copy in the store under
``sha256/<hex>/<file>``, and hands train the URI and the SHA-256 as parameters: the hash is part of
train's cache key (new weights retrain), and train refuses a file whose hash differs.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from coughreg.config.schema import ExperimentConfig
from coughreg.io.storage import atomic_write_text, download_s3_object, is_s3_uri, local_path, sha256_file, upload_file
from coughreg.runtime.errors import CoughPipelineError, StorageError
from coughreg.scoring import readback

log = logging.getLogger(__name__)

HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # timm's order: safetensors first
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


@dataclass(frozen=True)
class Weights:
    path: Path  # a local file
    sha256: str
    source: str  # where it came from, for people


def hub_id(backbone: str) -> tuple[str, str | None] | None:
    """(repo id, revision) of a backbone's pretrained weights on the hub, as timm names them; None when it has none."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(backbone)
    except (RuntimeError, ValueError):
        return None
    hub = getattr(cfg, "hf_hub_id", None)
    if not hub:
        return None
    repo, _, revision = hub.partition("@")
    return repo, revision or None


def hub_cache() -> Path:
    """The Hugging Face hub cache, read from the environment now (huggingface_hub fixes it when first imported)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def hub_endpoint() -> str:
    """The hub's URL as people may read it: any user and password in ``HF_ENDPOINT`` are left out."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/"))
    return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else ""))) if parts.hostname else parts.geturl()


def _hub_reachable() -> str | None:
    """One quick look at the hub (5 s), so an unreachable mirror fails in seconds, not after the client's retries."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(hub_endpoint(), method="HEAD"), timeout=5)
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return str(getattr(exc, "reason", exc))
    return None


def weights_in(source: str | Path, backbone: str | None = None) -> Path:
    """The weights file ``architecture.pretrained_weights`` names: a file, a folder's one weights file, or an s3:// object."""
    if is_s3_uri(str(source)):
        return download_s3_object(str(source))
    path = local_path(source)
    if path.is_dir():
        hub = hub_id(backbone) if backbone else None
        if hub and list(path.glob("models--*")):  # a Hugging Face cache folder: the backbone's own file, by refs/main
            cached = _from_cache(*hub, cache=path)
            if cached is None:
                raise CoughPipelineError(f"architecture.pretrained_weights: {path} is a Hugging Face cache without {hub[0]}")
            return cached
        found = sorted({p for suffix in WEIGHT_SUFFIXES for p in path.rglob(f"*{suffix}")})
        if len(found) != 1:
            listed = ", ".join(str(p.relative_to(path)) for p in found[:5]) or "none"
            raise CoughPipelineError(
                f"architecture.pretrained_weights: {path} must hold exactly one weights file "
                f"(*.safetensors, *.pth, *.pt, *.bin), it holds {len(found)}: {listed}; name the file"
            )
        return found[0]
    if not path.exists():
        raise CoughPipelineError(f"architecture.pretrained_weights: {path} does not exist")
    return path


def _from_cache(repo: str, revision: str | None, cache: Path | None = None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    for filename in HUB_FILES:
        found = try_to_load_from_cache(repo, filename, cache_dir=str(cache or hub_cache()), revision=revision)
        if isinstance(found, str):
            return Path(found)
    return None


def _record(store: str, repo: str, revision: str | None) -> str:
    return f"{store.rstrip('/')}/by-name/{repo.replace('/', '--')}@{revision or 'main'}.json"


def _read(uri: str) -> Path | None:
    """A stored file as a local path; None when the store does not have it."""
    if is_s3_uri(uri):
        try:
            return download_s3_object(uri)
        except StorageError as exc:
            if "no such object" in str(exc):
                return None
            raise
    path = local_path(uri)
    return path if path.exists() else None


def _from_store(store: str, repo: str, revision: str | None) -> Weights | None:
    """What an earlier run kept, checked again: a record or a file that does not hold up is a miss (and is rewritten)."""
    record_uri = _record(store, repo, revision)
    record = _read(record_uri)
    if record is None:
        return None
    try:
        entry = readback.read_json(record, "it is fetched again")
        path = _read(entry["uri"])
        if path is None or sha256_file(path) != entry["sha256"]:
            raise ValueError(f"{entry['uri']} is missing or is not SHA-256 {entry['sha256']}")
    except (CoughPipelineError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s: not used (%s); fetching the weights again", record_uri, exc)
        return None
    return Weights(path, entry["sha256"], f"{entry['uri']} (fetched before from {entry['source']})")


def _download(repo: str, revision: str | None, backbone: str) -> Path:
    """timm's file for the backbone from the hub (huggingface_hub retries a connection that fails)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
    )

    problem = ""
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    unreachable = None if offline else _hub_reachable()
    for filename in [] if unreachable else HUB_FILES:
        try:
            return Path(hf_hub_download(repo, filename, revision=revision, cache_dir=str(hub_cache())))
        except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:  # (before EntryNotFoundError: a subclass)
            problem = "HF_HUB_OFFLINE is set" if offline else f"{hub_endpoint()} could not be reached ({_first_line(exc)})"
            break
        except (EntryNotFoundError, RemoteEntryNotFoundError):
            problem = f"{repo} has none of {', '.join(HUB_FILES)}"
        except Exception as exc:  # noqa: BLE001 - the hub's HTTP errors (401 gated, 404 repository, 5xx) all end here
            problem = f"{hub_endpoint()}: {_first_line(exc)}"
            break
    if unreachable:
        problem = f"{hub_endpoint()} could not be reached ({unreachable})"
    raise CoughPipelineError(
        f"architecture.pretrained: no weights for '{backbone}' ({repo}): not in architecture.pretrained_weights, "
        f"not in the Hugging Face cache ({hub_cache()}), and the hub gave none: {problem}. Set "
        "architecture.pretrained_weights to a file, a folder or an s3:// URI, point HF_ENDPOINT at a mirror this "
        "machine reaches (HF_TOKEN for a private one), or set architecture.pretrained=false to start from random weights"
    )


def _first_line(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def resolve(config: ExperimentConfig, store: str | None = None) -> Weights:
    """The backbone's pretrained weights as a local file, in the order the module's docstring gives.

    Raises:
        CoughPipelineError: nothing found (naming ``architecture.pretrained`` and what to do), or the file
            differs from ``architecture.pretrained_sha256``.
    """
    architecture = config.architecture
    if architecture.pretrained_weights:
        path = weights_in(architecture.pretrained_weights, architecture.backbone)
        weights = Weights(path, sha256_file(path), f"architecture.pretrained_weights {architecture.pretrained_weights}")
    else:
        hub = hub_id(architecture.backbone)
        if hub is None:
            raise CoughPipelineError(
                f"architecture.pretrained: timm knows no pretrained weights for '{architecture.backbone}'; set "
                "architecture.pretrained_weights to a file, a folder or an s3:// URI, or architecture.pretrained=false"
            )
        repo, revision = hub
        cached = _from_cache(repo, revision)
        weights = (
            Weights(cached, sha256_file(cached), f"the Hugging Face cache ({repo})") if cached is not None
            else (_from_store(store, repo, revision) if store else None)
        )
        if weights is None:
            path = _download(repo, revision, architecture.backbone)
            weights = Weights(path, sha256_file(path), f"{hub_endpoint()}/{repo}")
            log.info("pretrained weights for %s downloaded from %s", architecture.backbone, weights.source)
    expected = architecture.pretrained_sha256
    if expected and weights.sha256 != expected:
        raise CoughPipelineError(
            f"architecture.pretrained_sha256: {weights.path} has SHA-256 {weights.sha256}, not {expected}; "
            "the weights changed after the run resolved them: run the pipeline again"
        )
    return weights


def keep(weights: Weights, store: str, backbone: str) -> str:
    """Put the weights in the store under their SHA-256 (once) and remember them by hub id; returns their URI there."""
    uri = f"{store.rstrip('/')}/sha256/{weights.sha256}/{weights.path.name}"
    if _read(uri) is None:
        if is_s3_uri(uri):
            upload_file(weights.path, uri)
        else:
            import shutil

            from coughreg.io.storage import atomic_path

            with atomic_path(local_path(uri)) as tmp:
                shutil.copyfile(weights.path, tmp)
        log.info("pretrained weights kept at %s", uri)
    hub = hub_id(backbone)
    if hub is not None and "pretrained_weights" not in weights.source:
        record = json.dumps({"sha256": weights.sha256, "uri": uri, "source": weights.source})
        target = _record(store, *hub)
        if is_s3_uri(target):
            import tempfile

            with tempfile.TemporaryDirectory() as folder:
                note = Path(folder) / "record.json"
                note.write_text(record)
                upload_file(note, target)
        else:
            atomic_write_text(local_path(target), record)
    return uri
