"""Object storage against a real S3 endpoint on loopback (auth enforced), over HTTP."""

from __future__ import annotations

import pytest

from coughreg.io.local_s3 import Credentials
from coughreg.io.storage import S3Options, atomic_path, download_s3_object, local_path
from coughreg.runtime.errors import StorageError


def test_download_uses_the_standard_aws_variables_and_caches_by_etag(s3_env, bucket, coughvid_zip, tmp_path, fault_proxy, monkeypatch):
    s3_env.client().upload_file(str(coughvid_zip), bucket, "datasets/coughvid.zip")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", fault_proxy.endpoint_url)  # through the counting proxy
    first = download_s3_object(f"s3://{bucket}/datasets/coughvid.zip", tmp_path / "cache")
    assert first.read_bytes() == coughvid_zip.read_bytes()
    downloaded = fault_proxy.bytes_down
    assert downloaded > coughvid_zip.stat().st_size
    second = download_s3_object(f"s3://{bucket}/datasets/coughvid.zip", tmp_path / "cache")
    assert second == first
    assert fault_proxy.bytes_down - downloaded < 5_000  # a HEAD request, not the object again


def test_a_changed_object_is_downloaded_again(s3_env, bucket, tmp_path):
    client = s3_env.client()
    client.put_object(Bucket=bucket, Key="a.zip", Body=b"one")
    first = download_s3_object(f"s3://{bucket}/a.zip", tmp_path / "cache")
    client.put_object(Bucket=bucket, Key="a.zip", Body=b"two!")
    second = download_s3_object(f"s3://{bucket}/a.zip", tmp_path / "cache")
    assert first != second and second.read_bytes() == b"two!"


def test_every_get_is_pinned_to_the_version_seen(s3_env, bucket, tmp_path, fault_proxy):
    """Small objects too: a GET without If-Match could mix in an object replaced meanwhile."""
    client = s3_env.client()
    first = client.put_object(Bucket=bucket, Key="small.zip", Body=b"small zip")
    path = download_s3_object(f"s3://{bucket}/small.zip", tmp_path / "cache", S3Options(endpoint_url=fault_proxy.endpoint_url))
    assert path.read_bytes() == b"small zip"
    gets = [head for head in fault_proxy.request_heads if head.startswith("get ")]
    assert gets and all(f"if-match: {first['ETag']}" in head for head in gets)
    client.put_object(Bucket=bucket, Key="small.zip", Body=b"replaced")  # a run that resolved the first version
    with pytest.raises(StorageError, match="no longer the version this run resolved"):
        download_s3_object(f"s3://{bucket}/small.zip", tmp_path / "other-cache", etag=first["ETag"].strip('"'))


def test_wrong_keys_are_refused_without_leaking_the_secret(s3_server, bucket, tmp_path, monkeypatch):
    s3_server.client().put_object(Bucket=bucket, Key="a.zip", Body=b"x")
    wrong = Credentials(s3_server.credentials.access_key_id, "not-the-secret-1234")
    for key, value in wrong.env(s3_server.endpoint_url).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(StorageError) as error:
        download_s3_object(f"s3://{bucket}/a.zip", tmp_path / "cache")
    assert f"s3://{bucket}/a.zip" in str(error.value)
    assert "access denied" in str(error.value) or "403" in str(error.value)
    assert "not-the-secret-1234" not in str(error.value)


def test_missing_bucket_and_missing_key_are_named(s3_env, bucket, tmp_path):
    with pytest.raises(StorageError, match="s3://no-such-bucket: bucket does not exist"):
        download_s3_object("s3://no-such-bucket/a.zip", tmp_path / "cache")
    with pytest.raises(StorageError, match=f"s3://{bucket}/missing.zip: no such object"):
        download_s3_object(f"s3://{bucket}/missing.zip", tmp_path / "cache")


def test_a_connection_cut_mid_download_is_retried_to_completion(s3_env, bucket, coughvid_zip, tmp_path, fault_proxy):
    s3_env.client().upload_file(str(coughvid_zip), bucket, "cut.zip")
    fault_proxy.cut_next(after_bytes=200_000, connections=2)
    path = download_s3_object(
        f"s3://{bucket}/cut.zip", tmp_path / "cache", S3Options(endpoint_url=fault_proxy.endpoint_url)
    )
    assert fault_proxy.cuts_done >= 1
    assert path.read_bytes() == coughvid_zip.read_bytes()
    assert not list(path.parent.glob("*.partial"))


def test_atomic_path_leaves_nothing_when_the_write_fails(tmp_path):
    target = tmp_path / "artifact.bin"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_local_paths_and_file_uris(tmp_path):
    assert local_path(f"file://{tmp_path}/a b.zip") == tmp_path / "a b.zip"
    assert local_path(str(tmp_path)) == tmp_path
    with pytest.raises(StorageError, match="unsupported URI scheme"):
        local_path("gs://bucket/x.zip")


def test_anonymous_access_to_a_public_bucket_sends_no_signature(public_s3, coughvid_zip, tmp_path, config):
    """--no-sign-request semantics: unsigned requests (no Authorization header) to a public endpoint."""
    import boto3

    from coughreg.artifacts import read_manifest
    from coughreg.ingest.manifest import ingest
    from tests.helpers.tcp_proxy import FaultProxy

    owner = boto3.client("s3", endpoint_url=public_s3, region_name="us-east-1",
                         aws_access_key_id="owner", aws_secret_access_key="owner")
    owner.create_bucket(Bucket="open-coughs", ACL="public-read")
    owner.upload_file(str(coughvid_zip), "open-coughs", "coughvid.zip", ExtraArgs={"ACL": "public-read"})
    host, port = public_s3.rsplit("//", 1)[1].split(":")
    proxy = FaultProxy(host, int(port))
    try:
        options = S3Options(endpoint_url=proxy.endpoint_url, region="us-east-1", anonymous=True)
        ingest("s3://open-coughs/coughvid.zip", tmp_path / "ingest", config, s3=options, cache_dir=tmp_path / "cache")
    finally:
        proxy.close()
    manifest, _ = read_manifest(tmp_path / "ingest")
    assert (manifest["status"] == "ok").sum() == 24
    assert proxy.requests and not any(proxy.requests)  # every request unsigned
