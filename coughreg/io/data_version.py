"""The content identity of a data set URI: what makes new data a cache miss and unchanged data a hit.

KFP reuses a cached ingest when its inputs are unchanged, and a URI alone does not change when
new recordings land under it. So a small uncached step resolves the URI to an identity first and
passes it to ingest as a parameter:

- an S3 object (a zip): its ETag, VersionId (on versioned buckets) and size, from one HEAD;
- an S3 prefix: a SHA-256 over the listing (key, ETag and size of every object);
- a local file: a SHA-256 of its content and its size;
- a local folder: a SHA-256 over its listing (relative path, size and modification time of every
  file), as make and rsync judge a tree.

Ingest checks that the source it reads still has the identity it was given.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from coughreg.io.storage import (
    S3Options,
    head_object,
    is_s3_uri,
    list_s3_prefix,
    local_path,
    parse_s3_uri,
    s3_client,
    sha256_file,
)
from coughreg.runtime.errors import StorageError


def is_archive_key(key: str) -> bool:
    """An S3 key read as one object (a zip); any other key is a prefix of objects."""
    return key.lower().endswith(".zip")


def source_identity(uri: str, options: S3Options | None = None) -> str:
    """A short text that changes exactly when the data set's content does.

    Raises:
        StorageError: the URI cannot be read (named, with what to check).
    """
    if is_s3_uri(uri):
        location = parse_s3_uri(uri)
        if is_archive_key(location.key):
            return _s3_object_identity(uri, options)
        return _s3_prefix_identity(uri if uri.endswith("/") else uri + "/", options)
    path = local_path(uri)
    if path.is_file():
        return f"file sha256={sha256_file(path)} size={path.stat().st_size}"
    if path.is_dir():
        return _folder_identity(path)
    raise StorageError(f"{uri}: no such file or folder")


def etag_of(identity: str) -> str | None:
    """The ETag an S3 object identity names (None for other kinds)."""
    for part in identity.split():
        if part.startswith("etag="):
            return part[len("etag="):]
    return None


def _s3_object_identity(uri: str, options: S3Options | None) -> str:
    options = options or S3Options()
    head = head_object(s3_client(options), parse_s3_uri(uri), options.retry_budget_seconds)
    etag = str(head.get("ETag", "")).strip('"')
    version = head.get("VersionId") or "-"
    return f"s3-object etag={etag} version={version} size={int(head.get('ContentLength', 0))}"


def prefix_listing(uri: str, options: S3Options | None = None, client=None) -> tuple[list[dict], str]:
    """Every object under an ``s3://bucket/prefix/`` and a SHA-256 over the listing (key, ETag, size)."""
    digest = hashlib.sha256()
    objects = [obj for obj in list_s3_prefix(uri, options, client) if not obj["Key"].endswith("/")]
    for obj in objects:
        digest.update(f"{obj['Key']}\t{str(obj.get('ETag', '')).strip(chr(34))}\t{obj.get('Size', 0)}\n".encode())
    if not objects:
        raise StorageError(f"{uri}: no objects under this prefix")
    return objects, digest.hexdigest()


def _s3_prefix_identity(uri: str, options: S3Options | None) -> str:
    objects, digest = prefix_listing(uri, options)
    return f"s3-prefix sha256={digest} objects={len(objects)}"


def _folder_identity(root: Path) -> str:
    digest = hashlib.sha256()
    count = 0
    for path in sorted(root.rglob("*")):
        if path.is_symlink() or not path.is_file():
            continue
        info = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}\t{info.st_size}\t{info.st_mtime_ns}\n".encode())
        count += 1
    return f"folder sha256={digest.hexdigest()} files={count}"
