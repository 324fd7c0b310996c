"""PNG report of a run (reward, response length, drift, step-time breakdown), refreshed
during the run from runs/<name>/metrics.jsonl."""
from __future__ import annotations

from pathlib import Path

PHASES = ("rollout", "reward", "advantage", "train", "sync", "alignment")


def write_report(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in rows if "reward/mean" in r]
    evals = [r for r in rows if "eval/accuracy" in r]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    fig.suptitle(title)
    x = [r["step"] for r in steps]
    ax = axes[0, 0]
    ax.plot(x, [r["reward/mean"] for r in steps], label="train reward (mean)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval/accuracy"] for r in evals], "o-", label="held-out accuracy (sampled)")
        ax.plot([r["step"] for r in evals], [r.get("eval/greedy_accuracy", float("nan")) for r in evals], "s-",
                label="held-out accuracy (greedy)")
    ax.set_xlabel("step")
    ax.set_title("reward / accuracy")
    ax.legend()
    ax = axes[0, 1]
    ax.plot(x, [r.get("response/mean_length", 0) for r in steps])
    ax.set_xlabel("step")
    ax.set_title("response length (tokens)")
    ax = axes[1, 0]
    ax.plot(x, [r.get("alignment/max_abs_logprob_diff", float("nan")) for r in steps], "o-", label="max |Δlogprob|")
    ax.plot(x, [1 - r.get("alignment/frac_bitwise_equal", float("nan")) for r in steps], "x--", label="1 - frac bit-equal")
    ax.set_xlabel("step")
    ax.set_title("trainer vs rollout drift (0 = bitwise)")
    ax.legend()
    ax = axes[1, 1]
    bottom = [0.0] * len(steps)
    for phase in PHASES:
        vals = [r.get(f"time/{phase}", 0.0) for r in steps]
        ax.bar(x, vals, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xlabel("step")
    ax.set_title("step time by phase (s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(path)
    return path
