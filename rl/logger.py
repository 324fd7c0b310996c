"""What a user sees during a run: metrics.jsonl, wandb (offline unless configured), a rich
progress line per step, and a final summary table."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table


class RunLogger:
    def __init__(self, run_dir: Path, cfg, resume: bool):
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self.console = Console()
        self.rows: list[dict] = []
        if resume and self.path.exists():
            self.rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        elif self.path.exists():
            self.path.unlink()
        self.wandb = None
        if cfg.logging.wandb_mode != "disabled":
            try:
                import wandb
                mode = "online" if cfg.logging.wandb_project and cfg.logging.wandb_mode == "online" else "offline"
                os.environ.setdefault("WANDB_SILENT", "true")
                self.wandb = wandb.init(project=cfg.logging.wandb_project or "lockstep", name=cfg.name,
                                        dir=str(run_dir), mode=mode, config=cfg.model_dump(mode="json"),
                                        resume="allow" if resume else None)
            except Exception as err:   # wandb is never required
                self.console.print(f"[yellow]wandb disabled: {type(err).__name__}: {err}[/]")
                self.wandb = None

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, "time": time.time(), **{k: _plain(v) for k, v in metrics.items()}}
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=step)

    def progress(self, step: int, total: int, m: dict) -> None:
        drift = m.get("alignment/max_abs_logprob_diff")
        drift_txt = "n/a" if drift is None else ("[green]0 (bitwise)[/]" if drift == 0 else f"[red]{drift:.3g}[/]")
        self.console.print(
            f"step {step + 1}/{total}  reward {m.get('reward/mean', float('nan')):.3f}  "
            f"len {m.get('response/mean_length', float('nan')):.1f}  "
            f"rollout {m.get('perf/rollout_tokens_per_s', 0):.0f} tok/s  drift {drift_txt}  "
            f"time {m.get('time/step', 0):.1f}s (rollout {m.get('time/rollout', 0):.1f}, reward "
            f"{m.get('time/reward', 0):.1f}, train {m.get('time/train', 0):.1f}, sync {m.get('time/sync', 0):.1f})")

    def phase(self, text: str) -> None:
        self.console.print(f"[dim]  … {text}[/]")

    def summary(self, extra: dict) -> Table:
        table = Table(title=f"lockstep run summary — {self.run_dir}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        steps = [r for r in self.rows if "reward/mean" in r]
        if steps:
            drift = [r["alignment/max_abs_logprob_diff"] for r in steps if "alignment/max_abs_logprob_diff" in r]
            table.add_row("steps", str(len(steps)))
            table.add_row("reward (first → last)", f"{steps[0]['reward/mean']:.3f} → {steps[-1]['reward/mean']:.3f}")
            if drift:
                table.add_row("max |Δlogprob| over all steps", f"{max(drift):.3g}")
                table.add_row("steps with drift exactly 0", f"{sum(d == 0 for d in drift)}/{len(drift)}")
            table.add_row("mean step time", f"{sum(r['time/step'] for r in steps) / len(steps):.1f}s")
        for k, v in extra.items():
            table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
        self.console.print(table)
        return table

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
