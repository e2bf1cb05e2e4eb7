"""Layer-wise learning-rate decay for Transformer fine-tuning: per-variable multipliers found from weight paths, and
`LayerwiseDecayAdamW`, Keras's `AdamW` scaled by them."""

from __future__ import annotations

import re
from collections.abc import Iterable

import keras
from keras import ops

_PACKAGE = "bert4x"


def layerwise_lr_multipliers(
    variables: Iterable,
    layer_decay: float,
    num_layers: int | None = None,
    layer_pattern: str = r"Transformer-(\d+)-",
    embedding_pattern: str = r"(^|/)Embedding-",
) -> list[float]:
    """Learning-rate multiplier of each variable, from its path.

    Transformer layer i (0-based, found by `layer_pattern`) gets `layer_decay ** (num_layers - i)`, embeddings
    (`embedding_pattern`) `layer_decay ** (num_layers + 1)`, anything else (heads, pooler) 1. `num_layers` defaults
    to the largest layer index found plus one.

    Example:
    >>> class V:
    ...     def __init__(self, path): self.path = path
    >>> layerwise_lr_multipliers([V("Embedding-Token/embeddings"), V("Transformer-1-FeedForward/inner/kernel"),
    ...                           V("Pooler-Dense/kernel")], layer_decay=0.5, num_layers=2)
    [0.125, 0.5, 1.0]
    """
    if not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}.")
    paths = [getattr(v, "path", None) or v.name for v in variables]
    layer_re, embedding_re = re.compile(layer_pattern), re.compile(embedding_pattern)
    indices = [int(m.group(1)) if (m := layer_re.search(p)) else None for p in paths]
    if num_layers is None:
        found = [i for i in indices if i is not None]
        num_layers = max(found) + 1 if found else 0
    multipliers = []
    for path, index in zip(paths, indices):
        if index is not None:
            if index >= num_layers:
                raise ValueError(f"{path}: layer {index} is beyond num_layers={num_layers}.")
            multipliers.append(layer_decay ** (num_layers - index))
        elif embedding_re.search(path):
            multipliers.append(layer_decay ** (num_layers + 1))
        else:
            multipliers.append(1.0)
    return multipliers


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LayerwiseDecayAdamW(keras.optimizers.AdamW):
    """Keras `AdamW` with layer-wise learning-rate decay (the step of layer i, weight decay included, is scaled).

    Multipliers come from `layerwise_lr_multipliers` on the variables' paths (bert4x layer names), fixed when the
    optimizer is built. All `AdamW` arguments (weight decay, `gradient_accumulation_steps`, `use_ema`, clipping,
    schedules) work as usual. Multipliers are applied in `update_step`, which Keras's tensorflow, jax and generic
    paths call per variable.

    Example:
    >>> opt = LayerwiseDecayAdamW(learning_rate=1e-4, layer_decay=0.8, weight_decay=0.01)
    >>> model.compile(optimizer=opt, loss="mse")  # doctest: +SKIP
    >>> dict(zip([v.path for v in model.trainable_variables], opt.lr_multipliers))  # doctest: +SKIP
    """

    def __init__(
        self,
        learning_rate=0.001,
        layer_decay: float = 0.75,
        num_layers: int | None = None,
        layer_pattern: str = r"Transformer-(\d+)-",
        embedding_pattern: str = r"(^|/)Embedding-",
        name: str = "layerwise_decay_adamw",
        **kwargs,
    ):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        if not 0 < layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}.")
        self.layer_decay = layer_decay
        self.num_layers = num_layers
        self.layer_pattern = layer_pattern
        self.embedding_pattern = embedding_pattern
        self.lr_multipliers: list[float] = []

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self.lr_multipliers = layerwise_lr_multipliers(
            var_list, self.layer_decay, self.num_layers, self.layer_pattern, self.embedding_pattern
        )

    def _multiplier(self, variable) -> float:
        return self.lr_multipliers[self._get_variable_index(variable)]

    def update_step(self, gradient, variable, learning_rate):
        return super().update_step(gradient, variable, learning_rate * self._multiplier(variable))

    def _apply_weight_decay(self, variables):
        if self.weight_decay is None:
            return
        for variable in variables:
            if self._use_weight_decay(variable):
                lr = ops.cast(self.learning_rate, variable.dtype) * self._multiplier(variable)
                wd = ops.cast(self.weight_decay, variable.dtype)
                variable.assign(variable - variable * wd * lr)

    def get_config(self):
        config = super().get_config()
        config.update(layer_decay=self.layer_decay, num_layers=self.num_layers, layer_pattern=self.layer_pattern,
                      embedding_pattern=self.embedding_pattern)
        return config
