"""GPU contract tests: run on a lent CUDA machine (`bench/gpu_run.sh`); skipped without CUDA.

Every test here is marked `gpu`; on a machine without CUDA the whole folder is skipped at
collection, so the CPU CI imports and collects it cleanly.
"""
import os

import pytest
import torch

INTERPRET = os.environ.get("LOCKSTEP_TEST_DEVICE") == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs CUDA (run tests/gpu on the lent GPU machine)")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available() and not INTERPRET:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(0)
    yield
