"""The position-wise feed-forward block of a Transformer layer."""

from __future__ import annotations

import functools

import keras
import numpy as np
from keras import ops

from bert4x import backend
from bert4x.kernels import dropout as hashed
from bert4x.layers._common import PACKAGE, initializer
from bert4x.layers.dropout import Dropout

__all__ = ["FeedForward"]


@functools.cache
def _activation_then_projection(activation, rate: float):
    """`dropout(activation(hidden)) @ kernel + bias` on jax, whose backward pass recomputes the activation and the
    dropout mask from `hidden` and the seed, after the incoming gradient arrives, instead of keeping them."""
    import jax

    def forward(hidden, kernel, bias, seed):
        x = activation(hidden)
        if rate > 0:
            x = hashed.hashed_dropout(x, seed, rate)
        return ops.matmul(x, kernel) + bias

    @jax.custom_vjp
    def project(hidden, kernel, bias, seed):
        return forward(hidden, kernel, bias, seed)

    def project_forward(hidden, kernel, bias, seed):
        return forward(hidden, kernel, bias, seed), (hidden, kernel, bias, seed)

    def project_backward(saved, upstream):
        hidden, kernel, bias, seed = saved
        (hidden, seed), upstream = backend.recompute_barrier((hidden, seed), upstream)  # what is recomputed from
        _, pullback = jax.vjp(lambda h, k, b: forward(h, k, b, seed), hidden, kernel, bias)
        return (*pullback(upstream), np.zeros(seed.shape, jax.dtypes.float0))

    project.defvjp(project_forward, project_backward)
    return project


@keras.saving.register_keras_serializable(package=PACKAGE)
class FeedForward(keras.layers.Layer):
    """Position-wise feed-forward: `output(act(inner(x)))`, or gated `output(act(inner(x)) * gate(x))`.

    The gated form is T5.1.1's gated-GELU (`wi_0` = inner, `wi_1` = gate, `wo` = output). In training on jax's CPU
    backend the ungated form recomputes `dropout(act(inner(x)))` in the backward pass (from `inner(x)` and the dropout
    seed) instead of keeping it for the output projection's weight gradient: the same gradients, one
    `[tokens, units]` array a layer less of host memory.

    Args:
        units: width of the inner layer.
        activation: activation of the inner layer (a name bert4x.backend knows, e.g. 'gelu', 'relu').
        gated: multiply the activation by a second projection `gate(x)` (T5.1.1).
        use_bias: whether the projections have biases.
        dropout_rate: dropout on the activation (T5); BERT's dropout is outside the layer.
        kernel_initializer: initializer of the projections (truncated normal, stddev 0.02, when None).
        **kwargs: `keras.layers.Layer` arguments.

    Example:
    >>> FeedForward(16, activation="gelu")(keras.ops.ones((2, 3, 8))).shape
    (2, 3, 8)
    """

    def __init__(
        self,
        units: int,
        activation: str = "gelu",
        gated: bool = False,
        use_bias: bool = True,
        dropout_rate: float = 0.0,
        kernel_initializer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.units = units
        self.activation = backend.canonical_activation(activation)
        self.gated = gated
        self.use_bias = use_bias
        self.dropout_rate = dropout_rate
        self.kernel_initializer = initializer(kernel_initializer)
        dense = dict(use_bias=use_bias, kernel_initializer=self.kernel_initializer, dtype=self.dtype_policy)
        self.inner_dense = keras.layers.Dense(units, name="inner", **dense)
        self.gate_dense = keras.layers.Dense(units, name="gate", **dense) if gated else None
        self.dropout = Dropout(dropout_rate, dtype=self.dtype_policy)
        self.output_dense = None  # its width is the input's: made in build()
        self._act = backend.get_activation(self.activation)
        self.supports_masking = True

    def build(self, input_shape):
        self.inner_dense.build(input_shape)
        if self.gate_dense is not None:
            self.gate_dense.build(input_shape)
        self.output_dense = keras.layers.Dense(
            input_shape[-1],
            use_bias=self.use_bias,
            kernel_initializer=self.kernel_initializer,
            dtype=self.dtype_policy,
            name="output",
        )
        self.output_dense.build(tuple(input_shape[:-1]) + (self.units,))

    def call(self, inputs, training=None):
        hidden = self.inner_dense(inputs)
        if training and self._recomputes_activation():
            return self._output_recomputing_activation(hidden)
        x = self._act(hidden)
        if self.gate_dense is not None:
            x = x * self.gate_dense(inputs)
        return self.output_dense(self.dropout(x, training=training))

    def _recomputes_activation(self) -> bool:
        # In training on jax CPU. Autodiff keeps act(inner(x)), which the output projection's weight gradient reads,
        # next to inner(x), which the activation's gradient reads: recomputing the first from the second keeps one
        # [tokens, units] array a layer less for one more activation a layer.
        dense = self.output_dense
        return (self.gate_dense is None and backend.on_jax_cpu() and dense.quantization_mode is None
                and not dense.lora_enabled and self.dropout.noise_shape is None)

    def _output_recomputing_activation(self, hidden):
        rate = self.dropout.rate
        seed = self.dropout.draw_seed() if rate > 0 else ops.zeros((), "int32")  # drawn once: recomputed masks match
        dense = self.output_dense
        kernel = ops.cast(dense.kernel, hidden.dtype)
        bias = ops.zeros((), hidden.dtype) if dense.bias is None else ops.cast(dense.bias, hidden.dtype)
        return _activation_then_projection(self._act, float(rate))(hidden, kernel, bias, seed)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            units=self.units,
            activation=self.activation,
            gated=self.gated,
            use_bias=self.use_bias,
            dropout_rate=self.dropout_rate,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
        )
        return config
