"""YAML config files with dotted `key=value` overrides, and readable validation errors.

Shared by every config loader (`lockstep train`, `lockstep sft`): values parse as YAML
scalars (`trainer.zero_stage=3`, `algo.name=ppo`, `rollout.engine={max_num_seqs: 8}`);
errors name the file, the line (bad YAML) or the dotted key (bad value, unknown key).
"""
from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError


class ConfigError(ValueError):
    """A bad config; the message names the file and the dotted key or line."""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        if "=" not in text:
            raise ConfigError(f"override {text!r}: expected key=value (e.g. trainer.zero_stage=3)")
        key, raw = text.split("=", 1)
        path = key.split(".")
        if not key or any(not part for part in path):
            raise ConfigError(f"override {text!r}: bad key {key!r}")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        for part in path[:-1]:
            if not isinstance(node.setdefault(part, {}), dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = node[part]
        node[path[-1]] = value
    return data


def load_yaml(path: str | Path, overrides: list[str] | None = None) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}:" if mark else ""
        raise ConfigError(f"{path}:{where} not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return apply_overrides(data, overrides or [])


def describe(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key {key!r}")
        else:
            got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
            lines.append(f"{source}: {key}: {e['msg']}{got}")
    return "\n".join(lines)


def validate(model_cls, path: str | Path, overrides: list[str] | None = None):
    """Load YAML + overrides and validate into `model_cls`, raising ConfigError."""
    data = load_yaml(path, overrides)
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(describe(err, str(path))) from None
    except ValueError as err:
        raise ConfigError(f"{path}: {err}") from None
