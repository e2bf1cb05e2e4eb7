"""Attention forward + backward with dropout: bert4x's fused Pallas kernels vs XLA, and cuDNN without dropout.

For each BERT-base attention shape (12 heads of 64, bfloat16, right-padded key masks) it prints one JSON line per
variant (prefixed `BENCH `):
  xla_dropout      what MultiHeadAttention ran before the kernels: einsum, masked softmax, dropout, einsum (jit)
  pallas_dropout   bert4x.kernels.flash_attention.flash_attention, dropout 0.1, for each tile configuration swept
  pallas_no_dropout the same kernels at rate 0 (no mask hashing): what the in-kernel dropout costs
  cudnn_no_dropout jax.nn.dot_product_attention(implementation="cudnn") with key lengths: the fused ceiling, dropout 0
and a `check` line: the kernels against plain jnp attention with the same dropout mask (max abs error of the output and
of dq, dk, dv, bfloat16 inputs, float32 reference), so a GPU run proves what the CPU tests prove in the interpreter.

    KERAS_BACKEND=jax python benchmarks/bench_flash_attention.py --out flash.jsonl
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402

SHAPES = ("32x128", "128x128", "32x512")
# (forward block_q, forward block_k, backward block_q, backward block_k, num_warps, num_stages[, heads per program])
SWEEP = ((128, 64, 64, 64, 4, 2), (64, 64, 64, 64, 4, 2), (128, 128, 64, 64, 8, 2), (128, 64, 32, 64, 4, 2),
         (64, 32, 32, 32, 4, 2), (128, 64, 64, 128, 8, 2), (64, 64, 64, 64, 4, 3), (64, 64, 32, 32, 4, 2),
         (64, 64, 64, 64, 8, 2), (32, 64, 64, 64, 4, 2),
         (64, 64, 64, 64, 4, 2, 2), (64, 64, 64, 64, 8, 2, 2), (64, 32, 32, 64, 4, 2, 2), (32, 64, 64, 32, 4, 2, 2),
         (64, 64, 32, 64, 4, 2, 2), (32, 64, 32, 64, 4, 2, 2))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--sweep", action="store_true", help="time every tile configuration in SWEEP")
    parser.add_argument("--blocks", default=None,
                        help="tile configurations to time instead, e.g. '64,64,64,64,4,2;64,64,64,64,4,2,2'")
    parser.add_argument("--interpret", action="store_true", help="kernels through Pallas' interpreter (CPU smoke test)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from bert4x.kernels import flash_attention as fa

    heads, head_size, rate = 12, 64, 0.1
    scale = head_size**-0.5
    base = dict(bench="flash_attention", heads=heads, head_size=head_size, rate=rate, dtype="bfloat16",
                versions=common.versions(), hardware=common.hardware(), commit=common.git_commit())
    records = []

    def emit(record):
        record = dict(base, **record)
        common.emit(record)
        records.append(record)

    for shape in args.shapes.split(","):
        batch, length = common.parse_shape(shape)
        rng = np.random.default_rng(0)
        q, k, v, do = (jnp.asarray(rng.standard_normal((batch, length, heads, head_size)), jnp.bfloat16)
                       for _ in range(4))
        lengths = rng.integers(length // 2, length + 1, size=batch)
        key_mask = jnp.asarray(np.arange(length)[None, :] < lengths[:, None])
        seed = jnp.int32(1234)

        def grads_of(attend):
            def loss(q, k, v):
                return jnp.sum(attend(q, k, v).astype(jnp.float32) * do.astype(jnp.float32))
            return jax.jit(jax.value_and_grad(loss, (0, 1, 2)))

        def pallas(blocks, rate=rate):
            return lambda q, k, v: fa.flash_attention(q, k, v, key_mask, seed, rate, scale, interpret=args.interpret,
                                                      blocks=blocks)

        # Correctness on the GPU: same mask, float32 reference on the bfloat16 inputs; one head or a head pair per
        # program.
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        ref_out = fa.reference_attention(*f32, key_mask, seed, rate, scale)
        want = jax.grad(lambda q, k, v: jnp.sum(fa.reference_attention(q, k, v, key_mask, seed, rate, scale)
                                                * do.astype(jnp.float32)), (0, 1, 2))(*f32)
        for blocks in (fa.DEFAULT_BLOCKS[:6] + (1,), fa.DEFAULT_BLOCKS[:6] + (2,)):
            attend = pallas(blocks)
            out = jax.jit(attend)(q, k, v)
            got = grads_of(attend)(q, k, v)[1]
            errors = {"out": float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref_out)))}
            for name, a, b in zip(("dq", "dk", "dv"), got, want):
                errors[name] = float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)))
                errors[name + "_scale"] = float(jnp.max(jnp.abs(b)))
            errors["out_scale"] = float(jnp.max(jnp.abs(ref_out)))
            emit(dict(variant="check", shape=shape, blocks=blocks, max_abs_error=errors))

        def xla_dropout(q, k, v):
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * jnp.asarray(scale, q.dtype)
            logits = jnp.where(key_mask[:, None, None, :], logits.astype(jnp.float32), -1e9)
            probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
            keep = jax.random.bernoulli(jax.random.key(0), 1 - rate, probs.shape)
            probs = jnp.where(keep, probs / jnp.asarray(1 - rate, q.dtype), 0)
            return jnp.einsum("bhqk,bkhd->bqhd", probs, v)

        def cudnn(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, scale=scale, key_value_seq_lengths=jnp.asarray(lengths),
                                                implementation="cudnn")

        variants = [("xla_dropout", xla_dropout, None)] + ([] if args.interpret else [("cudnn_no_dropout", cudnn, None)])
        variants.append(("pallas_no_dropout", pallas(fa.DEFAULT_BLOCKS, rate=0.0), fa.DEFAULT_BLOCKS))
        sweep = SWEEP if args.sweep else (fa.DEFAULT_BLOCKS,)
        if args.blocks:
            sweep = [tuple(int(b) for b in config.split(",")) for config in args.blocks.split(";")]
        for blocks in sweep:
            variants.append(("pallas_dropout", pallas(blocks), blocks))
        for name, attend, blocks in variants:
            try:
                seconds = common.jax_call_seconds(grads_of(attend), (q, k, v), args.repeats)
                emit(dict(variant=name, shape=shape, blocks=blocks, fwd_bwd_ms=round(1000 * seconds, 4)))
            except Exception as e:  # noqa: BLE001 - a tile configuration the compiler refuses is a result too
                emit(dict(variant=name, shape=shape, blocks=blocks, error=f"{type(e).__name__}: {str(e)[:300]}"))
    if args.out:
        common.append_jsonl(args.out, records)


if __name__ == "__main__":
    main()
