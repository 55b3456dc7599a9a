"""The config reference: every key with its type, default, the step it goes to and its meaning, as Markdown.

``python pipeline.py config-reference --write`` puts it in ``docs/config-reference.md``; a test checks it is current.
"""

from __future__ import annotations

import json
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel

from coughreg.config.ownership import RUNTIME, owner, runtime_users
from coughreg.config.schema import ExperimentConfig


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is Annotated:  # a type with a validator (config.Location): shown as its type
        return _type_name(get_args(annotation)[0])
    if get_origin(annotation) in (Union, UnionType) and any(get_origin(a) is Annotated for a in get_args(annotation)):
        return " \\| ".join("None" if a is type(None) else _type_name(a) for a in get_args(annotation))
    text = str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
    return text.replace("coughreg.config.schema.", "").replace("|", "\\|")  # a bare | would end the table cell


def config_reference() -> str:
    """Every key of the config model, with type, default, the step it goes to and its meaning, as a Markdown table (docs/config-reference.md)."""
    def goes_to(key: str) -> str:
        if key in RUNTIME:
            return f"{', '.join(runtime_users(key))} (env)"
        return owner(key) or "cluster"

    lines = ["| key | type | default | step | meaning |", "| --- | --- | --- | --- | --- |"]
    defaults = ExperimentConfig().model_dump(mode="json")
    for section, field in ExperimentConfig.model_fields.items():
        annotation = field.annotation
        if section == "resolved":
            continue
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            for name, inner in annotation.model_fields.items():
                default = json.dumps(defaults[section][name])
                meaning = (inner.description or "").replace("|", "\\|")
                key = f"{section}.{name}"
                lines.append(f"| `{key}` | `{_type_name(inner.annotation)}` | `{default}` | {goes_to(key)} | {meaning} |")
        else:
            lines.append(f"| `{section}` | `{_type_name(annotation)}` | `{json.dumps(defaults[section])}` | {goes_to(section)} | the run's name |")
    return "\n".join(lines) + "\n"
