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
import functools
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from coughreg.io.sources import download_prefix
from coughreg.io.storage import DEFAULT_CACHE, S3Options, atomic_write_text, is_s3_uri, upload_folder
from coughreg.runtime.env import ERROR_FILE_ENV, IMAGE_ENV, PIPELINE_ENV
from coughreg.runtime.errors import CoughPipelineError
from coughreg.runtime.names import PIPELINE_NAME
from coughreg.scoring.outputs import output_folder

log = logging.getLogger(__name__)


def pipeline_name() -> str:
    return os.environ.get(PIPELINE_ENV, PIPELINE_NAME)


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
        atomic_write_text(Path(metrics.path), json.dumps(numbers, indent=2))


class _Staging:
    """Inputs and outputs may be ``s3://`` artifact URIs (a previous run's): inputs are mirrored into the
    download cache, outputs written to a local folder and uploaded when the step succeeded."""

    def __init__(self, s3: S3Options | None, cache_dir: Path | None) -> None:
        self.s3 = s3 or S3Options()
        self.cache_dir = Path(cache_dir or DEFAULT_CACHE)
        self.uploads: list[tuple[Path, str]] = []

    def input(self, value: str | Path) -> Path:
        return download_prefix(str(value), self.s3, self.cache_dir) if is_s3_uri(str(value)) else Path(value)

    def output(self, value: str | Path) -> Path:
        """The local folder the step writes to; a local ``value`` is checked first (a file is refused)."""
        if not is_s3_uri(str(value)):
            return output_folder(value)
        local = Path(tempfile.mkdtemp(prefix="coughreg-step-"))
        self.uploads.append((local, str(value)))
        return local

    def publish(self) -> None:
        for local, uri in self.uploads:
            upload_folder(local, uri, self.s3)
            shutil.rmtree(local, ignore_errors=True)
            log.info("published %s", uri)


@contextlib.contextmanager
def staged(s3: S3Options | None = None, cache_dir: Path | None = None) -> Iterator[_Staging]:
    staging = _Staging(s3, cache_dir)
    try:
        yield staging
        staging.publish()  # only a step that succeeded publishes its outputs
    finally:
        for local, _ in staging.uploads:
            shutil.rmtree(local, ignore_errors=True)


def copy_html(source: Path, target: str | None) -> None:
    if target and source.exists():
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)


def run_identity(artifact_uri: str | None) -> dict:
    """What names the run an artifact belongs to: its URI (which holds the run's id), the pipeline, the image, the pod."""
    values = {"artifact_uri": artifact_uri, "pipeline": os.environ.get(PIPELINE_ENV), "image": os.environ.get(IMAGE_ENV),
              "pod": os.environ.get("KFP_POD_NAME")}
    return {k: v for k, v in values.items() if v}
