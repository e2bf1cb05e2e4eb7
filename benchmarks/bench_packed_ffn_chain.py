"""A chain of 11 BERT-base feed-forward sublayers (no dropout), forward + backward, at 32 x 512 positions of which
~75% are real tokens (row lengths uniform in [256, 512], as in bench_finetune.py), in plain jax (no Keras):

  padded               every position
  packed_no_fallback   the real tokens gathered into a fixed capacity (83.6% of the positions), and back
  packed_cond          the same inside a `lax.cond` whose other branch runs every position (exact for any batch)
  packed_cond_overflow a capacity the batch exceeds, so the cond runs every position

Gathers and their gradients are inverse gathers. What it showed on an H200 (RESULTS.md, ninth session): the packed
chain 16% faster than the padded one and the cond nearly free in this tight loop; the same packing inside the Keras
train step of the full model was slower.

    python benchmarks/bench_packed_ffn_chain.py --out packed_ffn_chain.jsonl
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

B, L, D, F, LAYERS = 32, 512, 768, 3072, 11
N = B * L
rng = np.random.default_rng(0)
lengths = rng.integers(L // 2, L + 1, size=B)
mask = jnp.asarray(np.arange(L)[None] < lengths[:, None]).reshape(N)
x0 = jnp.asarray(rng.standard_normal((N, D)), jnp.bfloat16)
params = [(jnp.asarray(rng.standard_normal((D, F)) * 0.02, jnp.float32), jnp.zeros((F,), jnp.float32),
           jnp.asarray(rng.standard_normal((F, D)) * 0.02, jnp.float32), jnp.zeros((D,), jnp.float32))
          for _ in range(LAYERS)]
wt = jnp.asarray(rng.standard_normal((N, D)), jnp.bfloat16) * mask[:, None]

def ffn(x, p):
    w1, b1, w2, b2 = p
    h = jnp.dot(x, w1.astype(x.dtype)) + b1.astype(x.dtype)
    return jnp.dot(jax.nn.gelu(h, approximate=False), w2.astype(x.dtype)) + b2.astype(x.dtype)

@jax.custom_vjp
def take_rows(x, rows, inverse):
    return x[rows]
def take_fwd(x, rows, inverse):
    return x[rows], (rows, inverse, x.shape[0])
def take_bwd(res, g):
    rows, inverse, n = res
    gz = jnp.concatenate([g, jnp.zeros((1, g.shape[1]), g.dtype)])
    return gz[inverse], None, None
take_rows.defvjp(take_fwd, take_bwd)

def packing(capacity):
    order = jnp.argsort(~mask, stable=True).astype(jnp.int32)  # real positions first
    rows = order[:capacity]
    slot = jnp.cumsum(mask.astype(jnp.int32)) - 1
    inverse = jnp.where(mask & (slot < capacity), slot, capacity).astype(jnp.int32)  # padded -> the zero row
    back_inverse = jnp.where(jnp.arange(capacity) < jnp.sum(mask), rows, N).astype(jnp.int32)
    return rows, inverse, back_inverse

def packed_ffn(x, p, pk):
    rows, inverse, back = pk
    xp = take_rows(x, rows, inverse)
    yp = ffn(xp, p)
    return _unpack(yp, inverse, back)


@jax.custom_vjp
def _unpack(yp, inverse, back):
    return jnp.concatenate([yp, jnp.zeros((1, yp.shape[1]), yp.dtype)])[inverse]
def _unpack_fwd(yp, inverse, back):
    return _unpack(yp, inverse, back), back
def _unpack_bwd(back, g):
    return jnp.concatenate([g, jnp.zeros((1, g.shape[1]), g.dtype)])[back], None, None
_unpack.defvjp(_unpack_fwd, _unpack_bwd)

def model(variant, capacity):
    def loss(params, x):
        pk = packing(capacity) if variant != "padded" else None
        fits = jnp.sum(mask) <= capacity
        for p in params:
            if variant == "padded":
                y = ffn(x, p)
            elif variant == "packed_no_fallback":
                y = packed_ffn(x, p, pk)
            else:
                y = lax.cond(fits, lambda x, p: packed_ffn(x, p, pk), lambda x, p: ffn(x, p) * mask[:, None].astype(x.dtype), x, p)
            x = (x + y) * 0.5
        return jnp.sum((x * wt).astype(jnp.float32))
    return jax.jit(jax.grad(loss, (0, 1)))

def timeit(f, n=30):
    jax.block_until_ready(f(params, x0))
    t = time.perf_counter()
    for _ in range(n):
        out = f(params, x0)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / n * 1e3

res = []
real = int(jnp.sum(mask))
cap = int(np.ceil(N * 0.83 / 128) * 128)
print("real fraction", real / N, "capacity", cap / N, flush=True)
ref = model("padded", N)(params, x0)
for rnd in range(2):
    for variant, c in [("padded", N), ("packed_no_fallback", cap), ("packed_cond", cap), ("packed_cond_overflow", 4096)]:
        f = model("packed_cond" if variant == "packed_cond_overflow" else variant, c)
        g = f(params, x0)
        err = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))) for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(ref)))
        r = dict(variant=variant, capacity=c, round=rnd, ms=round(timeit(f), 4), max_abs_grad_diff=err)
        res.append(r); print(r, flush=True)
if args.out:
    with open(args.out, "a") as f:
        f.writelines(json.dumps(dict(r, bench="packed_ffn_chain", device=str(jax.devices()[0]))) + "\n" for r in res)
