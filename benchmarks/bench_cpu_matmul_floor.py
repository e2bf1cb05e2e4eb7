"""The CPU's matmul floor for a BERT-base forward: how fast each backend can do the dense matmuls alone.

A BERT-base forward at 8 x 128 tokens is ~175 GFLOP, almost all of it in four dense matmuls per layer (fused QKV
768->2304, attention output 768->768, FFN 768->3072 and 3072->768). This script times exactly those matmuls, chained
through 12 layers with separate weights per layer, for 1,024 tokens, on each backend and dtype, in separate
processes. No attention, LayerNorm, GELU or softmax: the result is a lower bound on any library's forward time on
this machine and backend, which is what decides whether a "0.9x the best peer" target is reachable at all.

    python benchmarks/bench_cpu_matmul_floor.py               # one JSON line per backend x dtype
    python benchmarks/bench_cpu_matmul_floor.py --tokens 1 --dtypes float32 --repeats 20   # a decoding step's floor

Benchmarks may use the backends' native APIs; bert4x's model code never does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

TOKENS, HIDDEN, FFN, LAYERS = 1024, 768, 3072, 12
SHAPES = [(HIDDEN, 3 * HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, FFN), (FFN, HIDDEN)]
BACKENDS = ("tensorflow", "tensorflow_xla", "jax", "torch")


def weights(rng):
    import numpy as np

    return [[rng.standard_normal(shape).astype(np.float32) * 0.02 for shape in SHAPES] for _ in range(LAYERS)]


def flops(tokens: int) -> int:
    return 2 * tokens * LAYERS * sum(a * b for a, b in SHAPES)


def forward_builder(backend: str, dtype: str, tokens: int = TOKENS):
    """Returns a zero-argument callable running the chained matmuls once and blocking until they finish."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((tokens, HIDDEN)).astype(np.float32)
    layers = weights(rng)
    if backend.startswith("tensorflow"):
        import tensorflow as tf

        tf_dtype = tf.bfloat16 if dtype == "bfloat16" else tf.float32
        tx = tf.constant(x, dtype=tf_dtype)
        tw = [[tf.constant(w, dtype=tf_dtype) for w in layer] for layer in layers]

        @tf.function(jit_compile=backend == "tensorflow_xla")
        def run(h):
            for qkv, out, up, down in tw:
                h = tf.matmul(tf.matmul(h, qkv)[:, :HIDDEN], out)
                h = tf.matmul(tf.matmul(h, up), down)
            return h

        return lambda: run(tx).numpy()
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        jdtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
        jx = jnp.asarray(x, jdtype)
        jw = [[jnp.asarray(w, jdtype) for w in layer] for layer in layers]

        @jax.jit
        def run(h, ws):
            for qkv, out, up, down in ws:
                h = (h @ qkv)[:, :HIDDEN] @ out
                h = (h @ up) @ down
            return h

        return lambda: run(jx, jw).block_until_ready()
    if backend == "torch":
        import torch

        tdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        px = torch.tensor(x, dtype=tdtype)
        pw = [[torch.tensor(w, dtype=tdtype) for w in layer] for layer in layers]

        @torch.inference_mode()
        def run():
            h = px
            for qkv, out, up, down in pw:
                h = (h @ qkv)[:, :HIDDEN] @ out
                h = (h @ up) @ down
            return h

        return run
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def measure(backend: str, dtype: str, repeats: int, tokens: int = TOKENS) -> dict:
    run = forward_builder(backend, dtype, tokens)
    run()  # compile / warm caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    work = flops(tokens)
    return dict(bench="cpu_matmul_floor", backend=backend, dtype=dtype, tokens=tokens, layers=LAYERS,
                gflop=round(work / 1e9, 3), median_s=round(seconds, 5), gflops_per_s=round(work / seconds / 1e9, 1),
                repeats=repeats, cpu_count=os.cpu_count(), python=platform.python_version())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=TOKENS,
                        help="rows of the activations (1 = the matrix-vector products of one decoding step)")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # internal: "backend:dtype" in this process
    args = parser.parse_args(argv)
    if args.only:
        backend, dtype = args.only.split(":")
        print(json.dumps(measure(backend, dtype, args.repeats, args.tokens)), flush=True)
        return
    for backend in args.backends:
        for dtype in args.dtypes:
            # One process per measurement: TensorFlow's and torch's thread pools would otherwise compete.
            command = [sys.executable, __file__, "--repeats", str(args.repeats), "--tokens", str(args.tokens),
                       "--only", f"{backend}:{dtype}"]
            result = subprocess.run(command, capture_output=True, text=True,
                                    env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
            lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
            if result.returncode != 0 or not lines:
                lines = [json.dumps(dict(bench="cpu_matmul_floor", backend=backend, dtype=dtype,
                                         failed=result.stderr[-1500:]))]
            print(*lines, sep="\n", flush=True)


if __name__ == "__main__":
    main()
