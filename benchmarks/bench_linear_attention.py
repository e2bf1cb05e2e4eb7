"""Cost of attention against sequence length: softmax (O(n^2)) vs linear and Performer (O(n)) attention.

Times one forward pass of `MultiHeadAttention(attention_type=...)` (projections included) on a `[batch, n, dim]`
input for growing n, each shape compiled once (jit) and timed as the median of repeated calls, and prints a table of
milliseconds plus the growth factor per doubling of n (~4 for quadratic, ~2 for linear cost).

CPU example (a few minutes on 2 cores; shared machines give noisy figures):
    python benchmarks/bench_linear_attention.py --lengths 256,512,1024,2048,4096 --repeats 5
GPU / other backend:
    KERAS_BACKEND=jax python benchmarks/bench_linear_attention.py --lengths 1024,2048,4096,8192,16384
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from bert4x.layers import MultiHeadAttention  # noqa: E402


def time_forward(kind: str, n: int, args) -> float:
    layer = MultiHeadAttention(args.heads, args.dim // args.heads, attention_type=kind,
                               performer_features=args.features if kind == "performer" else None)
    inputs = keras.Input((n, args.dim))
    model = keras.Model(inputs, layer(inputs))
    x = np.random.default_rng(0).normal(size=(args.batch, n, args.dim)).astype("float32")
    model.predict_on_batch(x)  # compile
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        np.asarray(model.predict_on_batch(x))
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="256,512,1024,2048,4096")
    parser.add_argument("--kinds", default="softmax,linear,performer")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--features", type=int, default=128, help="Performer random features")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args(argv)
    lengths = [int(n) for n in args.lengths.split(",")]
    kinds = args.kinds.split(",")
    results = {kind: {} for kind in kinds}
    print(f"backend={keras.backend.backend()} batch={args.batch} dim={args.dim} heads={args.heads} "
          f"features={args.features} machine={platform.machine()} cpus={os.cpu_count()}")
    print(f"{'n':>7} " + " ".join(f"{k + ' ms':>14}" for k in kinds))
    for n in lengths:
        for kind in kinds:
            results[kind][n] = time_forward(kind, n, args)
        print(f"{n:>7} " + " ".join(f"{results[k][n]:>14.2f}" for k in kinds), flush=True)
    print("growth per doubling of n (last two lengths):")
    for kind in kinds:
        a, b = results[kind][lengths[-2]], results[kind][lengths[-1]]
        print(f"  {kind:10s} x{b / a:.2f} per x{lengths[-1] / lengths[-2]:.0f} length")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"args": vars(args), "backend": keras.backend.backend(), "ms": results}, f, indent=2)


if __name__ == "__main__":
    main()
