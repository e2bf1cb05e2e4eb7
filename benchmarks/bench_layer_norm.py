"""LayerNorm forward and forward + backward: bert4x's Pallas kernels vs Keras's LayerNormalization under XLA.

For each BERT-base activation shape (`[batch * seq, 768]`, bfloat16 input, float32 gamma and beta, float32 arithmetic,
bfloat16 output: what mixed_bfloat16 training runs) it prints one JSON line per variant (prefixed `BENCH `):
  xla      keras.layers.LayerNormalization's arithmetic (jit), forward and value_and_grad
  kernels  bert4x.kernels.layer_norm.layer_norm, for each tile configuration timed
(times per LayerNorm, from a jitted chain of `--chain` of them: one dispatch spread over many kernels)
and a `check` line: the kernels (default tiles) against the float32 reference (max abs error of y, dx, dgamma,
dbeta), so a GPU run proves what the CPU tests prove in the interpreter.

    KERAS_BACKEND=jax python benchmarks/bench_layer_norm.py --out layer_norm.jsonl
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402

SHAPES = ("32x128", "128x128", "32x512")
SWEEP = ((8, 8, 4, 8, 512), (4, 4, 4, 4, 512), (8, 8, 8, 8, 512), (16, 16, 8, 8, 512), (4, 8, 4, 8, 1024),
         (8, 8, 4, 8, 256), (2, 4, 2, 4, 1024), (16, 8, 8, 8, 512), (4, 4, 4, 4, 1024), (2, 2, 2, 2, 1024),
         (4, 4, 4, 4, 256), (1, 2, 1, 2, 2048))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--chain", type=int, default=24, help="LayerNorms per timed call (BERT-base has 25)")
    parser.add_argument("--sweep", action="store_true", help="time every tile configuration in SWEEP")
    parser.add_argument("--interpret", action="store_true", help="kernels through Pallas' interpreter (CPU smoke test)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from bert4x.kernels import layer_norm as fln

    epsilon = 1e-12
    base = dict(bench="layer_norm", width=args.width, dtype="bfloat16", versions=common.versions(),
                hardware=common.hardware(), commit=common.git_commit())
    records = []

    def emit(record):
        record = dict(base, **record)
        common.emit(record)
        records.append(record)

    def formula(x, gamma, beta):
        """LayerNorm in float32, as keras.layers.LayerNormalization computes it."""
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        variance = jnp.var(x, axis=-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(variance + epsilon) * gamma + beta

    def reference(x, gamma, beta):
        return formula(x, gamma, beta).astype(jnp.bfloat16)

    def jitted(norm, chain):
        """Jitted forward and gradient of `chain` LayerNorms applied in turn (as in a 12-layer model's forward), so
        that one call's dispatch is spread over many kernels."""
        def chained(x, gamma, beta):
            for _ in range(chain):
                x = norm(x, gamma, beta)
            return x

        def loss(x, gamma, beta, dy):
            return jnp.sum(chained(x, gamma, beta).astype(jnp.float32) * dy)

        return jax.jit(chained), jax.jit(jax.grad(loss, (0, 1, 2)))

    def kernels(blocks):
        return lambda x, gamma, beta: fln.layer_norm(x, gamma, beta, epsilon, interpret=args.interpret, blocks=blocks)

    configs = SWEEP if args.sweep else (fln.DEFAULT_BLOCKS,)
    for shape in args.shapes.split(","):
        batch, length = common.parse_shape(shape)
        rows = batch * length
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((rows, args.width)) * 2 + 0.5, jnp.bfloat16)
        dy = jnp.asarray(rng.standard_normal((rows, args.width)), jnp.float32)
        gamma = jnp.asarray(1 + 0.1 * rng.standard_normal(args.width), jnp.float32)
        beta = jnp.asarray(0.1 * rng.standard_normal(args.width), jnp.float32)
        moved = rows * args.width * 2 * 2  # bytes of a bfloat16 read and write: the forward's floor

        for variant, norm, blocks in [("xla", reference, None)] + [("kernels", kernels(b), b) for b in configs]:
            forward, backward = jitted(norm, args.chain)
            seconds = common.jax_call_seconds(forward, (x, gamma, beta), args.repeats) / args.chain
            both = common.jax_call_seconds(backward, (x, gamma, beta, dy), args.repeats) / args.chain
            emit(dict(variant=variant, shape=shape, rows=rows, forward_ms=seconds * 1e3, forward_backward_ms=both * 1e3,
                      forward_gb_s=moved / seconds / 1e9, **({"blocks": list(blocks)} if blocks else {})))

        # One LayerNorm with the default tiles against the float32 formula; y's cotangent reaches it as bfloat16.
        forward, backward = jitted(kernels(fln.DEFAULT_BLOCKS), 1)
        errors = {"y": float(jnp.max(jnp.abs(forward(x, gamma, beta).astype(jnp.float32)
                                              - reference(x, gamma, beta).astype(jnp.float32))))}
        rounded_dy = dy.astype(jnp.bfloat16).astype(jnp.float32)
        ref_grads = jax.grad(lambda *a: jnp.sum(formula(*a) * rounded_dy), (0, 1, 2))(
            x.astype(jnp.float32), gamma, beta)
        for name, got, want in zip(("dx", "dgamma", "dbeta"), backward(x, gamma, beta, dy), ref_grads):
            errors[name] = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)))
            errors[name + "_scale"] = float(jnp.max(jnp.abs(want)))
        emit(dict(variant="check", shape=shape, max_abs_error=errors))

    if args.out:
        common.append_jsonl(args.out, records)


if __name__ == "__main__":
    main()
