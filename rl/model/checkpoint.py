"""Strict HF checkpoint I/O for the Ring-linear model.

`save_model` writes config.json + safetensors (released key names) and the tokenizer, into a
temporary directory renamed into place (atomic). `load_model` reads a directory (single file
or sharded index) and refuses — naming the key — a missing, unexpected or mis-shaped
tensor, and a checkpoint of another architecture; `from_pretrained` would instead warn and
initialise randomly, which silently ruins an RL run.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

from rl.model.config import load_model_config
from rl.model.modeling import BailingMoeLinearV2ForCausalLM


def save_model(model: BailingMoeLinearV2ForCausalLM, path: str | Path, tokenizer=None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    replace_dir(tmp, path)
    return path


def replace_dir(tmp: Path, path: Path) -> None:
    """Move the finished directory `tmp` to `path` by renames, replacing any old `path`; a
    crash leaves either the old or the new directory complete, never a half-written one."""
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    index = path / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else ["model.safetensors"])
    tensors = {}
    for name in files:
        if not (path / name).exists():
            raise FileNotFoundError(f"checkpoint {path}: missing weights file {name}")
        with safe_open(str(path / name), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def check_state_dict(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"checkpoint {where}: missing key {missing[0]!r}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ValueError(f"checkpoint {where}: unexpected key {unexpected[0]!r}"
                         + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != tuple(shape):
            raise ValueError(f"checkpoint {where}: key {key!r} has shape {tuple(tensors[key].shape)}, "
                             f"model expects {tuple(shape)}")


def load_model(path: str | Path, dtype: torch.dtype = torch.bfloat16, device="cpu") -> BailingMoeLinearV2ForCausalLM:
    """A checkpoint directory -> model (strict), or a config JSON -> randomly initialised model."""
    path = Path(path)
    config = load_model_config(path)
    model = BailingMoeLinearV2ForCausalLM(config)
    if path.is_dir():
        tensors = read_state_dict(path)
        check_state_dict(model, tensors, str(path))
        model.load_state_dict(tensors, strict=True)
    return model.to(device=device, dtype=dtype)
