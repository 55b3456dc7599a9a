"""The experiment config loaded, overridden, resolved and saved (its schema is ``coughreg.config.schema``).

Loading reads the user's Hydrogen Torch YAML unchanged (or the default config), applies ``--set``
overrides, and names the file and key of every error. Resolution fills every default, lists the keys
that have no effect with the values given (``inert``), and records where the config came from. Each
step saves the keys that shaped its output as ``config.yaml`` beside its artifact
(``coughreg.config.ownership``); it loads back through the same model.
"""

from __future__ import annotations

import copy
import difflib
import logging
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from coughreg.config.schema import ExperimentConfig, ResolvedInfo, _none_strings_to_null
from coughreg.io.storage import atomic_write_text, redacted
from coughreg.runtime.errors import ConfigError

log = logging.getLogger(__name__)

CONFIG_FILE_NAME = "config.yaml"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
# The checkout's configs/, or the working directory's (the image installs the package elsewhere).
DEFAULT_CONFIG = next(
    (p for p in (PROJECT_ROOT / "configs" / "coughvid_ht.yaml", Path("configs/coughvid_ht.yaml").resolve()) if p.exists()),
    PROJECT_ROOT / "configs" / "coughvid_ht.yaml",
)



def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(_known_keys(annotation, prefix + name + "."))
    return keys


def describe_errors(error: ValidationError, source: str) -> str:
    known = _known_keys(ExperimentConfig)
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"] if not str(part).startswith("function-after"))
        if item["type"] == "extra_forbidden":
            section = key.rsplit(".", 1)[0] + "." if "." in key else ""
            close = difflib.get_close_matches(key, [k for k in known if k.startswith(section)], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            lines.append(f"unknown key '{key}'{hint}")
        else:
            value = item.get("input")
            value = redacted(value) if isinstance(value, str) else value  # a message never repeats a secret
            said = isinstance(value, (dict, list)) or (isinstance(value, str) and bool(value) and value in item["msg"])
            shown = "" if said else f" (got {value!r})"
            where = f"'{key}'" if key else "the config"
            lines.append(f"key {where}: {item['msg'].removeprefix('Value error, ')}{shown}")
    return f"{source}: invalid experiment config:\n  " + "\n  ".join(lines)


def _shown(text: str) -> str:
    """An override as a message shows it: a URI value with its credentials replaced by ``***``."""
    key, sign, value = text.partition("=")
    return f"{key}{sign}{redacted(value.strip())}" if sign else redacted(text)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value``; the value is read as YAML (numbers, booleans, lists)."""
    shown = _shown(text)
    if "=" not in text:
        raise ConfigError(f"--set {shown!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ConfigError(f"--set {shown!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        detail = f": {exc}" if shown == text else ""  # YAML's message quotes the value
        raise ConfigError(f"--set {shown!r}: value is not valid YAML{detail}") from None
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = copy.deepcopy(raw)
    known = set(_known_keys(ExperimentConfig))
    for text in overrides:
        path, value = parse_override(text)
        dotted = ".".join(path)
        if dotted not in known or dotted.startswith("resolved"):
            close = difflib.get_close_matches(dotted, sorted(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"--set {_shown(text)!r}: unknown key '{dotted}'{hint}")
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load and validate an experiment YAML (Hydrogen Torch's or the project's), with overrides.

    Args:
        path: the YAML file; the use case's Hydrogen Torch file when None.
        overrides: ``section.key=value`` strings applied before validation.

    Raises:
        ConfigError: naming the file and the key when anything is wrong.
    """
    path = Path(path) if path is not None else DEFAULT_CONFIG
    return config_from_dict(_read_yaml_mapping(path), source=str(path), overrides=overrides)


def _read_yaml_mapping(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if raw is None or raw == {}:
        raise ConfigError(f"{path}: the config file holds no keys (empty, or comments only); write the experiment's "
                          f"sections into it, or leave --config out to use {DEFAULT_CONFIG.name}")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    return raw


def config_from_dict(
    raw: dict[str, Any], source: str = "<dict>", overrides: list[str] | None = None
) -> ExperimentConfig:
    overrides = list(overrides or [])
    try:
        data = apply_overrides(raw, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    try:
        config = ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, source)) from None
    if overrides:
        info = config.resolved or ResolvedInfo()
        config.resolved = info.model_copy(update={"overrides": [*info.overrides, *overrides]})
    return config


def inert_keys(config: ExperimentConfig, keys: list[str] | None = None) -> dict[str, str]:
    """Keys whose value has no effect given the rest of the config, with the reason (only ``keys``, when given)."""
    inert: dict[str, str] = {}
    logger = config.logging.logger
    if logger != "Neptune" and (logger is None or config.logging.neptune_project):
        inert["logging.neptune_project"] = f"logger is {logger}"
    if logger != "MLflow" and config.logging.mlflow_experiment is not None:
        inert["logging.mlflow_experiment"] = f"logger is {logger}"
    if config.augmentation.mix_audio == "Disabled":
        for key in ("mix_concentration", "mix_iterations", "mix_probability", "mix_target"):
            inert[f"augmentation.{key}"] = "mix_audio is Disabled"
    if not config.training.differential_learning_rate_layers:
        inert["training.differential_learning_rate"] = "differential_learning_rate_layers is empty"
    if config.dataset.unlabeled_dataframe is not None:
        inert["dataset.unlabeled_dataframe"] = "unlabeled data is not used by this product"
    if config.dataset.test_dataframe is None and config.dataset.data_folder_test is not None:
        inert["dataset.data_folder_test"] = "test_dataframe is None"
    if config.dataset.validation_strategy != "kfold":
        inert["dataset.group_fold_column"] = "validation_strategy is not kfold"
    if config.dataset.data_sample == 1.0:
        inert["dataset.data_sample_choice"] = "data_sample is 1.0"
    if keys is not None:
        inert = {key: why for key, why in inert.items() if key in keys}
    return inert


def resolve_config(config: ExperimentConfig, keys: list[str] | None = None) -> ExperimentConfig:
    """Fill the run-time decisions in: the inert keys (among ``keys``, when given). Idempotent."""
    resolved = config.model_copy(deep=True)
    info = resolved.resolved or ResolvedInfo()
    updates: dict[str, Any] = {"inert": inert_keys(resolved, keys)}
    if not info.source:
        updates["source"] = "defaults"
    resolved.resolved = info.model_copy(update=updates)
    if updates["inert"] and not info.inert:
        log.warning(
            "config keys with no effect here (kept, marked inert): %s",
            "; ".join(f"{k} ({why})" for k, why in updates["inert"].items()),
        )
    return resolved


def load_resolved_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load, validate and resolve in one call: what every command does first."""
    config = load_config(path, overrides)
    source = str(Path(path).resolve()) if path is not None else str(DEFAULT_CONFIG)
    config.resolved = (config.resolved or ResolvedInfo()).model_copy(update={"source": source})
    return resolve_config(config)


def config_to_yaml(config: ExperimentConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=False, allow_unicode=True)


def save_config(config: ExperimentConfig, folder: str | Path, keys: list[str] | None = None) -> Path:
    """Write the resolved config as ``config.yaml`` into an artifact folder, atomically.

    With ``keys`` (dotted), only those keys are written (and ``resolved``): the keys that shaped
    the artifact, so the file never claims a value the step did not use.
    """
    data = config.to_dict()
    if keys is not None:
        wanted = set(keys)
        kept: dict[str, Any] = {}
        for section, value in data.items():
            if section == "resolved" and value:
                kept[section] = {**value, "inert": {k: v for k, v in value.get("inert", {}).items() if k in wanted}}
            elif section in wanted:
                kept[section] = value
            elif isinstance(value, dict):
                inner = {k: v for k, v in value.items() if f"{section}.{k}" in wanted}
                if inner:
                    kept[section] = inner
        data = kept
    target = Path(folder) / CONFIG_FILE_NAME
    atomic_write_text(target, yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True))
    return target


def load_settings(path: str | Path | None, overrides: list[str] | None = None) -> dict[str, Any]:
    """The keys a user gave, nested, as given: a config file's (when ``path``) with ``--set`` overrides on top.

    Validated like a whole config (unknown keys and bad values fail naming the key and the file), but
    the result holds only what was written, so a step can tell a given key from a default.
    """
    where = str(path) if path is not None else "--set"
    raw = _read_yaml_mapping(Path(path)) if path is not None else {}
    config_from_dict(raw, source=where, overrides=overrides)  # validate the whole
    return _none_strings_to_null(apply_overrides(raw, list(overrides or [])))
