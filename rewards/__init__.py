"""lockstep rewards: math, code and format rewards, and a plugin registry for your own.

A reward function has verl's signature,
`compute_score(data_source, solution_str, ground_truth, extra_info) -> float | dict`.

    import rewards
    fn = rewards.get("math")                        # or "pkg.mod:fn", "file.py:fn"
    fn("gsm8k", "... #### 18", "18", None)          # {"score": 1.0, ...}

    scorer = rewards.build([("math", 1.0), ("format", 0.1)], concurrency=8)
    scores, metrics = scorer.score_batch(items)     # items: dicts or rewards.ScoreItem

`rewards.RewardConfig` is the run config section; `RewardFn.from_config(cfg)` builds the
scorer. `lockstep rewards list|check` is the CLI (rewards/cli.py). Names resolve lazily so
`import rewards` stays cheap.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "RewardConfig": "rewards.config", "RewardEntry": "rewards.config",
    "RewardFn": "rewards.batch", "ScoreItem": "rewards.batch", "Component": "rewards.batch",
    "get": "rewards.registry", "resolve": "rewards.registry", "register": "rewards.registry",
    "available": "rewards.registry", "RewardPluginError": "rewards.registry",
    "ENTRY_POINT_GROUP": "rewards.registry",
}
__all__ = sorted(_EXPORTS) + ["build"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rewards' has no attribute {name!r}")


def build(specs_with_weights=None, **cfg):
    """A RewardFn from reward specs plus RewardConfig fields.

    `specs_with_weights`: a RewardConfig, or a list whose items are a spec string (weight
    1), a `(spec, weight)` or `(spec, weight, kwargs)` tuple, or a RewardEntry-shaped dict.
    `cfg`: the other RewardConfig fields (concurrency, math={...}, code={...}).
    """
    from rewards.batch import RewardFn
    from rewards.config import RewardConfig
    from rewards.registry import BUILTINS

    if isinstance(specs_with_weights, RewardConfig):
        return RewardFn.from_config(specs_with_weights)
    entries = []
    for item in specs_with_weights or ["math"]:
        if isinstance(item, dict):
            entries.append(item)
            continue
        item = (item,) if isinstance(item, str) else tuple(item)
        spec = item[0]
        weight = item[1] if len(item) > 1 else 1.0
        kwargs = item[2] if len(item) > 2 else {}
        key = "spec" if ":" in spec and spec not in BUILTINS else "name"
        entries.append({key: spec, "weight": weight, "kwargs": dict(kwargs)})
    return RewardFn.from_config(RewardConfig(rewards=entries, **cfg))
