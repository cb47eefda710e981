#!/usr/bin/env python3
"""Reference GEMM timings with numpy.matmul (float32), for `obfuscatune bench gemm`.

Batch mode (default): reads a JSON list of {"m", "k", "n", "op", "reps"} from stdin and
prints one JSON object:
    {"numpy": "<version>", "blas": "<name version>", "threads": "<OPENBLAS_NUM_THREADS>",
     "results": [{"m", "k", "n", "op", "gflops", "reps"}, ...]}

Serve mode (--serve): reads one such shape object per line and answers each with one JSON
line {"m", "k", "n", "op", "gflops", "reps"}, so that a caller can interleave these timings
with its own; the arrays of the last shape are kept for the next request.

C is m x n and the reduction is k. op "nn": C = A B with A (m, k) and B (k, n) C-contiguous;
"nt": B is the transpose view of an (n, k) array; "tn": A is the transpose view of a (k, m)
array, i.e. the layouts a row-major BLAS call with the transpose flags sees (numpy hands
such views to sgemm with the transpose flag, without copying).

Each timing is one warm-up call, then at least `reps` calls and at least --min-time seconds
(default 0.3) of calls; the result is the median call time as GFLOPS (2 m n k flops).
The thread count is whatever the environment sets (OPENBLAS_NUM_THREADS etc.).
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np


def blas_name():
    try:
        cfg = np.show_config(mode="dicts")
        blas = cfg.get("Build Dependencies", {}).get("blas", {})
        return f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:  # older numpy: no dict mode
        return "unknown"


class Shapes:
    def __init__(self):
        self.key = None
        self.arrays = None
        self.rng = np.random.default_rng(1234)

    def get(self, m, k, n, op):
        key = (m, k, n, op)
        if key != self.key:
            self.arrays = None  # free the previous shape first
            rnd = lambda r, c: self.rng.standard_normal((r, c), dtype=np.float32)
            a = rnd(k, m).T if op[0] == "t" else rnd(m, k)
            b = rnd(n, k).T if op[1] == "t" else rnd(k, n)
            c = np.empty((m, n), dtype=np.float32)
            self.arrays = (a, b, c)
            self.key = key
        return self.arrays


def time_shape(shapes, req, min_time):
    m, k, n, op = int(req["m"]), int(req["k"]), int(req["n"]), str(req["op"])
    if op not in ("nn", "nt", "tn", "tt"):
        raise ValueError(f"bad op {op!r}")
    a, b, c = shapes.get(m, k, n, op)
    np.matmul(a, b, out=c)  # warm-up (threads, caches, page faults)
    t0 = time.perf_counter()
    np.matmul(a, b, out=c)
    one = max(time.perf_counter() - t0, 1e-9)
    reps = max(int(req.get("reps", 3)), math.ceil(min_time / one))
    reps = min(reps, 100000)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        np.matmul(a, b, out=c)
        times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    return {"m": m, "k": k, "n": n, "op": op, "gflops": 2.0 * m * n * k / med / 1e9, "reps": reps}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--serve", action="store_true", help="one JSON shape per line in, one JSON result per line out")
    ap.add_argument("--min-time", type=float, default=0.3, help="seconds of timed calls per shape (default 0.3)")
    args = ap.parse_args()
    shapes = Shapes()
    if args.serve:
        print(json.dumps({"ready": True, "numpy": np.__version__, "blas": blas_name()}), flush=True)
        for line in sys.stdin:
            line = line.strip()
            if not line:
                continue
            try:
                out = time_shape(shapes, json.loads(line), args.min_time)
            except Exception as e:  # report and keep serving
                out = {"error": str(e)}
            print(json.dumps(out), flush=True)
        return
    reqs = json.load(sys.stdin)
    results = [time_shape(shapes, r, args.min_time) for r in reqs]
    print(json.dumps({
        "numpy": np.__version__,
        "blas": blas_name(),
        "threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "results": results,
    }))


if __name__ == "__main__":
    main()
