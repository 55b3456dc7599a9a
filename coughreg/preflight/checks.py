"""Step 0, preflight: everything that can be known before a recording is downloaded, checked in seconds.

- **config**: every step's keys make one valid config;
- **data**: the source URI exists and can be read with the steps' credentials (its version is resolved:
  ``coughreg.io.data_version``);
- **output locations**: the weights store and ``cluster.checkpoint_uri`` can be written;
- **GPUs**: a node can host ``environment.gpus`` (checked when the pod may list nodes);
- **weights** (``architecture.pretrained: true``): they resolve, and are fetched once into the store
  (``coughreg.model.weights``), to reach train as a URI and a SHA-256.

Every failed check is one line ``error: <key or URI>: <what is wrong and what to do>``, all of them at
once. The step never retries: KFP's retries cannot tell a wrong key from a preempted node, so
configuration and data errors stop here, before any retried step runs.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from coughreg.config.schema import ExperimentConfig
from coughreg.io.storage import S3Options, is_s3_uri, local_path, parse_s3_uri, s3_client
from coughreg.runtime.errors import CoughPipelineError

log = logging.getLogger(__name__)



@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    seconds: float


@dataclass
class PreflightResult:
    source_version: str = ""
    weights_uri: str = ""
    weights_sha256: str = ""
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failures(self) -> list[Check]:
        return [check for check in self.checks if not check.ok]

    def markdown(self) -> str:
        rows = "\n".join(f"| {c.name} | {'ok' if c.ok else '**failed**'} | {c.detail.replace('|', '/')} | {c.seconds:.1f} s |"
                         for c in self.checks)
        return f"# Preflight\n\n| check | result | detail | time |\n| --- | --- | --- | --- |\n{rows}\n\nIn {self.seconds:.1f} s.\n"


def pipeline_root_of(artifact_uri: str, pipeline_name: str, task: str = "preflight") -> str | None:
    """The pipeline root a task's artifact URI lies under: ``<root>/<pipeline>/<run id>/<task>/...`` on a
    cluster (KFP's driver), ``<root>/<pipeline>-<timestamp>/<task>/...`` in kfp.local. Read from the end, so a
    bucket or folder that happens to carry the pipeline's name is not mistaken for it."""
    name = re.escape(pipeline_name)
    match = re.match(rf"^(.*)/{name}(?:/[^/]+|-\d{{4}}(?:-\d+){{6}})/{re.escape(task)}(?:/|$)", artifact_uri)
    return match.group(1) if match else None


def check_writable(uri: str, s3: S3Options | None = None) -> None:
    """Write one small marker object under ``uri`` with the steps' credentials (the same key every run; nothing is
    deleted, so a role that may write but not delete, as the run needs, passes)."""
    marker = f"{uri.rstrip('/')}/.coughreg-write-check"
    note = f"written by the preflight step at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n".encode()
    if is_s3_uri(marker):
        from botocore.exceptions import BotoCoreError, ClientError

        from coughreg.io.storage import describe_client_error

        location = parse_s3_uri(marker)
        try:
            s3_client(s3).put_object(Bucket=location.bucket, Key=location.key, Body=note)
        except (ClientError, BotoCoreError) as exc:
            raise describe_client_error(exc, uri) from None
        return
    path = local_path(marker)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(note)
    except OSError as exc:
        raise CoughPipelineError(f"{uri}: cannot write here ({exc.strerror})") from None


def gpu_nodes(count: int, selector: dict[str, str]) -> str:
    """Which nodes could host a pod asking for ``count`` GPUs; raises when none could. Needs in-cluster
    credentials that may list nodes; without them it says what it could not check."""
    if not os.environ.get("KUBERNETES_SERVICE_HOST"):
        return "not checked (not in a cluster)"
    try:
        from kubernetes import client, config
        from kubernetes.client.exceptions import ApiException

        config.load_incluster_config()
        label_selector = ",".join(f"{k}={v}" for k, v in selector.items()) or None
        nodes = client.CoreV1Api().list_node(label_selector=label_selector, _request_timeout=10).items
    except ApiException as exc:
        return f"not checked (listing nodes was refused: {exc.status} {exc.reason}; grant the service account get/list on nodes to check)"
    except Exception as exc:  # noqa: BLE001 - no cluster API is not a failed check
        return f"not checked ({type(exc).__name__})"
    fits = [n.metadata.name for n in nodes if int((n.status.allocatable or {}).get("nvidia.com/gpu", "0")) >= count]
    if not fits:
        where = f" with labels {selector}" if selector else ""
        raise CoughPipelineError(
            f"environment.gpus: no node{where} has {count} allocatable nvidia.com/gpu ({len(nodes)} nodes seen); "
            "fix cluster.gpu_node_selector, add GPU nodes, or ask for fewer GPUs"
        )
    return f"{len(fits)} node(s) can host {count} GPU(s): {', '.join(fits[:3])}"


def check_backbone(backbone: str) -> str:
    """The backbone exists in timm and builds with one input channel (a typo would otherwise surface in train)."""
    import difflib

    import timm

    if not timm.is_model(backbone):
        close = difflib.get_close_matches(backbone, timm.list_models(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise CoughPipelineError(f"architecture.backbone: timm has no model '{backbone}'{hint}; see timm.list_models()")
    model = timm.create_model(backbone, pretrained=False, in_chans=1, num_classes=0, global_pool="")
    return f"{backbone}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters"


def preflight(source_uri: str, config: ExperimentConfig, store: str | None = None, s3: S3Options | None = None,
              gpu_selector: dict[str, str] | None = None) -> PreflightResult:
    """Run every check; the result holds each one and, when all passed, what the run goes on with.

    Args:
        source_uri: the data set.
        config: the whole config the run was compiled with (every step's keys).
        store: where fetched pretrained weights are kept (``cluster.weights_uri`` or the pipeline root's
            ``weights/``); None keeps them where they were found.
        s3: how to reach S3 (None: the environment).
        gpu_selector: the training pod's node selector, for the GPU check.
    """
    from coughreg.io.data_version import source_identity

    result = PreflightResult()
    started = time.perf_counter()

    def run(name: str, check) -> object:
        began = time.perf_counter()
        try:
            value = check()
        except CoughPipelineError as exc:
            result.checks.append(Check(name, False, str(exc), time.perf_counter() - began))
            log.warning("preflight: %s: failed", name)
            return None
        result.checks.append(Check(name, True, str(value or "ok"), time.perf_counter() - began))
        log.info("preflight: %s: %s", name, value or "ok")
        return value

    def data() -> str:
        if not source_uri:
            raise CoughPipelineError("source_uri: empty; give the data set's URI (s3://bucket/key.zip or s3://bucket/prefix/)")
        return source_identity(source_uri, s3)

    run("model", lambda: check_backbone(config.architecture.backbone))
    result.source_version = run("data", data) or ""
    locations = [("store", store)] if store and config.architecture.pretrained else []
    locations += [("checkpoint_uri", config.cluster.checkpoint_uri)] if config.cluster.checkpoint_uri else []
    for name, uri in locations:
        run(f"write {name}", lambda uri=uri: check_writable(uri, s3) or f"{uri} is writable")
    if config.environment.gpus:
        run("GPUs", lambda: gpu_nodes(len(config.environment.gpus), gpu_selector or {}))
    if config.architecture.pretrained:

        def weights() -> str:
            result.weights_uri, result.weights_sha256, source = _weights(config, store)
            return f"{source}, sha256 {result.weights_sha256}, for train at {result.weights_uri}"

        run("weights", weights)
    result.seconds = time.perf_counter() - started
    return result


def _weights(config: ExperimentConfig, store: str | None) -> tuple[str, str, str]:
    """(URI for train, SHA-256, where they came from)."""
    from coughreg.model.weights import keep, resolve

    weights = resolve(config, store)
    if store:
        return keep(weights, store, config.architecture.backbone), weights.sha256, weights.source
    return config.architecture.pretrained_weights or str(weights.path), weights.sha256, weights.source


def cluster_uri_problems(config: ExperimentConfig, source_uri: str) -> list[str]:
    """What a client can tell before submitting: a pod on the cluster cannot read a path of this machine."""
    problems = []
    named = [("--data", source_uri), ("architecture.pretrained_weights", config.architecture.pretrained_weights),
             ("cluster.checkpoint_uri", config.cluster.checkpoint_uri), ("cluster.weights_uri", config.cluster.weights_uri)]
    for name, uri in named:
        if uri and not is_s3_uri(uri):
            problems.append(f"{name}: {uri} is a path of this machine, which the cluster's pods cannot read; use an s3:// URI")
    if not source_uri:
        problems.append("--data: empty; give the s3:// URI of the data set as the cluster sees it")
    return problems


def failure_message(result: PreflightResult) -> str:
    """All failed checks, one line each (the first one without its ``error:``: the caller prints that)."""
    return "\nerror: ".join(check.detail.replace("\n", " ") for check in result.failures)


def write_report(result: PreflightResult, path: str | Path) -> None:
    from coughreg.io.storage import atomic_write_text

    atomic_write_text(Path(path), result.markdown())
