"""What KFP's cache key of each task is made of, read from a compiled pipeline (IR YAML).

KFP's driver keys a task's cache entry by its input parameter values, the identities of its input
artifacts, its output definitions, and its container's image, command and arguments
(``backend/src/v2/cacheutils``); the environment and the Kubernetes settings are not part of it.
An input artifact keeps its identity as long as the task that made it is reused, so a task's key
here folds in the key of every task upstream of it. Two compiles then tell which tasks a
resubmission would take from the cache and which would run again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml


class _Pipeline:
    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.root_inputs = {name: definition.get("defaultValue") for name, definition in
                            spec["root"].get("inputDefinitions", {}).get("parameters", {}).items()}

    def executor(self, component: str) -> dict:
        label = self.spec["components"][component].get("executorLabel")
        container = self.spec["deploymentSpec"]["executors"][label]["container"]
        return {"image": container.get("image"), "command": container.get("command", []), "args": container.get("args", [])}


def task_materials(spec: dict) -> dict[str, dict]:
    """Every container task of a compiled pipeline -> what its cache key is made of. A task inside a ParallelFor
    is named ``for-loop-1/inner``, one inside a ``dsl.If`` branch ``<branch name>/inner`` (``quality-gate-passed/export``)."""
    pipeline = _Pipeline(spec)
    materials: dict[str, dict] = {}
    root_scope = {"parameters": {k: {"value": v} for k, v in pipeline.root_inputs.items()}, "artifacts": {}}
    _walk(pipeline, spec["root"]["dag"]["tasks"], root_scope, "", materials)
    return materials


def _walk(pipeline: _Pipeline, tasks: dict, scope: dict, prefix: str, materials: dict) -> dict[str, str]:
    keys: dict[str, str] = {}

    def key_of(name: str) -> str:
        if name not in keys:
            keys[name] = _task_key(name)
        return keys[name]

    def resolve_parameter(spec: dict) -> Any:
        if "componentInputParameter" in spec:
            return scope["parameters"].get(spec["componentInputParameter"], {"unresolved": spec["componentInputParameter"]})
        if "runtimeValue" in spec:
            return {"value": spec["runtimeValue"].get("constant")}
        if "taskOutputParameter" in spec:
            out = spec["taskOutputParameter"]
            if not tasks[out["producerTask"]].get("cachingOptions", {}).get("enableCache", False):
                # An uncached task runs every time: the value it gives then is what counts, not how it was made.
                return {"output": out["outputParameterKey"], "known at run time": f"{prefix}{out['producerTask']}"}
            return {"output": out["outputParameterKey"], "of": key_of(out["producerTask"])}
        return {"spec": spec}

    def resolve_artifact(spec: dict) -> Any:
        if "taskOutputArtifact" in spec:
            out = spec["taskOutputArtifact"]
            return {"artifact": out["outputArtifactKey"], "of": key_of(out["producerTask"])}
        if "componentInputArtifact" in spec:
            return scope["artifacts"].get(spec["componentInputArtifact"], {"unresolved": spec["componentInputArtifact"]})
        return {"spec": spec}

    def _task_key(name: str) -> str:
        task = tasks[name]
        component = task["componentRef"]["name"]
        inputs = task.get("inputs", {})
        parameters = {k: resolve_parameter(v) for k, v in inputs.get("parameters", {}).items()}
        artifacts = {k: resolve_artifact(v) for k, v in inputs.get("artifacts", {}).items()}
        definition = pipeline.spec["components"][component]
        if "dag" in definition:  # a ParallelFor: its tasks see the loop's inputs, the item as one of the items
            iterator = task.get("parameterIterator")
            if iterator:
                items = parameters.get(iterator["items"].get("inputParameter", ""), iterator["items"])
                parameters[iterator["itemInput"]] = {"item of": items}
            producers = _producers(inputs, prefix, scope)
            inner = _walk(pipeline, definition["dag"]["tasks"], {"parameters": parameters, "artifacts": artifacts, "producers": producers},
                          prefix + _group_name(name, task), materials)
            return _digest({"dag": inner})
        material = {
            "container": pipeline.executor(component),
            "parameters": parameters,
            "artifacts": artifacts,
            "outputs": definition.get("outputDefinitions", {}),
            "caching": bool(task.get("cachingOptions", {}).get("enableCache", False)),
            "after": sorted(_producers(inputs, prefix, scope)),
        }
        key = _digest({k: v for k, v in material.items() if k not in ("caching", "after")})
        materials[f"{prefix}{name}"] = {**material, "key": key}
        return key

    for name in tasks:
        key_of(name)
    return keys


def _group_name(name: str, task: dict) -> str:
    """The prefix of the tasks inside a DAG task: a loop by its name, a ``dsl.If`` branch by the name it was given;
    the group that holds an If and its Else adds nothing."""
    if name.startswith("condition-branches-"):
        return ""
    if "triggerPolicy" in task and task["triggerPolicy"].get("condition"):
        return f"{task.get('taskInfo', {}).get('name', name)}/"
    return f"{name}/"


def _producers(inputs: dict, prefix: str, scope: dict) -> set[str]:
    """The tasks whose artifacts a task reads (a new artifact from any of them is a new input)."""
    found = set()
    for spec in inputs.get("artifacts", {}).values():
        if "taskOutputArtifact" in spec:
            found.add(f"{prefix}{spec['taskOutputArtifact']['producerTask']}")
        elif "componentInputArtifact" in spec:
            found |= scope.get("producers", set())
    return found


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def read_spec(path: str | Path) -> dict:
    """The pipeline spec of a compiled YAML (the first document; the second holds Kubernetes settings)."""
    from coughreg.runtime.errors import CoughPipelineError

    try:
        spec = next(yaml.safe_load_all(Path(path).read_text()))
    except (OSError, yaml.YAMLError, StopIteration) as exc:
        raise CoughPipelineError(f"{path}: cannot read a compiled pipeline ({exc})") from None
    if not isinstance(spec, dict) or not {"root", "components", "deploymentSpec"} <= set(spec):
        raise CoughPipelineError(f"{path}: not a compiled KFP pipeline (no root DAG); compile one with `pipeline.py compile`")
    return spec


def compare(before: dict, after: dict) -> list[dict]:
    """Per task of ``after``: whether a resubmission reuses it from the cache or runs it again, and why."""
    old, new = task_materials(before), task_materials(after)
    rows, running = [], set()
    for name, material in new.items():  # in the DAG's order: producers first
        previous = old.get(name)
        reran = sorted(p for p in material["after"] if p in running or any(r.startswith(p + "/") for r in running))
        if not material["caching"]:
            verdict, why = "runs", "caching is off for this task"
        elif previous is None:
            verdict, why = "runs", "a new task"
        elif reran:
            verdict, why = "runs", f"new input artifacts from {', '.join(reran)}"
        elif previous["key"] == material["key"]:
            runtime = sorted({v["known at run time"] for v in material["parameters"].values()
                              if isinstance(v, dict) and "known at run time" in v})
            verdict, why = "cached", f"if the output of {', '.join(runtime)} is the same" if runtime else ""
        else:
            verdict, why = "runs", _why(previous, material)
        if verdict == "runs":
            running.add(name)
        rows.append({"task": name, "before": previous["key"][:12] if previous else "-", "after": material["key"][:12],
                     "verdict": verdict, "why": why})
    return rows


def _why(old: dict, new: dict) -> str:
    changed = [f"parameter {k}" for k in sorted(set(old["parameters"]) | set(new["parameters"]))
               if old["parameters"].get(k) != new["parameters"].get(k) and not _upstream_only(old["parameters"].get(k), new["parameters"].get(k))]
    changed += [f"input {k} (made again upstream)" for k in sorted(set(old["artifacts"]) | set(new["artifacts"]))
                if old["artifacts"].get(k) != new["artifacts"].get(k)]
    changed += [f"upstream output {k}" for k in sorted(set(old["parameters"]) | set(new["parameters"]))
                if old["parameters"].get(k) != new["parameters"].get(k) and _upstream_only(old["parameters"].get(k), new["parameters"].get(k))]
    if old["container"] != new["container"]:
        changed.append("the container (image, command or code)")
    if old["outputs"] != new["outputs"]:
        changed.append("its outputs")
    return ", ".join(changed)


def _upstream_only(old: Any, new: Any) -> bool:
    return isinstance(old, dict) and isinstance(new, dict) and "of" in old and "of" in new


def format_comparison(rows: list[dict]) -> str:
    width = max(len(r["task"]) for r in rows)
    lines = [f"{'task':<{width}}  {'before':<12}  {'after':<12}  verdict"]
    for row in rows:
        why = f"  ({row['why']})" if row["why"] else ""
        lines.append(f"{row['task']:<{width}}  {row['before']:<12}  {row['after']:<12}  {row['verdict']}{why}")
    return "\n".join(lines)
