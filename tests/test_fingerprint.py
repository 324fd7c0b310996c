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
    F.code_digest.cache_clear()
    (tmp_path / "model" / "extra.py").unlink()
    assert F.code_digest(tmp_path) == F.code_digest()
    F.code_digest.cache_clear()
    c_source = tmp_path / "kernels" / "cpu" / "csrc" / "rows.c"
    c_source.write_bytes(c_source.read_bytes() + b"\n")      # the C kernels count too
    assert F.code_digest(tmp_path) != F.code_digest()


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


SMALL_ALTSTACK_THEN_HARDWARE = """
import ctypes
class stack_t(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]
small = ctypes.create_string_buffer(4096)       # too small for the AMX state: the OS refuses AMX
libc = ctypes.CDLL(None)
assert libc.sigaltstack(ctypes.byref(stack_t(ctypes.cast(small, ctypes.c_void_p), 0, 4096)), None) == 0
from rl.model.fingerprint import hardware
from rl.kernels.cpu import amx
print(amx.supported(), amx.permitted(), hardware(), sep="|")
"""


def test_hardware_reports_a_process_refused_amx():
    """A process the OS refused AMX (a thread's signal stack too small when the cpu backend
    asked) runs oneDNN's AVX512-BF16 kernels, other bits: its fingerprint says so, and a
    normal process here has AMX wherever the CPU has it."""
    import subprocess
    import sys
    from rl.kernels.cpu import amx
    from tests_paths import ROOT
    out = subprocess.run([sys.executable, "-c", SMALL_ALTSTACK_THEN_HARDWARE], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    supported, permitted, refused_hw = out.stdout.strip().splitlines()[-1].split("|")
    if amx.supported():
        assert amx.permitted() is True and "refused" not in F.hardware()
        assert (supported, permitted) == ("True", "False") and refused_hw.endswith("(AMX refused to this process)")
        assert F.differences({"hardware": F.hardware()}, {"hardware": refused_hw}, ("hardware",))
    else:
        assert "refused" not in refused_hw and "refused" not in F.hardware()
