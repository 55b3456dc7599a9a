"""Ingest throughput from a loopback S3 endpoint: recordings/s, MB/s and peak memory.

    python benchmarks/bench_ingest.py [-n 26000 2600] [--pool 400] [--workdir /tmp/coughreg-bench]

Builds a COUGHVID-format zip of N recordings (metadata_compiled.csv with N rows, <uuid>.webm/.ogg),
serves it from a local S3 endpoint (signatures checked), and runs `pipeline.py step ingest` on the
s3:// URI in a child process, timing it and reading the child's peak resident memory. The audio
files are drawn from a pool of generated clips (each file is a real, distinct-named recording;
bytes repeat across the pool), so building a 26,000-file archive takes seconds instead of the
generator's ~20 minutes; ingest does the same work per file either way (read, hash, probe, copy).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import subprocess
import sys
import time
import uuid
import zipfile
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from benchmarks.memory import TreeMemorySampler  # noqa: E402
from coughreg.io.local_s3 import LocalS3  # noqa: E402
from coughreg.synth.coughvid import COUGHVID_COLUMNS, _clip_job, sample_labels  # noqa: E402


def build_archive(path: Path, n: int, pool_size: int, seed: int = 0) -> None:
    if path.exists():
        return
    pool = [_clip_job((seed, i)) for i in range(pool_size)]
    rng = np.random.default_rng(seed)
    labels = sample_labels(rng, n)
    rows = []
    tmp = path.with_suffix(".partial")
    with zipfile.ZipFile(tmp, "w", allowZip64=True) as archive:
        for i in range(n):
            clip = pool[i % pool_size]
            uid = str(uuid.UUID(bytes=rng.bytes(16), version=4))
            archive.writestr(f"public_dataset/{uid}.{clip.container}", clip.data)
            row = dict(clip.metadata, uuid=uid, cough_detected=f"{labels[i]:.4f}")
            rows.append(row)
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=COUGHVID_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        archive.writestr("public_dataset/metadata_compiled.csv", table.getvalue(), compress_type=zipfile.ZIP_DEFLATED)
    os.replace(tmp, path)


def run(n: int, pool: int, workdir: Path, server: LocalS3) -> None:
    archive = workdir / f"coughvid_{n}.zip"
    started = time.perf_counter()
    build_archive(archive, n, pool)
    size_mb = archive.stat().st_size / 2**20
    key = f"bench/coughvid_{n}.zip"
    server.client().upload_file(str(archive), "bench-data", key)
    print(f"\n== {n} recordings, {size_mb:.0f} MB zip (prepared in {time.perf_counter() - started:.0f} s)")
    out = workdir / f"ingest_{n}"
    env = {**os.environ, **server.credentials.env(server.endpoint_url), "COUGHREG_CACHE": str(workdir / f"cache_{n}")}
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "pipeline.py", "step", "ingest", "--input", f"s3://bench-data/{key}", "--out", str(out),
         "--set", "environment.seed=1"],
        cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    with TreeMemorySampler(process.pid) as sampler:
        stdout, stderr = process.communicate()
    seconds = time.perf_counter() - started
    peak_mb = sampler.peak_pss_mb
    if process.returncode != 0:
        print(stderr[-3000:])
        raise SystemExit(process.returncode)
    print(stdout.strip().splitlines()[-1])
    print(f"wall time              {seconds:.1f} s (download from S3 included)")
    print(f"recordings/s           {n / seconds:.0f}")
    print(f"MB/s                   {size_mb / seconds:.1f}")
    print(f"peak memory (PSS)      {peak_mb:.0f} MB, the ingest process tree")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, nargs="+", default=[2600, 26000])
    parser.add_argument("--pool", type=int, default=400)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/coughreg-bench"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"cores: {os.cpu_count()}")
    with LocalS3(enforce_auth=True) as server:
        server.client().create_bucket(Bucket="bench-data")
        for n in sorted(args.n):
            run(n, args.pool, args.workdir, server)


if __name__ == "__main__":
    main()
