"""Experiment tracking: what a pipeline run made, also sent to MLflow or Neptune (``logging.logger``).

The evaluate step logs the run's config (its keys flattened, as parameters), the training curves (one
series per fold and seed, the epoch as the step), the final metrics and the report; the export step logs
the scorer folder. Every step of one pipeline run logs into one tracker run: the run is named by its run
key (``run_key``: the part of a step's output artifact URI that names the pipeline run), which an MLflow
run carries as a tag and a Neptune run as its custom run id, so a later step (or a retry) finds it again.
KFP's own Metrics are unchanged (its UI shows scalars; the curves are in the report and the tracker).

Where to log and as whom come from the environment only, never from the config or a parameter (on a
cluster: the optional Secret ``cluster.tracking_secret``):

    MLflow   MLFLOW_TRACKING_URI (required); MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or
             MLFLOW_TRACKING_TOKEN (the MLflow client reads them itself)
    Neptune  NEPTUNE_API_TOKEN (the Neptune client reads it itself); NEPTUNE_PROJECT when
             logging.neptune_project is empty; NEPTUNE_MODE (default async; offline writes .neptune/)

A tracker that is asked for but cannot be used as configured (no URI, no project, no token) is a config
error, raised by ``check`` before a step does its work (and reported by the preflight). A tracker that fails
while logging (a server down, a refused request) costs a warning naming it, never the step's results.
"""

from __future__ import annotations

import abc
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from coughreg import artifacts
from coughreg.config.schema import ExperimentConfig
from coughreg.runtime.errors import ConfigError
from coughreg.runtime.names import PIPELINE_NAME

log = logging.getLogger(__name__)

MLFLOW_URI_ENV = "MLFLOW_TRACKING_URI"
NEPTUNE_TOKEN_ENV = "NEPTUNE_API_TOKEN"
NEPTUNE_PROJECT_ENV = "NEPTUNE_PROJECT"
NEPTUNE_MODE_ENV = "NEPTUNE_MODE"
NEPTUNE_MODES = ("async", "sync", "offline", "debug")
# The keys the tracking Secret may hold; each reaches the steps as the environment variable of its name.
SECRET_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
               NEPTUNE_TOKEN_ENV, NEPTUNE_PROJECT_ENV, NEPTUNE_MODE_ENV)

RUN_ID_TAG = "coughreg.run"  # an MLflow run's run key, hashed: what it is looked up by
RUN_KEY_TAG = "coughreg.run_key"  # and in words
DEFAULT_PIPELINE = PIPELINE_NAME
PROBE_SECONDS = 10  # how long a tracking server may take to answer before it counts as down
HISTORY_KEYS = ("fold", "seed", "epoch")


# ---------------------------------------------------------------- naming a pipeline run


def run_key(artifact_uri: str | Path, pipeline_name: str = DEFAULT_PIPELINE) -> str:
    """What names one pipeline run, read from the output artifact URI (or local path) of any of its steps.

    KFP's driver puts a task's outputs at ``<root>/<pipeline>/<run id>/<task>/<salt>/<output>`` (KFP 2.x;
    ``<root>/<pipeline>/<run id>/<task>/<output>`` before it salted them), kfp.local at
    ``<root>/<pipeline>-<timestamp>/<task>/<output>``: the run key is the part up to the run
    (``<root>/<pipeline>/<run id>``), the same for every task of the run. It is read from the end, so a
    bucket or folder that happens to carry the pipeline's name is not mistaken for the run. Outside a
    pipeline (``pipeline.py step ...``, whose outputs are sibling folders), it is the output's parent.
    """
    text = str(artifact_uri).rstrip("/")
    if "://" not in text:
        text = str(Path(text).resolve())
    name = re.escape(pipeline_name)
    for pattern in (rf"^(.*/{name}-\d{{4}}(?:-\d+){{6}})/[^/]+/[^/]+$",  # kfp.local
                    rf"^(.*/{name}/[^/]+)/[^/]+(?:/[^/]+)?/[^/]+$"):  # a cluster
        match = re.match(pattern, text)
        if match:
            return match.group(1)
    return text.rsplit("/", 1)[0] if "/" in text.split("://", 1)[-1] else text


def run_hash(key: str) -> str:
    """A short, stable id for a run key (Neptune's custom run ids are at most 36 characters)."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def run_name(key: str) -> str:
    """A tracker run's display name: the run key's last part (KFP's run id, or kfp.local's run folder)."""
    return key.rstrip("/").rsplit("/", 1)[-1] or key


# ---------------------------------------------------------------- configuration


def public_uri(uri: str) -> str:
    """A URI fit for a log line: no user, password, query or fragment."""
    try:
        parts = urlsplit(uri)
        if not parts.netloc:  # a path, sqlite:///..., databricks
            return uri.split("?", 1)[0].split("#", 1)[0]
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        port = f":{parts.port}" if parts.port else ""
        return urlunsplit((parts.scheme, host + port, parts.path, "", ""))
    except ValueError:
        return "<the MLFLOW_TRACKING_URI>"


def _neptune_settings(config: ExperimentConfig) -> tuple[str, str]:
    mode = os.environ.get(NEPTUNE_MODE_ENV) or "async"
    return config.logging.neptune_project or os.environ.get(NEPTUNE_PROJECT_ENV, ""), mode


def check(config: ExperimentConfig) -> str | None:
    """Where this config's tracker logs (None: no tracker), once it can be used as configured: cheap, no network.

    Raises:
        ConfigError: naming the key and the environment variable that are missing.
    """
    logger = config.logging.logger
    if logger is None:
        return None
    unset = "; set logging.logger: None to log to KFP only"
    if logger == "MLflow":
        uri = os.environ.get(MLFLOW_URI_ENV, "").strip()
        if not uri:
            raise ConfigError(
                f"logging.logger is MLflow, but {MLFLOW_URI_ENV} is not set: give the tracking server's URI as "
                f"{MLFLOW_URI_ENV} in the environment (on a cluster: the key {MLFLOW_URI_ENV} of the Secret named by "
                f"cluster.tracking_secret){unset}"
            )
        return f"MLflow at {public_uri(uri)}"
    project, mode = _neptune_settings(config)
    if mode not in NEPTUNE_MODES:
        raise ConfigError(f"logging.logger is Neptune, but {NEPTUNE_MODE_ENV} is {mode!r}: use one of {', '.join(NEPTUNE_MODES)}")
    if mode in ("async", "sync"):
        if not project:
            raise ConfigError(
                f"logging.logger is Neptune, but logging.neptune_project is empty and {NEPTUNE_PROJECT_ENV} is not set: "
                f"name the project (workspace/project) in one of them{unset}"
            )
        if not os.environ.get(NEPTUNE_TOKEN_ENV):
            raise ConfigError(
                f"logging.logger is Neptune, but {NEPTUNE_TOKEN_ENV} is not set: give it in the environment (on a "
                f"cluster: the key {NEPTUNE_TOKEN_ENV} of the Secret named by cluster.tracking_secret), or set "
                f"{NEPTUNE_MODE_ENV}=offline{unset}"
            )
    return f"Neptune project {project or '(none)'} ({mode})"


def describe(config: ExperimentConfig) -> str:
    """The preflight's check: the tracker can be used as configured, and whether its server answers now (a server
    that does not answer fails no run: the steps warn and go on)."""
    where = check(config)
    if where is None:
        return "no tracker (logging.logger: None)"
    if config.logging.logger == "MLflow":
        try:
            _probe(os.environ[MLFLOW_URI_ENV].strip())
        except Unreachable as exc:
            return f"{where}: {exc}; the evaluate and export steps will warn and go on without it"
        return f"{where}: answers"
    return where


class Unreachable(ConnectionError):
    """A tracking server that does not answer."""


def _probe(uri: str) -> None:
    """Fail in seconds, not after the client's minutes of retries, when an HTTP tracking server does not answer
    (any HTTP answer counts: a server that wants credentials is up)."""
    if urlsplit(uri).scheme not in ("http", "https"):
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=PROBE_SECONDS)
    except requests.Timeout:
        raise Unreachable(f"no answer within {PROBE_SECONDS} s") from None
    except requests.RequestException as exc:
        raise Unreachable(f"no answer ({type(exc).__name__})") from None


# ---------------------------------------------------------------- what is logged


def flat_params(config: ExperimentConfig, keys: Iterable[str]) -> dict[str, str]:
    """Dotted config keys -> their values as text (lists and mappings as JSON)."""
    from coughreg.config.ownership import config_values

    values = config_values(config, list(keys))
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in values.items()}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def numeric_leaves(tree: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a nested mapping, keyed by their dotted path (text, lists and flags are left out)."""
    found: dict[str, float] = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            found.update(numeric_leaves(value, f"{prefix}{name}."))
        elif (number := _number(value)) is not None:
            found[f"{prefix}{name}"] = number
    return found


def history_series(rows: Iterable[dict]) -> dict[str, list[tuple[int, float]]]:
    """Training history rows (``{"fold", "seed", "epoch", "train_loss", "validation_mae", ...}``) -> one series
    per (fold, seed) and value, ``training/fold<k>/seed<s>/<value>``: [(epoch, value), ...] in epoch order."""
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        member = f"training/fold{row.get('fold', 0)}/seed{row.get('seed', 0)}"
        epoch = int(row.get("epoch", 0))
        for name, value in row.items():
            if name not in HISTORY_KEYS and (number := _number(value)) is not None:
                series.setdefault(f"{member}/{name}", []).append((epoch, number))
    return {key: sorted(points) for key, points in series.items()}


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# ---------------------------------------------------------------- trackers


class Tracker(abc.ABC):
    """One run of an experiment tracker. Its methods raise when the tracker fails; ``log_evaluation`` and
    ``log_scorer`` turn that into a warning."""

    kind = ""

    def __init__(self, where: str) -> None:
        self.where = where  # for messages: no credentials
        self.url: str | None = None

    @abc.abstractmethod
    def log_params(self, params: dict[str, Any]) -> None:
        """Flat ``{dotted key: value}``; values are logged as text, cut to the tracker's limit."""

    @abc.abstractmethod
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Flat ``{dotted key: number}``: final values (``step`` None) or one point of each series."""

    def log_history(self, rows: Iterable[dict]) -> None:
        """Training history rows -> one series per (fold, seed) and value, the epoch as the step
        (``history_series``). Series a run already holds (a retried step's) are not logged twice."""
        self._log_series(history_series(rows))

    @abc.abstractmethod
    def _log_series(self, series: dict[str, list[tuple[int, float]]]) -> None:
        """Each series' points, the step first."""

    @abc.abstractmethod
    def log_file(self, path: str | Path, name: str) -> None:
        """One file, as the artifact ``name`` (``report.html``, ``evaluation/metrics.json``)."""

    @abc.abstractmethod
    def log_folder(self, path: str | Path, name: str) -> None:
        """A folder and everything in it, as the artifact folder ``name``."""

    @abc.abstractmethod
    def close(self, failed: bool = False) -> None:
        """End the run (marked failed when the step failed)."""


class MlflowTracker(Tracker):
    """The run of an MLflow experiment (``logging.mlflow_experiment``, else ``experiment_name``) whose tag
    ``coughreg.run`` holds the run key's hash; made when no step of the pipeline run made it yet."""

    kind = "MLflow"

    def __init__(self, config: ExperimentConfig, key: str, name: str | None = None) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # nothing leaves but what goes to the tracker
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException
        from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

        uri = os.environ[MLFLOW_URI_ENV].strip()
        super().__init__(f"MLflow at {public_uri(uri)}")
        _probe(uri)
        self.client = MlflowClient(tracking_uri=uri)
        experiment_name = config.logging.mlflow_experiment or config.experiment_name
        experiment = self.client.get_experiment_by_name(experiment_name)
        if experiment is None:
            try:
                experiment_id = self.client.create_experiment(experiment_name)
            except MlflowException:  # made meanwhile by another step
                experiment = self.client.get_experiment_by_name(experiment_name)
                if experiment is None:
                    raise
                experiment_id = experiment.experiment_id
        else:
            experiment_id = experiment.experiment_id
        ident = run_hash(key)
        found = self.client.search_runs([experiment_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{ident}'", max_results=1)
        if found:
            run = found[0]
            if run.info.status != "RUNNING":
                self.client.update_run(run.info.run_id, status="RUNNING")
        else:
            run = self.client.create_run(experiment_id, run_name=name or run_name(key),
                                         tags={RUN_ID_TAG: ident, RUN_KEY_TAG: key[:MAX_TAG_VAL_LENGTH]})
        self.run_id = run.info.run_id
        self.params = dict(run.data.params)  # what earlier steps (or attempts) logged
        self.metrics = set(run.data.metrics)
        if urlsplit(uri).scheme in ("http", "https"):
            self.url = f"{public_uri(uri).rstrip('/')}/#/experiments/{experiment_id}/runs/{self.run_id}"

    @staticmethod
    def _key(name: str) -> str:
        from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH

        return re.sub(r"[^\w./\- ]", "_", name)[:MAX_ENTITY_KEY_LENGTH]

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        values = {self._key(k): str(v)[:MAX_PARAM_VAL_LENGTH] for k, v in params.items()}
        # MLflow refuses a parameter a second value: keep what the run holds (a retried step's are the same).
        new = [Param(k, v) for k, v in values.items() if k not in self.params]
        for batch in _batches(new, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=batch)
        self.params.update({p.key: p.value for p in new})

    def _log(self, points: list[tuple[str, float, int]]) -> None:
        import time

        from mlflow.entities import Metric
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        now = int(time.time() * 1000)
        metrics = [Metric(self._key(key), value, now, step) for key, value, step in points]
        for batch in _batches(metrics, MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=batch)
        self.metrics.update(m.key for m in metrics)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._log([(key, value, step or 0) for key, value in metrics.items()])

    def _log_series(self, series: dict[str, list[tuple[int, float]]]) -> None:
        self._log([(key, value, step) for key, points in series.items() if self._key(key) not in self.metrics
                   for step, value in points])

    def log_file(self, path: str | Path, name: str) -> None:
        target = PurePosixPath(name)
        folder = None if str(target.parent) == "." else str(target.parent)
        if Path(path).name == target.name:
            self.client.log_artifact(self.run_id, str(path), folder)
            return
        with tempfile.TemporaryDirectory(prefix="coughreg-tracking-") as tmp:
            copy = Path(tmp) / target.name
            shutil.copyfile(path, copy)
            self.client.log_artifact(self.run_id, str(copy), folder)

    def log_folder(self, path: str | Path, name: str) -> None:
        self.client.log_artifacts(self.run_id, str(path), name)

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class NeptuneTracker(Tracker):
    """The Neptune run whose custom run id is the run key's hash (Neptune makes it on first use), with the
    fields ``parameters/<section>/<key>``, ``metrics/...`` (the curves under ``metrics/training/``) and
    ``artifacts/...``; no stdout, hardware, source or git capture (a step's log is KFP's)."""

    kind = "Neptune"

    def __init__(self, config: ExperimentConfig, key: str, name: str | None = None) -> None:
        import neptune

        project, mode = _neptune_settings(config)
        super().__init__(f"Neptune project {project or '(none)'} ({mode})")
        if "NEPTUNE_DATA_DIRECTORY" not in os.environ and not os.access(os.getcwd(), os.W_OK):
            # Neptune queues what it sends in .neptune/ under the working directory; an image's may be read-only.
            os.environ["NEPTUNE_DATA_DIRECTORY"] = str(Path(tempfile.gettempdir()) / "neptune")
        self.run = neptune.init_run(
            project=project or None, custom_run_id=run_hash(key), mode=mode, name=name or run_name(key),
            capture_stdout=False, capture_stderr=False, capture_hardware_metrics=False, capture_traceback=False,
            source_files=[], git_ref=False,
        )
        self.run["coughreg/run_key"] = key
        url = self.run.get_url() if mode in ("async", "sync") else None
        self.url = url.split("?", 1)[0] if url else None

    @staticmethod
    def _path(*parts: str) -> str:
        return "/".join(part.strip("/").replace(".", "/") for part in parts if part)

    def log_params(self, params: dict[str, Any]) -> None:
        from neptune.attributes.atoms.string import String

        for key, value in params.items():
            self.run[self._path("parameters", key)] = str(value)[:String.MAX_VALUE_LENGTH]

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            if step is None:
                self.run[self._path("metrics", key)] = value
            else:
                self.run[self._path("metrics", key)].append(value, step=step)

    def _log_series(self, series: dict[str, list[tuple[int, float]]]) -> None:
        for key, points in series.items():
            path = self._path("metrics", key)
            if not self.run.exists(path):  # a retried step's series are there already
                self.run[path].extend([value for _, value in points], steps=[step for step, _ in points])

    def log_file(self, path: str | Path, name: str) -> None:
        self.run["artifacts/" + name.strip("/")].upload(str(path))

    def log_folder(self, path: str | Path, name: str) -> None:
        self.run["artifacts/" + name.strip("/")].upload_files(str(Path(path).resolve()))

    def close(self, failed: bool = False) -> None:
        if failed:
            self.run["coughreg/tracking_failed"] = True
        self.run.stop()  # waits until everything queued is sent (or written, offline)


def open_tracker(config: ExperimentConfig, key: str, name: str | None = None) -> Tracker | None:
    """The tracker run of the pipeline run ``key`` (found again, or made), for ``logging.logger``; None when it is None.

    Raises:
        ConfigError: the tracker cannot be used as configured (``check``).
        Exception: whatever the tracker raises when it cannot be reached.
    """
    if check(config) is None:
        return None
    return (MlflowTracker if config.logging.logger == "MLflow" else NeptuneTracker)(config, key, name)


# ---------------------------------------------------------------- what the steps call


def _reason(exc: BaseException) -> str:
    """An exception in one line without credentials (an MLflow message repeats the URI it was given)."""
    text = (str(exc) if isinstance(exc, Unreachable) else f"{type(exc).__name__}: {exc}").replace("\n", " ")
    uri = os.environ.get(MLFLOW_URI_ENV, "").strip()
    if uri:
        text = text.replace(uri.rstrip("/"), public_uri(uri).rstrip("/"))
    text = re.sub(r"//[^/@\s]+@", "//", text)
    return text if len(text) <= 400 else text[:400] + "..."


def _guarded(config: ExperimentConfig, key: str, what: str, work: Callable[[Tracker], None]) -> bool:
    """Run ``work`` on the pipeline run's tracker run; a tracker that fails is a warning. True when it was logged."""
    where = check(config)  # a config error is the step's error, raised before anything is sent
    if where is None:
        return False
    tracker = None
    try:
        tracker = open_tracker(config, key)
        work(tracker)
        tracker.close()
    except Exception as exc:  # noqa: BLE001 - the step's results do not depend on the tracker
        log.warning("experiment tracking: %s was not logged to %s (%s); the step's results are kept",
                    what, tracker.where if tracker else where, _reason(exc))
        if tracker is not None:
            try:
                tracker.close(failed=True)
            except Exception:  # noqa: BLE001 - it is down: the warning above says so
                pass
        return False
    log.info("experiment tracking: %s logged to %s%s", what, tracker.where, f": {tracker.url}" if tracker.url else "")
    return True


def log_evaluation(config: ExperimentConfig, key: str, model_dir: str | Path, evaluation_dir: str | Path) -> bool:
    """The evaluate step's share: the config's keys (the evaluate step's and its upstream steps') as parameters, the
    training history (``history.json`` of the model) as per-epoch series, the final metrics (``metrics.json``: its
    numbers, nested ones with dotted names) and the report and ``metrics.json`` as artifacts.

    Returns:
        whether it was logged (False: no tracker, or it failed: a warning says so).

    Raises:
        ConfigError: a tracker is asked for but cannot be used as configured.
    """
    from coughreg.config.ownership import chain_keys

    def work(tracker: Tracker) -> None:
        tracker.log_params(flat_params(config, chain_keys("evaluate")))
        history = Path(model_dir) / artifacts.HISTORY
        if history.exists():
            tracker.log_history(json.loads(history.read_text()))
        tracker.log_metrics(numeric_leaves(json.loads((Path(evaluation_dir) / artifacts.METRICS).read_text())))
        for name in (artifacts.REPORT, artifacts.METRICS):
            if (Path(evaluation_dir) / name).exists():
                tracker.log_file(Path(evaluation_dir) / name, name)

    return _guarded(config, key, "the evaluation", work)


def log_scorer(config: ExperimentConfig, key: str, scorer_dir: str | Path) -> bool:
    """The export step's share: its own keys as parameters and the scorer folder as the artifact folder ``scorer/``.

    Returns and raises as ``log_evaluation``.
    """
    from coughreg.config.ownership import owned_keys

    def work(tracker: Tracker) -> None:
        tracker.log_params(flat_params(config, owned_keys("export")))
        tracker.log_folder(scorer_dir, "scorer")

    return _guarded(config, key, "the scorer", work)
