"""Is erf-GELU's elementwise work (BERT-base 32 x 512: [16384, 3072] bfloat16) bound by memory or by its math?

Times, under jit: the backward (gradient times GELU'(h), with the bias gradient's column sum, as XLA fuses them in a
train step) and the forward (bias add, GELU; h kept) with erf, with Abramowitz & Stegun 7.1.26's erf (|error| <=
1.5e-7; one exp shared with the derivative, but a division), and with trivial math on the same bytes. Prints the
approximation's accuracy first. What it showed on an H200 (RESULTS.md, ninth session): the forward is at the trivial
kernel's time; the backward 0.114 vs 0.082 ms, and A&S's division makes it slower (0.177).

    python benchmarks/bench_gelu_elementwise.py --out gelu_elementwise.jsonl
"""
import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

parser = argparse.ArgumentParser()
parser.add_argument("--out", default=None, help="append the JSON lines to this file")
args = parser.parse_args()

N, F = 16384, 3072
rng = np.random.default_rng(0)
g = jnp.asarray(rng.standard_normal((N, F)), jnp.bfloat16)
z = jnp.asarray(rng.standard_normal((N, F)) * 2, jnp.bfloat16)
b = jnp.asarray(rng.standard_normal((F,)) * 0.1, jnp.float32)
INV_SQRT2, INV_SQRT2PI = 0.7071067811865476, 0.3989422804014327

def cdf_erf(x):
    return 0.5 * (1.0 + lax.erf(x * INV_SQRT2))

def cdf_as(x, e=None):  # Abramowitz & Stegun 7.1.26, |erf error| <= 1.5e-7
    t = 1.0 / (1.0 + 0.3275911 * INV_SQRT2 * jnp.abs(x))
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    e = jnp.exp(-0.5 * x * x) if e is None else e
    q = 0.5 * poly * e
    return jnp.where(x >= 0, 1.0 - q, q)

def bwd_erf(g, h):
    x = h.astype(jnp.float32)
    return (g.astype(jnp.float32) * (cdf_erf(x) + x * INV_SQRT2PI * jnp.exp(-0.5 * x * x))).astype(jnp.bfloat16)

def bwd_as(g, h):
    x = h.astype(jnp.float32)
    e = jnp.exp(-0.5 * x * x)
    return (g.astype(jnp.float32) * (cdf_as(x, e) + x * INV_SQRT2PI * e)).astype(jnp.bfloat16)

def bwd_trivial(g, h):
    return (g.astype(jnp.float32) * h.astype(jnp.float32)).astype(jnp.bfloat16)

def with_bias_sum(f):
    def run(g, h):
        dh = f(g, h)
        return dh, jnp.sum(dh.astype(jnp.float32), 0)
    return run

def fwd(cdf):
    def run(z, b):
        h = z + b.astype(jnp.bfloat16)
        x = h.astype(jnp.float32)
        return h, (x * cdf(x)).astype(jnp.bfloat16)
    return run

def fwd_trivial(z, b):
    h = z + b.astype(jnp.bfloat16)
    return h, (h.astype(jnp.float32) * 2.0).astype(jnp.bfloat16)

def timeit(f, *args, n=200):
    f = jax.jit(f)
    jax.block_until_ready(f(*args))
    t = time.perf_counter()
    for _ in range(n):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / n * 1e3

xs = jnp.linspace(-12, 12, 2_000_001, dtype=jnp.float32)
exact = jax.jit(lambda x: x * cdf_erf(x))(xs)
approx = jax.jit(lambda x: x * cdf_as(x))(xs)
res = [dict(part="accuracy_f32", max_abs_gelu_diff_as_vs_erf=float(jnp.abs(exact - approx).max()))]
dx_exact = jax.jit(lambda x: bwd_erf(jnp.ones_like(x), x))(xs.astype(jnp.bfloat16)).astype(jnp.float32)
dx_as = jax.jit(lambda x: bwd_as(jnp.ones_like(x), x))(xs.astype(jnp.bfloat16)).astype(jnp.float32)
res.append(dict(part="accuracy_bf16_grad", differing_of_2M=int(jnp.sum(dx_exact != dx_as)), max_abs=float(jnp.abs(dx_exact - dx_as).max())))
print(res, flush=True)
for rnd in range(3):
    for name, f, args in [("bwd_erf", with_bias_sum(bwd_erf), (g, z)), ("bwd_as", with_bias_sum(bwd_as), (g, z)),
                          ("bwd_trivial", with_bias_sum(bwd_trivial), (g, z)),
                          ("fwd_erf", fwd(cdf_erf), (z, b)), ("fwd_as", fwd(cdf_as), (z, b)), ("fwd_trivial", fwd_trivial, (z, b))]:
        r = dict(part="timing", variant=name, round=rnd, ms=round(timeit(f, *args), 4))
        res.append(r); print(r, flush=True)
if args.out:
    with open(args.out, "a") as f:
        f.writelines(json.dumps(dict(r, bench="gelu_elementwise", device=str(jax.devices()[0]))) + "\n" for r in res)
