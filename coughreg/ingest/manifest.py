"""Step 1, ingestion: a data set in S3 or on disk -> ``manifest.parquet`` + the accepted recordings.

Every metadata row and every audio file of the source appears exactly once in the manifest,
``ok`` or ``rejected`` with a reason a person understands. Accepted recordings are copied as
they came, after a probe decodes them through (nothing kept: spectrograms are the features step's
job), which proves they are audio and gives the duration that decodes, under their own names in
``audio/`` (a name part longer than a file system takes is shortened and tagged with its digest;
``source_name`` keeps the original). A recording that cannot be stored is rejected
alone; a full disk stops the step with a message naming the folder.
The manifest is written last and atomically: a folder without it is an unfinished ingest.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import hashlib
import io
import json
import logging
import posixpath
import re
import shutil
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from coughreg.artifacts import AUDIO_FOLDER, INGEST_REPORT, MANIFEST, QUALITY_HTML
from coughreg.audio.files import is_audio_name, probe_audio
from coughreg.config.loading import save_config
from coughreg.config.ownership import chain_keys
from coughreg.config.schema import ExperimentConfig
from coughreg.ingest.quality_report import quality_page, quality_summary
from coughreg.io.sources import DataSource, SourceLimits, is_archive_name, open_source, safe_relative_name
from coughreg.io.storage import S3Options, atomic_path, atomic_write_text
from coughreg.runtime.errors import AudioDecodeError, CoughPipelineError, StorageError
from coughreg.runtime.resources import available_cpus
from coughreg.scoring.filenames import fitting_path

log = logging.getLogger(__name__)

COUGHVID_METADATA = "metadata_compiled.csv"
MANIFEST_SCHEMA_VERSION = 1
RESERVED_COLUMNS = (
    "id", "split", "source_name", "audio_path", "status", "reason", "duration_s", "sample_rate",
    "channels", "codec", "container", "bytes", "sha256",
)


@dataclass(frozen=True)
class Layout:
    """Where the metadata is and how its rows name recordings."""

    kind: str  # "coughvid" or "hydrogen_torch"
    tables: dict[str, str]  # split -> table name inside the source
    data_folders: dict[str, str]  # split -> folder the file names are relative to ("" = root)
    id_column: str
    audio_column: str | None  # None: derived from the id (COUGHVID)


@dataclass
class IngestResult:
    manifest_path: Path
    counts: dict[str, int]
    layout: str


# ---------------------------------------------------------------- layout detection


def _longest_existing_suffix(configured: str, exists) -> str | None:
    """Hydrogen Torch paths are absolute on its server: find the part of them that exists here."""
    parts = [p for p in configured.replace("\\", "/").split("/") if p and p != "."]
    for start in range(len(parts)):
        candidate = "/".join(parts[start:])
        if exists(candidate):
            return candidate
    return None


def detect_layout(source: DataSource, config: ExperimentConfig) -> Layout:
    """COUGHVID (``metadata_compiled.csv`` at most two folders down) or Hydrogen Torch (``train_dataframe``)."""
    names = set(source.names)
    folders = {posixpath.dirname(n) for n in names}
    folder_prefixes = {f + "/" for f in folders} | {"/".join(f.split("/")[:i]) + "/" for f in folders for i in range(1, f.count("/") + 1)}

    def file_exists(name: str) -> bool:
        return name in names

    def folder_exists(name: str) -> bool:
        return name.rstrip("/") + "/" in folder_prefixes

    dataset = config.dataset
    if dataset.train_dataframe:
        table = _longest_existing_suffix(dataset.train_dataframe, file_exists)
        if table is not None:
            tables = {"train": table}
            for split, configured in (("validation", dataset.validation_dataframe), ("test", dataset.test_dataframe)):
                if configured:
                    found = _longest_existing_suffix(configured, file_exists)
                    if found is None:
                        raise CoughPipelineError(
                            f"{source.uri}: dataset.{split}_dataframe '{configured}' is not in the data set"
                        )
                    tables[split] = found
            folders_by_split = {}
            for split in tables:
                configured = dataset.data_folder_test if split == "test" and dataset.data_folder_test else dataset.data_folder
                folder = _longest_existing_suffix(configured, folder_exists) if configured else None
                folders_by_split[split] = folder if folder is not None else posixpath.dirname(tables[split])
            return Layout("hydrogen_torch", tables, folders_by_split, id_column=dataset.audio_column, audio_column=dataset.audio_column)

    candidates = sorted((n for n in names if posixpath.basename(n) == COUGHVID_METADATA), key=lambda n: n.count("/"))
    if candidates and candidates[0].count("/") <= 2:
        table = candidates[0]
        return Layout("coughvid", {"train": table}, {"train": posixpath.dirname(table)}, id_column="uuid", audio_column=None)

    archives = sorted(n for n in names if is_archive_name(n))
    if archives:
        raise CoughPipelineError(
            f"{source.uri}: no known layout, and it holds the archive {archives[0]}"
            + (f" (and {len(archives) - 1} more)" if len(archives) > 1 else "")
            + ": archives inside a data set are not unpacked; unpack it and ingest its contents (a folder, or a zip of them)"
        )
    csvs = sorted(n for n in names if n.lower().endswith(".csv"))[:10]
    raise CoughPipelineError(
        f"{source.uri}: no known layout: neither dataset.train_dataframe "
        f"'{dataset.train_dataframe}' nor a COUGHVID '{COUGHVID_METADATA}' was found "
        f"(CSV files seen: {csvs or 'none'}). Set dataset.train_dataframe to the table's path in the data set."
    )


# ---------------------------------------------------------------- metadata tables


DELIMITERS = (",", ";", "\t")  # in this order on a tie: a comma unless the header says otherwise
DECIMAL_COMMA = re.compile(r"[+-]?\d*,\d+")


def read_metadata_table(data: bytes, where: str) -> pd.DataFrame:
    """Read a CSV as text columns, the way spreadsheets export them.

    UTF-8 (with or without BOM), UTF-16 with a BOM (Excel's "Unicode text"), else Latin-1 with a warning; the
    delimiter the header uses (comma, semicolon as in European exports, or tab). ``attrs`` keeps the header as
    written (``header``: duplicates are not renamed there) and the ``delimiter``.
    """
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        text = data.decode("utf-16")
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            try:
                text = data.decode("cp1252")
            except UnicodeDecodeError:
                text = data.decode("latin-1")
            log.warning("%s: not UTF-8; read as Latin-1/Windows-1252", where)
    if "\x00" in text:
        raise CoughPipelineError(f"{where}: the metadata table holds NUL bytes (UTF-16 without a byte order mark, or "
                                 "binary?); save it as UTF-8 CSV")
    first = text.lstrip("\r\n").split("\n", 1)[0].rstrip("\r")
    delimiter = max(DELIMITERS, key=first.count)
    header = [name.strip() for name in next(csv.reader([first], delimiter=delimiter), [])]
    try:
        table = pd.read_csv(io.StringIO(text), sep=delimiter, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise CoughPipelineError(f"{where}: cannot read the metadata table as CSV: {exc}") from None
    table.attrs.update(header=header, delimiter=delimiter)
    return table


def _conflicting_labels(first: dict, first_at: str, second: dict, second_at: str, labels: list[str]) -> str:
    """How two rows of one id disagree: each label both give, with different values (empty: they agree)."""
    differing = [label for label in labels
                 if np.isfinite(first[label]) and np.isfinite(second[label]) and first[label] != second[label]]
    return "; ".join(f"{label} {first[label]:g} ({first_at}) and {second[label]:g} ({second_at})" for label in differing)


def _parse_label(text: str, decimal_comma: bool = False) -> float:
    """A label as written: empty and NaN-like words are missing; ``0,85`` is 0.85 in a table whose cells are
    separated by semicolons (where a comma is the decimal mark).

    Raises:
        ValueError: not a number; the message says when a decimal comma was what kept it from being one.
    """
    text = text.strip()
    if text == "" or text.lower() in ("nan", "none", "null", "na", "n/a"):
        return float("nan")
    if DECIMAL_COMMA.fullmatch(text):
        if decimal_comma:
            return float(text.replace(",", "."))
        raise ValueError(f"{text!r} has a decimal comma in a comma-separated table; write it with a decimal point")
    try:
        return float(text)
    except ValueError:
        raise ValueError(repr(text[:40])) from None


# ---------------------------------------------------------------- the step


class _Rows:
    """The manifest under construction: one dict per row."""

    def __init__(self, label_columns: list[str], group_column: str | None) -> None:
        self.label_columns = label_columns
        self.group_column = group_column
        self.rows: list[dict] = []

    def add(self, **values) -> dict:
        row = {
            "id": "", "split": "train", "source_name": "", "audio_path": "", "status": "ok", "reason": "",
            "duration_s": np.nan, "sample_rate": 0, "channels": 0, "codec": "", "container": "", "bytes": 0, "sha256": "",
        }
        for label in self.label_columns:
            row[label] = np.nan
        if self.group_column:
            row[self.group_column] = ""
        row.update(values)
        self.rows.append(row)
        return row


def reject(row: dict, reason: str) -> None:
    if row["status"] == "ok":
        row["status"] = "rejected"
        row["reason"] = reason


def generator_of(comment: bytes) -> dict | None:
    """What the project's own generator (``coughreg.synth.coughvid``) wrote into the archive's comment (JSON, read as data):
    its mapping version and the noise floor that evaluation shows beside the model. None for any other archive."""
    try:
        facts = json.loads(comment.decode("utf-8")) if comment else None
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(facts, dict) or facts.get("generator") != "coughreg.synth":
        return None
    return {k: v for k, v in facts.items() if isinstance(v, (str, int, float)) and not isinstance(v, bool)}


def ingest(
    source_uri: str,
    out_dir: str | Path,
    config: ExperimentConfig,
    s3: S3Options | None = None,
    cache_dir: Path | None = None,
    workers: int | None = None,
    source_version: str | None = None,
) -> IngestResult:
    """Ingest a data set into ``out_dir``: ``manifest.parquet``, ``audio/``, report and config.

    Args:
        source_uri: ``s3://bucket/key.zip``, ``s3://bucket/prefix/``, a local zip or folder, ``file://``.
        out_dir: the step's output folder (the KFP artifact's path).
        config: the resolved experiment config.
        s3: endpoint, region, anonymous access; None takes everything from the environment.
        cache_dir: where S3 downloads are cached by ETag.
        workers: probe threads (None: 2 per core).
        source_version: the content identity the run resolved for ``source_uri``; a source that
            changed since is refused (``coughreg.io.data_version``).

    Raises:
        CoughPipelineError: the layout is unknown, a column is missing, nothing usable is left,
            or too many recordings are unusable.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / MANIFEST
    manifest_path.unlink(missing_ok=True)  # an ingest in progress never shows an old manifest
    settings = config.ingest
    limits = SourceLimits(settings.max_archive_bytes, settings.max_archive_files, settings.max_compression_ratio)
    s3 = dataclasses.replace(s3 or S3Options(), retry_budget_seconds=settings.retry_budget_seconds)
    source = open_source(source_uri, s3, cache_dir, limits, expected_identity=source_version)
    try:
        layout = detect_layout(source, config)
        log.info("%s: %s layout, tables %s", source.uri, layout.kind, layout.tables)
        manifest = _build_manifest(source, layout, config, out_dir, workers or 2 * available_cpus())
    finally:
        source.close()

    counts = Counter(row["status"] for row in manifest.rows)
    reasons = Counter(row["reason"].split(":")[0] for row in manifest.rows if row["status"] != "ok")
    missing_audio = sum(1 for row in manifest.rows if row["reason"] == REASON_NO_RECORDING)
    present = len(manifest.rows) - missing_audio
    bad = counts.get("rejected", 0) - missing_audio
    frame = _manifest_frame(manifest)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({
        **(table.schema.metadata or {}),
        b"coughreg.manifest": json.dumps({
            "schema_version": MANIFEST_SCHEMA_VERSION,
            "source": source.uri,
            "source_version": source.identity,
            "layout": layout.kind,
            "tables": layout.tables,
            "label_columns": config.dataset.label_columns,
            "group_column": manifest.group_column,
        }).encode(),
    })
    report = {
        "source": source.uri,
        "source_version": source.identity,
        "generator": generator_of(source.comment),
        "layout": layout.kind,
        "tables": layout.tables,
        "rows": len(manifest.rows),
        "ok": counts.get("ok", 0),
        "rejected": counts.get("rejected", 0),
        "metadata_rows_without_recording": missing_audio,
        "unusable_fraction_of_present": round(bad / present, 4) if present else 0.0,
        "reasons": dict(reasons.most_common()),
        "seconds": round(time.perf_counter() - started, 2),
    }
    report["quality"] = quality_summary(frame, config.dataset.label_columns, (config.ingest.label_min, config.ingest.label_max))
    atomic_write_text(out_dir / INGEST_REPORT, json.dumps(report, indent=2, default=str))
    atomic_write_text(out_dir / QUALITY_HTML, quality_page(report["quality"], report))
    save_config(config, out_dir, chain_keys("ingest"))
    if counts.get("ok", 0) == 0:
        raise CoughPipelineError(f"{source.uri}: no usable recordings (reasons: {dict(reasons.most_common(5))})")
    if present and bad / present > settings.max_invalid_fraction:
        raise CoughPipelineError(
            f"{source.uri}: {bad} of {present} recordings present are unusable ({bad / present:.0%}), more than "
            f"ingest.max_invalid_fraction {settings.max_invalid_fraction:.0%}; see {out_dir / INGEST_REPORT}"
        )
    with atomic_path(manifest_path) as tmp:
        pq.write_table(table, tmp)
    log.info(
        "ingest: %d ok, %d rejected (%s) in %.1f s -> %s",
        counts.get("ok", 0), counts.get("rejected", 0), dict(reasons.most_common(4)), report["seconds"], manifest_path,
    )
    return IngestResult(manifest_path, dict(counts), layout.kind)


REASON_NO_RECORDING = "no recording for this metadata row"
REASON_NO_METADATA = "recording without a metadata row"


def _build_manifest(source: DataSource, layout: Layout, config: ExperimentConfig, out_dir: Path, workers: int) -> _Rows:
    dataset = config.dataset
    group_column = dataset.group_fold_column
    for label in dataset.label_columns:
        if label in RESERVED_COLUMNS:
            raise CoughPipelineError(f"dataset.label_columns: '{label}' clashes with a manifest column; rename it")
    manifest = _Rows(dataset.label_columns, group_column)
    audio_names = [n for n in source.names if is_audio_name(n)]
    claimed: set[str] = set()
    seen_ids: dict[str, tuple[str, int, dict]] = {}  # id -> (table, line, manifest row) of its first row

    for split, table_name in layout.tables.items():
        where = source.describe(table_name)
        table = read_metadata_table(source.read(table_name), where)
        table.columns = [str(c).strip() for c in table.columns]
        required = [layout.id_column] + (dataset.label_columns if split != "test" else [])
        if group_column and split != "test":
            required.append(group_column)
        twice = sorted({c for c in required if table.attrs["header"].count(c) > 1})
        if twice:
            raise CoughPipelineError(f"{where}: column(s) {twice} appear more than once in the header, and which one is "
                                     "meant cannot be told; keep one of each")
        decimal_comma = table.attrs["delimiter"] == ";"
        missing = [c for c in required if c not in table.columns]
        if missing:
            raise CoughPipelineError(
                f"{where}: column(s) {missing} not found (named by the config: dataset.audio_column, "
                f"label_columns, group_fold_column); columns present: {list(table.columns)[:20]}"
            )
        folder = layout.data_folders[split]
        by_stem: dict[str, list[str]] = {}
        if layout.audio_column is None:
            # Refused members still match their id, so the row says why ("symbolic link", ...).
            for name in audio_names + sorted(n for n in source.refused if is_audio_name(n)):
                if posixpath.dirname(name) == folder:
                    by_stem.setdefault(posixpath.splitext(posixpath.basename(name))[0], []).append(name)
        for number, record in enumerate(table.to_dict("records"), start=2):  # line 1 is the header
            identifier = str(record[layout.id_column]).strip()
            row = manifest.add(id=identifier, split=split)
            if group_column and group_column in record:
                row[group_column] = str(record[group_column])
            for label in dataset.label_columns:
                if label in record:
                    try:
                        row[label] = _parse_label(str(record[label]), decimal_comma)
                    except ValueError as exc:
                        reject(row, f"label '{label}' is not a number: {exc}")
            if not identifier:
                reject(row, f"empty {layout.id_column} ({where}, line {number})")
                continue
            if identifier in seen_ids:
                first_where, first_line, first_row = seen_ids[identifier]
                same = first_where == where
                conflict = _conflicting_labels(first_row, f"line {first_line}" + ("" if same else f" of {first_where}"),
                                               row, f"line {number}" + ("" if same else f" of {where}"), dataset.label_columns)
                if conflict:
                    reason = (f"{layout.id_column} '{identifier}' is on two rows with different labels: {conflict}"
                              f"{f' of {where}' if same else ''}; both rows are rejected")
                    reject(row, reason)
                    reject(first_row, reason)
                else:
                    reject(row, f"duplicate id: also on line {first_line} of the metadata")
            else:
                seen_ids[identifier] = (where, number, row)
            if layout.audio_column is None:
                matches = by_stem.get(identifier, [])
                if len(matches) > 1:
                    reject(row, f"several recordings for one id: {sorted(matches)}")
                name = matches[0] if matches else None
            else:
                relative = safe_relative_name(identifier)
                if relative is None:
                    reject(row, f"file name points outside the data folder: {identifier!r}")
                    continue
                name = posixpath.normpath(posixpath.join(folder, relative)) if folder else relative
                if not name.startswith(folder.rstrip("/") + "/") and folder:
                    reject(row, f"file name points outside the data folder: {identifier!r}")
                    continue
                if name not in source.sizes:
                    name = None if name not in source.refused else name
            if name is None:
                reject(row, REASON_NO_RECORDING)
                continue
            if name in source.refused:
                reject(row, source.refused[name])
                row["source_name"] = name
                continue
            if name in claimed:
                reject(row, f"recording already used by another metadata row: {name}")
                row["source_name"] = name
                continue
            claimed.add(name)
            row["source_name"] = name
            if split != "test":
                for label in dataset.label_columns:
                    value = row[label]
                    if np.isnan(value):
                        reject(row, f"label '{label}' is missing")
                    elif not config.ingest.label_min <= value <= config.ingest.label_max:
                        reject(
                            row,
                            f"label '{label}' = {value:g} is outside [{config.ingest.label_min:g}, {config.ingest.label_max:g}]",
                        )

    for name in audio_names:
        if name not in claimed:
            # The id a metadata row would have used: the uuid (COUGHVID) or the path (Hydrogen Torch).
            orphan_id = posixpath.splitext(posixpath.basename(name))[0] if layout.audio_column is None else name
            manifest.add(id=orphan_id, source_name=name, split="", status="rejected", reason=REASON_NO_METADATA)
    for name, reason in source.refused.items():
        if name not in claimed and not any(r["source_name"] == name for r in manifest.rows):
            manifest.add(id=posixpath.basename(name), source_name=name, split="", status="rejected", reason=reason)

    _copy_and_probe(source, [row for row in manifest.rows if row["status"] == "ok"], config, out_dir, workers)
    return manifest


# Recordings from which probing (decoding each through) goes to one process per core: decoding holds Python's
# GIL, so threads decode one at a time; starting the processes costs about a second.
PROCESS_PROBES = 200


def _copy_and_probe(source: DataSource, rows: list[dict], config: ExperimentConfig, out_dir: Path, workers: int) -> None:
    """Read, hash, probe and store each accepted row's recording (threads for the I/O; the probes in worker
    processes when there are ``PROCESS_PROBES`` recordings or more and more than one core)."""
    cpus = available_cpus()
    probes = (ProcessPoolExecutor(cpus, mp_context=get_context("spawn"))  # no fork while threads run
              if cpus > 1 and len(rows) >= PROCESS_PROBES else None)
    try:
        _copy_and_probe_with(source, rows, config, out_dir, workers,
                             (lambda data: probes.submit(probe_audio, data).result()) if probes else probe_audio)
    except BrokenProcessPool:
        raise CoughPipelineError(f"{source.uri}: the audio decoder crashed while probing its recordings (a file FFmpeg "
                                 "cannot survive); find it with `pipeline.py score` on the recordings") from None
    finally:
        if probes is not None:
            probes.shutdown(cancel_futures=True)


def _copy_and_probe_with(source: DataSource, rows: list[dict], config: ExperimentConfig, out_dir: Path, workers: int,
                         probe) -> None:
    audio_dir = out_dir / AUDIO_FOLDER
    if audio_dir.exists():
        shutil.rmtree(audio_dir)
    audio_dir.mkdir(parents=True)
    minimum = config.ingest.min_duration_seconds
    total = len(rows)
    started = time.perf_counter()
    done = 0

    def one(row: dict) -> None:
        name = row["source_name"]
        try:
            data = source.read(name)
        except StorageError as exc:
            reject(row, f"unreadable: {exc}")
            return
        row["bytes"] = len(data)
        if not data:
            reject(row, "empty file (0 bytes)")
            return
        row["sha256"] = hashlib.sha256(data).hexdigest()
        try:
            info = probe(data)
        except AudioDecodeError as exc:
            reject(row, "undecodable: " + str(exc).split(": ", 1)[-1])
            return
        row.update(duration_s=round(info.duration_s, 4), sample_rate=info.sample_rate, channels=info.channels,
                   codec=info.codec, container=info.container)
        if info.duration_s < minimum:
            reject(row, f"shorter than {minimum:g} s ({info.duration_s:.3f} s)")
            return
        relative = f"{AUDIO_FOLDER}/{fitting_path(name)}"  # a name too long for a file system is shortened; the manifest keeps it
        try:
            with atomic_path(out_dir / relative) as tmp:
                tmp.write_bytes(data)
        except OSError as exc:  # this recording's name (a full disk is a StorageError, which stops the step)
            reject(row, f"cannot be stored as {relative}: {exc.strerror or exc}")
            return
        row["audio_path"] = relative

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for _ in pool.map(one, rows):
            done += 1
            if done % 1000 == 0 or done == total:
                rate = done / max(1e-9, time.perf_counter() - started)
                log.info("ingest: probed %d/%d recordings (%.0f/s, ETA %.0f s)", done, total, rate, (total - done) / rate)


def _manifest_frame(manifest: _Rows) -> pd.DataFrame:
    frame = pd.DataFrame(manifest.rows)
    ordered = list(RESERVED_COLUMNS) + manifest.label_columns + ([manifest.group_column] if manifest.group_column else [])
    frame = frame[ordered]
    for column in ("sample_rate", "channels", "bytes"):
        frame[column] = frame[column].astype("int64")
    frame["duration_s"] = frame["duration_s"].astype("float64")
    for label in manifest.label_columns:
        frame[label] = frame[label].astype("float64")
    frame = frame.sort_values(["status", "split", "id", "source_name"], kind="stable").reset_index(drop=True)
    return frame
