"""S3 outages: waited out within the retry budget, or one message naming the URI with every whole part kept."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from coughreg.ingest.manifest import ingest
from tests.helpers.faults import partials

pytestmark = pytest.mark.faults


def _ingest_through(fault_proxy, bucket: str, config, tmp_path: Path, budget: float, out: str = "ingest"):
    from coughreg.io.storage import S3Options

    config.ingest.retry_budget_seconds = budget
    return ingest(f"s3://{bucket}/coughvid.zip", tmp_path / out, config, s3=S3Options(endpoint_url=fault_proxy.endpoint_url),
                  cache_dir=tmp_path / "cache")


@pytest.fixture
def small_parts(monkeypatch):
    """Parts of 64 KiB, so the test's zip comes in many of them (the cluster's are 16 MiB)."""
    from coughreg.io import storage

    monkeypatch.setattr(storage, "PART_BYTES", 64 * 2**10)
    monkeypatch.setattr(storage, "CHUNK_BYTES", 16 * 2**10)
    return storage.PART_BYTES


def test_an_s3_outage_shorter_than_the_retry_budget_is_waited_out(s3_env, bucket, fault_proxy, coughvid_zip, config,
                                                                  small_parts, tmp_path):
    """The store goes down (every connection reset) for 3 s a third of the way into the download: with a budget
    of 10 s the ingest finishes, and the parts that had arrived are not fetched again."""
    s3_env.client().upload_file(str(coughvid_zip), bucket, "coughvid.zip")
    size = coughvid_zip.stat().st_size
    fault_proxy.outage_after(size // 3, seconds=3.0)
    started = time.monotonic()
    result = _ingest_through(fault_proxy, bucket, config, tmp_path, budget=10)
    assert result.counts == {"ok": 24}
    assert fault_proxy.refused > 0 and time.monotonic() - started >= 3.0  # the outage happened and was waited out
    assert fault_proxy.bytes_down < size + 9 * small_parts + 200_000  # at most the parts in flight again (8 threads)


def test_an_s3_outage_longer_than_the_budget_fails_naming_the_uri_and_keeps_the_parts(s3_env, bucket, fault_proxy, coughvid_zip,
                                                                                      config, small_parts, tmp_path):
    """Down for 8 s with a budget of 2 s: the step fails within seconds, naming the object and the budget; the whole
    parts stay in the cache, and the run after the outage fetches only the rest."""
    from coughreg.runtime.errors import StorageError

    s3_env.client().upload_file(str(coughvid_zip), bucket, "coughvid.zip")
    size = coughvid_zip.stat().st_size
    fault_proxy.outage_after(size // 2, seconds=8.0)
    started = time.monotonic()
    with pytest.raises(StorageError) as error:
        _ingest_through(fault_proxy, bucket, config, tmp_path, budget=2)
    message = str(error.value)
    assert message.startswith(f"s3://{bucket}/coughvid.zip: S3 failed for ")
    assert "longer than the retry budget of 2 s (ingest.retry_budget_seconds)" in message
    assert "parts were downloaded whole and are kept in" in message and "a next run fetches only the rest" in message
    assert time.monotonic() - started < 8.0  # it gave up before the store came back
    assert not (tmp_path / "ingest" / "manifest.parquet").exists()
    while fault_proxy.down():
        time.sleep(0.2)
    before = fault_proxy.bytes_down
    result = _ingest_through(fault_proxy, bucket, config, tmp_path, budget=2, out="again")
    assert result.counts == {"ok": 24}
    assert fault_proxy.bytes_down - before < size * 0.75  # the half before the outage was kept
    assert not partials(tmp_path / "cache")
