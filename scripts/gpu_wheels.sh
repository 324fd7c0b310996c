#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with the wheels the lent GPU machines lack, for the device tool's
# `run` with carry [".whl"]; bench/gpu_run.sh installs them there with --no-deps:
#   fla-core, liger-kernel       baselines of bench/kernels_gpu.py and the stock kernel mode
#   deepspeed (built here as a pure-Python wheel, DS_BUILD_OPS=0) and the dependencies the
#   machines' image does not hold: hjson, pydantic, pydantic-core (cp312), annotated-types,
#   typing-inspection            the trainer, for bench/multi_gpu.py
# Versions are those of this repo's .venv (pyproject pins) so both sides run the same code.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[[ -x $PY ]] || { echo "run 'make venv' first (needs .venv for the versions)" >&2; exit 2; }
mkdir -p .whl
version() { $PY -c "import importlib.metadata as m; print(m.version('$1'))"; }
pure=(hjson pydantic annotated-types typing-inspection)
args=()
for name in "${pure[@]}"; do args+=("$name==$(version "$name")"); done
$PY -m pip download -q --no-deps -d .whl fla-core==0.6.0 liger-kernel==0.8.5 "${args[@]}"
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl "pydantic-core==$(version pydantic-core)"
tmp=$(mktemp -d)
$PY -m pip download -q --no-deps --no-binary=:all: -d "$tmp" "deepspeed==$(version deepspeed)"
DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w .whl "$tmp"/deepspeed-*.tar.gz
rm -rf "$tmp"
ls -1 .whl
