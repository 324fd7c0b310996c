"""rl.model.fingerprint: the build fingerprint that the trainer, rollout workers and their
engines compare at start (the engine-side wiring: tests/test_rollout_vllm.py)."""
from __future__ import annotations

import shutil

import pytest
import torch

from rl.model import fingerprint as F


def test_code_digest_covers_every_kernel_and_model_source_byte(tmp_path):
    for name in F.SOURCE_DIRS:
        shutil.copytree(F.PACKAGE_ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    assert F.code_digest(tmp_path) == F.code_digest()
    F.code_digest.cache_clear()
    target = tmp_path / "kernels" / "cpu" / "matmul.py"
    target.write_bytes(target.read_bytes() + b"\n")
    assert F.code_digest(tmp_path) != F.code_digest()
    F.code_digest.cache_clear()
    (tmp_path / "model" / "extra.py").write_text("")
    target.write_bytes(target.read_bytes()[:-1])
    assert F.code_digest(tmp_path) != F.code_digest()          # a new file counts too


def test_fingerprint_fields():
    fp = F.fingerprint()
    assert set(fp) == {"code", "torch", "triton", "hardware"}
    assert fp["torch"] == torch.__version__ and fp["hardware"].startswith("cpu: ")
    assert len(fp["code"]) == 64


def test_check_same_build_names_the_process_and_field():
    ref = F.fingerprint()
    same_code_other_cpu = dict(ref, hardware="cpu: OTHER")
    assert F.check_same_build("trainer", ref, {"worker 0": dict(ref)}) == []
    warnings = F.check_same_build("trainer", ref, {"worker 0": same_code_other_cpu})
    assert warnings == [f"worker 0 vs trainer: hardware: cpu: OTHER vs {ref['hardware']}"]
    with pytest.raises(F.BuildMismatch) as err:
        F.check_same_build("trainer", ref, {"worker 0": dict(ref), "worker 1": dict(ref, torch="0.0", code="x")})
    message = str(err.value)
    assert "worker 1 vs trainer" in message and "torch: 0.0 vs" in message and "code: x vs" in message
    assert "worker 0" not in message
