"""The token-layout attention kernels (`flash_varlen_self_attention`) against the padded ones on a GPU.

For each BERT-base shape: rows of random length in [L/2, L] (the fine-tuning benchmark's), bfloat16 q, k, v packed
as the fused QKV projection makes them, attention dropout 0.1. Checks on the device that the token layout gives
the padded kernels' outputs and d(qkv) at every real token (bit for bit expected: the same tiles and dropout
counters) and zeros in the unused tail, then times forward + backward of both layouts (median of `--repeats` jitted
calls). One JSON line per shape.

Example (GPU machine, jax backend; `--interpret --shapes 2x32 --repeats 2` runs it on CPU):
    python benchmarks/bench_varlen_attention.py --out benchmarks/flash_attention_gpu.jsonl
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402

SHAPES = ("32x128", "128x128", "32x512")


def run_shape(batch: int, length: int, repeats: int, interpret: bool) -> dict:
    import jax
    import jax.numpy as jnp

    from bert4x.kernels import flash_attention as fa
    from bert4x.kernels import flash_varlen as fv
    from bert4x.snippets import packing_positions

    heads, head_size, rate, scale = 12, 64, 0.1, 0.125
    rng = np.random.default_rng(batch * length)
    lengths = rng.integers(length // 2, length + 1, size=batch)
    keep = np.arange(length)[None, :] < lengths[:, None]
    positions = packing_positions(keep.astype(np.int32)).reshape(-1)
    real = int(keep.sum())
    dtype = jnp.float32 if interpret else jnp.bfloat16
    qkv = jnp.asarray(rng.standard_normal((batch, length, 3, heads, head_size)), dtype)
    weights = jnp.asarray(rng.standard_normal((batch, length, heads, head_size)) * keep[:, :, None, None], dtype)
    # The token layout: real tokens in order, then the tail (copies of a padding slot, as RemovePadding fills it).
    gather = np.where(positions >= 0, positions, np.flatnonzero(~keep.reshape(-1))[:1].repeat(len(positions)))
    tokens = jnp.asarray(gather, jnp.int32)
    key_mask, lengths_j, seed = jnp.asarray(keep), jnp.asarray(lengths, jnp.int32), jnp.int32(7)

    def padded_loss(x):
        out = fa.flash_self_attention(x, key_mask, seed, rate, scale, interpret=interpret, skip_padded_queries=True)
        return jnp.sum((out * weights).astype(jnp.float32)), out

    def varlen_loss(x, w):
        out = fv.flash_varlen_self_attention(x, lengths_j, seed, rate, scale, length, interpret=interpret)
        return jnp.sum((out * w).astype(jnp.float32)), out

    padded_step = jax.jit(jax.value_and_grad(padded_loss, has_aux=True))
    varlen_step = jax.jit(jax.value_and_grad(varlen_loss, has_aux=True))
    flat_qkv = qkv.reshape((batch * length,) + qkv.shape[2:])[tokens]
    flat_w = weights.reshape((batch * length,) + weights.shape[2:])[tokens]
    (_, padded_out), padded_grad = padded_step(qkv)
    (_, varlen_out), varlen_grad = varlen_step(flat_qkv, flat_w)
    at_tokens = np.flatnonzero(keep.reshape(-1))
    padded_out = np.asarray(padded_out.astype(jnp.float32)).reshape((batch * length,) + padded_out.shape[2:])
    padded_grad = np.asarray(padded_grad.astype(jnp.float32)).reshape((batch * length,) + qkv.shape[2:])
    varlen_out, varlen_grad = (np.asarray(a.astype(jnp.float32)) for a in (varlen_out, varlen_grad))
    record = dict(
        bench="varlen_attention", shape=f"{batch}x{length}", dtype=str(np.dtype(dtype)), rate=rate,
        real_tokens=real, capacity=len(positions),
        out_max_difference=float(np.abs(varlen_out[:real] - padded_out[at_tokens]).max()),
        grad_max_difference=float(np.abs(varlen_grad[:real] - padded_grad[at_tokens]).max()),
        grad_max=float(np.abs(padded_grad).max()),
        tail_max=float(max(np.abs(varlen_out[real:]).max(initial=0), np.abs(varlen_grad[real:]).max(initial=0))),
    )
    record["padded_ms"] = round(1000 * common.jax_call_seconds(padded_step, (qkv,), repeats), 4)
    record["varlen_ms"] = round(1000 * common.jax_call_seconds(varlen_step, (flat_qkv, flat_w), repeats), 4)
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--interpret", action="store_true", help="kernels through Pallas' interpreter (CPU smoke test)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    records = []
    for shape in args.shapes.split(","):
        batch, length = common.parse_shape(shape)
        record = dict(run_shape(batch, length, args.repeats, args.interpret), versions=common.versions(),
                      hardware=common.hardware(), commit=common.git_commit())
        common.emit(record)
        records.append(record)
    if args.out:
        common.append_jsonl(args.out, records)


if __name__ == "__main__":
    main()
