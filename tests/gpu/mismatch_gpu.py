"""`lockstep mismatch --backend reference` on the GPU, for the `small` config and the
Ring-mini-linear-2.0 layer-group slice, with lockstep and with stock kernels.

    python tests/gpu/mismatch_gpu.py --out mismatch_gpu.json

Runs `alignment.mismatch.run_mismatch` (the function behind the CLI) with `device="cuda"`; the
model comes from `test_model_gpu.build_model` (built on the GPU, `:slice` configs included)
instead of the CLI's loader. The reference decoder's sampler (rollout.sampling, keyed
Gumbel-max) needs no adaptation. Expected: lockstep reads 0.0 with every token bit-equal;
stock reads non-zero and names the first divergent component.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]

import alignment.mismatch as mismatch  # noqa: E402
from rl import kernels as K  # noqa: E402
from test_model_gpu import build_model, model_config_path  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="mismatch_gpu.json")
    ap.add_argument("--kernels", default="lockstep,stock", help="comma list of kernel modes to run")
    args = ap.parse_args()
    mismatch.load_model = lambda path, device="cuda", **_: build_model(Path(path))   # builds on the GPU
    tmp = Path(tempfile.mkdtemp())
    runs = [("small", 16, 32), ("ring-mini-linear-2.0:slice", 6, 12)]
    results, failed = [], False
    for name, prompts, new_tokens in runs:
        path = model_config_path(name, tmp)
        for kernels in args.kernels.split(","):
            t0 = time.time()
            try:
                res = mismatch.run_mismatch(str(path), "reference", prompts, new_tokens, 1, 1.0, 0, kernels, 3, device="cuda")
                res["config"] = name
                res["seconds"] = time.time() - t0
                ok = (res["max_abs_logprob_diff"] == 0.0 and res["frac_bitwise_equal"] == 1.0) if kernels == "lockstep" \
                    else (res["max_abs_logprob_diff"] > 0.0 and res["first_divergent"] is not None)
                res["expected"] = "pass" if ok else "FAIL"
                failed |= not ok
            except Exception as err:
                traceback.print_exc()
                res = {"config": name, "kernels": kernels, "error": repr(err)[:1000], "expected": "FAIL"}
                failed = True
            finally:
                K.set_kernels("lockstep")
                torch.cuda.empty_cache()
            results.append(res)
            print(f"{name:28s} {kernels:8s} max|dlogp| {res.get('max_abs_logprob_diff')}  "
                  f"bit-equal {res.get('frac_bitwise_equal')}  first {res.get('first_divergent')}  "
                  f"-> {res['expected']}", flush=True)
    Path(args.out).write_text(json.dumps({"command": "python tests/gpu/mismatch_gpu.py " + " ".join(sys.argv[1:]),
                                          "device": torch.cuda.get_device_name(), "results": results}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
