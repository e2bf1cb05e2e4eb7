"""The padding lever in isolation: a chain of BERT-base feed-forward sublayers, forward + backward, on every position
or on the real tokens only, in plain jax (no Keras, no attention, no dropout).

Rows of random length in [seq/2, seq] (as in bench_finetune.py), bfloat16 activations, float32 weights. Variants, one
JSON line each (prefixed `BENCH `), per round:
  padded                every position
  packed_no_fallback    the real tokens gathered into a fixed capacity (`--capacity` of the positions) and back
  packed_cond           the same inside a `lax.cond` whose other branch runs every position (exact for any batch)
  packed_cond_overflow  a capacity the batch exceeds (a quarter), so the cond runs every position

The gathers' gradients are the inverse gathers (no scatter-add). Each line also has the largest gradient difference
against the padded chain (bfloat16 rounding). What it showed on an H200 is in RESULTS.md (ninth session): the packed
chain 16% faster and the cond nearly free in this loop, while the same packing in the Keras train step was slower.

    python benchmarks/bench_packed_ffn_chain.py --out packed_ffn_chain.jsonl
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="32x512")
    parser.add_argument("--layers", type=int, default=11, help="BERT-base's full layers next to a [CLS]-only last one")
    parser.add_argument("--capacity", type=float, default=0.83, help="packed rows, as a fraction of the positions")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    batch, seq = common.parse_shape(args.shape)
    hidden, inner = 768, 3072
    positions = batch * seq
    rng = np.random.default_rng(0)
    lengths = rng.integers(seq // 2, seq + 1, size=batch)
    real = jnp.asarray(np.arange(seq)[None] < lengths[:, None]).reshape(positions)
    x0 = jnp.asarray(rng.standard_normal((positions, hidden)), jnp.bfloat16)
    params = [(jnp.asarray(rng.standard_normal((hidden, inner)) * 0.02, jnp.float32), jnp.zeros((inner,), jnp.float32),
               jnp.asarray(rng.standard_normal((inner, hidden)) * 0.02, jnp.float32), jnp.zeros((hidden,), jnp.float32))
              for _ in range(args.layers)]
    loss_weights = jnp.asarray(rng.standard_normal((positions, hidden)), jnp.bfloat16) * real[:, None]

    def feed_forward(x, layer):
        w1, b1, w2, b2 = layer
        h = jnp.dot(x, w1.astype(x.dtype)) + b1.astype(x.dtype)
        return jnp.dot(jax.nn.gelu(h, approximate=False), w2.astype(x.dtype)) + b2.astype(x.dtype)

    def with_zero_row(rows):
        return jnp.concatenate([rows, jnp.zeros((1, rows.shape[1]), rows.dtype)])

    @jax.custom_vjp
    def gather_rows(x, rows, inverse):  # x[rows]; its gradient is the gather by `inverse` (the zero row where none)
        return x[rows]

    gather_rows.defvjp(lambda x, rows, inverse: (x[rows], inverse),
                       lambda inverse, g: (with_zero_row(g)[inverse], None, None))

    def packing(capacity: int):
        """(rows, inverse, back): the real positions first, each position's packed row (or the zero row), and each
        packed row's position for the gradient (the zero row past the real tokens, and for the zero row itself)."""
        order = jnp.argsort(~real, stable=True).astype(jnp.int32)
        rows = order[:capacity]
        slot = jnp.cumsum(real.astype(jnp.int32)) - 1
        inverse = jnp.where(real & (slot < capacity), slot, capacity).astype(jnp.int32)
        back = jnp.where(jnp.arange(capacity + 1) < jnp.sum(real), jnp.append(rows, 0), positions).astype(jnp.int32)
        return rows, inverse, back

    def packed_feed_forward(x, layer, index):
        rows, inverse, back = index
        return gather_rows(with_zero_row(feed_forward(gather_rows(x, rows, inverse), layer)), inverse, back)

    def train_step(variant: str, capacity: int):
        def loss(params, x):
            index = None if variant == "padded" else packing(capacity)
            fits = jnp.sum(real) <= capacity
            for layer in params:
                if variant == "padded":
                    y = feed_forward(x, layer)
                elif variant == "packed_no_fallback":
                    y = packed_feed_forward(x, layer, index)
                else:
                    y = jax.lax.cond(fits, lambda x, p: packed_feed_forward(x, p, index),
                                     lambda x, p: feed_forward(x, p) * real[:, None].astype(x.dtype), x, layer)
                x = (x + y) * 0.5
            return jnp.sum((x * loss_weights).astype(jnp.float32))

        return jax.jit(jax.grad(loss, (0, 1)))

    capacity = int(np.ceil(positions * args.capacity / 128) * 128)
    base = dict(bench="packed_ffn_chain", shape=args.shape, layers=args.layers,
                real_fraction=round(float(jnp.mean(real)), 4), versions=common.versions(("jax", "jaxlib", "numpy")),
                hardware=common.hardware(), commit=common.git_commit())
    reference = train_step("padded", positions)(params, x0)
    records = []
    for round_ in range(args.rounds):
        for variant, rows in (("padded", positions), ("packed_no_fallback", capacity), ("packed_cond", capacity),
                              ("packed_cond_overflow", positions // 4)):
            step = train_step("packed_cond" if variant == "packed_cond_overflow" else variant, rows)
            grads = step(params, x0)
            diff = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                       for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(reference)))
            record = dict(base, variant=variant, capacity=rows, round=round_, max_abs_grad_diff=diff,
                          ms=round(common.jax_call_seconds(step, (params, x0), args.repeats) * 1e3, 4))
            common.emit(record)
            records.append(record)
    if args.out:
        common.append_jsonl(args.out, records)


if __name__ == "__main__":
    main()
