"""`lockstep mismatch` from the command line: 0.0 with the kernel set, non-zero with stock."""
import json
import subprocess
import sys

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
