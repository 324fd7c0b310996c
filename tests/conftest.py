"""Shared fixtures: seeded RNG, the tiny model, bit-comparison helper."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "model" / "tiny.json"
sys.path.insert(0, str(ROOT / "tests"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread (2 cores shared with other jobs: avoids OpenMP oversubscription stalls)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_model():
    from rl.model.checkpoint import load_model
    torch.manual_seed(1234)
    return load_model(TINY).eval()
