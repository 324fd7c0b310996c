"""Finding reward functions: built-in names, entry points, `module:function`, `file.py:function`.

A reward function has verl's signature,
`compute_score(data_source, solution_str, ground_truth, extra_info) -> float | dict`, and is
called with those four as keywords. `resolve(spec, **kwargs)` turns a spec into such a
callable, checking the signature up front, so a broken plugin fails when the config loads,
with an error naming it:

* a registered name: a built-in (`math`, `code`, `format`, `length`), one added in this
  process with `register`, or one a package declares in the entry point group
  `lockstep.rewards` (`name = "pkg.module:compute_score"` in its pyproject);
* `package.module:function`;
* `path/to/file.py:function` (relative paths from the current directory).

The target may be a function (kwargs are bound with functools.partial) or a class
(instantiated with the kwargs; the instance is the reward).
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
from dataclasses import dataclass
from typing import Any, Callable

ENTRY_POINT_GROUP = "lockstep.rewards"
BUILTINS = {
    "math": "rewards.math:MathReward",
    "code": "rewards.code.reward:CodeReward",
    "format": "rewards.format:FormatReward",
    "length": "rewards.length:LengthReward",
}
_ARGS = ("data_source", "solution_str", "ground_truth", "extra_info")
_registered: dict[str, Callable] = {}


class RewardPluginError(ValueError):
    """A reward spec cannot be resolved into a working reward function."""

    def __init__(self, plugin: str, message: str):
        super().__init__(f"reward plugin {plugin!r}: {message}")
        self.plugin = plugin


@dataclass
class RewardInfo:
    name: str
    source: str   # builtin | registered | entry point (distribution name)
    target: str


def register(name: str, fn: Callable) -> None:
    """Make `fn` available by `name` in this process (tests, notebooks)."""
    check_signature(name, fn)
    _registered[name] = fn


def _entry_points(name: str | None = None) -> list[importlib.metadata.EntryPoint]:
    eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return [ep for ep in eps if name is None or ep.name == name]


def available() -> list[RewardInfo]:
    """Every reward that can be named, built-ins first."""
    infos = [RewardInfo(n, "builtin", t) for n, t in BUILTINS.items()]
    infos += [RewardInfo(n, "registered", getattr(f, "__qualname__", repr(f)))
              for n, f in _registered.items()]
    seen = set(BUILTINS) | set(_registered)
    for ep in sorted(_entry_points(), key=lambda e: e.name):
        dist = getattr(ep.dist, "name", None) or "?"
        infos.append(RewardInfo(ep.name, f"entry point ({dist})"
                                + (" [shadowed]" if ep.name in seen else ""), ep.value))
    return infos


def _load_file(plugin: str, path: str, attr: str) -> Any:
    full = os.path.abspath(path)
    if not os.path.isfile(full):
        raise RewardPluginError(plugin, f"file not found: {full}")
    module_name = "lockstep_reward_" + hashlib.sha1(full.encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(module_name, full)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - any import-time failure is the plugin's
        raise RewardPluginError(plugin, f"importing {full} failed: {type(err).__name__}: "
                                f"{err}") from err
    if not hasattr(module, attr):
        raise RewardPluginError(plugin, f"{full} has no attribute {attr!r}")
    return getattr(module, attr)


def _load_object(plugin: str, target: str) -> Any:
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise RewardPluginError(plugin, f"expected 'module:function' or 'file.py:function', "
                                f"got {target!r}")
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        return _load_file(plugin, module_name, attr)
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001
        raise RewardPluginError(plugin, f"cannot import module {module_name!r}: "
                                f"{type(err).__name__}: {err}") from err
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RewardPluginError(plugin, f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _load_name(name: str) -> Any:
    if name in BUILTINS:
        return _load_object(name, BUILTINS[name])
    if name in _registered:
        return _registered[name]
    eps = _entry_points(name)
    if not eps:
        known = ", ".join(i.name for i in available())
        raise RewardPluginError(name, f"no reward of that name (known: {known}); use a "
                                "'module:function' or 'file.py:function' spec, or install a "
                                f"package that declares it in entry point group "
                                f"{ENTRY_POINT_GROUP!r}")
    if len({ep.value for ep in eps}) > 1:
        raise RewardPluginError(name, "declared by several packages: "
                                + ", ".join(f"{ep.value} ({getattr(ep.dist, 'name', '?')})"
                                            for ep in eps))
    try:
        return eps[0].load()
    except Exception as err:  # noqa: BLE001
        dist = getattr(eps[0].dist, "name", "?")
        raise RewardPluginError(name, f"entry point {eps[0].value!r} of package {dist!r} "
                                f"failed to load: {type(err).__name__}: {err}") from err


def check_signature(plugin: str, fn: Any) -> None:
    """The reward must accept the four verl arguments as keywords."""
    if not callable(fn):
        raise RewardPluginError(plugin, f"{fn!r} is not callable")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins without introspection: trust them
    try:
        sig.bind(**{a: None for a in _ARGS})
    except TypeError as err:
        raise RewardPluginError(plugin, f"wrong signature {sig}: a reward is called as "
                                "compute_score(data_source=, solution_str=, ground_truth=, "
                                f"extra_info=) ({err})") from None


def resolve(spec: str, **kwargs) -> Callable:
    """The reward callable for `spec`, configured with `kwargs`."""
    if not isinstance(spec, str) or not spec.strip():
        raise RewardPluginError(str(spec), "a reward spec must be a non-empty string")
    spec = spec.strip()
    obj = _load_object(spec, spec) if ":" in spec else _load_name(spec)
    if inspect.isclass(obj):
        try:
            fn = obj(**kwargs)
        except Exception as err:  # noqa: BLE001 - bad kwargs or a failing constructor
            raise RewardPluginError(spec, f"{type(err).__name__}: {err}") from err
    else:
        fn = obj
        if kwargs:
            check_signature(spec, fn)
            try:
                inspect.signature(fn).bind_partial(**kwargs)
            except (TypeError, ValueError) as err:
                raise RewardPluginError(spec, f"does not take kwargs {sorted(kwargs)}: "
                                        f"{err}") from None
            fn = functools.partial(fn, **kwargs)
    check_signature(spec, fn)
    return fn


def get(spec: str, **kwargs) -> Callable:
    """Alias of `resolve`: `rewards.get("math")`, `rewards.get("my.mod:score")`."""
    return resolve(spec, **kwargs)
