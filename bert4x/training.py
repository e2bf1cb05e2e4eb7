"""`Model`: a `keras.Model` whose `fit` on jax runs `steps_per_execution` steps as one compiled program.

Keras 3's jax trainer honours `steps_per_execution` with a Python loop that dispatches one compiled step at a time, so
every step still pays the host's dispatch of the whole training state: a BERT-base classifier with AdamW passes ≈500
arrays in and out, and on the H200 machine of `benchmarks/` Keras's loop cannot go below ≈5 ms a step (202k tokens/s
at 8 × 128 for bert4x and keras-hub alike, where the GPU's work takes at most 3.6 ms). Here the `k` batches of one
execution are stacked on the device and the compiled program loops over them (`jax.lax.scan`): one dispatch per `k`
steps (284k tokens/s there with `k=8`), and the same steps as Keras's loop, dropout draws included. Where the GPU is
the limit (BERT-base at 32 × 128 and above) it keeps the step GPU-bound when the host slows: on that machine the
host's single-thread speed halves at times, and Keras's loop, which needs ≈5 ms of host time a step (most of it
the jitted step's call, which passes the ≈500 state arrays), then falls from 600k to 400k tokens/s at 32 × 128.

On the tensorflow and torch backends, with `steps_per_execution=1`, under `run_eagerly`, `jit_compile=False` or a
`keras.distribution`, `Model` trains exactly as `keras.Model` does.
"""

from __future__ import annotations

import keras

__all__ = ["Model"]


@keras.saving.register_keras_serializable(package="bert4x")
class Model(keras.Model):
    """`keras.Model` (functional or subclassed) whose jax `fit` runs `steps_per_execution` steps per dispatch.

    A drop-in replacement for `keras.Model`: build it from inputs and outputs, compile with `steps_per_execution=k`
    and `fit` as usual. Callbacks see one batch end per `k` steps, as with Keras's own `steps_per_execution`. The
    batches of an execution must share their shapes to be stacked; a chunk whose shapes differ (a smaller last
    batch, a generator of varying lengths) and the tail of an epoch shorter than `k` run one step per dispatch (that
    single step compiles once, on first use).

    Example:
        >>> import keras, numpy as np
        >>> from bert4x.models import Model
        >>> x = keras.Input((4,))
        >>> model = Model(x, keras.layers.Dense(1)(x))
        >>> model.compile("sgd", "mse", steps_per_execution=4)
        >>> model.fit(np.ones((32, 4)), np.zeros((32, 1)), batch_size=4, verbose=0).history["loss"][0] >= 0
        True
    """

    def __setattr__(self, name: str, value) -> None:
        # Keras's jax loop stores the training state here after every dispatch, for callbacks that sync it. As a
        # layer attribute, each store walks the ≈500 arrays through Keras's tracker (0.6–1.2 ms of host time a step for
        # BERT-base on the benchmark's H200 host); jax arrays are never tracked, so it is stored plainly.
        if name == "_jax_state":
            object.__setattr__(self, name, value)
            return
        super().__setattr__(name, value)

    def make_train_function(self, force: bool = False) -> None:
        if self.train_function is not None and not force:
            return
        if not self._fuses_steps():
            super().make_train_function(force)
            return
        import jax

        steps = self.steps_per_execution
        step = self.train_step

        def run_steps(state, batches):
            stacked = jax.tree.map(lambda *leaves: jax.numpy.stack(leaves), *batches)

            def body(state, data):
                logs, state = step(state, data)
                return state, logs

            state, logs = jax.lax.scan(body, state, stacked)
            return jax.tree.map(lambda values: values[-1], logs), state

        run_steps = jax.jit(run_steps, donate_argnums=0, compiler_options=_SCAN_COMPILER_OPTIONS)
        run_one = jax.jit(step, donate_argnums=0)

        def train_function(state, iterator):
            batches = [next(iterator)]  # StopIteration here ends the epoch, as in Keras's loop
            for _ in range(steps - 1):
                try:
                    batches.append(next(iterator))
                except StopIteration:
                    break
            if len(batches) == steps and _same_shapes(batches):
                return run_steps(state, tuple(batches))
            for data in batches:
                logs, state = run_one(state, data)
            return logs, state

        self.train_function = train_function

    def _fuses_steps(self) -> bool:
        if keras.backend.backend() != "jax" or self.steps_per_execution <= 1:
            return False
        if self.run_eagerly or not self.jit_compile or keras.config.is_nnx_enabled():
            return False
        return keras.distribution.distribution() is None


# XLA's latency-hiding scheduler (on by default in jaxlib 0.11.2 on an H200: setting it true changed nothing) orders
# the scanned step's backward pass as all input gradients first, then every weight-gradient reduction and optimizer
# update, whose inputs have by then left the L2 cache. BERT-base at 32 x 128 took 7.10 ms a step with it, 6.85-6.92 ms
# without, like single steps. The option is per program and ignored off the GPU.
_SCAN_COMPILER_OPTIONS = {"xla_gpu_enable_latency_hiding_scheduler": False}


def _same_shapes(batches: list) -> bool:
    """Whether every batch has the first one's structure, shapes and dtypes (so that they stack)."""
    first = _signature(batches[0])
    return all(_signature(batch) == first for batch in batches[1:])


def _signature(batch) -> tuple:
    import jax

    leaves, structure = jax.tree.flatten(batch)
    return structure, [(getattr(leaf, "shape", None), getattr(leaf, "dtype", None)) for leaf in leaves]
