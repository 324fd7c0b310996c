"""`RewardConfig`: the run config's `rewards` section, validated and resolved at load time.

```yaml
rewards:
  rewards:                       # what to score with; the total is the weighted sum
    - {name: math, weight: 1.0}
    - {name: format, weight: 0.1, kwargs: {preset: boxed}}
    - {spec: my_pkg.scores:compute_score, weight: 0.5, kwargs: {strict: true}}
  concurrency: 8                 # items x rewards scored at once
  math: {timeout_s: 5.0}         # rewards.math.MathConfig
  code: {timeout_s: 5.0, score_mode: fraction}   # rewards.code.reward.CodeConfig
```

Every entry is resolved (imported, signature-checked, built with its kwargs) when the model
is validated, so a missing or broken plugin fails at config load with the entry and the
plugin named. Built-in rewards take their section (`math`, `code`) as defaults, overridden by
the entry's kwargs.
"""
from __future__ import annotations

from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from rewards.code.reward import CodeConfig
from rewards.math import MathConfig
from rewards.registry import BUILTINS, RewardPluginError, resolve


class RewardEntry(BaseModel):
    """One reward in the mix: a registered `name` or a `spec`, with a weight and kwargs."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description="registered name: math, code, format, "
                             "length, or an entry point of group lockstep.rewards")
    spec: str | None = Field(None, description="'package.module:function' or "
                             "'path/file.py:function'")
    weight: float = Field(1.0, description="the item's total is sum(weight * score)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to the reward")
    label: str | None = Field(None, description="metric name; default: name or function name")

    @model_validator(mode="after")
    def _one_target(self) -> "RewardEntry":
        if (self.name is None) == (self.spec is None):
            raise ValueError("give exactly one of 'name' or 'spec'")
        return self

    @property
    def target(self) -> str:
        return self.name if self.name is not None else self.spec

    @property
    def metric_name(self) -> str:
        if self.label:
            return self.label
        if self.name is not None:
            return self.name
        return self.spec.rpartition(":")[2] or self.spec


class RewardConfig(BaseModel):
    """The run config's reward section (see the module docstring for the YAML)."""

    model_config = ConfigDict(extra="forbid")

    rewards: list[RewardEntry] = Field(default_factory=lambda: [RewardEntry(name="math")],
                                       min_length=1)
    concurrency: int = Field(8, ge=1, description="items x rewards scored at once")
    math: MathConfig = Field(default_factory=MathConfig)
    code: CodeConfig = Field(default_factory=CodeConfig)

    _resolved: list[tuple[str, float, Callable]] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _resolve_plugins(self) -> "RewardConfig":
        resolved, names = [], set()
        for i, entry in enumerate(self.rewards):
            kwargs = dict(entry.kwargs)
            section = _section_of(entry)
            if section is not None:
                kwargs = {**getattr(self, section).model_dump(), **kwargs}
            try:
                fn = resolve(entry.target, **kwargs)
            except RewardPluginError as err:
                raise ValueError(f"rewards[{i}] ({'name' if entry.name else 'spec'} "
                                 f"{entry.target!r}): {err}") from None
            label = entry.metric_name
            if label in names:
                raise ValueError(f"rewards[{i}]: metric name {label!r} is used twice; set "
                                 "'label' to tell them apart")
            names.add(label)
            resolved.append((label, entry.weight, fn))
        self._resolved = resolved
        return self

    def resolved(self) -> list[tuple[str, float, Callable]]:
        """(metric name, weight, reward callable) per entry, as resolved at load."""
        return list(self._resolved)


def _section_of(entry: RewardEntry) -> str | None:
    if entry.name in BUILTINS and entry.name in ("math", "code"):
        return entry.name
    return None
