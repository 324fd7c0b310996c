"""`RewardFn`: the batch scorer the RL driver calls.

`score_batch(items) -> (scores, metrics)`: every (item, reward) pair runs on a bounded
thread pool (the heavy rewards wait on their own worker processes or sandboxes, so threads
are enough); an item's score is the weighted sum of its rewards. A reward that raises or
returns something that is not a finite number scores 0 for that item and is counted in
`reward/<name>/errors` (the first message per reward is logged); nothing a reward does
stops the batch.

Metrics: `reward/mean`, `reward/<name>/mean` (unweighted), `reward/<name>/errors`, and each
extra key of dict results as `reward/<name>/<key>`: summed for keys the reward lists in its
`count_metrics` (math: timeouts, parse_errors, no_answer), averaged otherwise.
"""
from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

log = logging.getLogger(__name__)


@dataclass
class ScoreItem:
    """One completion to score (the verl arguments)."""

    data_source: str
    solution_str: str
    ground_truth: Any
    extra_info: dict | None = field(default=None)


def _as_item(obj) -> ScoreItem:
    if isinstance(obj, ScoreItem):
        return obj
    if isinstance(obj, Mapping):
        missing = [k for k in ("solution_str", "ground_truth") if k not in obj]
        if missing:
            raise ValueError(f"score item lacks {missing}")
        return ScoreItem(str(obj.get("data_source", "")), obj["solution_str"],
                         obj["ground_truth"], obj.get("extra_info"))
    raise TypeError(f"score item must be a ScoreItem or a mapping, got {type(obj).__name__}")


def normalize(result) -> tuple[float, dict[str, float]]:
    """A reward's return value as (score, extra metrics); ValueError if unusable."""
    extras: dict[str, float] = {}
    if isinstance(result, Mapping):
        if "score" not in result:
            raise ValueError("a dict result needs a 'score' key")
        for key, value in result.items():
            if key != "score" and isinstance(value, (int, float)):  # bools count as 0/1
                extras[str(key)] = float(value)
        result = result["score"]
    if isinstance(result, bool):
        result = float(result)
    if not isinstance(result, (int, float)):
        raise ValueError(f"score must be a number, got {type(result).__name__}")
    score = float(result)
    if not math.isfinite(score):
        raise ValueError(f"score is not finite: {score}")
    return score, extras


@dataclass
class Component:
    name: str
    weight: float
    fn: Callable
    count_metrics: tuple[str, ...] = ()


class RewardFn:
    """Weighted sum of reward functions, scored in parallel."""

    def __init__(self, components: list[Component], concurrency: int = 8):
        if not components:
            raise ValueError("RewardFn needs at least one reward")
        self.components = components
        self._pool = ThreadPoolExecutor(max_workers=concurrency,
                                        thread_name_prefix="lockstep-reward")
        self._warned: set[str] = set()

    @classmethod
    def from_config(cls, cfg) -> "RewardFn":
        comps = [Component(name, weight, fn, tuple(getattr(fn, "count_metrics", ())))
                 for name, weight, fn in cfg.resolved()]
        return cls(comps, concurrency=cfg.concurrency)

    def _one(self, comp: Component, item: ScoreItem) -> tuple[float, dict, str | None]:
        try:
            result = comp.fn(data_source=item.data_source, solution_str=item.solution_str,
                             ground_truth=item.ground_truth, extra_info=item.extra_info)
            score, extras = normalize(result)
            return score, extras, None
        except Exception as err:  # noqa: BLE001 - a reward's failure is that item's 0
            return 0.0, {}, f"{type(err).__name__}: {err}"

    def score(self, item) -> float:
        scores, _ = self.score_batch([item])
        return scores[0]

    def score_batch(self, items: Iterable) -> tuple[list[float], dict[str, float]]:
        start = time.perf_counter()
        batch = [_as_item(x) for x in items]
        futures = [[self._pool.submit(self._one, comp, item) for comp in self.components]
                   for item in batch]
        totals = [0.0] * len(batch)
        metrics: dict[str, float] = {}
        for c, comp in enumerate(self.components):
            sums: dict[str, float] = {}
            counts: dict[str, int] = {}
            total, errors = 0.0, 0
            for i, row in enumerate(futures):
                score, extras, error = row[c].result()
                totals[i] += comp.weight * score
                total += score
                if error is not None:
                    errors += 1
                    if comp.name not in self._warned:
                        self._warned.add(comp.name)
                        log.warning("reward %r failed on an item (scored 0, counted in "
                                    "reward/%s/errors): %s", comp.name, comp.name, error)
                for key, value in extras.items():
                    sums[key] = sums.get(key, 0.0) + value
                    counts[key] = counts.get(key, 0) + 1
            n = max(len(batch), 1)
            metrics[f"reward/{comp.name}/mean"] = total / n
            metrics[f"reward/{comp.name}/errors"] = float(errors)
            for key, value in sums.items():
                summed = key in comp.count_metrics
                metrics[f"reward/{comp.name}/{key}"] = value if summed else value / counts[key]
            for key in comp.count_metrics:
                metrics.setdefault(f"reward/{comp.name}/{key}", 0.0)
        metrics["reward/mean"] = sum(totals) / max(len(batch), 1)
        metrics["reward/time_s"] = time.perf_counter() - start
        return totals, metrics

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "RewardFn":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
