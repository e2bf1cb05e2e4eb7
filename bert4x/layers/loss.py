"""`Loss`: the base of bert4keras's loss layers, which add a loss computed from several model tensors."""

from __future__ import annotations

import keras

__all__ = ["Loss"]


@keras.saving.register_keras_serializable(package="bert4x")
class Loss(keras.layers.Layer):
    """A layer that adds `compute_loss(inputs, mask)` to the model's losses and returns some of its inputs.

    Subclass it and override `compute_loss`; compile the model with no `loss` (`model.compile(optimizer)`) and
    train on generators that yield `(inputs, None)`. The Keras mask of the inputs (a list for a list of inputs, None
    where a tensor has none) arrives as `mask`, so padding can be left out of the loss.

    Args:
        output_axis: which inputs the layer returns: None (all of them, as given), an int (that one) or a list of
            ints (those, as a list).
        **kwargs: `keras.layers.Layer` arguments (`name`, `dtype`).

    Example:
    >>> class CrossEntropy(Loss):
    ...     def compute_loss(self, inputs, mask=None):
    ...         y_true, y_pred = inputs
    ...         return keras.ops.mean(keras.losses.sparse_categorical_crossentropy(y_true, y_pred))
    >>> labels, probs = keras.ops.array([[1]]), keras.ops.array([[[0.5, 0.5]]])
    >>> tuple(CrossEntropy(output_axis=1)([labels, probs]).shape)
    (1, 1, 2)
    """

    def __init__(self, output_axis: int | list[int] | None = None, **kwargs):
        super().__init__(**kwargs)
        if not (output_axis is None or isinstance(output_axis, int)
                or (isinstance(output_axis, (list, tuple)) and all(isinstance(i, int) for i in output_axis))):
            raise TypeError(f"{type(self).__name__}: output_axis must be None, an int or a list of ints, "
                            f"got {output_axis!r}.")
        self.output_axis = list(output_axis) if isinstance(output_axis, tuple) else output_axis
        self.supports_masking = True

    def compute_loss(self, inputs, mask=None):
        """The scalar loss of `inputs` (`mask`: their Keras masks). Override this."""
        raise NotImplementedError(f"{type(self).__name__} must override compute_loss(self, inputs, mask=None).")

    def call(self, inputs, mask=None):
        self.add_loss(self.compute_loss(inputs, mask))
        return self._select(inputs)

    def _select(self, values):
        if self.output_axis is None:
            return values
        if isinstance(values, (list, tuple)):
            if isinstance(self.output_axis, list):
                return [values[i] for i in self.output_axis]
            return values[self.output_axis]
        if self.output_axis in (0, -1, [0]):
            return [values] if isinstance(self.output_axis, list) else values
        raise ValueError(f"{type(self).__name__}: output_axis={self.output_axis} needs a list of inputs.")

    def compute_output_shape(self, input_shape):
        if self.output_axis is None:
            return input_shape
        if isinstance(input_shape, list) or (isinstance(input_shape, tuple) and input_shape
                                             and isinstance(input_shape[0], (list, tuple))):
            return self._select(list(input_shape))
        return self._select(input_shape)

    def compute_output_spec(self, inputs, mask=None):
        spec = keras.tree.map_structure(lambda x: keras.KerasTensor(x.shape, x.dtype), inputs)
        return self._select(spec)

    def compute_mask(self, inputs, mask=None):
        if mask is None:
            return None
        return self._select(mask)

    def get_config(self):
        config = super().get_config()
        config.update(output_axis=self.output_axis)
        return config
