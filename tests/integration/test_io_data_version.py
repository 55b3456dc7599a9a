"""The data's version: new recordings under the same URI are a new version (a cache miss), unchanged data the same one."""

from __future__ import annotations

import os
import time

import pytest

from coughreg.ingest.manifest import ingest
from coughreg.io.data_version import source_identity
from coughreg.runtime.errors import StorageError
from coughreg.steps.preflight import source_version_step


def test_an_s3_object_keeps_its_version_until_it_is_uploaded_again_with_other_bytes(s3_env, bucket, coughvid_zip):
    client = s3_env.client()
    client.upload_file(str(coughvid_zip), bucket, "data/coughvid.zip")
    uri = f"s3://{bucket}/data/coughvid.zip"
    first = source_version_step(uri)
    assert first.startswith("s3-object etag=") and f"size={coughvid_zip.stat().st_size}" in first
    assert source_version_step(uri) == first  # nothing changed: the same version, a cache hit
    client.upload_file(str(coughvid_zip), bucket, "data/coughvid.zip")  # the same bytes again
    assert source_version_step(uri) == first
    client.put_object(Bucket=bucket, Key="data/coughvid.zip", Body=coughvid_zip.read_bytes() + b"\0")  # new recordings
    assert source_version_step(uri) != first


def test_a_versioned_bucket_names_the_object_version(s3_env, bucket):
    client = s3_env.client()
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    put = client.put_object(Bucket=bucket, Key="v.zip", Body=b"zip bytes")
    assert f"version={put['VersionId']}" in source_identity(f"s3://{bucket}/v.zip")


def test_a_prefix_changes_when_an_object_is_added(s3_env, bucket):
    client = s3_env.client()
    for name in ("metadata_compiled.csv", "a.webm"):
        client.put_object(Bucket=bucket, Key=f"release/{name}", Body=name.encode())
    first = source_identity(f"s3://{bucket}/release/")
    assert first.startswith("s3-prefix sha256=") and first.endswith("objects=2")
    assert source_identity(f"s3://{bucket}/release") == first  # the trailing slash does not matter
    client.put_object(Bucket=bucket, Key="release/b.ogg", Body=b"b")
    assert source_identity(f"s3://{bucket}/release/").endswith("objects=3")


def test_a_prefix_read_after_a_deletion_no_longer_shows_the_deleted_object(s3_env, bucket, tmp_path):
    from coughreg.io.sources import open_source

    client = s3_env.client()
    for name in ("metadata_compiled.csv", "a.webm", "b.webm"):
        client.put_object(Bucket=bucket, Key=f"release/{name}", Body=name.encode())
    assert open_source(f"s3://{bucket}/release/", cache_dir=tmp_path / "cache").names == ["a.webm", "b.webm", "metadata_compiled.csv"]
    client.delete_object(Bucket=bucket, Key="release/b.webm")
    again = open_source(f"s3://{bucket}/release/", cache_dir=tmp_path / "cache")  # the same download cache
    assert again.names == ["a.webm", "metadata_compiled.csv"] and again.identity.endswith("objects=2")


def test_local_files_and_folders(tmp_path):
    archive = tmp_path / "data.zip"
    archive.write_bytes(b"one")
    first = source_identity(str(archive))
    os.utime(archive, (time.time() + 100, time.time() + 100))
    assert source_identity(f"file://{archive}") == first  # a file is its content
    archive.write_bytes(b"two")
    assert source_identity(str(archive)) != first
    folder = tmp_path / "release"
    folder.mkdir()
    (folder / "a.webm").write_bytes(b"a")
    listing = source_identity(str(folder))
    (folder / "b.ogg").write_bytes(b"b")
    assert source_identity(str(folder)) != listing and source_identity(str(folder)).endswith("files=2")


def test_missing_data_is_named(s3_env, bucket, tmp_path):
    with pytest.raises(StorageError, match=f"s3://{bucket}/missing.zip: no such object"):
        source_identity(f"s3://{bucket}/missing.zip")
    with pytest.raises(StorageError, match="s3://no-such-bucket: bucket does not exist"):
        source_identity("s3://no-such-bucket/data.zip")
    with pytest.raises(StorageError, match=f"s3://{bucket}/empty/: no objects under this prefix"):
        source_identity(f"s3://{bucket}/empty/")
    with pytest.raises(StorageError, match="no such file or folder"):
        source_identity(str(tmp_path / "missing.zip"))


def test_ingest_refuses_data_that_changed_after_its_version_was_resolved(s3_env, bucket, coughvid_zip, config, tmp_path):
    client = s3_env.client()
    client.upload_file(str(coughvid_zip), bucket, "coughvid.zip")
    uri = f"s3://{bucket}/coughvid.zip"
    resolved = source_version_step(uri)
    client.put_object(Bucket=bucket, Key="coughvid.zip", Body=coughvid_zip.read_bytes() + b"\0")
    with pytest.raises(StorageError) as error:
        ingest(uri, tmp_path / "stale", config, source_version=resolved)
    assert resolved in str(error.value) and source_identity(uri) in str(error.value) and uri in str(error.value)
    assert not (tmp_path / "stale" / "manifest.parquet").exists()
    result = ingest(uri, tmp_path / "fresh", config, source_version=source_identity(uri))
    assert result.counts["ok"] == 24
