"""Data-parallel scaling of BERT-base fine-tuning with keras.distribution.DataParallel on jax.

Fine-tunes BERT-base (a sentence classifier on the pooled output, AdamW, jit-compiled, mixed_bfloat16 by default)
on 1 device and on N devices with the same per-device batch, and reports tokens/s (batch x seq_len per second) and
the scaling efficiency  tokens/s(N) / (N x tokens/s(1)). Inputs are random token ids: throughput does not depend on
what the tokens say. Imports no tensorflow, so it runs where only jax + keras are installed.

GPU run (2 GPUs):
    KERAS_BACKEND=jax python benchmarks/bench_data_parallel.py --devices 1,2 --output bench_dp.json
CPU smoke run (simulated devices, tiny model):
    KERAS_BACKEND=jax XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \\
        python benchmarks/bench_data_parallel.py --size tiny --devices 1,2 --steps 2 --warmup 1 --dtype float32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = {
    # Google's BERT-base with the Chinese vocabulary (21128 tokens).
    "base": dict(vocab_size=21128, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072),
    "tiny": dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--devices", default="1,all", help="device counts to compare, e.g. '1,2' ('all' = every device)")
    parser.add_argument("--per-device-batch", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50, help="timed steps per device count")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps (compilation) before timing (>= 2)")
    parser.add_argument("--dtype", default="mixed_bfloat16", help="keras dtype policy")
    parser.add_argument("--num-labels", type=int, default=2)
    parser.add_argument("--output", help="write the results as JSON here")
    return parser.parse_args(argv)


def build_classifier(size: str, seq_len: int, num_labels: int):
    import keras

    from bert4x.models import build_transformer_model

    bert = build_transformer_model(dict(SIZES[size], max_position_embeddings=max(512, seq_len)), with_pool=True)
    logits = keras.layers.Dense(num_labels, dtype="float32", name="Classifier")(bert.output)
    model = keras.Model(bert.inputs, logits)
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=2e-5, weight_decay=0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    return model


def measure(devices: list[str], args) -> dict:
    import keras
    import numpy as np

    from bert4x.distribution import global_batch_size

    keras.backend.clear_session()
    keras.config.set_dtype_policy(args.dtype)
    distribution = keras.distribution.DataParallel(devices=devices)
    batch = global_batch_size(args.per_device_batch, distribution)
    rng = np.random.default_rng(0)
    vocab = SIZES[args.size]["vocab_size"]

    def data(steps):
        n = steps * batch
        token_ids = rng.integers(1, vocab, size=(n, args.seq_len), dtype=np.int32)
        segment_ids = np.zeros_like(token_ids)
        labels = rng.integers(0, args.num_labels, size=(n,), dtype=np.int32)
        return [token_ids, segment_ids], labels

    with distribution.scope():
        model = build_classifier(args.size, args.seq_len, args.num_labels)
        # Untimed calls until nothing compiles any more. Under a distribution jax compiles the step up to three
        # times, for equivalent but distinct shardings of the state: as created, as returned by a step, and as
        # written back into the variables at the end of `fit`. Two steps, then one more call, cover them.
        for steps in (max(2, args.warmup), 1):
            x, y = data(steps)
            model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)
        x, y = data(args.steps)
        start = time.perf_counter()
        history = model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)
        seconds = time.perf_counter() - start  # fit returns after the last step's loss reached the host
    loss = float(history.history["loss"][-1])
    if not np.isfinite(loss):
        raise RuntimeError(f"non-finite loss {loss} on {len(devices)} devices")
    return dict(devices=len(devices), global_batch=batch, steps=args.steps, seconds=round(seconds, 4),
                tokens_per_second=round(args.steps * batch * args.seq_len / seconds, 1), loss=round(loss, 4))


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    import keras

    if keras.backend.backend() != "jax":
        raise SystemExit(f"run with KERAS_BACKEND=jax (this process uses {keras.backend.backend()!r})")
    all_devices = keras.distribution.list_devices()
    counts = [len(all_devices) if c == "all" else int(c) for c in args.devices.split(",")]
    for count in counts:
        if not 1 <= count <= len(all_devices):
            raise SystemExit(f"--devices asks for {count} devices; this machine has {len(all_devices)}: {all_devices}")
    results = [measure(all_devices[:count], args) for count in counts]
    base = next((r for r in results if r["devices"] == 1), None)
    for r in results:
        r["speedup"] = round(r["tokens_per_second"] / base["tokens_per_second"], 3) if base else None
        r["efficiency"] = round(r["speedup"] / r["devices"], 3) if base else None
    meta = dict(size=args.size, seq_len=args.seq_len, per_device_batch=args.per_device_batch, dtype=args.dtype,
                device_kind=all_devices[0], keras=keras.__version__)
    print(f"BERT-{args.size} fine-tuning, seq_len {args.seq_len}, {args.per_device_batch} per device, {args.dtype}")
    print("| devices | global batch | tokens/s | speedup | efficiency |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['devices']} | {r['global_batch']} | {r['tokens_per_second']:.0f} | {r['speedup']} | {r['efficiency']} |")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(dict(meta, results=results), f, indent=2)
    return results


if __name__ == "__main__":
    main()
