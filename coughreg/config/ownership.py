"""Which config keys shape which step, and how one step's config is put together.

KFP reuses a step from its cache when the step's inputs are unchanged, so a step must receive
exactly the keys that shape its output: given the whole config, it would rerun whenever any key
changed. Every key therefore has one owner, the first step whose output it shapes. The owner
receives it as a parameter (``<step>_config``: one line of JSON holding only its keys); the steps
after it read it back from the artifact the owner wrote (``config.yaml``, see
``coughreg.artifacts``). The ``cluster`` section shapes the Kubernetes side only and is never a
parameter; ``resolved`` is bookkeeping.

A step's config is its chain: the upstream steps' keys from the input artifact, then its own.
A key given for a step that an upstream step owns must agree with what the artifact was made
with; a disagreement is an error naming both values, never a silent mix.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ValidationError

from coughreg.config.loading import describe_errors, resolve_config
from coughreg.config.schema import ExperimentConfig
from coughreg.runtime import env
from coughreg.runtime.errors import ConfigError

STEPS = ("ingest", "features", "train", "evaluate", "export")
UPSTREAM = {
    "ingest": (),
    "features": ("ingest",),
    "train": ("ingest", "features"),
    "evaluate": ("ingest", "features", "train"),
    "export": ("ingest", "features", "train", "evaluate"),
}
NOT_PARAMETERS = ("cluster", "resolved")  # the Kubernetes side and bookkeeping

# The owner of every key of a section, unless the key is listed below.
SECTION_OWNER = {
    "architecture": "train",
    "audio": "features",
    "augmentation": "train",
    "dataset": "ingest",
    "environment": "train",
    "logging": "train",
    "prediction": "evaluate",  # the chunking validation recordings are scored with, which the scorer keeps
    "training": "train",
    "ingest": "ingest",
    "features": "features",
}
KEY_OWNER = {
    "audio.spectrogram_normalization": "train",  # applied inside the model; shards stay raw log-mel
    "audio.training_chunk_seconds": "train",  # crops drawn while training
    "dataset.data_sample": "train",  # folds, subsampling and validation are training's choices
    "dataset.data_sample_choice": "train",
    "dataset.group_fold_truncate": "train",
    "dataset.selected_folds": "train",
    "dataset.validation_size": "train",
    "dataset.validation_strategy": "train",
    "prediction.max_inference_chunk_seconds": "features",  # audio beyond it is never featurized
    "prediction.metric": "train",  # ranks epochs for save_best_checkpoint
    "augmentation.recording_chain_views": "features",  # the copies are spectrograms beside the shards
    "training.build_scoring_pipelines": "export",
    "training.run_interpretations": "evaluate",
    "logging.number_of_audios": "evaluate",
    "experiment_name": "evaluate",  # the report's title
}
# Keys that shape how a step runs, not what it makes: never parameters (a new worker count must not
# retrain a model); they reach the step (or steps) as environment variables, which no cache key holds.
# The experiment tracker is one: where results are also sent changes none of them.
TRACKING = ("evaluate", "export")
RUNTIME = {
    "features.workers": ("features", env.FEATURE_WORKERS_ENV),
    "ingest.retry_budget_seconds": ("ingest", env.S3_RETRY_BUDGET_ENV),
    "environment.number_of_workers": ("train", env.LOADER_WORKERS_ENV),
    "cluster.checkpoint_uri": ("train", env.CHECKPOINT_URI_ENV),
    "cluster.weights_uri": ("preflight", env.WEIGHTS_URI_ENV),
    "logging.logger": (TRACKING, env.TRACKING_LOGGER_ENV),
    "logging.neptune_project": (TRACKING, env.NEPTUNE_PROJECT_ENV),
    "logging.mlflow_experiment": (TRACKING, env.MLFLOW_EXPERIMENT_ENV),
}
# Keys a user sets in the KFP UI as typed run parameters (their step's JSON leaves them out).
UI_PARAMETERS = {
    "backbone": "architecture.backbone",
    "epochs": "training.epochs",
    "learning_rate": "training.learning_rate",
    "batch_size": "training.batch_size",
    "max_mae_to_median_baseline": "prediction.max_mae_to_median_baseline",
}


def all_keys() -> list[str]:
    """Every dotted key of the config model that can be a parameter, in the model's order."""
    keys = []
    for section, field in ExperimentConfig.model_fields.items():
        if section in NOT_PARAMETERS:
            continue
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(f"{section}.{name}" for name in annotation.model_fields)
        else:
            keys.append(section)
    return keys


def runtime_users(key: str) -> tuple[str, ...]:
    """The steps a runtime setting reaches (none for other keys)."""
    users = RUNTIME.get(key, ((), ""))[0]
    return (users,) if isinstance(users, str) else users


def owner(key: str) -> str | None:
    """The step that owns a dotted key; None for runtime settings, the cluster section and bookkeeping."""
    if key in RUNTIME:
        return None
    if key in KEY_OWNER:
        return KEY_OWNER[key]
    section = key.split(".", 1)[0]
    return None if section in NOT_PARAMETERS else SECTION_OWNER[section]


def owned_keys(step: str) -> list[str]:
    _check_step(step)
    return [key for key in all_keys() if owner(key) == step]


def chain_keys(step: str) -> list[str]:
    """The keys that shape a step's output: its upstream steps' and its own."""
    steps = (*UPSTREAM[step], step)
    return [key for key in all_keys() if owner(key) in steps]


def runtime_env(config: ExperimentConfig, step: str) -> dict[str, str]:
    """The environment variables that carry a step's runtime settings (set on its task at compile time); the
    preflight step gets them all (it checks every location)."""
    flat = flatten(config.model_dump(mode="json"))
    return {env: str(flat[key]) for key, (_, env) in RUNTIME.items()
            if (step in runtime_users(key) or step == "preflight") and flat.get(key) not in (None, "")}


def runtime_from_env() -> dict[str, Any]:
    """Runtime settings found in the environment, nested (see ``RUNTIME``)."""
    import os

    import yaml

    return nest({key: yaml.safe_load(os.environ[env]) for key, (_, env) in RUNTIME.items() if os.environ.get(env)})


def _check_step(step: str) -> None:
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; steps: {', '.join(STEPS)}")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; the two levels of the config only (values stay whole)."""
    flat = {}
    for name, value in tree.items():
        dotted = f"{prefix}{name}"
        if not prefix and isinstance(value, dict) and name in ExperimentConfig.model_fields and name != "experiment_name":
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        section, _, name = key.partition(".")
        if name:
            tree.setdefault(section, {})[name] = value
        else:
            tree[section] = value
    return tree


def config_values(config: ExperimentConfig, keys: list[str]) -> dict[str, Any]:
    """The values of dotted keys, as JSON values."""
    flat = flatten(config.model_dump(mode="json"))
    return {key: flat[key] for key in keys}


def step_settings(config: ExperimentConfig, step: str, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The keys a step owns, nested, with their values in this config."""
    return nest(config_values(config, [k for k in owned_keys(step) if k not in exclude]))


def step_parameter(config: ExperimentConfig, step: str, exclude: tuple[str, ...] = ()) -> str:
    """A step's keys as one line of canonical JSON (which is YAML): the same config, the same bytes."""
    return json.dumps(step_settings(config, step, exclude), sort_keys=True, separators=(",", ":"))


def typed_parameters(step: str) -> dict[str, str]:
    """The typed run parameters a step's task receives beside its JSON: name -> dotted key."""
    return {name: key for name, key in UI_PARAMETERS.items() if owner(key) == step}


def step_arguments(config: ExperimentConfig, step: str) -> dict[str, Any]:
    """The parameters a step's task receives: ``<step>_config``, and its typed run parameters."""
    typed = typed_parameters(step)
    values = {name: config_values(config, [key])[key] for name, key in typed.items()}
    return {f"{step}_config": step_parameter(config, step, exclude=tuple(typed.values())), **values}


def check_keys(step: str, given: dict[str, Any], where: str, strict: bool) -> dict[str, Any]:
    """The given keys, flat, once every one is known (and, when ``strict``, owned by ``step`` or a runtime setting)."""
    _check_step(step)
    flat = flatten(given)
    known = set(all_keys())
    for key in flat:
        if key not in known and key.split(".", 1)[0] not in NOT_PARAMETERS:
            raise ConfigError(f"{where}: unknown key '{key}'")
    if strict:
        foreign = sorted(k for k in flat if owner(k) != step and k not in RUNTIME)
        if foreign:
            raise ConfigError(
                f"{where}: {', '.join(repr(k) for k in foreign)} belong to another step "
                f"({', '.join(sorted({str(owner(k)) for k in foreign}))}); the {step} step takes only its own keys"
            )
    return flat


def build_step_config(
    step: str,
    given: dict[str, Any],
    upstream: ExperimentConfig | None,
    where: str,
    made_by: str = "the input artifact",
    strict: bool = False,
    overrides: list[str] | None = None,
    source: str | None = None,
) -> ExperimentConfig:
    """The config a step runs with: upstream keys from its input artifact, then its own keys.

    Args:
        step: the step's name.
        given: keys given for this run, nested (a ``<step>_config`` parameter, or a config file and
            ``--set`` overrides). Keys of later steps and of the cluster section are left aside.
        upstream: the config saved beside the step's input artifact (None for ingest).
        where: names ``given`` in messages (a parameter name or a file).
        made_by: names the input artifact in messages.
        strict: refuse keys the step does not own (a parameter holds the owner's keys only).
        overrides: the ``--set`` overrides among ``given``, recorded with ``where`` under ``resolved``.
        source: where the keys came from, recorded and named in errors of their values (default: ``where``).

    Raises:
        ConfigError: a key is unknown or invalid, or a key an upstream step owns disagrees with
            what the input artifact was made with (both values named).
    """
    flat = check_keys(step, given, where, strict)
    own = {k: v for k, v in flat.items() if owner(k) == step or step in runtime_users(k)}
    chain: dict[str, Any] = {}
    if upstream is not None:
        chain = config_values(upstream, [k for k in all_keys() if owner(k) in UPSTREAM[step]])
        _check_agreement(step, flat, upstream, chain, where, made_by)
    merged = nest({**chain, **own})
    merged["resolved"] = {"source": source or where, "overrides": list(overrides or [])}
    try:
        config = ExperimentConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, source or where)) from None
    return resolve_config(config, keys=chain_keys(step))


def _check_agreement(step: str, flat: dict, upstream: ExperimentConfig, chain: dict, where: str, made_by: str) -> None:
    """Upstream keys given again must say what the artifact was made with."""
    given_upstream = {k: v for k, v in flat.items() if owner(k) in UPSTREAM[step]}
    if given_upstream.get("environment.seed") == -1:  # "draw one" agrees with the seed the train step drew
        del given_upstream["environment.seed"]
    if not given_upstream:
        return
    try:
        asked = ExperimentConfig.model_validate(nest({**chain, **given_upstream}))
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, where)) from None
    asked_values = config_values(asked, list(given_upstream))
    differences = [
        f"{key}: {made_by} was made with {json.dumps(chain[key])}, {where} says {json.dumps(asked_values[key])}"
        for key in given_upstream
        if asked_values[key] != chain[key]
    ]
    if differences:
        steps = sorted({str(owner(k)) for k in given_upstream if asked_values[k] != chain[k]})
        raise ConfigError(
            "the config disagrees with the input artifact:\n  " + "\n  ".join(differences)
            + f"\nDrop these keys (the {step} step reads them from its input) or rerun the {', '.join(steps)} step with them."
        )


def with_upstream(config: ExperimentConfig, step: str, upstream: ExperimentConfig) -> ExperimentConfig:
    """``config``'s own keys for ``step`` on top of the upstream keys an artifact was made with."""
    info = config.resolved
    where = info.source if info and info.source and info.source != "defaults" else f"the {step} step's config"
    return build_step_config(step, step_settings(config, step), upstream, where, overrides=info.overrides if info else None)
