"""A Keras model's inference call, compiled for serving on the current backend.

`CompiledInference(model)` is `fn({input name: array}) -> {output name: np.ndarray}` with `training=False`, the
outputs of `bert4x.export.serving_function` (CRF layers add their Viterbi paths) and host arrays in and out:

- jax: one `jax.jit` of the call per input shape, the weights passed as arguments (read when the object is made:
  `refresh()` reads them again after more training). A model built with `remove_padding=True` takes
  `Input-Packing`; here it is computed on the device from `Input-Token`, for a width the host picks from the number
  of real tokens (`bert4x.snippets.packing_width`), so callers give only the token inputs;
- tensorflow: one `tf.function` with free batch and length axes;
- torch: the eager call under `torch.no_grad()`.

Example:
>>> from bert4x.models import build_transformer_model
>>> model = build_transformer_model({"vocab_size": 20, "hidden_size": 8, "num_hidden_layers": 1,
...                                  "num_attention_heads": 2, "intermediate_size": 16}, with_pool=True)
>>> infer = CompiledInference(model)
>>> infer.input_names
['Input-Token', 'Input-Segment']
>>> out = infer({"Input-Token": np.array([[2, 5, 3, 0]]), "Input-Segment": np.zeros((1, 4), "int32")})
>>> {name: value.shape for name, value in out.items()}
{'Pooler-Dense': (1, 8)}
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import keras
import numpy as np

__all__ = ["CompiledInference", "PACKING_INPUT", "device_packing_positions"]

PACKING_INPUT = "Input-Packing"
_TOKEN_INPUT = "Input-Token"


class CompiledInference:
    """The inference call of `model` compiled once per input shape; host arrays in and out.

    Args:
        model: a built `keras.Model` (a bert4x model, or one built on it).
        crf_decode: add `<crf layer name>-Viterbi` for every output made by a `ConditionalRandomField`.
        packing_buckets: on jax, for a model without padding: the packing widths' granularity (at most this many
            widths per input shape, hence compilations; `bert4x.snippets.packing_positions`).
        pad_id: the padding id of `Input-Token`.
    """

    def __init__(self, model: keras.Model, crf_decode: bool = True, packing_buckets: int = 32, pad_id: int = 0):
        from bert4x.export import serving_function, serving_inputs

        if not isinstance(model, keras.Model):
            raise TypeError(f"CompiledInference: model must be a keras.Model, got {type(model).__name__}.")
        names = [spec[0] for spec in serving_inputs(model)]
        self.model, self.backend = model, keras.backend.backend()
        self.packing = self.backend == "jax" and PACKING_INPUT in names
        if self.packing and _TOKEN_INPUT not in names:
            raise ValueError(f"CompiledInference: model {model.name!r} takes {PACKING_INPUT!r} but no "
                             f"{_TOKEN_INPUT!r} to compute it from.")
        self.input_names = [n for n in names if not (self.packing and n == PACKING_INPUT)]
        self.packing_buckets, self.pad_id = int(packing_buckets), int(pad_id)
        self._serve = serving_function(model, crf_decode=crf_decode)
        self._call = self._compile()

    @property
    def compiles_per_shape(self) -> bool:
        """Whether each new input shape compiles anew (jax), so that callers do well to bucket their shapes."""
        return self.backend == "jax"

    def refresh(self) -> None:
        """Reads the model's weights again (jax keeps those of when the object was made, or last refreshed)."""
        if self.backend == "jax":
            self._values = [v.value for v in self.model.variables]

    def __call__(self, inputs: Mapping[str, object]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in inputs]
        unknown = [n for n in inputs if n not in self.input_names]
        if missing or unknown:
            raise ValueError(f"CompiledInference: takes {self.input_names}; missing {missing}, unknown {unknown}"
                             + (f" ({PACKING_INPUT!r} is computed from {_TOKEN_INPUT!r})"
                                if PACKING_INPUT in unknown else "") + ".")
        outputs = self._call({n: inputs[n] for n in self.input_names})
        return {name: keras.ops.convert_to_numpy(value) for name, value in outputs.items()}

    # ------------------------------------------------------------------ per backend
    def _compile(self):
        if self.backend == "jax":
            return self._jax_call()
        if self.backend == "tensorflow":
            import tensorflow as tf

            function = tf.function(self._serve, reduce_retracing=True)
            return lambda feeds: function({n: tf.convert_to_tensor(np.asarray(v)) for n, v in feeds.items()})
        if self.backend == "torch":
            import torch

            def call(feeds):
                with torch.no_grad():
                    return self._serve({n: keras.ops.convert_to_tensor(np.asarray(v)) for n, v in feeds.items()})

            return call
        return self._serve

    def _jax_call(self):
        import jax

        from bert4x.snippets import packing_width

        variables = list(self.model.variables)
        self.refresh()

        @functools.partial(jax.jit, static_argnums=2)
        def run(values, feeds, width):
            if width is not None:
                feeds = dict(feeds, **{PACKING_INPUT: device_packing_positions(feeds[_TOKEN_INPUT], width,
                                                                               self.pad_id)})
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return self._serve(feeds)

        def call(feeds):
            width = None
            if self.packing:
                ids = np.asarray(feeds[_TOKEN_INPUT])
                width = packing_width(int(np.count_nonzero(ids != self.pad_id)), ids.shape[0], ids.shape[1],
                                      self.packing_buckets)
            return run(self._values, feeds, width)

        return call


def device_packing_positions(token_ids, width: int, pad_id: int = 0):
    """`bert4x.snippets.packing_positions(token_ids)` computed on the jax device, for a `width` the host chose
    (`bert4x.snippets.packing_width`): the flat positions of the non-padding tokens, row after row, then -1, shaped
    `[batch, width]`.

    Args:
        token_ids: `[batch, len]` integer jax array.
        width: positions per row of the result (batch * width must hold the real tokens: a smaller width makes the
            model's outputs NaN, as `RemovePadding` documents).
        pad_id: the padding id.
    """
    import jax.numpy as jnp

    real = jnp.reshape(token_ids, (-1,)) != pad_id
    capacity = token_ids.shape[0] * width
    slot = jnp.where(real, jnp.cumsum(real) - 1, capacity)  # each real token's place in the list; padding: dropped
    positions = jnp.full((capacity,), -1, jnp.int32)
    positions = positions.at[slot].set(jnp.arange(real.shape[0], dtype=jnp.int32), mode="drop")
    return jnp.reshape(positions, (token_ids.shape[0], width))
