"""The cpu backend makes MKL VML's first call single-threaded (rl/kernels/cpu/vml.py).

Without that, a process whose first VML call is split across threads sometimes computes one
thread's share on another code path (measured: 11 of 80 fresh processes on 2 busy cores).
This test starts fresh processes one at a time beside two busy-looping ones (the race needs
busy cores), each loading the cpu backend and then making the call that raced — a parallel
`torch.cos` right after other parallel work — and requires the first result to equal the
second, bit for bit, in every process. With the backend's import replaced by `pass` (no
warm-up), this test failed here with 10 of 60 processes differing (and 4 of 48 in an earlier
form that ran two at a time): it can fail.
"""
from __future__ import annotations

import subprocess
import sys

from tests_paths import ROOT

PROCESSES = 60
AT_ONCE = 1
BUSY = 2

CHILD = """
import torch
import rl.kernels.cpu                       # the backend under test: warms VML up at load
torch.bmm(torch.randn(4, 64, 256), torch.randn(4, 256, 64))
torch.ones(1 << 20).add_(1)                 # the OpenMP pool is up and has run
x = torch.arange(64 * 1024, dtype=torch.float32) * 0.001
first, second = torch.cos(x), torch.cos(x)
if not torch.equal(first, second):
    diff = (first != second).nonzero()
    print(f"first cos differs from the second at {diff.shape[0]} elements, first index {diff[0].item()}")
    sys.exit(1)
"""


def test_first_parallel_vml_call_is_stable():
    failures = []
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(BUSY)]
    try:
        for start in range(0, PROCESSES, AT_ONCE):
            procs = [subprocess.Popen([sys.executable, "-c", "import sys\n" + CHILD], cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                     for _ in range(AT_ONCE)]
            for proc in procs:
                out, _ = proc.communicate(timeout=300)
                if proc.returncode != 0:
                    failures.append(out.strip().splitlines()[-1] if out.strip() else f"rc {proc.returncode}")
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    assert not failures, f"{len(failures)} of {PROCESSES} processes: " + "; ".join(failures[:3])
