"""Storage URIs (``s3://``, ``file://``, plain paths), the S3 client, and atomic local writes.

The S3 client follows boto3's standard credential chain and ``AWS_*`` variables, including
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` for S3-compatible stores (MinIO, SeaweedFS, Ceph).
Credentials are never logged: messages name buckets and keys only. Every URI that enters the product
(a command's argument, a config key, a pipeline parameter) goes through ``checked_uri``, which refuses
credentials written into it (``s3://KEY:SECRET@bucket/...``) without repeating them.

A write that fails because the file system is full, over quota or read-only is one message naming
the folder (``StorageError``), never a bare ``Errno 28``; its temporary file is removed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from coughreg.io.retry_budget import BudgetSpent, Outage, ShortRead
from coughreg.runtime.env import CACHE_ENV
from coughreg.runtime.errors import StorageError
from coughreg.scoring.filenames import fitting_name, temporary_file, temporary_folder
from coughreg.scoring.folder import sha256_file  # noqa: F401 - one place (every scorer folder carries it)

log = logging.getLogger(__name__)

_UMASK = os.umask(0)
os.umask(_UMASK)
DEFAULT_CACHE = Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "coughreg"))


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True)
class S3Options:
    """How to reach S3. Everything left None comes from the standard AWS chain and ``AWS_*`` variables."""

    endpoint_url: str | None = None
    region: str | None = None
    anonymous: bool = False
    max_attempts: int = 2  # botocore's tries of one request; past them, the retry budget
    max_concurrency: int = 8
    connect_timeout: float = 60.0
    read_timeout: float = 60.0
    retry_budget_seconds: float = 120.0  # failures in a row waited out (``coughreg.io.retry_budget``)


def is_s3_uri(uri: str) -> bool:
    return str(uri).startswith("s3://")


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _authority(text: str) -> str | None:
    """What follows ``scheme://`` up to the first ``/``, ``?`` or ``#``; None when ``text`` is not a URI."""
    match = _SCHEME.match(text)
    if match is None:
        return None
    return re.split(r"[/?#]", text[match.end():], maxsplit=1)[0]


def has_credentials(uri: str | Path) -> bool:
    """Whether a URI carries user info: ``user@``, ``user:secret@``, or a secret holding ``/`` (which
    ends the host early: ``s3://KEY:SE/CRET@bucket`` leaves ``KEY:SE``, not a host[:port])."""
    authority = _authority(str(uri))
    if authority is None:
        return False
    if "@" in authority or (str(uri).startswith("s3://") and ":" in authority):  # no bucket name holds a colon
        return True
    host = re.sub(r"^\[[^\]]*\]", "", authority)  # an IPv6 literal holds colons of its own
    port = host.rsplit(":", 1)[1] if ":" in host else ""
    return bool(port) and not port.isdigit()


def redacted(uri: str | Path) -> str:
    """A URI as a message may show it: with any user info replaced by ``***`` (everything up to the last
    ``@``, or all but the scheme when there is none)."""
    text = str(uri)
    if not has_credentials(text):
        return text
    scheme = _SCHEME.match(text).group(0)
    rest = text[len(scheme):]
    return f"{scheme}***@{rest.rsplit('@', 1)[1]}" if "@" in rest else f"{scheme}***"


def checked_uri(uri: str | Path, argument: str | None = None) -> str:
    """``uri`` unchanged when it carries no credentials. The one check every URI entering the product passes.

    Args:
        uri: an ``s3://``, ``file://`` or ``http(s)://`` URI, or a plain path (always accepted here).
        argument: what the URI was given as (``--data``, ``cluster.checkpoint_uri``), named in the message.

    Raises:
        StorageError: the URI holds user info; the message shows it with the user info replaced by ``***``.
    """
    text = str(uri)
    if has_credentials(text):
        where = f"{argument}: " if argument else ""
        raise StorageError(f"{where}{redacted(text)}: credentials in a URI are not accepted (they would be written "
                           "into logs, configs and the compiled pipeline); use the AWS_* variables, a profile or a Secret")
    return text


def parse_s3_uri(uri: str) -> S3Location:
    parsed = urlparse(checked_uri(uri))
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageError(f"{uri}: not an s3://bucket/key URI")
    return S3Location(parsed.netloc, parsed.path.lstrip("/"))


def local_path(uri: str | Path) -> Path:
    """A plain path or a ``file://`` URI as a local path."""
    text = checked_uri(uri)
    if text.startswith("file://"):
        return Path(unquote(urlparse(text).path))
    if "://" in text:
        raise StorageError(f"{text}: unsupported URI scheme (use s3://, file:// or a local path)")
    return Path(text).expanduser()


def s3_client(options: S3Options | None = None):
    """A boto3 S3 client with adaptive retries; endpoint and region from options or the environment."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    options = options or S3Options()
    config = Config(
        retries={"mode": "adaptive", "max_attempts": options.max_attempts},
        signature_version=UNSIGNED if options.anonymous else None,
        max_pool_connections=max(10, options.max_concurrency * 2),
        connect_timeout=options.connect_timeout, read_timeout=options.read_timeout,
    )
    kwargs = {"config": config}
    if options.endpoint_url:
        kwargs["endpoint_url"] = options.endpoint_url
    if options.region:
        kwargs["region_name"] = options.region
    # A fresh session reads the environment now (boto3's default session keeps what it saw first).
    return boto3.session.Session().client("s3", **kwargs)


def describe_client_error(exc: Exception, uri: str) -> StorageError:
    """Turn a botocore error into a message that names the URI and says what to check."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return StorageError(
            f"{uri}: no S3 credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, "
            "or use anonymous access for a public bucket"
        )
    if isinstance(exc, EndpointConnectionError):
        return StorageError(f"{uri}: cannot reach the S3 endpoint ({exc.kwargs.get('endpoint_url', 'unknown')})")
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchBucket",):
            return StorageError(f"{uri}: bucket does not exist")
        if code in ("NoSuchKey", "404", "NotFound"):
            return StorageError(f"{uri}: no such object")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"):
            return StorageError(f"{uri}: access denied ({code}); check the credentials and the bucket policy")
        return StorageError(f"{uri}: S3 error {code or status}: {error.get('Message', '')}".rstrip(": "))
    return StorageError(f"{uri}: {type(exc).__name__}: {exc}")


def download_s3_object(
    uri: str, cache_dir: Path | None = None, options: S3Options | None = None, client=None, etag: str | None = None
) -> Path:
    """Download one object into a local cache keyed by its ETag; a rerun reuses the cached file.

    The object comes in ranged GETs of ``PART_BYTES`` (``max_concurrency`` at once), each pinned to the ETag
    (``IfMatch``) so an object replaced mid-download fails instead of mixing versions. With ``etag``, the object
    must still be that version. Failures that pass (an outage, a dropped connection) are tried again within
    ``options.retry_budget_seconds`` (``coughreg.io.retry_budget``); every part that arrived whole is kept, also
    when the budget runs out, and a next run fetches only the others. The file is written under a fixed
    temporary name (``.download.partial``, beside its record of whole parts) and renamed when complete,
    so an interrupted download never looks complete.
    """
    location = parse_s3_uri(uri)
    options = options or S3Options()
    client = client or s3_client(options)
    head = head_object(client, location, options.retry_budget_seconds, **({"IfMatch": f'"{etag}"'} if etag else {}))
    quoted = str(head.get("ETag", ""))
    etag = quoted.strip('"') or "no-etag"
    cache_dir = Path(cache_dir or DEFAULT_CACHE)
    key_digest = hashlib.sha256(f"{location.bucket}/{location.key}".encode()).hexdigest()[:16]
    name = fitting_name(Path(location.key).name or "object")  # an S3 key's last part may be longer than a file name can be
    target = cache_dir / "s3" / key_digest / etag.replace("/", "_") / name
    size = int(head.get("ContentLength", 0))
    if target.exists() and target.stat().st_size == size:
        log.info("%s: cached (ETag %s) at %s", uri, etag, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent):  # one process downloads an object version; another waits and finds it cached
        if target.exists() and target.stat().st_size == size:
            return target
        log.info("%s: downloading %.1f MB", uri, size / 2**20)
        try:
            _download_parts(client, location, quoted or None, size, target, options)
        except Exception as exc:
            error = storage_error(exc, target)
            if error is None:
                raise
            raise error from None
    return target


def head_object(client, location: S3Location, retry_budget: float = 0.0, **kwargs) -> dict:
    """HEAD one object; a missing object and a missing bucket are told apart, a replaced version (412) is named.
    Failures that pass are tried again for ``retry_budget`` seconds (``coughreg.io.retry_budget``)."""
    from botocore.exceptions import BotoCoreError, ClientError

    outage = Outage(location.uri, retry_budget)
    try:
        return outage.call(lambda: client.head_object(Bucket=location.bucket, Key=location.key, **kwargs))
    except (ClientError, BotoCoreError) as exc:
        code = exc.response.get("Error", {}).get("Code") if isinstance(exc, ClientError) else None
        if code in ("PreconditionFailed", "412"):
            raise StorageError(f"{location.uri}: the object is no longer the version this run resolved (it was replaced); run again") from None
        if code in ("404", "NoSuchKey", "NotFound"):
            try:
                client.head_bucket(Bucket=location.bucket)
            except ClientError as bucket_exc:
                if bucket_exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket", "NotFound"):
                    raise StorageError(f"s3://{location.bucket}: bucket does not exist") from None
                raise describe_client_error(bucket_exc, f"s3://{location.bucket}") from None
            except BotoCoreError as bucket_exc:
                raise describe_client_error(bucket_exc, f"s3://{location.bucket}") from None
        raise describe_client_error(exc, location.uri) from None


PART_BYTES = 16 * 2**20
CHUNK_BYTES = 2**20  # written as it arrives: a part is never held whole in memory
DOWNLOADING = ".download.partial"  # the object being downloaded, beside its final name
WHOLE_PARTS = ".download.parts.partial"  # which of its parts arrived whole (JSON), kept for a next run


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` (flock on the directory itself: no lock file is left behind)."""
    import fcntl

    handle = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # releases the lock


def _download_parts(client, location: S3Location, etag: str | None, size: int, target: Path, options: S3Options) -> None:
    """Ranged, pinned GETs into ``target``'s temporary file, resuming from the parts a run before kept whole."""
    from concurrent.futures import ThreadPoolExecutor

    from botocore.exceptions import BotoCoreError, ClientError

    partial, record = target.parent / DOWNLOADING, target.parent / WHOLE_PARTS
    count = max(1, -(-size // PART_BYTES))
    whole = _whole_parts(partial, record, size, count)
    if whole:
        log.info("%s: %d of %d parts kept from an earlier run", location.uri, len(whole), count)
    else:
        with open(partial, "wb") as handle:
            handle.truncate(size)
    outage = Outage(location.uri, options.retry_budget_seconds)
    lock = threading.Lock()

    def part(index: int) -> None:
        start, end = index * PART_BYTES, min(size, (index + 1) * PART_BYTES)
        outage.call(lambda: _get_range(client, location, etag, start, end, partial))
        with lock:
            whole.add(index)
            atomic_write_text(record, json.dumps({"size": size, "parts": count, "whole": sorted(whole)}))

    try:
        with ThreadPoolExecutor(max(1, options.max_concurrency)) as pool:
            futures = [pool.submit(part, index) for index in range(count) if index not in whole]
            try:
                for future in futures:
                    future.result()
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    except BudgetSpent as exc:
        raise BudgetSpent(f"{exc}; {len(whole)} of {count} parts were downloaded whole and are kept "
                          f"in {target.parent}: a next run fetches only the rest") from None
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        if code in ("PreconditionFailed", "412"):
            partial.unlink(missing_ok=True)
            record.unlink(missing_ok=True)
            raise StorageError(f"{location.uri}: the object changed during the download; run again") from None
        raise describe_client_error(exc, location.uri) from None
    except BotoCoreError as exc:
        raise describe_client_error(exc, location.uri) from None
    if partial.stat().st_size != size:
        raise StorageError(f"{location.uri}: download incomplete ({partial.stat().st_size} of {size} bytes); run again")
    os.chmod(partial, 0o666 & ~_UMASK)
    os.replace(partial, target)
    record.unlink(missing_ok=True)


def _whole_parts(partial: Path, record: Path, size: int, count: int) -> set[int]:
    """The parts an earlier run downloaded whole into ``partial`` (none when its record does not fit this object)."""
    try:
        kept = json.loads(record.read_text())
        if partial.stat().st_size == size and kept.get("size") == size and kept.get("parts") == count:
            return {int(index) for index in kept.get("whole", []) if 0 <= int(index) < count}
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    return set()


def _get_range(client, location: S3Location, etag: str | None, start: int, end: int, path: Path) -> None:
    """Bytes [start, end) of the object (pinned to ``etag``) written at ``start`` of ``path``, flushed to disk."""
    if end <= start:
        return
    response = client.get_object(Bucket=location.bucket, Key=location.key, Range=f"bytes={start}-{end - 1}",
                                 **({"IfMatch": etag} if etag else {}))
    written = 0
    with open(path, "r+b") as handle:
        handle.seek(start)
        for chunk in response["Body"].iter_chunks(CHUNK_BYTES):
            handle.write(chunk)
            written += len(chunk)
        if written != end - start:
            raise ShortRead(f"{end - start - written} bytes of bytes={start}-{end - 1} missing")
        handle.flush()
        os.fsync(handle.fileno())


def list_s3_prefix(uri: str, options: S3Options | None = None, client=None) -> Iterator[dict]:
    """Every object under an ``s3://bucket/prefix/``, streamed page by page (each page tried within the retry budget)."""
    from botocore.exceptions import BotoCoreError, ClientError

    location = parse_s3_uri(uri)
    options = options or S3Options()
    client = client or s3_client(options)
    outage = Outage(uri, options.retry_budget_seconds)
    token: dict = {}
    try:
        while True:
            page = outage.call(lambda token=token: client.list_objects_v2(Bucket=location.bucket, Prefix=location.key, **token))
            yield from page.get("Contents", [])
            if not page.get("IsTruncated") or not page.get("NextContinuationToken"):
                return
            token = {"ContinuationToken": page["NextContinuationToken"]}
    except (ClientError, BotoCoreError) as exc:
        raise describe_client_error(exc, uri) from None


def upload_file(path: Path, uri: str, options: S3Options | None = None, client=None) -> None:
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    location = parse_s3_uri(uri)
    client = client or s3_client(options)
    try:
        client.upload_file(str(path), location.bucket, location.key)
    except (ClientError, BotoCoreError) as exc:
        raise describe_client_error(exc, uri) from None
    except S3UploadFailedError as exc:  # the transfer manager's wrapper around a ClientError
        cause = exc.__cause__ or exc.__context__
        raise (describe_client_error(cause, uri) if isinstance(cause, (ClientError, BotoCoreError))
               else StorageError(f"{uri}: upload failed: {exc}")) from None


_SPACE = "free space there or write to a larger volume"
_NO_ROOM = {  # errno -> (what happened, what to do)
    errno.ENOSPC: ("no space left on the device", _SPACE),
    errno.EDQUOT: ("the disk quota is used up", _SPACE),
    errno.EFBIG: ("the file is larger than the file system (or this process's file size limit) allows",
                  "raise the limit or write to another volume"),
    errno.EROFS: ("the file system is read-only", "write to a writable folder"),
}
_LOW_SPACE_BYTES = 2**20


def _no_room(exc: Exception, folder: Path) -> tuple[str, str] | None:
    """Why writes to ``folder`` fail, and what to do, when ``exc`` came from a full (or read-only) file system.

    Writers name a full disk differently: ``OSError`` 28, Arrow's and safetensors' text ("errno 28",
    "os error 28"), or a ``RuntimeError`` from torch's writer ("unexpected pos") with nothing else to go
    on; that last kind is told by the file system having (almost) no space left now.
    """
    code = getattr(exc, "errno", None)
    if code in _NO_ROOM:
        return _NO_ROOM[code]
    text = str(exc).lower()
    if "no space left on device" in text or "errno 28" in text or "os error 28" in text:
        return _NO_ROOM[errno.ENOSPC]
    if "file too large" in text or "errno 27" in text or "os error 27" in text:
        return _NO_ROOM[errno.EFBIG]
    if not isinstance(exc, RuntimeError):
        return None
    try:
        stats = os.statvfs(folder)
    except OSError:
        return None
    return _NO_ROOM[errno.ENOSPC] if stats.f_bavail * stats.f_frsize < _LOW_SPACE_BYTES else None


def storage_error(exc: Exception, target: Path) -> StorageError | None:
    """The message for a write to ``target`` that failed for lack of room, naming the folder; None otherwise."""
    found = _no_room(exc, Path(target).parent)
    if found is None:
        return None
    reason, remedy = found
    return StorageError(f"{Path(target).parent}: {reason} (while writing {Path(target).name}); {remedy}, then run the step again")


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only on success.

    The temporary name fits the file system whatever ``target``'s name (``coughreg.scoring.filenames``).

    Raises:
        StorageError: the file system is full, over quota or read-only (naming the folder).
    """
    target = Path(target)
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_file(target)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts are read by other users and pods
        yield tmp
        if tmp.exists():
            os.chmod(tmp, 0o666 & ~_UMASK)  # writers that recreate the file (safetensors) reset the mode
        os.replace(tmp, target)
    except Exception as exc:
        error = storage_error(exc, target)
        if error is None:
            raise
        raise error from None
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()


def atomic_write_bytes(target: Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())


def atomic_write_text(target: Path, text: str) -> None:
    atomic_write_bytes(Path(target), text.encode("utf-8"))


@contextlib.contextmanager
def staged_folder(target: Path, last: str) -> Iterator[Path]:
    """Build a folder's files beside ``target`` and move them in only when the block succeeds.

    A block that fails leaves ``target`` as it was (nothing half written). On success, ``target``'s old
    ``last`` file (what marks the folder finished) is removed first, every file is moved in, and
    ``last`` is moved in last: a reader never sees a finished folder holding a mix.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_folder(target)
    try:
        yield tmp
        target.mkdir(exist_ok=True)
        (target / last).unlink(missing_ok=True)
        files = [p for p in tmp.rglob("*") if p.is_file() or p.is_symlink()]
        for path in sorted(files, key=lambda p: (p.relative_to(tmp).as_posix() == last, p.as_posix())):
            destination = target / path.relative_to(tmp)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(path, destination)  # a rename (the folders share a file system unless target is a mount)
    except StorageError as exc:  # named after the folder being built, which is gone once this returns
        raise StorageError(str(exc).replace(str(tmp), str(target))) from None
    except Exception as exc:
        error = storage_error(exc, target / last)
        if error is None:
            raise
        raise error from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def upload_folder(folder: Path, uri: str, options: S3Options | None = None) -> int:
    """Every file under ``folder`` to ``s3://bucket/prefix/`` (symbolic links followed); returns the count."""
    from concurrent.futures import ThreadPoolExecutor

    location = parse_s3_uri(uri if uri.endswith("/") else uri + "/")
    client = s3_client(options)
    files = [p for p in sorted(Path(folder).rglob("*")) if p.is_file()]

    def put(path: Path) -> None:
        upload_file(path, f"s3://{location.bucket}/{location.key}{path.relative_to(folder).as_posix()}", options, client)

    with ThreadPoolExecutor((options or S3Options()).max_concurrency) as pool:
        list(pool.map(put, files))
    log.info("uploaded %d files to %s", len(files), location.uri)
    return len(files)
