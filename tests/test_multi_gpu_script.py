"""bench/multi_gpu.py (the two-GPU trainer checks of issue 9) run end to end on CPU/gloo with the
tiny model, so the script the GPU machines run cannot rot between device sessions: ZeRO-3,
world size 1 and 2, forward micro-batch 1 and 2, two GRPO steps, and the slice part on a tiny
layer group. Its own comparisons must all read bit-equal (exit code 0)."""
import json
import subprocess
import sys

import pytest

from tests_paths import ROOT, TINY

pytestmark = pytest.mark.slow


def test_multi_gpu_script_on_cpu(tmp_path):
    out = tmp_path / "multi.json"
    cmd = [sys.executable, str(ROOT / "bench" / "multi_gpu.py"), "--out", str(out), "--device", "cpu",
           "--model", str(TINY), "--rows", "8", "--max-len", "40", "--micro-batch", "2", "--steps", "2",
           "--zero-stages", "3", "--slice-base", str(TINY), "--slice-rows", "4", "--slice-len", "48",
           "--slice-steps", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    part = result["forward_and_training"]
    assert [r["name"] for r in part["forward"]] == ["zero3_ws1_fmb1", "zero3_ws1_fmb2", "zero3_ws2_fmb1", "zero3_ws2_fmb2"]
    assert part["forward_all_bit_equal"] and part["training_all_bit_equal"] and result["all_bit_equal"]
    assert part["training"]["zero3"]["loss_bit_equal"] == [True, True]
    assert part["training"]["zero3"]["weights_ws2_vs_ws1"] == {}
    assert len(result["slice"]["steps"]) == 1 and len(result["slice"]["memory"]) == 2
