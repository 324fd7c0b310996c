"""Pick the M <= 256 GEMM tiles from a `TUNE=gemmsmall` table and write them into
rl/kernels/triton/matmul.py's SMALL_TILES (run before the tests and bench of the same device call).

    python bench/pick_small_tiles.py TUNE_JSON [--write]

Per (bucket, N >= 4096): the primary shape's table (N = 6144 / 2048, K = 2048), the bit-checked
candidate with the lowest sum of graph ratios over the bucket's M values; it replaces the current
tile only when that sum is 2% or more below the current tile's (else noise).
"""
from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

MATMUL = Path(__file__).resolve().parents[1] / "rl" / "kernels" / "triton" / "matmul.py"


def pick(results: list) -> tuple[dict, list]:
    src = MATMUL.read_text()
    cur = ast.literal_eval(re.search(r"SMALL_TILES = (\{.*?\})", src, re.S).group(1))
    new, notes = dict(cur), []
    for wide, n in ((True, 6144), (False, 2048)):
        table = next((e["result"] for e in results if e.get("name") == f"tune gemm small M by graph replay N={n} K=2048"), None)
        if table is None:
            notes.append(f"N={n}: no table")
            continue
        for bucket in sorted({b for b, _ in cur}):
            rows = [r for r in table if r.get("bucket") == bucket and "ratio" in r and r.get("bitwise") == "pass"]
            now = next((r for r in rows if tuple(r["cand"]) == cur[(bucket, wide)]), None)
            if not rows or now is None:
                notes.append(f"N={n} bucket {bucket}: current not timed, kept")
                continue
            best = min(rows, key=lambda r: sum(r["ratio"].values()))
            s_best, s_now = sum(best["ratio"].values()), sum(now["ratio"].values())
            if s_best <= 0.98 * s_now:
                new[(bucket, wide)] = tuple(best["cand"])
            notes.append(f"N={n} bucket {bucket}: current {now['cand']} {now['ratio']}, best {best['cand']} "
                         f"{best['ratio']} -> {new[(bucket, wide)]}")
    return new, notes


def main():
    results = json.loads(Path(sys.argv[1]).read_text())["results"]
    new, notes = pick(results)
    print("\n".join(notes))
    body = ",\n               ".join(f"{k!r}: {v!r}" for k, v in sorted(new.items(), key=lambda kv: (kv[0][0], not kv[0][1])))
    print("SMALL_TILES =", new)
    if "--write" in sys.argv:
        src = MATMUL.read_text()
        src = re.sub(r"SMALL_TILES = \{.*?\}[^\n]*\n", lambda _: "SMALL_TILES = {" + body + "}\n", src, count=1, flags=re.S)
        MATMUL.write_text(src)


if __name__ == "__main__":
    main()
