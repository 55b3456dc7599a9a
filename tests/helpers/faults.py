"""What the fault tests share: the command line in a subprocess, its last error, and damaged inputs."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tests.conftest import PROJECT, REAL_COUGHS

REAL = sorted(REAL_COUGHS.glob("*.mp3"))


LONG_ASCII = "a" * (250 - len(".mp3")) + ".mp3"  # 250 bytes: a legal name whose temporary name was not


LONG_ACCENTS = "é" * 130 + ".mp3"  # 264 bytes: more than any file system's name; a zip or S3 holds it


def cli(*args, cwd=PROJECT, env=None, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "pipeline.py", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})}, preexec_fn=preexec_fn, check=False)


def last_error(done: subprocess.CompletedProcess) -> str:
    return done.stderr.strip().splitlines()[-1]


def no_traceback(done: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in done.stderr, done.stderr[-3000:]


def partials(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith((".partial", ".link"))]


@contextlib.contextmanager
def small_file_system(folder: Path, size: str):
    """A real tmpfs of ``size``; None when this machine does not allow mounting one (then the caller limits
    the file size of its subprocess instead: the writer sees EFBIG, the same class of fault)."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = shutil.which("mount") is not None and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, check=False).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], check=False)


def tampered_ingest(tiny_run, tmp_path: Path, how: str, test_rows: int = 0, among: set | None = None) -> tuple[Path, str, str]:
    """A copy of the tiny run's ingest folder whose manifest sends one accepted row (of ``among``, when given) to a
    REAL recording outside the folder (reading it would succeed); ``test_rows`` rows (that one first) become test
    rows. Returns the folder, the row's id and the path written."""
    ingest = tmp_path / "ingest"
    shutil.copytree(tiny_run["ingest"], ingest)
    table = pq.read_table(ingest / "manifest.parquet")
    frame = table.to_pandas()
    ok = list(frame.index[(frame["status"] == "ok") & (frame["id"].isin(among) if among else True)])
    victim = frame.loc[ok[0], "id"]
    outside = tmp_path / "outside.webm"
    shutil.copy(ingest / frame.loc[ok[0], "audio_path"], outside)
    path = {"climbs-out": "audio/../../outside.webm", "absolute": str(outside)}[how]
    frame.loc[ok[0], "audio_path"] = path
    frame.loc[ok[:test_rows], "split"] = "test"
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(table.schema.metadata),
                   ingest / "manifest.parquet")
    return ingest, victim, path


def refusal(ingest: Path, victim: str, path: str) -> str:
    return (f"{ingest / 'manifest.parquet'}: the row of {victim!r} names audio_path {path!r}, which is outside "
            f"{ingest / 'audio'}; that row is refused (the manifest was changed after ingest: run the ingest step again)")
