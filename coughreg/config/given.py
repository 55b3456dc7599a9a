"""The config keys given for a step run, and where they came from: a component's ``<step>_config``
parameter, or a config file and ``--set`` overrides; every step's keys from one config, and back."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from coughreg.config.loading import DEFAULT_CONFIG, describe_errors, load_settings, resolve_config
from coughreg.config.ownership import (
    RUNTIME,
    STEPS,
    UI_PARAMETERS,
    build_step_config,
    check_keys,
    config_values,
    flatten,
    nest,
    owner,
    runtime_from_env,
    runtime_users,
    step_settings,
)
from coughreg.config.schema import ExperimentConfig
from coughreg.runtime.errors import ConfigError


@dataclass(frozen=True)
class Given:
    """The config keys given for one step run, nested as in the config, and where they came from."""

    keys: dict = field(default_factory=dict)
    where: str = "defaults"
    strict: bool = False  # a KFP parameter holds the owner's keys only
    overrides: tuple[str, ...] = ()
    defaults: dict = field(default_factory=dict)  # the default config file's keys: each step takes those it owns

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
        """A config file and ``--set`` overrides: only what they say is given. Without a file, the default config
        (``DEFAULT_CONFIG``, what ``run-local``, ``compile`` and ``submit`` start from) gives each step the keys
        it owns, and the keys of earlier steps come from the step's input artifact as always."""
        where = " and ".join(filter(None, [str(path) if path else "", "--set" if overrides else ""])) or "defaults"
        defaults = {} if path or not DEFAULT_CONFIG.is_file() else load_settings(DEFAULT_CONFIG)
        return cls(load_settings(path, overrides), where, overrides=tuple(overrides or ()), defaults=defaults)

    @property
    def described(self) -> str:
        """Which config a step starts from, in words (what the command line prints first)."""
        parts = [f"{DEFAULT_CONFIG.name} (the default config)" if self.defaults else "", "" if self.where == "defaults" else self.where]
        return " and ".join(filter(None, parts)) or self.where

    def build(self, step: str, upstream: ExperimentConfig | None, made_by: str = "the input artifact") -> ExperimentConfig:
        """The step's config: these keys on top of the upstream keys its input was made with."""
        keys = self.keys
        if self.defaults:  # the default config's keys of this step, beneath what was given
            given = flatten(self.keys)
            owned = {k: v for k, v in flatten(self.defaults).items()
                     if k not in given and (owner(k) == step or step in runtime_users(k))}
            keys = nest({**owned, **given})
        source = " and ".join([str(DEFAULT_CONFIG), *(["--set"] if self.overrides else [])]) if self.defaults else None
        return build_step_config(step, keys, upstream, self.where, made_by, self.strict, list(self.overrides), source)

    def with_keys(self, keys: dict) -> Given:
        """These keys with more on top (what an earlier task resolved at run time)."""
        merged = {section: dict(values) if isinstance(values, dict) else values for section, values in self.keys.items()}
        for section, values in keys.items():
            merged.setdefault(section, {}).update(values)
        return Given(merged, self.where, self.strict, self.overrides, self.defaults)


def givens_of(config: ExperimentConfig) -> dict[str, Given]:
    """Every step's keys from one config, with the runtime settings (what the pipeline's tasks receive)."""
    givens = {step: Given(step_settings(config, step), f"the config's {step} keys") for step in STEPS}
    runtime = {key: value for key, value in config_values(config, list(RUNTIME)).items() if value is not None}
    givens["ingest"] = givens["ingest"].with_keys(nest(runtime))  # worker counts, checkpoint_uri, weights_uri
    return givens


def whole_config(givens: dict[str, Given]) -> ExperimentConfig:
    """One config from every step's keys (each checked against what its step owns)."""
    flat: dict = {}
    for step, given in givens.items():
        flat.update(check_keys(step, given.keys, given.where, given.strict))
    where = ", ".join(given.where for given in givens.values())
    try:
        return resolve_config(ExperimentConfig.model_validate(nest(flat)))
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, where)) from None
