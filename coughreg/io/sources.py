"""Data sources: a zip or a folder, local or in S3, seen as a flat list of safe relative names.

Archives are read member by member (never unpacked whole). Unsafe members (absolute paths,
``..``, symlinks, device files, members compressed beyond a sane ratio) are listed in ``refused``
with the reason and never read; an archive over the size or file-count bounds is refused whole, and a
damaged one is named damaged. Archives inside a data set are not unpacked (``is_archive_name``).
"""

from __future__ import annotations

import abc
import logging
import os
import posixpath
import stat
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from coughreg.io.data_version import etag_of, is_archive_key, prefix_listing, source_identity
from coughreg.io.storage import (
    DEFAULT_CACHE,
    S3Options,
    download_s3_object,
    is_s3_uri,
    local_path,
    parse_s3_uri,
    s3_client,
)
from coughreg.runtime.errors import StorageError
from coughreg.scoring.filenames import fitting_path, temporary_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceLimits:
    max_total_bytes: int = 200 * 2**30
    max_files: int = 2_000_000
    max_compression_ratio: float = 200.0


@dataclass
class DataSource(abc.ABC):
    """A read-only view of a data set: ``names`` are safe posix paths relative to its root."""

    uri: str
    identity: str = ""
    names: list[str] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    comment: bytes = b""  # a zip archive's comment (data, never run)

    @abc.abstractmethod
    def read(self, name: str) -> bytes:
        """The member's bytes."""

    def describe(self, name: str) -> str:
        return f"{self.uri}!{name}"

    def close(self) -> None:  # noqa: B027 - nothing to release unless a subclass holds a handle
        """Release what the source holds open (an archive's file handle)."""


def safe_relative_name(name: str) -> str | None:
    """The normalized posix path, or None when it is absolute or climbs out of the root."""
    text = name.replace("\\", "/")
    if text.startswith("/") or (len(text) > 1 and text[1] == ":"):
        return None
    normalized = posixpath.normpath(text)
    if normalized.startswith("../") or normalized == ".." or normalized == ".":
        return None
    return normalized


class ZipSource(DataSource):
    def __init__(self, path: Path, uri: str, limits: SourceLimits) -> None:
        super().__init__(uri=uri)
        try:
            self._zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise StorageError(f"{uri}: a damaged zip archive ({exc}: its directory at the end is missing or broken, as after "
                               "an interrupted download or copy); copy or download the archive again") from None
        self.comment = self._zip.comment
        members = self._zip.infolist()
        if len(members) > limits.max_files:
            raise StorageError(f"{uri}: archive has {len(members)} members, more than the limit {limits.max_files}")
        total = sum(member.file_size for member in members)
        if total > limits.max_total_bytes:
            raise StorageError(
                f"{uri}: archive unpacks to {total / 2**30:.1f} GiB, more than the limit "
                f"{limits.max_total_bytes / 2**30:.1f} GiB (ingest.max_archive_bytes)"
            )
        self._members: dict[str, zipfile.ZipInfo] = {}
        for member in members:
            if member.is_dir():
                continue
            name = safe_relative_name(member.filename)
            mode = member.external_attr >> 16
            if name is None:
                self.refused[member.filename] = "unsafe path in archive (absolute or '..')"
            elif stat.S_ISLNK(mode):
                self.refused[name] = "symbolic link in archive"
            elif stat.S_IFMT(mode) and not stat.S_ISREG(mode):  # no type bits: a plain file
                self.refused[name] = "special file in archive (device, fifo or socket)"
            elif member.compress_size and member.file_size / member.compress_size > limits.max_compression_ratio:
                self.refused[name] = (
                    f"compression ratio {member.file_size / member.compress_size:.0f} above the limit "
                    f"{limits.max_compression_ratio:.0f} (possible zip bomb)"
                )
            elif name in self._members or self.refused.get(name) == "duplicate name in archive":
                # Two members, one name: neither can be trusted to be the one the metadata means.
                self._members.pop(name, None)
                self.sizes.pop(name, None)
                self.refused[name] = "duplicate name in archive"
            else:
                self._members[name] = member
                self.sizes[name] = member.file_size
        self.names = sorted(self._members)

    def read(self, name: str) -> bytes:
        member = self._members[name]
        try:
            with self._zip.open(member) as handle:
                return handle.read(member.file_size + 1)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:  # a CRC error or a truncated member
            raise StorageError(f"{self.describe(name)}: cannot read archive member: {exc}") from None

    def close(self) -> None:
        self._zip.close()


class FolderSource(DataSource):
    def __init__(self, root: Path, uri: str, limits: SourceLimits) -> None:
        super().__init__(uri=uri)
        self.root = root
        count = 0
        for path in sorted(root.rglob("*")):
            relative = path.relative_to(root).as_posix()
            if path.is_symlink():
                self.refused[relative] = "symbolic link in data folder"
                continue
            mode = path.lstat().st_mode
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                self.refused[relative] = "special file in data folder (device, fifo or socket)"
                continue
            count += 1
            if count > limits.max_files:
                raise StorageError(f"{uri}: more than {limits.max_files} files (ingest.max_archive_files)")
            self.names.append(relative)
            self.sizes[relative] = path.stat().st_size

    def read(self, name: str) -> bytes:
        try:
            return (self.root / name).read_bytes()
        except OSError as exc:
            raise StorageError(f"{self.describe(name)}: cannot read: {exc}") from None

    def describe(self, name: str) -> str:
        return str(self.root / name)


def download_prefix(uri: str, options: S3Options, cache_dir: Path, renamed: dict[str, str] | None = None) -> Path:
    """Mirror an ``s3://bucket/prefix/`` into the cache: one folder of links per version of the listing.

    Each object is downloaded once per ETag (and pinned to the ETag the listing showed); the mirror
    folder is named by the listing's digest, so an object deleted from the prefix is never seen again.
    A key part longer than a file name may be (S3 takes 1024 bytes) is linked under its shortened
    name (``coughreg.scoring.filenames.fitting_path``), recorded in ``renamed`` (mirror name -> key name).
    """
    location = parse_s3_uri(uri if uri.endswith("/") else uri + "/")
    client = s3_client(options)
    objects, digest = prefix_listing(location.uri, options, client)
    mirror = cache_dir / "prefix" / location.bucket / fitting_path(location.key) / digest[:16]
    mirror.mkdir(parents=True, exist_ok=True)

    def fetch(obj: dict) -> None:
        relative = safe_relative_name(obj["Key"][len(location.key) :])
        if relative is None:
            log.warning("s3://%s/%s: unsafe key name, skipped", location.bucket, obj["Key"])
            return
        etag = str(obj.get("ETag", "")).strip('"') or None
        cached = download_s3_object(f"s3://{location.bucket}/{obj['Key']}", cache_dir, options, client, etag=etag)
        target = mirror / fitting_path(relative)
        if renamed is not None and fitting_path(relative) != relative:
            renamed[fitting_path(relative)] = relative
        target.parent.mkdir(parents=True, exist_ok=True)
        link = temporary_name(target, ".link")
        link.symlink_to(cached)
        os.replace(link, target)  # atomic: processes mirroring the same prefix never see half a link

    log.info("%s: %d objects", uri, len(objects))
    with ThreadPoolExecutor(options.max_concurrency) as pool:
        list(pool.map(fetch, objects))
    return mirror


class _MirrorSource(FolderSource):
    """A folder of symlinks into the download cache (an S3 prefix): links are expected here.

    ``renamed`` maps the mirror's shortened names back to the keys' names, which are the names seen.
    """

    def __init__(self, root: Path, uri: str, limits: SourceLimits, renamed: dict[str, str] | None = None) -> None:
        DataSource.__init__(self, uri=uri)
        self.root = root
        renamed = renamed or {}
        for path in sorted(root.rglob("*")):
            if (path.is_dir() and not path.is_symlink()) or path.name.endswith(".link"):
                continue
            relative = path.relative_to(root).as_posix()
            name = renamed.get(relative, relative)
            self.names.append(name)
            self.sizes[name] = path.stat().st_size
        self.names.sort()
        if len(self.names) > limits.max_files:
            raise StorageError(f"{uri}: more than {limits.max_files} objects (ingest.max_archive_files)")

    def read(self, name: str) -> bytes:
        try:
            return (self.root / fitting_path(name)).read_bytes()
        except OSError as exc:
            raise StorageError(f"{self.describe(name)}: cannot read: {exc}") from None

    def describe(self, name: str) -> str:
        return f"{self.uri.rstrip('/')}/{name}"


def open_source(
    uri: str, options: S3Options | None = None, cache_dir: Path | None = None, limits: SourceLimits | None = None,
    expected_identity: str | None = None,
) -> DataSource:
    """Open ``s3://bucket/key.zip``, ``s3://bucket/prefix/``, a local zip or folder, or a ``file://`` URI.

    The source's content identity (``coughreg.io.data_version``) is resolved first and kept as
    ``source.identity``; with ``expected_identity`` (what the run resolved before ingest), a source
    that changed since is refused, and an S3 object is downloaded pinned to that version.
    """
    options = options or S3Options()
    limits = limits or SourceLimits()
    cache_dir = Path(cache_dir or DEFAULT_CACHE)
    if not is_s3_uri(uri) and not local_path(uri).exists():
        raise StorageError(f"{uri}: no such file or folder")
    identity = source_identity(uri, options)
    if expected_identity and identity != expected_identity:
        raise StorageError(
            f"{uri}: the data changed after this run resolved its version ({expected_identity}); it is now {identity}. "
            "Run the pipeline again to ingest the new data"
        )
    source = _open(uri, options, cache_dir, limits, identity)
    source.identity = identity
    return source


def _open(uri: str, options: S3Options, cache_dir: Path, limits: SourceLimits, identity: str) -> DataSource:
    if is_s3_uri(uri):
        if is_archive_key(parse_s3_uri(uri).key):
            return ZipSource(download_s3_object(uri, cache_dir, options, etag=etag_of(identity)), uri, limits)
        renamed: dict[str, str] = {}
        return _MirrorSource(download_prefix(uri, options, cache_dir, renamed), uri, limits, renamed)
    path = local_path(uri)
    if path.is_dir():
        return FolderSource(path, uri, limits)
    if looks_like_zip(path):  # a damaged zip is named as one (zipfile.is_zipfile says no to it)
        return ZipSource(path, uri, limits)
    raise StorageError(f"{uri}: not a zip archive or a folder")


ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")  # a member, an empty archive, a spanned archive
# Archives inside a data set are never unpacked (a layout inside one is not seen): names ending so are named instead.
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tgz", ".gz", ".bz2", ".xz", ".zst", ".7z", ".rar")


def looks_like_zip(path: Path) -> bool:
    """A ``.zip`` name or a zip signature at the start: a zip archive, whole or damaged."""
    if path.suffix.lower() == ".zip" or zipfile.is_zipfile(path):
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(4) in ZIP_SIGNATURES
    except OSError:
        return False


def is_archive_name(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)
