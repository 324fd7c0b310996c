"""`lockstep mismatch` from the command line: 0.0 with the kernel set, non-zero with stock."""
import json
import subprocess
import sys

import pytest

from tests_paths import ROOT, TINY


def _run(tmp_path, *extra):
    out = tmp_path / "out.json"
    cmd = [sys.executable, "-m", "rl.cli", "mismatch", "--model", str(TINY), "--backend", "reference",
           "--json", str(out), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_mismatch_lockstep_reads_zero(tmp_path):
    result, stdout = _run(tmp_path, "--prompts", "32", "--max-new-tokens", "96")
    assert result["tokens"] == 32 * 96
    assert result["max_abs_logprob_diff"] == 0.0
    assert result["mean_abs_logprob_diff"] == 0.0
    assert result["frac_bitwise_equal"] == 1.0
    assert result["k3_kl"] == 0.0
    assert result["first_divergent"] is None
    assert result["kernels"] == "lockstep" and result["backend"] == "reference"
    assert "first_divergent" in stdout


def test_mismatch_stock_shows_drift_and_locates_it(tmp_path):
    result, _ = _run(tmp_path, "--prompts", "8", "--max-new-tokens", "32", "--kernels", "stock")
    assert result["max_abs_logprob_diff"] > 0.0
    assert result["frac_bitwise_equal"] < 1.0
    first = result["first_divergent"]
    assert first is not None and isinstance(first["layer"], int)
    assert first["component"] in {"input_layernorm", "attention", "linear_attention", "post_attention_layernorm",
                                  "router", "experts", "mlp", "moe", "final_norm", "lm_head"}


def test_mismatch_bad_arguments(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rl.cli", "mismatch", "--model", str(TINY), "--prompts", "0"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "--prompts must be >= 1" in proc.stderr


@pytest.mark.slow
def test_mismatch_vllm_backend_with_engine_trace(tmp_path):
    """The CLI on the vLLM backend reads 0.0, and --trace replays every engine forward here bit
    for bit (rollout.engine_trace)."""
    trace = tmp_path / "trace"
    result, stdout = _run(tmp_path, "--backend", "vllm", "--prompts", "6", "--max-new-tokens", "20",
                          "--samples", "2", "--trace", str(trace))
    assert result["backend"] == "vllm" and result["tokens"] == 6 * 2 * 20
    assert result["max_abs_logprob_diff"] == 0.0 and result["frac_bitwise_equal"] == 1.0
    replayed = result["engine_trace"]
    assert replayed["first_difference"] is None and replayed["prefix_caching"] is False
    assert replayed["steps"] == len(list(trace.glob("step*.pt"))) >= 20
    assert "engine replay" in stdout


def test_mismatch_trace_needs_the_vllm_backend(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rl.cli", "mismatch", "--model", str(TINY), "--prompts", "1",
                           "--max-new-tokens", "2", "--trace", str(tmp_path / "t")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "--trace: only the vllm backend" in proc.stderr
