"""One entry point per step: what ``pipeline.py step X``, the KFP component and the training ranks all call.

Each step function takes its inputs and outputs as folders or ``s3://`` artifact URIs, the keys
given for this run (``Given``: a component's ``<step>_config`` parameter, or a config file and
``--set`` overrides), and a metrics sink (KFP's ``Metrics`` artifact, or None). It sets up logging,
reads the upstream keys from its input artifact (``coughreg.config.ownership``), runs the plain step
function, logs its figures, and publishes its outputs only when it succeeded. Settings that shape
only how a step runs (worker counts, ``cluster.checkpoint_uri``, the image) are arguments or
environment variables, never part of a cache key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coughreg import artifacts
from coughreg.config.experiment import ExperimentConfig, load_settings
from coughreg.config.ownership import UI_PARAMETERS, build_step_config, runtime_from_env
from coughreg.io.storage import DEFAULT_CACHE, S3Options, is_s3_uri
from coughreg.runtime.env import ERROR_FILE_ENV, GPU_NODE_SELECTOR_ENV, IMAGE_ENV, PIPELINE_ENV
from coughreg.runtime.errors import ConfigError, CoughPipelineError
from coughreg.runtime.names import PIPELINE_NAME
from coughreg.runtime.resources import limit_threads
from coughreg.scoring.outputs import output_folder

log = logging.getLogger(__name__)



def _pipeline_name() -> str:
    return os.environ.get(PIPELINE_ENV, PIPELINE_NAME)


@dataclass(frozen=True)
class Given:
    """The config keys given for one step run, nested as in the config, and where they came from."""

    keys: dict = field(default_factory=dict)
    where: str = "defaults"
    strict: bool = False  # a KFP parameter holds the owner's keys only
    overrides: tuple[str, ...] = ()

    @classmethod
    def parameter(cls, name: str, text: str, typed: dict[str, Any] | None = None) -> Given:
        """A component's ``<step>_config`` parameter (one line of JSON), with typed run parameters on top."""
        try:
            keys = json.loads(text) if text.strip() else {}
        except ValueError as exc:
            raise ConfigError(f"pipeline parameter {name}: not JSON ({exc})") from None
        if not isinstance(keys, dict) or not all(isinstance(v, dict) or k == "experiment_name" for k, v in keys.items()):
            raise ConfigError(f"pipeline parameter {name}: expected a JSON object of config sections, each an object of keys")
        for parameter, value in (typed or {}).items():
            section, key = UI_PARAMETERS[parameter].split(".")
            keys.setdefault(section, {})[key] = value
        for section, values in runtime_from_env().items():  # worker counts, checkpoint_uri: set on the task
            keys.setdefault(section, {}).update(values)
        return cls(keys, f"pipeline parameter {name}", strict=True)

    @classmethod
    def command_line(cls, path: str | Path | None, overrides: list[str] | None = None) -> Given:
        """A config file (optional) and ``--set`` overrides: only what they say is given."""
        where = " and ".join(filter(None, [str(path) if path else "", "--set" if overrides else ""])) or "defaults"
        return cls(load_settings(path, overrides), where, overrides=tuple(overrides or ()))

    def build(self, step: str, upstream: ExperimentConfig | None, made_by: str = "the input artifact") -> ExperimentConfig:
        """The step's config: these keys on top of the upstream keys its input was made with."""
        return build_step_config(step, self.keys, upstream, self.where, made_by, self.strict, list(self.overrides))

    def with_keys(self, keys: dict) -> Given:
        """These keys with more on top (what an earlier task resolved at run time)."""
        merged = {section: dict(values) if isinstance(values, dict) else values for section, values in self.keys.items()}
        for section, values in keys.items():
            merged.setdefault(section, {}).update(values)
        return Given(merged, self.where, self.strict, self.overrides)


def reports_errors(step: str):
    """A step function whose error a person reads: inside a pipeline pod its message is printed as
    ``error: ...`` lines (under the executor's traceback) and, when asked, written for the runner."""

    def wrap(function):
        @functools.wraps(function)
        def run(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except CoughPipelineError as exc:
                if os.environ.get("_KFP_RUNTIME"):  # the command line prints it itself
                    print("\n".join(f"error: {line}" for line in str(exc).split("\nerror: ")), file=sys.stderr, flush=True)
                if os.environ.get(ERROR_FILE_ENV):
                    from coughreg.io.storage import atomic_write_text

                    atomic_write_text(Path(os.environ[ERROR_FILE_ENV]), json.dumps({"step": step, "message": str(exc)}))
                raise

        return run

    return wrap


def setup_logging(verbose: bool = False) -> None:
    """Timestamped log lines on standard error, set up once per process."""
    root = logging.getLogger()
    if not getattr(setup_logging, "done", False):
        logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "matplotlib", "torch.distributed"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        setup_logging.done = True
    if verbose:
        root.setLevel(logging.DEBUG)


def log_metrics(metrics: Any, values: dict[str, Any]) -> None:
    """Numbers of a flat dict into a KFP ``Metrics`` artifact (None: nothing to log to).

    The numbers are also written to the artifact's file: an artifact with a file is one the
    pipeline root holds (and a cached step's artifact that ``kfp.local`` finds again).
    """
    if metrics is None:
        return
    numbers = {k: float(v) for k, v in values.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}  # KFP refuses NaN
    for key, value in numbers.items():
        metrics.log_metric(key, value)
    if getattr(metrics, "path", None):
        from coughreg.io.storage import atomic_write_text

        atomic_write_text(Path(metrics.path), json.dumps(numbers, indent=2))


class _Staging:
    """Inputs and outputs may be ``s3://`` artifact URIs (a previous run's): inputs are mirrored into the
    download cache, outputs written to a local folder and uploaded when the step succeeded."""

    def __init__(self, s3: S3Options | None, cache_dir: Path | None) -> None:
        self.s3 = s3 or S3Options()
        self.cache_dir = Path(cache_dir or DEFAULT_CACHE)
        self.uploads: list[tuple[Path, str]] = []

    def input(self, value: str | Path) -> Path:
        from coughreg.io.sources import download_prefix

        return download_prefix(str(value), self.s3, self.cache_dir) if is_s3_uri(str(value)) else Path(value)

    def output(self, value: str | Path) -> Path:
        """The local folder the step writes to; a local ``value`` is checked first (a file is refused)."""
        if not is_s3_uri(str(value)):
            return output_folder(value)
        local = Path(tempfile.mkdtemp(prefix="coughreg-step-"))
        self.uploads.append((local, str(value)))
        return local

    def publish(self) -> None:
        from coughreg.io.storage import upload_folder

        for local, uri in self.uploads:
            upload_folder(local, uri, self.s3)
            shutil.rmtree(local, ignore_errors=True)
            log.info("published %s", uri)


@contextlib.contextmanager
def _staged(s3: S3Options | None = None, cache_dir: Path | None = None) -> Iterator[_Staging]:
    staging = _Staging(s3, cache_dir)
    try:
        yield staging
        staging.publish()  # only a step that succeeded publishes its outputs
    finally:
        for local, _ in staging.uploads:
            shutil.rmtree(local, ignore_errors=True)


def _copy_html(source: Path, target: str | None) -> None:
    if target and source.exists():
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)


# ---------------------------------------------------------------- 0. preflight


def source_version_step(source_uri: str, s3: S3Options | None = None) -> str:
    """The content identity of the data set at ``source_uri`` (``coughreg.io.data_version``)."""
    from coughreg.io.data_version import source_identity

    setup_logging()
    identity = source_identity(source_uri, s3)
    log.info("%s: %s", source_uri, identity)
    return identity


def givens_of(config: ExperimentConfig) -> dict[str, Given]:
    """Every step's keys from one config, with the runtime settings (what the pipeline's tasks receive)."""
    from coughreg.config.ownership import RUNTIME, STEPS, config_values, nest, step_settings

    givens = {step: Given(step_settings(config, step), f"the config's {step} keys") for step in STEPS}
    runtime = {key: value for key, value in config_values(config, list(RUNTIME)).items() if value is not None}
    givens["ingest"] = givens["ingest"].with_keys(nest(runtime))  # worker counts, checkpoint_uri, weights_uri
    return givens


def whole_config(givens: dict[str, Given]) -> ExperimentConfig:
    """One config from every step's keys (each checked against what its step owns)."""
    from pydantic import ValidationError

    from coughreg.config.experiment import _describe_errors, resolve_config
    from coughreg.config.ownership import check_keys, nest

    flat: dict = {}
    for step, given in givens.items():
        flat.update(check_keys(step, given.keys, given.where, given.strict))
    where = ", ".join(given.where for given in givens.values())
    try:
        return resolve_config(ExperimentConfig.model_validate(nest(flat)))
    except ValidationError as exc:
        raise ConfigError(_describe_errors(exc, where)) from None


@reports_errors("preflight")
def preflight_step(source_uri: str, givens: dict[str, Given], *, report: str | None = None, artifact_uri: str | None = None,
                   s3: S3Options | None = None) -> dict:
    """Every check that can be made before a recording is downloaded (``coughreg.preflight.checks``), and, with
    ``logging.logger``, the experiment tracker's settings.

    Returns the data's version and the pretrained weights' URI and SHA-256 for the run to go on with.

    Raises:
        CoughPipelineError: one line per failed check.
    """
    from coughreg.preflight.checks import Check as PreflightCheck
    from coughreg.preflight.checks import PreflightResult, failure_message, pipeline_root_of, preflight, write_report

    setup_logging()
    started = time.perf_counter()
    # Short timeouts and few attempts: a check that cannot get an answer should say so in seconds.
    s3 = dataclasses.replace(s3 or S3Options(), max_attempts=2, connect_timeout=5, read_timeout=10, retry_budget_seconds=0)
    try:
        config = whole_config(givens)
    except ConfigError as exc:
        result = PreflightResult(checks=[PreflightCheck("config", False, str(exc), time.perf_counter() - started)])
    else:
        store = config.cluster.weights_uri
        root = pipeline_root_of(artifact_uri, _pipeline_name()) if artifact_uri else None
        store = store or (f"{root}/weights" if root else None)
        selector = json.loads(os.environ.get(GPU_NODE_SELECTOR_ENV) or "{}")
        result = preflight(source_uri, config, store, s3, selector)
        result.checks.insert(0, PreflightCheck("config", True, "every step's keys make one valid config", 0.0))
        if config.logging.logger is not None:
            result.checks.append(_tracking_check(config))
    result.seconds = time.perf_counter() - started
    if report:
        write_report(result, report)
    log.info("preflight: %d checks in %.1f s, %d failed", len(result.checks), result.seconds, len(result.failures))
    if result.failures:
        raise CoughPipelineError(failure_message(result))
    return {"source_version": result.source_version, "weights_uri": result.weights_uri, "weights_sha256": result.weights_sha256}


def _tracking_check(config: ExperimentConfig):
    """The experiment tracker's settings and credentials are there (``coughreg.tracking.tracker.describe``); whether an MLflow
    server answers now is reported, not required (the evaluate and export steps warn and go on without it)."""
    from coughreg.preflight.checks import Check
    from coughreg.tracking import tracker as tracking

    began = time.perf_counter()
    try:
        detail, ok = tracking.describe(config), True
    except CoughPipelineError as exc:
        detail, ok = str(exc), False
    (log.info if ok else log.warning)("preflight: tracking: %s", detail if ok else "failed")
    return Check("tracking", ok, detail, time.perf_counter() - began)


# ---------------------------------------------------------------- 1. ingest


@reports_errors("ingest")
def ingest_step(source_uri: str, out: str | Path, given: Given, *, source_version: str | None = None, metrics: Any = None,
                html: str | None = None, s3: S3Options | None = None, cache_dir: Path | None = None,
                workers: int | None = None) -> dict:
    from coughreg.ingest.manifest import ingest

    setup_logging()
    config = given.build("ingest", None)
    with _staged(s3, cache_dir) as staging:
        out_dir = staging.output(out)
        try:
            ingest(source_uri, out_dir, config, s3, cache_dir, workers, source_version=source_version)
        finally:  # a failed ingest still shows its data-quality report
            _copy_html(out_dir / artifacts.QUALITY_HTML, html)
        report = artifacts.read_json(out_dir, artifacts.INGEST_REPORT, "ingest")
    log_metrics(metrics, {"recordings_ok": report["ok"], "recordings_rejected": report["rejected"],
                          "metadata_rows_without_recording": report["metadata_rows_without_recording"],
                          "unusable_fraction_of_present": report["unusable_fraction_of_present"],
                          "audio_hours": report["quality"]["duration_s"]["total_hours"]})
    return report


# ---------------------------------------------------------------- 2. features


def _features_config(ingest_dir: Path, given: Given, named: str | Path) -> ExperimentConfig:
    upstream = artifacts.read_config(ingest_dir, "ingest")
    return given.build("features", upstream, f"the ingest output {named}")


def _features_metrics(out_dir: Path, metrics: Any) -> dict:
    report = artifacts.read_json(out_dir, artifacts.FEATURES_REPORT, "features")
    log_metrics(metrics, {"spectrograms": report["rows"], "shards": report["shards"], "failed_recordings": len(report["failures"]),
                          "audio_hours": report["audio_seconds"] / 3600,
                          **({"recordings_without_copies": len(report["copy_failures"])} if "copy_failures" in report else {})})
    return report


@reports_errors("features")
def features_step(ingest: str | Path, out: str | Path, given: Given, *, metrics: Any = None, s3: S3Options | None = None,
                  cache_dir: Path | None = None, workers: int | None = None) -> dict:
    """Every shard on this machine (one process per core): the features step outside a ParallelFor."""
    from coughreg.features.extract import extract_features

    setup_logging()
    with _staged(s3, cache_dir) as staging:
        ingest_dir, out_dir = staging.input(ingest), staging.output(out)
        extract_features(ingest_dir, out_dir, _features_config(ingest_dir, given, ingest), workers)
        return _features_metrics(out_dir, metrics)


@reports_errors("features")
def feature_part_step(ingest: str | Path, out: str | Path, given: Given, part: int, parts: int, *,
                      workers: int | None = None) -> None:
    """One of ``parts`` slices of the shard plan: a branch of the ParallelFor."""
    from coughreg.features.extract import extract_feature_part

    setup_logging()
    extract_feature_part(Path(ingest), Path(out), _features_config(Path(ingest), given, ingest), part, parts, workers)


@reports_errors("features")
def collect_features_step(ingest: str | Path, parts: list[str], out: str | Path, given: Given, *, metrics: Any = None) -> dict:
    """The parts' shards gathered into one features folder with its index."""
    from coughreg.features.extract import collect_feature_parts

    setup_logging()
    collect_feature_parts(Path(ingest), [Path(p) for p in parts], Path(out), _features_config(Path(ingest), given, ingest))
    return _features_metrics(Path(out), metrics)


# ---------------------------------------------------------------- 3. train


@reports_errors("train")
def train_step(features: str | Path, out: str | Path, given: Given, *, metrics: Any = None, identity: str | None = None,
               processes: int | None = None, s3: S3Options | None = None, cache_dir: Path | None = None) -> dict:
    """Train on the shards of a features folder; on several GPUs, one DistributedDataParallel rank per GPU.

    Args:
        identity: what names this run's output across retries (the KFP artifact URI); a drawn seed
            derives from it (``coughreg.training.run_seed``).
        processes: ranks to start (default: one per GPU of ``environment.gpus`` when there are several
            and that many are present; 1 otherwise).
    """
    from coughreg.training import run_seed

    setup_logging()
    limit_threads()
    with _staged(s3, cache_dir) as staging:
        features_dir, out_dir = staging.input(features), staging.output(out)
        upstream = artifacts.read_config(features_dir, "features")
        config = given.build("train", upstream, f"the features output {features}")
        if identity is None and is_s3_uri(str(out)):
            identity = str(out)
        processes = processes or _ranks(config)
        if processes > 1:
            from coughreg.training.distributed import launch

            config = run_seed(config, out_dir, identity)  # drawn once, before the ranks
            if config.architecture.pretrained:  # fetched once into this pod's cache, before the ranks read it
                from coughreg.model.weights import resolve

                resolve(config)
            launch(_train_rank, (str(features_dir), str(out_dir), config), processes)
        else:
            from coughreg.training import train
            from coughreg.training.distributed import is_main_process

            train(features_dir, out_dir, config, identity)
            if not is_main_process():  # one of ranks started by hand (torchrun): rank 0 writes and publishes
                staging.uploads.clear()
                return {}
        history = artifacts.read_json(out_dir, artifacts.HISTORY, "train", list)
        info = artifacts.read_model_info(out_dir)
    summary = {"members": len(info["members"]), "seed": info["seed"], **training_summary(history, config.prediction.metric)}
    log_metrics(metrics, summary)
    return summary


def training_summary(history: list[dict], metric: str) -> dict:
    """The training curves as the scalars KFP's UI shows: each value of the last epoch (``train_loss``,
    ``validation_mae``, ...) and the validation values of the best epoch by ``metric`` (``best_validation_mae``,
    ...), averaged over the models (fold, seed) when there are several; the best epoch (``best_epoch``, or
    ``fold<k>_seed<s>_best_epoch`` for each of several models). The curves themselves are in the report and
    the experiment tracker."""
    import math

    def numbers(row: dict, prefix: str = "") -> dict:
        return {k: float(v) for k, v in row.items() if k.startswith(prefix) and k not in ("fold", "seed", "epoch")
                and isinstance(v, (int, float)) and not isinstance(v, bool)}

    def mean(rows: list[dict]) -> dict:
        keys = sorted({key for row in rows for key in row})
        return {key: sum(r[key] for r in rows if key in r) / sum(key in r for r in rows) for key in keys}

    members: dict[tuple, list[dict]] = {}
    for row in history:
        members.setdefault((row.get("fold"), row.get("seed")), []).append(row)
    ranked, higher = f"validation_{metric.lower()}", metric.upper() == "R2"
    bests = []
    for rows in members.values():
        scored = [r for r in rows if isinstance(r.get(ranked), (int, float)) and math.isfinite(r[ranked])]
        if scored:
            bests.append((max if higher else min)(scored, key=lambda r: r[ranked]))  # the first of equals
    summary = mean([numbers(rows[-1]) for rows in members.values()])
    summary.update({f"best_{k}": v for k, v in mean([numbers(best, "validation_") for best in bests]).items()})
    if len(bests) == 1:
        summary["best_epoch"] = bests[0]["epoch"]
    else:
        summary.update({f"fold{b.get('fold')}_seed{b.get('seed')}_best_epoch": b["epoch"] for b in bests})
    return summary


def _ranks(config: ExperimentConfig) -> int:
    import torch

    gpus = len(config.environment.gpus)
    if gpus > 1 and torch.cuda.device_count() >= gpus and "WORLD_SIZE" not in os.environ:
        return gpus
    return 1


def _train_rank(features_dir: str, out_dir: str, config: ExperimentConfig) -> None:
    """One rank of a distributed training run (started by ``coughreg.training.distributed.launch``)."""
    from coughreg.training import train

    setup_logging()
    train(features_dir, out_dir, config)


# ---------------------------------------------------------------- 4. evaluate


@reports_errors("evaluate")
def evaluate_step(model: str | Path, features: str | Path, ingest: str | Path, out: str | Path, given: Given, *,
                  metrics: Any = None, html: str | None = None, s3: S3Options | None = None, cache_dir: Path | None = None,
                  workers: int | None = None, artifact_uri: str | None = None) -> dict:
    """Validation recordings scored from audio, metrics, the quality gate's verdict (``metrics['quality_gate']``).

    With ``logging.logger``, the config, the training curves, the metrics and the report also go to the
    experiment tracker, into the tracker run of the pipeline run ``artifact_uri`` (default: ``out``) belongs to.
    """
    from coughreg.evaluation.evaluate import evaluate
    from coughreg.tracking import tracker as tracking

    setup_logging()
    limit_threads()
    with _staged(s3, cache_dir) as staging:
        model_dir, features_dir, ingest_dir = staging.input(model), staging.input(features), staging.input(ingest)
        out_dir = staging.output(out)
        upstream = artifacts.read_config(model_dir, "train")
        config = given.build("evaluate", upstream, f"the model {model}")
        tracking.check(config)  # a tracker asked for but not configured fails before the work, not after it
        result = evaluate(model_dir, features_dir, ingest_dir, out_dir, config, workers)
        _copy_html(result.report_path, html)
        # Before the outputs are published (and a staged folder removed); a tracker that fails is a warning.
        tracking.log_evaluation(config, tracking.run_key(artifact_uri or str(out), _pipeline_name()), model_dir, out_dir)
    log_metrics(metrics, result.metrics)
    return result.metrics


# ---------------------------------------------------------------- 5. export


def run_identity(artifact_uri: str | None) -> dict:
    """What names the run an artifact belongs to: its URI (which holds the run's id), the pipeline, the image, the pod."""
    values = {"artifact_uri": artifact_uri, "pipeline": os.environ.get(PIPELINE_ENV), "image": os.environ.get(IMAGE_ENV),
              "pod": os.environ.get("KFP_POD_NAME")}
    return {k: v for k, v in values.items() if v}


@reports_errors("export")
def export_step(model: str | Path, evaluation: str | Path, out: str | Path, given: Given, *, artifact_uri: str | None = None,
                s3: S3Options | None = None, cache_dir: Path | None = None) -> dict:
    """The scorer folder; with ``logging.logger``, also to the experiment tracker (the evaluate step's tracker run)."""
    from coughreg.export.scorer_folder import export
    from coughreg.tracking import tracker as tracking

    setup_logging()
    limit_threads()
    with _staged(s3, cache_dir) as staging:
        model_dir, evaluation_dir, out_dir = staging.input(model), staging.input(evaluation), staging.output(out)
        upstream = artifacts.read_config(evaluation_dir, "evaluate")
        config = given.build("export", upstream, f"the evaluation {evaluation}")
        tracking.check(config)
        result = export(model_dir, evaluation_dir, out_dir, config, run_identity(artifact_uri or str(out)))
        tracking.log_scorer(config, tracking.run_key(artifact_uri or str(out), _pipeline_name()), result.scorer_dir)
    return {"scorer": str(out if is_s3_uri(str(out)) else result.scorer_dir), "programs": result.programs}


# ---------------------------------------------------------------- after the gate


@reports_errors("score")
def score_test_step(scorer: str | Path, ingest: str | Path, out: str | Path, *, metrics: Any = None,
                    s3: S3Options | None = None, cache_dir: Path | None = None, workers: int | None = None) -> dict:
    """The test table (``dataset.test_dataframe``) scored with the exported scorer (``coughreg.export.score_test_table``)."""
    from coughreg.export.score_test_table import score_test_table

    setup_logging()
    with _staged(s3, cache_dir) as staging:
        summary = score_test_table(staging.input(scorer), staging.input(ingest), staging.output(out), workers)
    log_metrics(metrics, summary)
    return summary


def gate_failed_step(evaluation: str | Path, out: str | Path) -> str:
    """What a run whose model failed the quality gate leaves where the scorer would be: a note saying why."""
    from coughreg.io.storage import atomic_write_text

    setup_logging()
    verdict = artifacts.read_json(evaluation, artifacts.METRICS, "evaluate")["quality_gate"]
    message = f"quality gate failed: {verdict['message']}"
    Path(out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out) / artifacts.GATE_NOTE, message + "\nNo scorer was exported; see the evaluation report.\n")
    log.warning("%s", message)
    return message
