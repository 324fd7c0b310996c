#!/usr/bin/env bash
# The one command sent to the lent GPU machine (device tool `run`, carry [".whl"]):
#   [PYTEST_K='pytest -k expr'] [MISMATCH_KERNELS=lockstep|stock] bash bench/gpu_run.sh [all|tests,mismatch,bench,cli,multigpu] [bench --only list]
# Installs the carried wheels (fla-core / liger-kernel for the baselines; deepspeed and its
# missing dependencies hjson, pydantic(-core), annotated-types, typing-inspection for
# `multigpu`), then runs the GPU contract tests, `lockstep mismatch` on the GPU, the kernel
# benchmark and the real CLI (`python3 -m rl.cli mismatch --device cuda`, tiny config); logs
# and JSON go to $OUT. `multigpu` (not part of `all`; needs 2 GPUs: kind nvidia-h200-x2) runs
# bench/multi_gpu.py [--parts list given as the second argument] [$MULTI_GPU_ARGS].
# Tuning tables: `TUNE=rmsnorm,attention,gemm,lightning bash bench/gpu_run.sh bench tune`.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/lockstep-gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
STAGE=${1:-all}
ONLY=${2:-}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv > "$OUT/gpu.txt" 2>&1
status=0
if [[ $STAGE == all || ",$STAGE," == *",tests,"* ]]; then
  python3 -m pytest tests/gpu -q -p no:cacheprovider --durations=15 -rf --timeout=300 ${PYTEST_K:+-k "$PYTEST_K"} 2>&1 | tee "$OUT/pytest.log" || status=1
fi
if [[ $STAGE == all || ",$STAGE," == *",mismatch,"* ]]; then
  python3 tests/gpu/mismatch_gpu.py --out "$OUT/mismatch_gpu.json" ${MISMATCH_KERNELS:+--kernels $MISMATCH_KERNELS} 2>&1 | tee "$OUT/mismatch.log" || status=1
fi
if [[ $STAGE == all || ",$STAGE," == *",bench,"* ]]; then
  python3 bench/kernels_gpu.py --out "$OUT/kernels_gpu_h200.json" ${ONLY:+--only $ONLY} 2>&1 | tee "$OUT/bench.log" || status=1
fi
if [[ $STAGE == all || ",$STAGE," == *",cli,"* ]]; then
  python3 -m rl.cli mismatch --model configs/model/tiny.json --backend reference --device cuda \
    --prompts 4 --max-new-tokens 24 --json "$OUT/cli_mismatch.json" 2>&1 | tee "$OUT/cli.log" || status=1
fi
if [[ ",$STAGE," == *",multigpu,"* ]]; then
  python3 bench/multi_gpu.py --out "$OUT/multi_gpu.json" ${ONLY:+--parts $ONLY} ${MULTI_GPU_ARGS:-} 2>&1 | tee "$OUT/multi_gpu.log" || status=1
fi
exit $status
