"""Build fingerprint: what decides a token's logprob bits besides the weights and the inputs.

The trainer and every rollout engine compute the same bits only if they run the same model
and kernel source (`rl/model`, `rl/kernels`), the same torch (its ATen / oneDNN kernels) and
the same triton. A stale install on one Ray node, an engine process that imports another copy
of lockstep (PYTHONPATH, an editable install elsewhere), or a source tree edited between two
processes' imports all break "bit-identical" silently; the fingerprint turns them into an
error at start: `RolloutWorker` compares its engine's with its own, `rl.run` compares the
trainer's with every rollout worker's. The hardware (CPU instruction set, GPU name) is
reported too: other hardware may pick other low-level kernels, so a difference there is
logged as a warning (the per-step drift check then has the last word).
"""
from __future__ import annotations

import functools
import hashlib
from importlib import metadata
from pathlib import Path

import torch

from rl.kernels.cpu import amx

PACKAGE_ROOT = Path(__file__).resolve().parents[1]          # rl/
SOURCE_DIRS = ("kernels", "model")
SOURCE_SUFFIXES = (".py", ".c", ".h")
MUST_MATCH = ("code", "torch", "triton")


class BuildMismatch(RuntimeError):
    """Two processes that must compute the same bits run different builds."""


@functools.lru_cache(maxsize=None)
def code_digest(root: Path = PACKAGE_ROOT) -> str:
    """sha256 over the path and bytes of every source file (.py, and the C of rl/kernels/cpu/csrc)
    under root/kernels and root/model
    (computed once per process: the source this process loaded, give or take edits made
    between its imports and its first call here)."""
    digest = hashlib.sha256()
    for name in SOURCE_DIRS:
        for path in sorted(p for p in (root / name).rglob("*") if p.suffix in SOURCE_SUFFIXES):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def hardware(device: str | torch.device = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda: {torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    # the bf16 products follow these (AMX: our tile kernel; else oneDNN's AVX512-BF16 kernels,
    # other bits; measured)
    flags = [name for name, probe in (("avx512_bf16", "_is_avx512_bf16_supported"), ("amx_tile", "_is_amx_tile_supported"),
                                      ("amx_fp16", "_is_amx_fp16_supported"))
             if getattr(torch.cpu, probe, lambda: False)()]
    # a process the OS refused AMX runs AVX512-BF16 kernels (rl/kernels/cpu/amx.py)
    refused = "amx_tile" in flags and amx.permitted() is False
    return (f"cpu: {torch.backends.cpu.get_cpu_capability()}" + "".join(f" +{f}" for f in flags)
            + (" (AMX refused to this process)" if refused else ""))


def fingerprint(device: str | torch.device = "cpu") -> dict:
    return {"code": code_digest(), "torch": str(torch.__version__), "triton": _version("triton"),
            "hardware": hardware(device)}


def differences(a: dict, b: dict, fields=MUST_MATCH) -> list[str]:
    """'field: a-value vs b-value' for each of `fields` that differs."""
    return [f"{f}: {a.get(f)} vs {b.get(f)}" for f in fields if a.get(f) != b.get(f)]


def check_same_build(reference_name: str, reference: dict, others: dict[str, dict]) -> list[str]:
    """Raise BuildMismatch naming every process whose code / torch / triton differ from the
    reference's; return warnings for hardware differences."""
    errors, warnings = [], []
    for name, fp in others.items():
        diff = differences(fp, reference)
        if diff:
            errors.append(f"{name} vs {reference_name}: " + "; ".join(diff))
        diff = differences(fp, reference, ("hardware",))
        if diff:
            warnings.append(f"{name} vs {reference_name}: " + "; ".join(diff))
    if errors:
        raise BuildMismatch("processes that must compute bit-identical logprobs run different builds "
                            "(model/kernel source, torch or triton): " + " | ".join(errors))
    return warnings
