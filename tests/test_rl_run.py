"""End-to-end RL runs on CPU: Ray + vLLM rollout + DeepSpeed trainer + rewards (slow).

Runs use the tiny model with small batches so that each takes about a minute. The SFT
checkpoint is made once per session (a short warm start) and shared.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests_paths import ROOT

pytestmark = pytest.mark.slow

SMALL = ["rollout.prompts_per_step=4", "rollout.n_samples=4", "rollout.max_new_tokens=6", "data.eval_size=8",
         "run.checkpoint_every=0", "logging.wandb_mode=disabled"]


@pytest.fixture(scope="session")
def sft_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    proc = subprocess.run([sys.executable, "-m", "rl.cli", "sft", "--config", "configs/sft_arith_tiny.yaml",
                           f"out_dir={out}", "steps=30", "eval_every=30", "trainer.total_steps=30",
                           "data.num_eval=20"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "sft_arith_tiny" / "checkpoint"


def _train(tmp_path, config, *overrides, name="t", timeout=900, resume=False):
    cmd = [sys.executable, "-m", "rl.train", "--config", f"configs/{config}.yaml", f"name={name}",
           f"run.output_dir={tmp_path}", *SMALL, *overrides] + (["--resume"] if resume else [])
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _rows(tmp_path, name="t"):
    path = tmp_path / name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _step_rows(rows):
    return {r["step"]: r for r in rows if "reward/mean" in r}


def test_ppo_two_steps(tmp_path, sft_checkpoint):
    proc = _train(tmp_path, "ppo_arith_tiny", f"model.path={sft_checkpoint}", "run.steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = _step_rows(_rows(tmp_path))
    assert sorted(steps) == [1, 2]
    for r in steps.values():
        assert r["alignment/max_abs_logprob_diff"] == 0.0 and r["alignment/frac_bitwise_equal"] == 1.0
        assert "critic/loss" in r or any(k.startswith("critic/") for k in r)
    assert (tmp_path / "t" / "report.png").stat().st_size > 1000


def test_code_config_two_steps(tmp_path):
    proc = _train(tmp_path, "grpo_code_tiny", "run.steps=2", "rollout.max_new_tokens=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = _step_rows(_rows(tmp_path))
    assert sorted(steps) == [1, 2]
    assert all(r["alignment/max_abs_logprob_diff"] == 0.0 for r in steps.values())
    assert all("reward/code/mean" in r for r in steps.values())


def _outcome(row):
    """A step's metrics without the wall-clock ones (times, rates)."""
    return {k: v for k, v in row.items()
            if not (k == "time" or k.startswith("time/") or k.startswith("perf/") or k.endswith("time_s"))}


def test_resume_after_kill_gives_the_uninterrupted_metrics(tmp_path, sft_checkpoint):
    """SIGTERM mid-run -> the step finishes and a checkpoint is written; --resume continues
    from it at the saved weight version, to the end, with drift 0 on every step, and every
    step's metrics (rewards, lengths, losses, grad norm, KL, drift; not the timings) equal
    those of an uninterrupted run of the same config: prompts are drawn by (seed, step),
    rollout samples by (seed, step, prompt, sample, position), and the trainer resumes bitwise."""
    model = f"model.path={sft_checkpoint}"
    full = _train(tmp_path, "grpo_arith_tiny", model, "run.steps=3", name="full")
    assert full.returncode == 0, full.stderr[-3000:]
    cmd = [sys.executable, "-m", "rl.train", "--config", "configs/grpo_arith_tiny.yaml", "name=cut",
           f"run.output_dir={tmp_path}", *SMALL, model, "run.steps=3"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and 1 not in _step_rows(_rows(tmp_path, "cut")):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    done = max(_step_rows(_rows(tmp_path, "cut")))
    assert done < 3, "the SIGTERM arrived too late to interrupt the run"
    state = json.loads((tmp_path / "cut" / "checkpoints" / f"step_{done:06d}" / "state.json").read_text())
    assert state == {"step": done, "weight_version": done, "corrected": False}
    resumed = _train(tmp_path, "grpo_arith_tiny", model, "run.steps=3", name="cut", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and f"at step {done}" in resumed.stdout
    rows = _step_rows(_rows(tmp_path, "cut"))
    assert sorted(rows) == [1, 2, 3]
    assert all(r["alignment/max_abs_logprob_diff"] == 0.0 for r in rows.values())
    assert rows[done + 1]["rollout/weight_version"] == done
    reference = _step_rows(_rows(tmp_path, "full"))
    for step in (1, 2, 3):
        got, want = _outcome(rows[step]), _outcome(reference[step])
        differing = {k: (got.get(k), want.get(k)) for k in set(got) | set(want) if got.get(k) != want.get(k)}
        assert not differing, f"step {step} (resumed after step {done}) differs from the uninterrupted run: {differing}"


def test_on_drift_abort_with_stock_kernels(tmp_path, sft_checkpoint):
    proc = _train(tmp_path, "grpo_arith_tiny", f"model.path={sft_checkpoint}", "model.kernels=stock",
                  "alignment.on_drift=abort", "run.steps=3", "rollout.max_new_tokens=8")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "drift" in proc.stderr and "max |Δ|" in proc.stderr


def test_rollout_actor_killed_mid_run(tmp_path, sft_checkpoint):
    """In-process driver: kill the rollout actor after step 1; the run goes on, re-synced."""
    from rl.config import load_run_config
    from rl.run import Run
    cfg = load_run_config(ROOT / "configs/grpo_arith_tiny.yaml",
                          [f"model.path={sft_checkpoint}", "name=kill", f"run.output_dir={tmp_path}",
                           "run.steps=3", *SMALL])
    run = Run(cfg)
    killed = []

    def kill_after_first(r, metrics):
        if r.step == 1:
            r.rollout.kill(0)
            killed.append(True)
    run.step_hooks.append(kill_after_first)
    summary = run()
    assert killed and summary["steps"] == 3
    steps = _step_rows(_rows(tmp_path, "kill"))
    assert sorted(steps) == [1, 2, 3]
    assert all(r["alignment/max_abs_logprob_diff"] == 0.0 for r in steps.values())
    assert run.rollout.restarts == 1
    import ray
    ray.shutdown()


def test_ray_job_submit(tmp_path, sft_checkpoint):
    # as a user with the venv activated: `python` in the job's entrypoint is the venv's
    venv_bin = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    ray_bin = os.path.join(venv_bin, "ray")
    port = 8265 + (os.getpid() % 500)
    start = subprocess.run([ray_bin, "start", "--head", "--node-ip-address", "127.0.0.1", "--num-cpus", "2",
                            "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                            "--dashboard-port", str(port), "--disable-usage-stats"],
                           cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)
    assert start.returncode == 0, start.stderr[-3000:]
    try:
        cmd = [ray_bin, "job", "submit", "--address", f"http://127.0.0.1:{port}", "--working-dir", ".", "--",
               "python", "-m", "rl.train", "--config", "configs/grpo_arith_tiny.yaml", "name=job",
               f"run.output_dir={tmp_path}", f"model.path={sft_checkpoint}", "run.steps=2", *SMALL]
        job = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
        assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
        steps = _step_rows(_rows(tmp_path, "job"))
        assert sorted(steps) == [1, 2]
        assert all(r["alignment/max_abs_logprob_diff"] == 0.0 for r in steps.values())
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, timeout=120, env=env)
