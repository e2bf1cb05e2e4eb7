"""Layer normalization with bert4x's jax paths (`bert4x.kernels.layer_norm`)."""

from __future__ import annotations

import keras
from keras import ops

from bert4x.kernels import layer_norm
from bert4x.layers._common import PACKAGE

__all__ = ["LayerNormalization"]


@keras.saving.register_keras_serializable(package=PACKAGE)
class LayerNormalization(keras.layers.LayerNormalization):
    """Keras's `LayerNormalization` (same weights, config and float32 arithmetic) with faster jax paths.

    Over the last axis with both gamma and beta (BERT's LayerNorms), on jax (`bert4x.kernels.layer_norm.choose`):
    - on NVIDIA GPUs in training, forward and backward run as two Pallas kernels (`bert4x.kernels.layer_norm`): one
      pass over the activations each way instead of XLA's several. At inference in float16/bfloat16 the mean and
      variance come from one pass (`bert4x.kernels.layer_norm.layer_norm_one_pass`), fused by XLA with the residual sum
      feeding it;
    - on CPU, the backward pass recomputes the normalised input from x instead of keeping two extra
      `[tokens, width]` float32 arrays per LayerNorm.
    Elsewhere it runs Keras's. `bert4x.config.set_fused_layer_norm` picks: 'auto' (default, as above), 'interpret'
    (the kernels through Pallas' interpreter, any jax device: how tests run them on CPU) or 'off' (Keras's
    everywhere).

    Args:
        axis, epsilon, center, scale, ...: as `keras.layers.LayerNormalization`.

    Example:
    >>> norm = LayerNormalization(epsilon=1e-12)
    >>> y = keras.ops.convert_to_numpy(norm(keras.ops.convert_to_tensor([[1.0, 2.0, 3.0, 6.0]])))
    >>> bool(abs(y.mean()) < 1e-6)
    True
    """

    def call(self, inputs, training=None):
        last_axis_only = list(self.axis) in ([-1], [len(inputs.shape) - 1])
        plain = self.scale and self.center and not getattr(self, "rms_scaling", False)
        path = layer_norm.choose(inputs.shape, bool(training), self.compute_dtype) if last_axis_only and plain else None
        if path is None:
            return super().call(inputs)
        gamma, beta = ops.cast(self.gamma, "float32"), ops.cast(self.beta, "float32")
        if path == "one_pass":
            y = layer_norm.layer_norm_one_pass(inputs, gamma, beta, self.epsilon)
        elif path == "recompute":
            epsilon = ops.convert_to_tensor(self.epsilon, "float32")
            y = layer_norm.layer_norm_keeping_only_its_input(inputs, gamma, beta, epsilon)
        else:
            y = layer_norm.layer_norm(inputs, gamma, beta, self.epsilon, interpret=path == "interpret")
        return ops.cast(y, self.compute_dtype)
