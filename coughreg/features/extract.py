"""Step 2, features: accepted recordings -> log-mel Parquet shards that training streams from.

Shards depend only on the audio parameters and the manifest, never on folds or seeds, so they are
cached and reused: a rerun with the same inputs skips complete shards, and changed parameters go
to a new shard set (its folder is named by the parameters' and the manifest's hashes), never a mix.
A recording that fails to decode is reported and skipped; the others in its shard are kept, and so is a
manifest row that names a file outside the ingest folder (``coughreg.artifacts.recording_path``). A recording
is decoded and turned into its log-mel ``WINDOW_SECONDS`` at a time, so a long one costs a worker little memory.

With ``augmentation.recording_chain_views`` K, every training recording also gets K copies passed through a random
recording chain (``coughreg.audio.recording_chain.draw_chain``, drawn from the recording's id, so the same copies every
time), stored as log-mel in a second shard beside each shard (``views/...``, K rows per recording in the same
order); training draws from them. Copies cover at most the first ``VIEW_SECONDS`` of a recording.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coughreg.artifacts import (
    FEATURES_REPORT,
    MANIFEST,
    PART_REPORT,
    SHARD_INDEX,
    expected_feature_parameters,
    read_manifest,
    recording_path,
)
from coughreg.artifacts.shards import SpectrogramShardWriter, read_shard_metadata
from coughreg.audio.feature_spec import feature_hash
from coughreg.audio.recording_chain import CHAIN_VERSION
from coughreg.config.loading import save_config
from coughreg.config.ownership import chain_keys, config_values
from coughreg.config.schema import ExperimentConfig
from coughreg.io.storage import atomic_path, atomic_write_text, sha256_file
from coughreg.runtime.errors import CoughPipelineError
from coughreg.runtime.resources import available_cpus
from coughreg.scoring import readback

log = logging.getLogger(__name__)


@dataclass
class FeaturesResult:
    index_path: Path
    shards: list[Path]
    rows: int
    failures: list[dict]
    skipped_shards: int


_WORKER_FRONTEND = None


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # one process per core: threads inside would fight each other


def _frontend(params: dict):
    global _WORKER_FRONTEND
    key = json.dumps(params, sort_keys=True)
    if _WORKER_FRONTEND is None or _WORKER_FRONTEND[0] != key:
        from coughreg.audio.frontend import LogMel

        module = LogMel(
            params["sample_rate"], params["stft_window_size"], params["hop_size"], params["mel_frequency_bins"],
            params["minimum_frequency"], params["maximum_frequency"],
        ).eval()
        _WORKER_FRONTEND = (key, module)
    return _WORKER_FRONTEND[1]


WINDOW_SECONDS = 10.0  # decoded and transformed at a time: a worker's memory does not grow with a recording's length
VIEW_SECONDS = 60.0  # the longest stretch of a recording its recording-chain copies cover
MAX_COPY_FAILURE_SHARE = 0.5  # of the recordings that should have copies: more failing fails the step


def log_mel_of_file(path: Path, params: dict) -> np.ndarray:
    """Decode one recording and return its (mels, frames) log-mel as float32 (possibly a view), the whole clip's,
    computed in windows of ``WINDOW_SECONDS`` as the samples are decoded (``coughreg.audio.frontend.windowed_log_mel``)."""
    from coughreg.audio.files import DecodedStream
    from coughreg.audio.frontend import windowed_log_mel

    stream = DecodedStream(path, params["sample_rate"], max_seconds=params["max_seconds"])
    window_frames = int(WINDOW_SECONDS * params["sample_rate"]) // params["hop_size"]
    return windowed_log_mel(_frontend(params), stream, window_frames, stream.limit)


def view_rng(identifier: str, view: int) -> np.random.Generator:
    """What draws recording ``identifier``'s chain copy number ``view`` (and where its knock goes)."""
    return np.random.default_rng((CHAIN_VERSION, int.from_bytes(hashlib.sha256(str(identifier).encode()).digest()[:8], "little"), view))


def chain_views(path: Path, identifier: str, params: dict, views: int) -> list[np.ndarray]:
    """``views`` log-mels of the recording (its first ``VIEW_SECONDS``), each through its own random recording chain."""
    import torch

    from coughreg.audio.files import decode_audio
    from coughreg.audio.recording_chain import draw_chain

    rate = params["sample_rate"]
    samples = decode_audio(path, rate, max_seconds=min(VIEW_SECONDS, params["max_seconds"]))
    out = []
    for view in range(views):
        rng = view_rng(identifier, view)
        chain = draw_chain(rng)
        try:
            changed = chain(samples, rate, rng)
        except Exception as exc:  # noqa: BLE001 - named: which copy, through which chain
            raise CoughPipelineError(f"copy {view} ({chain.name}): {exc}") from exc
        with torch.inference_mode():
            out.append(_frontend(params)(torch.from_numpy(changed)[None])[0].numpy())
    return out


def _write_shard(task: dict) -> dict:
    writer = SpectrogramShardWriter(
        Path(task["path"]), task["label_columns"], task["group_column"], task["metadata"], task["row_group_rows"]
    )
    views = task.get("views", 0)
    view_writer = SpectrogramShardWriter(
        Path(task["views_path"]), task["label_columns"], task["group_column"], task["views_metadata"],
        task["row_group_rows"] * max(1, views),
    ) if views else None
    failures, copy_failures = [], []
    seconds = 0.0
    for record in task["records"]:
        path = None
        try:
            path = recording_path(task["root"], record["audio_path"], record["id"])
            log_mel = log_mel_of_file(path, task["params"])
        except CoughPipelineError as exc:  # undecodable, or a manifest row naming a file outside the ingest folder
            failures.append({"id": record["id"], "audio_path": record["audio_path"], "reason": str(exc)})
            continue
        copies = []
        if view_writer is not None and record["split"] != "test":
            try:
                copies = chain_views(path, record["id"], task["params"], views)
            except Exception as exc:  # noqa: BLE001 - a recording a chain cannot take still trains as recorded
                copy_failures.append({"id": record["id"], "audio_path": record["audio_path"], "reason": str(exc)})
        seconds += log_mel.shape[1] * task["params"]["hop_size"] / task["params"]["sample_rate"]
        writer.add(record, log_mel)
        for copy in copies:
            view_writer.add(record, copy)
    if view_writer is not None:  # first: a shard whose copies are missing is not complete
        view_writer.close({"copy_failures": copy_failures})  # kept with the copies: a rerun that skips the shard reports them
    info = writer.close()
    return {"path": str(info.path), "rows": info.rows, "failures": failures, "audio_seconds": seconds}


def _complete(path: Path, expected: dict) -> dict | None:
    """The shard's metadata when it is a whole shard made with ``expected``, else None."""
    if not path.exists():
        return None
    try:
        metadata = read_shard_metadata(path)
    except CoughPipelineError:
        return None
    return metadata if all(metadata.get(k) == v for k, v in expected.items()) else None


@dataclass
class ShardPlan:
    """Which recordings go into which shard: a pure function of the manifest and the config."""

    shard_set: str
    tasks: list[dict]
    params: dict
    manifest_hash: str
    label_columns: list[str]
    group_column: str | None


def plan_shards(ingest_dir: str | Path, config: ExperimentConfig) -> ShardPlan:
    ingest_dir = Path(ingest_dir)
    manifest, manifest_meta = read_manifest(ingest_dir)
    manifest_hash = sha256_file(ingest_dir / MANIFEST)[:16]
    label_columns = config.dataset.label_columns
    missing = [label for label in label_columns if label not in manifest.columns]
    if missing:
        raise CoughPipelineError(f"{ingest_dir / MANIFEST}: label column(s) {missing} are not in the manifest")
    group_column = config.dataset.group_fold_column
    ok = manifest[manifest["status"] == "ok"].sort_values("id", kind="stable")
    if ok.empty:
        raise CoughPipelineError(f"{ingest_dir / MANIFEST}: no accepted recordings to featurize")

    params = expected_feature_parameters(config)
    fhash = feature_hash(config.audio) + ("" if params["max_seconds"] == 600 else f"-{params['max_seconds']:g}s")
    shard_set = f"{fhash}-{manifest_hash}"
    config_hash = hashlib.sha256(json.dumps(config_values(config, chain_keys("features")), sort_keys=True).encode()).hexdigest()[:16]
    columns = ["id", "split", "audio_path", "duration_s", *label_columns] + ([group_column] if group_column in ok.columns else [])
    records = []
    for row in ok[columns].to_dict("records"):
        row["group"] = str(row.pop(group_column)) if group_column in row else ""
        records.append(row)
    size = config.features.shard_rows
    tasks = []
    for number, start in enumerate(range(0, len(records), size)):
        chunk = records[start : start + size]
        ids_hash = hashlib.sha256("\n".join(r["id"] for r in chunk).encode()).hexdigest()[:16]
        metadata = {
            "feature_parameters": params, "feature_hash": fhash, "manifest_hash": manifest_hash, "config_hash": config_hash,
            "ids_hash": ids_hash, "source": manifest_meta.get("source", ""),
        }
        task = {
            "number": number, "name": f"shards/{shard_set}/part-{number:05d}.parquet", "records": chunk, "params": params,
            "label_columns": label_columns, "group_column": group_column, "metadata": metadata,
            "row_group_rows": config.features.row_group_rows, "root": str(ingest_dir),
        }
        views = config.augmentation.recording_chain_views
        if views:
            task.update(views=views, views_name=f"views/{shard_set}-chain{CHAIN_VERSION}x{views}/part-{number:05d}.parquet",
                        views_metadata={**metadata, "views": views, "chain_version": CHAIN_VERSION,
                                        "view_seconds": min(VIEW_SECONDS, params["max_seconds"])})
        tasks.append(task)
    return ShardPlan(shard_set, tasks, params, manifest_hash, label_columns, group_column)


EXPECTED_KEYS = ("feature_hash", "manifest_hash", "ids_hash")


def task_files(task: dict) -> list[str]:
    """The files a shard task writes: its shard, and its recording-chain copies when asked for."""
    return [task["name"], *([task["views_name"]] if task.get("views") else [])]


def _task_complete(task: dict, out_dir: Path, redo_failed_copies: bool = False) -> bool:
    """Whether the task's files are whole and made with its parameters. Its copies shard must also list the copies
    that failed (older ones did not); with ``redo_failed_copies`` (a run deciding what to skip) a copies shard with
    failures is not complete either, so a rerun tries them again (a codec installed since, say)."""
    expected = {k: task["metadata"][k] for k in EXPECTED_KEYS}
    if task.get("views"):
        copies = _complete(out_dir / task["views_name"], {**expected, "views": task["views"], "chain_version": CHAIN_VERSION})
        if copies is None or "copy_failures" not in copies or (redo_failed_copies and copies["copy_failures"]):
            return False
    return _complete(out_dir / task["name"], expected) is not None


def _run_tasks(tasks: list[dict], out_dir: Path, workers: int) -> tuple[list[dict], float]:
    """Write the shards of ``tasks`` under ``out_dir`` on ``workers`` processes; complete shards are skipped."""
    started = time.perf_counter()
    todo = []
    for task in tasks:
        task = {**task, "path": str(out_dir / task["name"]),
                **({"views_path": str(out_dir / task["views_name"])} if task.get("views") else {})}
        if not _task_complete(task, out_dir, redo_failed_copies=True):
            todo.append(task)
    if len(todo) < len(tasks):
        log.info("features: %d of %d shards already complete, skipped", len(tasks) - len(todo), len(tasks))
    results, audio_seconds, clips_done = [], 0.0, 0
    clips_total = sum(len(t["records"]) for t in todo)
    if not todo:
        return results, audio_seconds
    workers = max(1, min(workers, len(todo)))
    for name in task_files(todo[0]):
        (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
    log.info("features: %d recordings in %d shards on %d processes -> %s", clips_total, len(todo), workers, out_dir)
    with ProcessPoolExecutor(workers, initializer=_worker_init) as pool:
        futures = {pool.submit(_write_shard, task): task for task in todo}
        for future in as_completed(futures):
            result = future.result()
            results.append(result)
            clips_done += len(futures[future]["records"])
            audio_seconds += result["audio_seconds"]
            elapsed = time.perf_counter() - started
            rate = clips_done / max(elapsed, 1e-9)
            log.info(
                "features: %d/%d clips (%.0f clips/s, %.0fx real time, ETA %.0f s)",
                clips_done, clips_total, rate, audio_seconds / max(elapsed, 1e-9), (clips_total - clips_done) / rate,
            )
    return results, audio_seconds


def _default_workers(config: ExperimentConfig, workers: int | None) -> int:
    return workers or config.features.workers or available_cpus()


def _finish(out_dir: Path, plan: ShardPlan, config: ExperimentConfig, failures: list[dict], skipped: int,
            seconds: float, audio_seconds: float) -> FeaturesResult:
    shards = [out_dir / task["name"] for task in plan.tasks]
    absent = [str(out_dir / task["name"]) for task in plan.tasks if not _task_complete(task, out_dir)]
    if absent:
        raise CoughPipelineError(f"{out_dir}: shards missing or incomplete: {absent[:5]}")
    rows = sum(read_shard_metadata_rows(p) for p in shards)
    if rows == 0:
        raise CoughPipelineError(f"{out_dir}: no recording could be featurized ({len(failures)} failed)")
    for failure in failures:
        log.warning("features: skipped %s: %s", failure["id"], failure["reason"])
    copy_failures = _copy_failures(out_dir, plan.tasks)
    index = {
        "shard_set": plan.shard_set,
        "shards": [task["name"] for task in plan.tasks],
        "rows": rows,
        "feature_parameters": plan.params,
        "feature_hash": plan.tasks[0]["metadata"]["feature_hash"],
        "manifest_hash": plan.manifest_hash,
        "label_columns": plan.label_columns,
        "group_column": plan.group_column,
        **({"views": plan.tasks[0]["views"], "view_shards": [task["views_name"] for task in plan.tasks],
            "chain_version": CHAIN_VERSION} if plan.tasks[0].get("views") else {}),
    }
    report = {
        "rows": rows, "shards": len(shards), "skipped_shards": skipped, "failures": failures,
        **({"copy_failures": copy_failures} if plan.tasks[0].get("views") else {}),
        "seconds": round(seconds, 2), "audio_seconds": round(audio_seconds, 1),
    }
    atomic_write_text(out_dir / FEATURES_REPORT, json.dumps(report, indent=2))
    save_config(config, out_dir, chain_keys("features"))
    atomic_write_text(out_dir / SHARD_INDEX, json.dumps(index, indent=2))  # last: the folder is finished
    log.info("features: %d rows in %d shards (%d failed) in %.1f s", rows, len(shards), len(failures), seconds)
    return FeaturesResult(out_dir / SHARD_INDEX, shards, rows, failures, skipped)


def _copy_failures(out_dir: Path, tasks: list[dict]) -> list[dict]:
    """The recordings whose recording-chain copies could not be made, from the tasks' copies shards, each reported.
    They train as recorded only; when that is more than ``MAX_COPY_FAILURE_SHARE`` of the recordings that should
    have copies (a codec missing from the image, say), the step fails rather than train without them (and a
    rerun makes those shards again)."""
    views = tasks[0].get("views") if tasks else 0
    if not views:
        return []
    failures, copied = [], 0
    for task in tasks:
        path = out_dir / task["views_name"]
        failures.extend(read_shard_metadata(path).get("copy_failures", []))
        copied += read_shard_metadata_rows(path) // views
    for failure in failures:
        log.warning("features: no recording-chain copies of %s (%s), it trains as recorded only: %s",
                    failure["id"], failure["audio_path"], failure["reason"])
    if failures and len(failures) > MAX_COPY_FAILURE_SHARE * (copied + len(failures)):
        raise CoughPipelineError(
            f"{out_dir}: recording-chain copies failed for {len(failures)} of {copied + len(failures)} recordings "
            f"(augmentation.recording_chain_views is {views}); the first: {failures[0]['id']}: {failures[0]['reason']}"
        )
    return failures


def extract_features(
    ingest_dir: str | Path, out_dir: str | Path, config: ExperimentConfig, workers: int | None = None
) -> FeaturesResult:
    """Turn the accepted recordings of an ingest folder into spectrogram shards in ``out_dir``.

    Args:
        ingest_dir: the ingest step's output (``manifest.parquet`` and ``audio/``).
        out_dir: the features output folder; the shard index ``shards.json`` is written last.
        config: the resolved experiment config (``audio.*`` and ``features.*`` are used).
        workers: processes (None: ``features.workers``, 0 there meaning one per core).
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    plan = plan_shards(ingest_dir, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SHARD_INDEX).unlink(missing_ok=True)
    results, audio_seconds = _run_tasks(plan.tasks, out_dir, _default_workers(config, workers))
    failures = [failure for result in results for failure in result["failures"]]
    skipped = len(plan.tasks) - len(results)
    return _finish(out_dir, plan, config, failures, skipped, time.perf_counter() - started, audio_seconds)


def extract_feature_part(
    ingest_dir: str | Path, out_dir: str | Path, config: ExperimentConfig, part: int, parts: int, workers: int | None = None
) -> list[Path]:
    """One of ``parts`` slices of the shard plan (shards ``part``, ``part + parts``, ...): a ParallelFor branch."""
    if not 0 <= part < parts:
        raise CoughPipelineError(f"feature part {part} is not one of 0..{parts - 1}")
    out_dir = Path(out_dir)
    plan = plan_shards(ingest_dir, config)
    mine = [task for task in plan.tasks if task["number"] % parts == part]
    out_dir.mkdir(parents=True, exist_ok=True)
    results, audio_seconds = _run_tasks(mine, out_dir, _default_workers(config, workers))
    _copy_failures(out_dir, mine)  # a part whose copies mostly failed fails here, and is not kept as a finished part
    summary = {
        "part": part, "parts": parts, "shards": [name for t in mine for name in task_files(t)],
        "failures": [f for r in results for f in r["failures"]], "audio_seconds": audio_seconds,
    }
    atomic_write_text(out_dir / PART_REPORT, json.dumps(summary, indent=2))
    return [out_dir / t["name"] for t in mine]


def collect_feature_parts(
    ingest_dir: str | Path, part_dirs: list[str | Path], out_dir: str | Path, config: ExperimentConfig
) -> FeaturesResult:
    """Gather the shards of every part into one features folder and write its index (the Collected step).

    Files are hard-linked when the parts live on the same file system, copied otherwise.
    """
    import shutil

    started = time.perf_counter()
    out_dir = Path(out_dir)
    plan = plan_shards(ingest_dir, config)
    found: dict[str, Path] = {}
    failures: list[dict] = []
    audio_seconds = 0.0
    for folder in map(Path, part_dirs):
        report_path = folder / PART_REPORT
        if not report_path.exists():
            raise CoughPipelineError(f"{folder}: not a finished feature part (no {PART_REPORT})")
        summary = readback.read_json(report_path, "run that feature part again")
        failures.extend(summary["failures"])
        audio_seconds += summary["audio_seconds"]
        for name in summary["shards"]:
            if name in found:
                raise CoughPipelineError(f"{name}: written by two feature parts ({found[name].parent} and {folder})")
            found[name] = folder / name
    expected = {name for task in plan.tasks for name in task_files(task)}
    if set(found) != expected:
        raise CoughPipelineError(
            f"feature parts do not cover the plan: missing {sorted(expected - set(found))[:5]}, "
            f"unexpected {sorted(set(found) - expected)[:5]}; were all parts run with the same config and manifest?"
        )
    (out_dir / SHARD_INDEX).unlink(missing_ok=True)
    for name, source in found.items():
        target = out_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target.unlink()
        try:
            os.link(source, target)
        except OSError:
            with atomic_path(target) as tmp:
                shutil.copyfile(source, tmp)
    return _finish(out_dir, plan, config, failures, 0, time.perf_counter() - started, audio_seconds)


def read_shard_metadata_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows
