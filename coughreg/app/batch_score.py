"""Batch scoring and serving from anywhere: the scorer folder's own code (``coughreg.scoring``), with S3.

``pipeline.py score`` and ``pipeline.py serve`` take the scorer as a folder or as the export step's
``s3://`` artifact URI (mirrored into the download cache, its files checked against the SHA-256s the
export recorded), and ``score`` takes ``s3://`` prefixes beside files, folders and globs: each object
is fetched when its turn comes (pinned to the version the listing showed) and deleted once scored, so
a prefix of any size streams through. S3 honours ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` and the
usual credential chain.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from pathlib import Path

from coughreg.io.sources import download_prefix
from coughreg.io.storage import (
    DEFAULT_CACHE,
    S3Options,
    download_s3_object,
    is_s3_uri,
    list_s3_prefix,
    parse_s3_uri,
    s3_client,
)
from coughreg.scoring.inputs import expand
from coughreg.scoring.scorer import Scorer

log = logging.getLogger(__name__)


def open_scorer(location: str | Path, program: str = "torchscript", s3: S3Options | None = None,
                cache_dir: Path | None = None) -> Scorer:
    """A scorer folder, or the export step's artifact at an ``s3://`` URI (downloaded once per version)."""
    location = str(location)
    if is_s3_uri(location):
        folder = download_prefix(location, s3 or S3Options(), Path(cache_dir or DEFAULT_CACHE))
        return Scorer(folder, program)
    return Scorer(Path(location).expanduser(), program)


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/") if part)


def _fetcher(uri: str, etag: str | None, options: S3Options, client):
    @contextlib.contextmanager
    def fetch():
        folder = Path(tempfile.mkdtemp(prefix="coughreg-score-"))
        try:
            yield download_s3_object(uri, folder, options, client, etag=etag)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    return fetch


def s3_inputs(uri: str, options: S3Options, client=None) -> list[tuple[str, object]]:
    """Every non-hidden object under an ``s3://`` prefix (or the one object the URI names), as ``(uri, fetcher)``."""
    from coughreg.io.storage import head_object
    from coughreg.runtime.errors import StorageError

    location = parse_s3_uri(uri)
    client = client or s3_client(options)
    prefix = location.key if not location.key or location.key.endswith("/") else location.key + "/"
    found = []
    for obj in list_s3_prefix(f"s3://{location.bucket}/{prefix}", options, client):
        key = obj["Key"]
        if key.endswith("/") or _hidden(key[len(prefix):]):
            continue  # folder markers and hidden objects, as for local folders
        found.append((f"s3://{location.bucket}/{key}", _fetcher(f"s3://{location.bucket}/{key}", str(obj.get("ETag", "")).strip('"') or None,
                                                                   options, client)))
    if not found and location.key and not location.key.endswith("/"):  # one object, named whole
        etag = str(head_object(client, location).get("ETag", "")).strip('"') or None  # names the URI when it is missing
        found.append((uri, _fetcher(uri, etag, options, client)))
    if not found:
        raise StorageError(f"{uri}: no object under this prefix")
    log.info("%s: %d recording(s)", uri, len(found))
    return found


def expand_inputs(arguments: list[str], s3: S3Options | None = None) -> list[tuple[str, object]]:
    """Files, folders, quoted globs and ``s3://`` prefixes -> ``(name, local path or fetcher)``, in the order given."""
    options = s3 or S3Options()
    items: list[tuple[str, object]] = []
    client = None
    for argument in arguments:
        if is_s3_uri(argument):
            client = client or s3_client(options)
            items += s3_inputs(argument, options, client)
        else:
            items += expand([argument])
    return items
