"""Is erf-GELU's elementwise work in a BERT-base step bound by memory or by its math? (jax, jit, one array shape)

On a `[batch * seq, 3072]` bfloat16 activation (32 x 512 by default), float32 arithmetic, it times:
  bwd_*  the backward: upstream gradient times GELU'(h), with the bias gradient's column sum (as XLA fuses them)
  fwd_*  the forward: bias add, GELU, h kept for the backward
each with erf (`erf`), with Abramowitz & Stegun 7.1.26's erf (`as`: |error| <= 1.5e-7, its exp shared with the
derivative but with a division) and with trivial math on the same bytes (`trivial`: the memory-bound floor). One JSON
line per variant and round (prefixed `BENCH `), after two accuracy lines for the A&S form. What it showed on an H200
is in RESULTS.md (ninth session): the forward at the floor, the backward ≈0.03 ms a layer above it.

    python benchmarks/bench_gelu_elementwise.py --out gelu_elementwise.jsonl
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

INV_SQRT2, INV_SQRT_2PI = 0.7071067811865476, 0.3989422804014327


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="32x512")
    parser.add_argument("--width", type=int, default=3072)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    batch, seq = common.parse_shape(args.shape)
    rng = np.random.default_rng(0)
    upstream = jnp.asarray(rng.standard_normal((batch * seq, args.width)), jnp.bfloat16)
    pre_activation = jnp.asarray(rng.standard_normal((batch * seq, args.width)) * 2, jnp.bfloat16)
    bias = jnp.asarray(rng.standard_normal((args.width,)) * 0.1, jnp.float32)

    def cdf_erf(x):
        return 0.5 * (1.0 + jax.lax.erf(x * INV_SQRT2))

    def cdf_as(x, gauss=None):
        t = 1.0 / (1.0 + 0.3275911 * INV_SQRT2 * jnp.abs(x))
        poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
        tail = 0.5 * poly * (jnp.exp(-0.5 * x * x) if gauss is None else gauss)
        return jnp.where(x >= 0, 1.0 - tail, tail)

    def grad_erf(x):
        return cdf_erf(x) + x * INV_SQRT_2PI * jnp.exp(-0.5 * x * x)

    def grad_as(x):
        gauss = jnp.exp(-0.5 * x * x)
        return cdf_as(x, gauss) + x * INV_SQRT_2PI * gauss

    def backward(derivative):
        def run(g, h):
            dh = (g.astype(jnp.float32) * derivative(h.astype(jnp.float32))).astype(jnp.bfloat16)
            return dh, jnp.sum(dh.astype(jnp.float32), 0)

        return run

    def forward(activation):
        def run(z, b):
            h = z + b.astype(jnp.bfloat16)
            return h, activation(h.astype(jnp.float32)).astype(jnp.bfloat16)

        return run

    base = dict(bench="gelu_elementwise", shape=args.shape, width=args.width,
                versions=common.versions(("jax", "jaxlib", "numpy")), hardware=common.hardware(),
                commit=common.git_commit())
    records = []

    def emit(record):
        record = dict(base, **record)
        common.emit(record)
        records.append(record)

    xs = jnp.linspace(-12, 12, 2_000_001, dtype=jnp.float32)
    exact, approx = (jax.jit(lambda x, cdf=cdf: x * cdf(x))(xs) for cdf in (cdf_erf, cdf_as))
    emit(dict(part="accuracy_f32", max_abs_gelu_diff_as_vs_erf=float(jnp.abs(exact - approx).max())))
    ones = jnp.ones_like(xs, jnp.bfloat16)
    d_exact, d_as = (jax.jit(backward(d))(ones, xs.astype(jnp.bfloat16))[0].astype(jnp.float32)
                     for d in (grad_erf, grad_as))
    emit(dict(part="accuracy_bf16_grad", differing_of_2M=int(jnp.sum(d_exact != d_as)),
              max_abs=float(jnp.abs(d_exact - d_as).max())))

    variants = (("bwd_erf", backward(grad_erf), (upstream, pre_activation)),
                ("bwd_as", backward(grad_as), (upstream, pre_activation)),
                ("bwd_trivial", backward(lambda x: x), (upstream, pre_activation)),
                ("fwd_erf", forward(lambda x: x * cdf_erf(x)), (pre_activation, bias)),
                ("fwd_as", forward(lambda x: x * cdf_as(x)), (pre_activation, bias)),
                ("fwd_trivial", forward(lambda x: x * 2.0), (pre_activation, bias)))
    for round_ in range(args.rounds):
        for name, fn, fn_args in variants:
            ms = common.jax_call_seconds(jax.jit(fn), fn_args, args.repeats) * 1e3
            emit(dict(part="timing", variant=name, round=round_, ms=round(ms, 4)))
    if args.out:
        common.append_jsonl(args.out, records)


if __name__ == "__main__":
    main()
