"""Storage URIs (``s3://``, ``file://``, plain paths), the S3 client, and atomic local writes.

The S3 client follows boto3's standard credential chain and ``AWS_*`` variables, including
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` for S3-compatible stores (MinIO, SeaweedFS, Ceph).
Credentials are never logged: messages name buckets and keys only.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from coughreg.errors import StorageError
from coughreg.scoring.scorer import sha256_file  # noqa: F401 - one place (every scorer folder carries it)

log = logging.getLogger(__name__)

_UMASK = os.umask(0)
os.umask(_UMASK)
DEFAULT_CACHE = Path(os.environ.get("COUGHREG_CACHE", Path.home() / ".cache" / "coughreg"))


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
    max_attempts: int = 8
    max_concurrency: int = 8
    connect_timeout: float = 60.0
    read_timeout: float = 60.0


def is_s3_uri(uri: str) -> bool:
    return str(uri).startswith("s3://")


def parse_s3_uri(uri: str) -> S3Location:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageError(f"{uri}: not an s3://bucket/key URI")
    if "@" in parsed.netloc:  # never echo what looks like a secret
        redacted = f"s3://***@{parsed.netloc.rsplit('@', 1)[1]}{parsed.path}"
        raise StorageError(f"{redacted}: credentials in the URI are not accepted; use the AWS_* variables or a profile")
    return S3Location(parsed.netloc, parsed.path.lstrip("/"))


def local_path(uri: str | Path) -> Path:
    """A plain path or a ``file://`` URI as a local path."""
    text = str(uri)
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

    Downloads go through boto3's transfer manager: parallel ranged GETs, each part retried on its
    own when a connection drops, every request pinned to the ETag (``IfMatch``) so an object
    replaced mid-download fails instead of mixing versions. With ``etag``, the object must still be
    that version. The file lands under a temporary name first, so an interrupted download never
    looks complete.
    """
    location = parse_s3_uri(uri)
    options = options or S3Options()
    client = client or s3_client(options)
    head = head_object(client, location, **({"IfMatch": f'"{etag}"'} if etag else {}))
    quoted = str(head.get("ETag", ""))
    etag = quoted.strip('"') or "no-etag"
    cache_dir = Path(cache_dir or DEFAULT_CACHE)
    key_digest = hashlib.sha256(f"{location.bucket}/{location.key}".encode()).hexdigest()[:16]
    name = Path(location.key).name or "object"
    target = cache_dir / "s3" / key_digest / etag.replace("/", "_") / name
    size = int(head.get("ContentLength", 0))
    if target.exists() and target.stat().st_size == size:
        log.info("%s: cached (ETag %s) at %s", uri, etag, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("%s: downloading %.1f MB", uri, size / 2**20)
    with atomic_path(target) as tmp:
        _transfer(client, location, quoted or None, size, tmp, options)
        if tmp.stat().st_size != size:
            raise StorageError(f"{uri}: download incomplete ({tmp.stat().st_size} of {size} bytes)")
    return target


def head_object(client, location: S3Location, **kwargs) -> dict:
    """HEAD one object; a missing object and a missing bucket are told apart, a replaced version (412) is named."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return client.head_object(Bucket=location.bucket, Key=location.key, **kwargs)
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


def _transfer(client, location: S3Location, etag: str | None, size: int, path: Path, options: S3Options) -> None:
    """boto3's transfer manager, told the size and ETag we saw: no second HEAD, and every GET pinned to that version."""
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import BotoCoreError, ClientError
    from s3transfer.exceptions import RetriesExceededError, S3DownloadFailedError
    from s3transfer.manager import TransferManager
    from s3transfer.subscribers import BaseSubscriber

    class KnownObject(BaseSubscriber):
        def on_queued(self, future, **kwargs):
            future.meta.provide_transfer_size(size)
            if etag:
                future.meta.provide_object_etag(etag)

    # multipart_threshold=1: every object takes the ranged path, whose GETs carry IfMatch (a plain GET would not)
    config = TransferConfig(
        multipart_threshold=1, multipart_chunksize=PART_BYTES, max_concurrency=max(1, options.max_concurrency),
        num_download_attempts=options.max_attempts, use_threads=True,
    )
    try:
        with TransferManager(client, config) as manager:
            manager.download(location.bucket, location.key, str(path), subscribers=[KnownObject()]).result()
    except (S3DownloadFailedError, ClientError) as exc:
        code = exc.response.get("Error", {}).get("Code") if isinstance(exc, ClientError) else None
        if code in ("PreconditionFailed", "412") or "did not match expected ETag" in str(exc):
            raise StorageError(f"{location.uri}: the object changed during the download; run again") from None
        if isinstance(exc, ClientError):
            raise describe_client_error(exc, location.uri) from None
        raise StorageError(f"{location.uri}: download failed: {exc}") from None
    except RetriesExceededError as exc:
        raise StorageError(f"{location.uri}: download failed {options.max_attempts} times: {exc.last_exception}") from None
    except BotoCoreError as exc:
        raise describe_client_error(exc, location.uri) from None


def list_s3_prefix(uri: str, options: S3Options | None = None, client=None) -> Iterator[dict]:
    """Every object under an ``s3://bucket/prefix/``, streamed page by page."""
    from botocore.exceptions import BotoCoreError, ClientError

    location = parse_s3_uri(uri)
    client = client or s3_client(options)
    paginator = client.get_paginator("list_objects_v2")
    try:
        for page in paginator.paginate(Bucket=location.bucket, Prefix=location.key):
            yield from page.get("Contents", [])
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


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts are read by other users and pods
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, 0o666 & ~_UMASK)  # writers that recreate the file (safetensors) reset the mode
        os.replace(tmp, target)
    finally:
        if tmp.exists():
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
def atomic_directory(target: Path) -> Iterator[Path]:
    """Build a folder under a temporary name and swap it in whole when the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
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
