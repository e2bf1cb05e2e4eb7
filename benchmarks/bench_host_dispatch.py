"""Where Keras's jax training loop spends the host's time per step, for the issue-6 classifier (one process).

Keras 3's jax `fit` dispatches one compiled step per batch. When the GPU's step is short (BERT-base at 8 x 128) or
the host slows down, the host's work per step sets the pace. This splits the main thread's CPU time per step into:
  next        taking the next batch from Keras's iterator (slicing, `device_put` one batch ahead)
  jit_call    calling the jitted train step: jax's dispatch of the ~500 state arrays in and out
  store       `model._jax_state = {...}`, which Keras's loop does after every dispatch
  cb_begin / cb_end   the callback list
and `cpu_ms` (the whole `fit`) and `step_ms` (wall). It alternates `keras.Model` and `bert4x.models.Model` (the same
layers; bert4x stores `_jax_state` without Keras's attribute tracking), and times a pure-Python probe (3M integer
additions) before each run: on a shared host that probe's time varies, and with it every figure here.

Example (on the GPU machine; `--config tiny` for a CPU smoke test):
    KERAS_BACKEND=jax python benchmarks/bench_host_dispatch.py --shape 8x128 --out host.jsonl
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402


class PartTimer:
    """Main-thread CPU seconds per named part, summed over a `fit`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def wrap(self, key: str, fn):
        def timed(*args, **kwargs):
            start = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[key] = self.seconds.get(key, 0.0) + time.thread_time() - start

        return timed


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="base", choices=sorted(common.CONFIGS))
    parser.add_argument("--shape", default="8x128", help="BATCHxSEQ")
    parser.add_argument("--steps", type=int, default=300, help="steps per timed fit")
    parser.add_argument("--repeats", type=int, default=4, help="timed fits per model class, alternating")
    parser.add_argument("--out", default=None, help="append the JSON line to this file")
    args = parser.parse_args(argv)

    import jax
    import keras
    from keras.src.callbacks import callback_list

    import bench_finetune
    from bert4x.models import Model

    keras.config.set_dtype_policy("mixed_bfloat16")
    cfg = common.config(args.config)
    batch, seq = common.parse_shape(args.shape)
    data = common.random_batches(cfg, batch, seq, args.steps + 16, seed=1)
    x, y = bench_finetune.keras_inputs("bert4x", data), data["labels"]
    built = bench_finetune.build_keras_classifier("bert4x", cfg)
    timer = PartTimer()
    for name in ("on_train_batch_begin", "on_train_batch_end"):  # the loop's callback list, timed for every model
        setattr(callback_list.CallbackList, name,
                timer.wrap("cb_" + name.split("_")[-1], getattr(callback_list.CallbackList, name)))

    models = {}
    for label, model_class in (("keras.Model", keras.Model), ("bert4x.models.Model", Model)):
        model = model_class(built.inputs, built.outputs)
        model.compile(optimizer=keras.optimizers.AdamW(common.LEARNING_RATE, weight_decay=common.WEIGHT_DECAY),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)
        step = jax.jit(model.train_step, donate_argnums=0)
        call_step, take = timer.wrap("jit_call", step), timer.wrap("next", next)
        # Keras's single-step train function, its two parts timed apart (`fit` keeps a train function already set)
        model.train_function = lambda state, iterator, call_step=call_step, take=take: call_step(state, take(iterator))
        # the instance's class (keras makes a functional one) records how long storing `_jax_state` takes, and stores
        # it as that class does
        own = type(model)
        store = timer.wrap("store", own.__setattr__)
        model.__class__ = type(own.__name__, (own,), {
            "__setattr__": lambda self, key, value, store=store, plain=own.__setattr__:
                (store if key == "_jax_state" else plain)(self, key, value)})
        models[label] = model

    def fit(model, first: int, count: int) -> dict:
        timer.seconds.clear()
        wall, cpu = time.perf_counter(), time.thread_time()
        history = model.fit(bench_finetune.slice_rows(x, first * batch, (first + count) * batch),
                            y[first * batch:(first + count) * batch], batch_size=batch, epochs=1, shuffle=False,
                            verbose=0)
        float(history.history["loss"][-1])  # waits for the device
        per_step = lambda s: round(1000 * s / count, 3)  # noqa: E731
        return dict(step_ms=per_step(time.perf_counter() - wall), cpu_ms=per_step(time.thread_time() - cpu),
                    **{key: per_step(s) for key, s in sorted(timer.seconds.items())})

    for model in models.values():
        fit(model, 0, 16)  # compiles
    runs = []
    for repeat in range(args.repeats):
        for label, model in models.items():
            runs.append(dict(model=label, repeat=repeat, probe_s=common.python_probe_s(), **fit(model, 16, args.steps)))
            print(runs[-1], flush=True)
    record = dict(bench="host_dispatch", config=args.config, shape=args.shape, steps=args.steps,
                  state_arrays=len(jax.tree.leaves(models["keras.Model"]._get_jax_state(
                      trainable_variables=True, non_trainable_variables=True, optimizer_variables=True,
                      metrics_variables=True))),
                  runs=runs, backend=jax.default_backend(), versions=common.versions(), hardware=common.hardware(),
                  commit=common.git_commit())
    common.emit(record)
    if args.out:
        common.append_jsonl(args.out, [record])


if __name__ == "__main__":
    main()
