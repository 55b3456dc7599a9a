"""The container image and the manifests, checked with the tools that run here."""

from __future__ import annotations

import copy
import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.conftest import DATA, PROJECT


def test_the_dockerfile_is_hadolint_clean():
    hadolint = Path(sys.executable).parent / "hadolint"
    done = subprocess.run([str(hadolint), str(PROJECT / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_image_installs_exactly_the_local_pins():
    dockerfile = (PROJECT / "docker" / "Dockerfile").read_text()
    assert "COPY requirements.txt" in dockerfile
    assert re.search(r"pip install --no-cache-dir -r requirements\.txt", dockerfile)
    makefile = (PROJECT / "Makefile").read_text()
    assert "-r requirements-dev.txt" in makefile
    dev = (PROJECT / "requirements-dev.txt").read_text().splitlines()
    assert "-r requirements.txt" in dev
    pins = [line for line in (PROJECT / "requirements.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[^=\s]+", line) for line in pins), "every runtime dependency is pinned"
    names = {line.split("==")[0].lower() for line in pins}
    assert {"torch", "torchaudio", "timm", "kfp", "kfp-kubernetes", "av", "pyarrow", "pandas", "scikit-learn", "boto3"} <= names


TARGETS = ["base", "overlays/aws", "overlays/minio-dev", "overlays/kubeflow-multi-user", "overlays/kfp-standalone"]
# Where each target puts the pipelines' objects, which service account KFP runs the pipeline pods as
# there, and whether the target creates that namespace (a Kubeflow profile or KFP's install creates
# it otherwise).
PLATFORM = {
    "base": ("coughreg", "coughreg-pipeline-runner", True),
    "overlays/aws": ("coughreg", "coughreg-pipeline-runner", True),
    "overlays/minio-dev": ("coughreg", "coughreg-pipeline-runner", True),
    "overlays/kubeflow-multi-user": ("coughreg", "default-editor", False),
    "overlays/kfp-standalone": ("kubeflow", "pipeline-runner", False),
}
# The exported scorer on KServe: applied on its own, into the namespace an overlay set up.
SERVING = "serving"
# Kinds kubernetes-validate has no schema for, checked against their CRD instead (kept in the repo).
CRDS = {
    ("kubeflow.org/v1", "Profile"): DATA / "schemas" / "kubeflow.org_profiles.yaml",
    ("serving.kserve.io/v1beta1", "InferenceService"): DATA / "schemas" / "serving.kserve.io_inferenceservices.yaml",
}


@functools.cache
def _build(target: str) -> str:
    built = subprocess.run(
        ["kubectl", "kustomize", str(PROJECT / "manifests" / target)], capture_output=True, text=True, check=False
    )
    assert built.returncode == 0, built.stderr
    return built.stdout


def _objects(target: str) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed on this machine")
    return [o for o in yaml.safe_load_all(_build(target)) if o]


def _one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


@functools.cache
def _crd_schema(api_version: str, kind: str) -> dict:
    """The CRD's openAPIV3Schema for that version, closed as the API server's strict field validation is.

    The API server prunes fields a structural schema does not name, and `kubectl apply` (strict
    field validation, its default) refuses them: every object schema with properties and no
    `additionalProperties` / `x-kubernetes-preserve-unknown-fields` is closed here to match.
    """
    # libyaml's safe loader where it is built in: the KServe CRD is 2 MB of YAML.
    crd = yaml.load(CRDS[(api_version, kind)].read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]

    def close(node):
        if isinstance(node, dict):
            node = {key: close(value) for key, value in node.items()}
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            return node
        if isinstance(node, list):
            return [close(item) for item in node]
        return node

    closed = close(schema)
    jsonschema.Draft202012Validator.check_schema(closed)
    return closed


def _crd_errors(obj: dict) -> list[str]:
    validator = jsonschema.Draft202012Validator(_crd_schema(obj["apiVersion"], obj["kind"]))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(obj)]


def _pod_specs(objects: list[dict]) -> list[tuple[str, dict]]:
    specs = []
    for o in objects:
        spec = o.get("spec", {})
        if o["kind"] == "Pod":
            specs.append((f"Pod/{o['metadata']['name']}", spec))
        elif "template" in spec:
            specs.append((f"{o['kind']}/{o['metadata']['name']}", spec["template"]["spec"]))
        elif "jobTemplate" in spec:
            specs.append((f"{o['kind']}/{o['metadata']['name']}", spec["jobTemplate"]["spec"]["template"]["spec"]))
        elif o["kind"] == "InferenceService":  # each component carries the pod's fields itself
            for component in ("predictor", "transformer", "explainer"):
                if component in spec:
                    specs.append((f"InferenceService/{o['metadata']['name']}/{component}", spec[component]))
    return specs


@pytest.mark.parametrize("target", TARGETS)
def test_the_manifests_build_and_validate(tmp_path, target):
    objects = _objects(target)
    builtin = [o for o in objects if (o["apiVersion"], o["kind"]) not in CRDS]
    custom = [o for o in objects if (o["apiVersion"], o["kind"]) in CRDS]
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(builtin, sort_keys=False))
    validate = Path(sys.executable).parent / "kubernetes-validate"
    done = subprocess.run(
        [str(validate), "-k", "1.32.0", "--strict", str(rendered)], capture_output=True, text=True, check=False
    )
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    assert report.count(" passed for resource ") == len(builtin), report
    assert "WARN" not in report and "ERROR" not in report, report
    for obj in custom:
        assert _crd_errors(obj) == [], f"{obj['kind']}/{obj['metadata']['name']}"

    kinds = {o["kind"] for o in objects}
    assert {"Secret", "ConfigMap", "Role", "RoleBinding"} <= kinds
    launcher = _one(objects, "ConfigMap", "kfp-launcher")
    root = launcher["data"]["defaultPipelineRoot"]
    assert re.fullmatch(r"s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/\S*)?", root), root
    providers = yaml.safe_load(launcher["data"]["providers"])["s3"]["default"]
    credentials = providers["credentials"]
    if credentials["fromEnv"] is False:
        secret = _one(objects, "Secret", credentials["secretRef"]["secretName"])
        assert {credentials["secretRef"]["accessKeyKey"], credentials["secretRef"]["secretKeyKey"]} <= set(
            secret["stringData"]
        )
    assert _one(objects, "Secret", "coughreg-s3")["metadata"]["namespace"] == launcher["metadata"]["namespace"]
    if target == "overlays/minio-dev":
        assert "Deployment" in kinds and providers["forcePathStyle"] is True
    if target == "overlays/aws":
        account = _one(objects, "ServiceAccount")
        assert "eks.amazonaws.com/role-arn" in account["metadata"]["annotations"]
        assert credentials["fromEnv"] is True


@pytest.mark.parametrize("target", TARGETS)
def test_the_role_lets_the_pipeline_pods_do_their_work(target):
    role = _one(_objects(target), "Role", "coughreg-pipeline-runner")

    def granted(group: str, resource: str, name: str | None = None) -> set[str]:
        verbs: set[str] = set()
        for rule in role["rules"]:
            named = name is None or not rule.get("resourceNames") or name in rule["resourceNames"]
            if group in rule["apiGroups"] and resource in rule["resources"] and named:
                verbs |= set(rule["verbs"])
        return verbs

    # Argo Workflows >= 3.4 records each step's outputs as a WorkflowTaskResult written by the pod.
    assert {"create", "patch"} <= granted("argoproj.io", "workflowtaskresults")
    assert {"get", "list", "watch"} <= granted("", "pods")
    assert "get" in granted("", "secrets", "coughreg-s3")
    assert "get" in granted("", "configmaps", "kfp-launcher")


@pytest.mark.parametrize("target", TARGETS)
def test_the_role_is_bound_to_the_account_kfp_runs_the_pipelines_as(target):
    objects = _objects(target)
    namespace, account, _ = PLATFORM[target]
    binding = _one(objects, "RoleBinding", "coughreg-pipeline-runner")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "coughreg-pipeline-runner",
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": namespace}]
    accounts = [o["metadata"]["name"] for o in objects if o["kind"] == "ServiceAccount"]
    # Where the platform creates the account (a profile's default-editor, KFP's pipeline-runner),
    # the overlay leaves it alone.
    assert accounts == (["coughreg-pipeline-runner"] if account == "coughreg-pipeline-runner" else [])


@pytest.mark.parametrize("target", TARGETS)
def test_the_objects_land_in_the_namespace_kfp_runs_the_pipelines_in(target):
    objects = _objects(target)
    namespace, _, creates_namespace = PLATFORM[target]
    namespaces = [o["metadata"]["name"] for o in objects if o["kind"] == "Namespace"]
    assert namespaces == ([namespace] if creates_namespace else [])
    cluster_scoped = {"Namespace", "Profile"}
    assert all(o["metadata"].get("namespace") == namespace for o in objects if o["kind"] not in cluster_scoped)
    assert all("namespace" not in o["metadata"] for o in objects if o["kind"] in cluster_scoped)
    profiles = [o for o in objects if o["kind"] == "Profile"]
    if target == "overlays/kubeflow-multi-user":
        # The profile controller creates the namespace named after the Profile.
        assert [p["metadata"]["name"] for p in profiles] == [namespace]
    else:
        assert profiles == []


def test_the_profile_matches_the_crd_and_allows_gpus():
    profile = _one(_objects("overlays/kubeflow-multi-user"), "Profile")
    assert _crd_errors(profile) == []
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", profile["metadata"]["name"]), "a namespace name"
    owner = profile["spec"]["owner"]
    assert owner["kind"] == "User" and re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", owner["name"])
    hard = profile["spec"]["resourceQuotaSpec"]["hard"]
    assert int(hard["requests.nvidia.com/gpu"]) >= 1
    # A cpu or memory quota would make Kubernetes refuse every pod without requests for them.
    assert not {"cpu", "memory", "requests.cpu", "requests.memory", "limits.cpu", "limits.memory"} & set(hard)


def _without_owner_kind(profile):
    del profile["spec"]["owner"]["kind"]


def _owner_name_not_a_string(profile):
    profile["spec"]["owner"]["name"] = ["owner@example.com"]


def _quota_not_a_quantity(profile):
    profile["spec"]["resourceQuotaSpec"]["hard"]["requests.nvidia.com/gpu"] = "four"


def _quota_not_a_map(profile):
    profile["spec"]["resourceQuotaSpec"]["hard"] = ["requests.nvidia.com/gpu=4"]


def _unknown_spec_field(profile):
    profile["spec"]["resourceQuota"] = profile["spec"].pop("resourceQuotaSpec")


def _unknown_owner_field(profile):
    profile["spec"]["owner"]["email"] = profile["spec"]["owner"]["name"]


@pytest.mark.parametrize(
    ("breakage", "where"),
    [
        (_without_owner_kind, "spec.owner"),
        (_owner_name_not_a_string, "spec.owner.name"),
        (_quota_not_a_quantity, "spec.resourceQuotaSpec.hard.requests.nvidia.com/gpu"),
        (_quota_not_a_map, "spec.resourceQuotaSpec.hard"),
        (_unknown_spec_field, "spec"),
        (_unknown_owner_field, "spec.owner"),
    ],
)
def test_a_broken_profile_fails_the_crd_schema(breakage, where):
    profile = copy.deepcopy(_one(_objects("overlays/kubeflow-multi-user"), "Profile"))
    breakage(profile)
    errors = _crd_errors(profile)
    assert any(error.startswith(f"{where}: ") for error in errors), f"{breakage.__name__}: {errors}"


def _scorer_service() -> dict:
    return _one(_objects(SERVING), "InferenceService", "cough-regression")


def _serving_container(service: dict) -> dict:
    (container,) = service["spec"]["predictor"]["containers"]
    return container


def _pipeline_argv(container: dict) -> list[str]:
    """What the container passes pipeline.py (the image has no entrypoint: command and args are the process)."""
    argv = container.get("command", []) + container.get("args", [])
    assert argv[:2] == ["python", "pipeline.py"], argv
    return argv[2:]


def test_the_serving_target_builds_and_matches_the_kserve_crd():
    objects = _objects(SERVING)
    # The InferenceService alone: the base's Secret template must not overwrite the Secret an overlay applied.
    assert [(o["kind"], o["metadata"]["name"]) for o in objects] == [("InferenceService", "cough-regression")]
    service = objects[0]
    assert _crd_errors(service) == []
    assert service["metadata"]["namespace"] == PLATFORM["base"][0]
    assert service["metadata"]["labels"]["app.kubernetes.io/part-of"] == "coughreg"
    predictor = service["spec"]["predictor"]
    # A custom predictor that downloads the scorer itself: no model format, no storage initializer.
    assert not {"model", "storageUri", "storageUris"} & set(predictor), sorted(predictor)
    assert _serving_container(service)["name"] == "kserve-container"
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    # The image is named once, in kustomization.yaml's `images:`, which sets its tag.
    source = yaml.safe_load((PROJECT / "manifests" / SERVING / "inferenceservice.yaml").read_text())
    (named,) = source["spec"]["predictor"]["containers"]
    kustomization = yaml.safe_load((PROJECT / "manifests" / SERVING / "kustomization.yaml").read_text())
    assert [entry["name"] for entry in kustomization["images"]] == [named["image"]] and ":" not in named["image"]


def _port_not_a_number(service):
    service["spec"]["predictor"]["containers"][0]["ports"][0]["containerPort"] = "eighty"


def _unknown_predictor_field(service):
    service["spec"]["predictor"]["replicas"] = 2


def _unknown_container_field(service):
    service["spec"]["predictor"]["containers"][0]["port"] = 8080


def _replicas_not_a_number(service):
    service["spec"]["predictor"]["minReplicas"] = "one"


def _cpu_not_a_quantity(service):
    service["spec"]["predictor"]["containers"][0]["resources"]["requests"]["cpu"] = "two cores"


def _secret_ref_misspelled(service):
    ref = service["spec"]["predictor"]["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"]
    ref["secret"] = ref.pop("name")


def _probe_path_misspelled(service):
    probe = service["spec"]["predictor"]["containers"][0]["readinessProbe"]["httpGet"]
    probe["url"] = probe.pop("path")


def _container_without_name(service):
    del service["spec"]["predictor"]["containers"][0]["name"]


@pytest.mark.parametrize(
    ("breakage", "where"),
    [
        (_port_not_a_number, "spec.predictor.containers.0.ports.0.containerPort"),
        (_unknown_predictor_field, "spec.predictor"),
        (_unknown_container_field, "spec.predictor.containers.0"),
        (_replicas_not_a_number, "spec.predictor.minReplicas"),
        (_cpu_not_a_quantity, "spec.predictor.containers.0.resources.requests.cpu"),
        (_secret_ref_misspelled, "spec.predictor.containers.0.env.0.valueFrom.secretKeyRef"),
        (_probe_path_misspelled, "spec.predictor.containers.0.readinessProbe.httpGet"),
        (_container_without_name, "spec.predictor.containers.0"),
    ],
)
def test_a_broken_inferenceservice_fails_the_crd_schema(breakage, where):
    service = copy.deepcopy(_scorer_service())
    breakage(service)
    errors = _crd_errors(service)
    assert any(error.startswith(f"{where}: ") for error in errors), f"{breakage.__name__}: {errors}"


def test_the_scorer_service_serves_the_s3_scorer_with_the_secrets_keys_on_its_probed_port():
    service = _scorer_service()
    predictor = service["spec"]["predictor"]
    container = _serving_container(service)
    argv = _pipeline_argv(container)
    assert argv[0] == "serve"
    option = dict(zip(argv[1::2], argv[2::2]))
    assert option["--scorer"].startswith("s3://") and option["--host"] == "0.0.0.0"
    (port,) = container["ports"]
    # KServe routes to a custom container's one port; Knative wants it named http1 (or h2c).
    assert port["name"] == "http1" and port["containerPort"] == int(option["--port"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": port["containerPort"]}, probe
    # The port opens once the scorer is downloaded and loaded: the startup probe waits minutes for it.
    startup = container["startupProbe"]
    assert startup.get("initialDelaySeconds", 0) + startup["periodSeconds"] * startup["failureThreshold"] >= 180

    env = {e["name"]: e for e in container["env"]}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3"):
        assert env[key]["valueFrom"]["secretKeyRef"]["name"] == "coughreg-s3", key
        assert env[key]["valueFrom"]["secretKeyRef"]["key"] == key
    assert not any("AWS" in arg for arg in argv), "credentials come from the Secret, never from the arguments"

    # The image's user, workdir and pipeline.py (docker/Dockerfile); a read-only root filesystem, so
    # the download cache and /tmp are emptyDirs.
    dockerfile = (PROJECT / "docker" / "Dockerfile").read_text()
    (user,) = re.findall(r"^USER (\d+):(\d+)$", dockerfile, re.MULTILINE)
    security = container["securityContext"]
    assert (str(security["runAsUser"]), str(security["runAsGroup"])) == user and security["runAsNonRoot"] is True
    assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
    assert f"WORKDIR {container['workingDir']}" in dockerfile
    assert f"/src/pipeline.py {container['workingDir']}/pipeline.py" in dockerfile
    empty_dirs = {v["name"] for v in predictor["volumes"] if "emptyDir" in v}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[env["COUGHREG_CACHE"]["value"]] in empty_dirs and mounts["/tmp"] in empty_dirs
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]


def test_the_serving_command_parses_with_the_real_command_line():
    from coughreg.app.cli import build_parser, cmd_serve

    container = _serving_container(_scorer_service())
    args = build_parser().parse_args(_pipeline_argv(container))
    assert args.command == "serve" and args.func is cmd_serve
    assert args.host == "0.0.0.0" and args.port == 8080 == container["ports"][0]["containerPort"]
    assert args.scorer.startswith("s3://") and args.scorer.endswith("/scorer")


def test_the_minio_job_creates_the_pipeline_root_bucket_with_the_secrets_credentials(tmp_path):
    objects = _objects("overlays/minio-dev")
    job = _one(objects, "Job")
    secret = _one(objects, "Secret", "coughreg-s3")["stringData"]
    launcher = _one(objects, "ConfigMap", "kfp-launcher")["data"]
    assert job["spec"]["backoffLimit"] >= 1 and job["spec"]["ttlSecondsAfterFinished"] > 0
    # An Istio sidecar (a Kubeflow profile namespace injects one) would keep the Job from finishing.
    assert job["spec"]["template"]["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    pod = job["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    (container,) = pod["containers"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"cpu", "memory"} <= set(container["resources"]["requests"]) and "memory" in container["resources"]["limits"]
    env = {e["name"]: e for e in container["env"]}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "coughreg-s3", "key": key}
    assert env["PIPELINE_ROOT"]["valueFrom"]["configMapKeyRef"] == {
        "name": "kfp-launcher",
        "key": "defaultPipelineRoot",
    }
    script = "\n".join(container.get("command", []) + container.get("args", []))
    for value in (secret["AWS_ACCESS_KEY_ID"], secret["AWS_SECRET_ACCESS_KEY"]):
        assert value not in script, "credentials come from the Secret, never from the manifest's arguments"
    assert container["command"][:2] == ["/bin/sh", "-c"]

    # Run the container's script with a stand-in `mc` that records its calls and, like a MinIO
    # that is still starting, refuses the first two connections; the environment is what the
    # kubelet would give the container from the Secret and the ConfigMap.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    (bin_dir / "mc").write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> "{calls}"\n'
        f"if [ \"$1\" = alias ] && [ \"$(grep -c '^alias set' '{calls}')\" -le 2 ]; then exit 1; fi\n"
    )
    (bin_dir / "sleep").write_text("#!/bin/sh\n")
    for tool in ("mc", "sleep"):
        (bin_dir / tool).chmod(0o755)
    pod_env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "PIPELINE_ROOT": launcher["defaultPipelineRoot"],
        **{key: value["value"] for key, value in env.items() if "value" in value and key != "HOME"},
        **{key: secret[key] for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3")},
    }
    done = subprocess.run(
        ["sh", "-c", container["args"][0]], env=pod_env, capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = calls.read_text().splitlines()
    endpoint, key, secret_key = (
        secret[k] for k in ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    )
    alias = f"alias set coughreg {endpoint} {key} {secret_key}"
    assert lines.count(alias) == 3, lines
    bucket = re.match(r"s3://([^/]+)", launcher["defaultPipelineRoot"]).group(1)
    assert bucket == "coughreg-artifacts"
    assert f"mb --ignore-existing coughreg/{bucket}" in lines
    assert "mb --ignore-existing coughreg/coughreg-data" in lines
    assert secret["AWS_ENDPOINT_URL_S3"].startswith("http://coughreg-minio.coughreg.svc")


@pytest.mark.parametrize("target", [*TARGETS, SERVING])
def test_every_container_image_is_pinned(target):
    objects = _objects(target)
    images = [
        (where, container["image"])
        for where, spec in _pod_specs(objects)
        for container in spec.get("initContainers", []) + spec.get("containers", [])
    ]
    for where, image in images:
        name, _, digest = image.partition("@")
        last = name.rsplit("/", 1)[-1]  # a registry's port is not a tag
        tag = last.rpartition(":")[2] if ":" in last else ""
        assert digest or (tag and tag != "latest"), f"{where}: {image} has no explicit version"
    if target == "overlays/minio-dev":
        assert {image.split(":")[0] for _, image in images} == {"quay.io/minio/minio", "quay.io/minio/mc"}
        assert all(re.search(r":RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ$", image) for _, image in images), images
    if target == SERVING:
        # The project's CPU image, named as coughreg/runtime/images.py names it. The tag is the image the scorer
        # was exported with (kustomization.yaml's `images:`), not necessarily this checkout's.
        from coughreg.runtime import images as built

        form = re.escape(f"{built.REGISTRY}/coughreg:{built.VERSION}-") + r"[0-9a-f]{12}-cpu"
        assert [re.fullmatch(form, image) is not None for _, image in images] == [True], images
        if not {"COUGHREG_CPU_IMAGE", "COUGHREG_IMAGE_TAG"} & set(os.environ):
            assert re.fullmatch(form, built.CPU_IMAGE), built.CPU_IMAGE


def test_components_take_their_image_from_one_place():
    from components.features import feature_part
    from components.train import train
    from coughreg.runtime.images import CPU_IMAGE, GPU_IMAGE

    assert feature_part.component_spec.implementation.container.image == CPU_IMAGE
    assert train.component_spec.implementation.container.image == GPU_IMAGE
    makefile = (PROJECT / "Makefile").read_text()
    assert "coughreg.runtime.images" in makefile
