"""Training helpers that work with `model.fit` (tensorflow and jax backends).

- `PiecewiseLinearSchedule(lr, {step: multiplier})`: bert4keras's piecewise-linear warmup/decay as a Keras schedule.
- `LayerwiseDecayAdamW`: Keras's `AdamW` with the learning rate (and decoupled weight decay) of Transformer layer i
  multiplied by `layer_decay ** (num_layers - i)`; embeddings get `layer_decay ** (num_layers + 1)`, heads 1.
- `adversarial_training(model, 'Embedding-Token', epsilon)`: FGM on the embedding matrix.

Use Keras's own optimizer options for the rest; nothing here re-implements them:

    optimizer = keras.optimizers.AdamW(
        learning_rate=PiecewiseLinearSchedule(2e-5, {1000: 1.0, 10000: 0.1}),
        weight_decay=0.01,
        gradient_accumulation_steps=4,  # one update every 4 batches, on the mean gradient (bert4keras's grad_accum_steps)
        use_ema=True, ema_momentum=0.999,  # exponential moving average of the weights (bert4keras's extend_with_exponential_moving_average)
    )
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])  # as BERT's AdamW does
    model.compile(optimizer=optimizer, loss=...)
    model.fit(...)
    optimizer.finalize_variable_values(model.trainable_variables)  # evaluate/save with the EMA weights

(`LayerwiseDecayAdamW` accepts the same arguments.) Known Keras 3.15 limitation: on jax, a second `fit` call on a
model whose optimizer has `use_ema=True` fails ("Attempt to donate the same buffer twice"); train in one `fit`.
"""

from __future__ import annotations

import re
import types
from collections.abc import Iterable, Mapping

import keras
from keras import ops

__all__ = [
    "piecewise_linear",
    "PiecewiseLinearSchedule",
    "layerwise_lr_multipliers",
    "LayerwiseDecayAdamW",
    "adversarial_training",
]

_PACKAGE = "bert4x"


def _sorted_schedule(schedule: Mapping, from_zero: bool) -> list[tuple[int, float]]:
    if not schedule:
        raise ValueError("schedule must be a non-empty {step: multiplier} mapping.")
    points = sorted((int(k), float(v)) for k, v in schedule.items())
    if any(step < 0 for step, _ in points):
        raise ValueError(f"schedule steps must be >= 0, got {[s for s, _ in points]}.")
    if from_zero and points[0][0] != 0:
        points = [(0, 0.0)] + points
    return points


def piecewise_linear(step, schedule: Mapping[int, float], from_zero: bool = True):
    """Multiplier at `step` interpolated linearly through the `{step: multiplier}` points (bert4keras's function).

    With `from_zero=True` the curve starts at (0, 0) unless step 0 is given: `{1000: 1}` is a 1000-step linear warmup.
    After the last point the last multiplier holds.

    Example:
    >>> float(piecewise_linear(500, {1000: 1.0, 2000: 0.1}))
    0.5
    """
    points = _sorted_schedule(schedule, from_zero)
    step = ops.cast(step, "float32")
    value = ops.convert_to_tensor(points[0][1], "float32")
    for (s0, v0), (s1, v1) in zip(points[:-1], points[1:]):
        segment = v0 + (v1 - v0) * (step - s0) / max(s1 - s0, 1)
        value = ops.where(step >= s0, segment, value)
    return ops.where(step >= points[-1][0], points[-1][1], value)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class PiecewiseLinearSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """`learning_rate * piecewise_linear(step, schedule)`, e.g. warmup then linear decay.

    Example:
    >>> schedule = PiecewiseLinearSchedule(1e-3, {100: 1.0, 1000: 0.1})
    >>> optimizer = keras.optimizers.AdamW(learning_rate=schedule)
    >>> round(float(schedule(50)), 6)
    0.0005
    """

    def __init__(self, learning_rate: float, schedule: Mapping[int, float], from_zero: bool = True):
        self.learning_rate = float(learning_rate)
        self.schedule = {int(k): float(v) for k, v in schedule.items()}
        self.from_zero = from_zero
        _sorted_schedule(self.schedule, from_zero)

    def __call__(self, step):
        return self.learning_rate * piecewise_linear(step, self.schedule, self.from_zero)

    def get_config(self):
        # JSON object keys are strings: from_config turns them back into ints.
        return {"learning_rate": self.learning_rate, "schedule": {str(k): v for k, v in self.schedule.items()},
                "from_zero": self.from_zero}


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


# ------------------------------------------------------------------------------------------------ FGM
def _find_layer(model: keras.Model, name: str):
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if layer.name == name:
            return layer
    raise ValueError(f"adversarial_training: the model has no layer named {name!r} (looked in nested models too).")


def adversarial_training(
    model: keras.Model, embedding_name: str = "Embedding-Token", epsilon: float = 1.0, clean_gradient: bool = True
) -> keras.Model:
    """FGM adversarial training on the embedding matrix E, installed in `model.fit` (tensorflow and jax backends).

    Each training step computes the gradient g of the loss, perturbs `E <- E + r` with
    `r = epsilon * g_E / ||g_E||` (g_E: the gradient w.r.t. E, Frobenius norm), computes the gradient g_adv of the
    loss at the perturbed embeddings, restores E exactly, and applies `g + g_adv` (or `g_adv` alone with
    `clean_gradient=False`, which is bert4keras's `adversarial_training`). The reported loss is the clean one.
    Call it after `compile`; it returns the same model.

    Example:
    >>> model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")  # doctest: +SKIP
    >>> adversarial_training(model, "Embedding-Token", epsilon=0.5)  # doctest: +SKIP
    >>> model.fit(x, y)  # doctest: +SKIP
    """
    if epsilon <= 0:
        raise ValueError(f"adversarial_training: epsilon must be positive, got {epsilon}.")
    layer = _find_layer(model, embedding_name)
    embeddings = getattr(layer, "embeddings", None)
    if embeddings is None:
        raise ValueError(f"adversarial_training: layer {embedding_name!r} ({type(layer).__name__}) has no `embeddings`.")
    if not embeddings.trainable:
        raise ValueError(f"adversarial_training: {embeddings.path} is not trainable, so it has no gradient to follow.")
    backend = keras.backend.backend()
    if backend == "tensorflow":
        step = _tensorflow_fgm_step(embeddings, epsilon, clean_gradient)
    elif backend == "jax":
        step = _jax_fgm_step(embeddings, epsilon, clean_gradient)
    else:
        raise NotImplementedError(f"adversarial_training supports the tensorflow and jax backends, not {backend!r}.")
    model.train_step = types.MethodType(step, model)
    model.train_function = None  # rebuilt with the new step on the next fit
    return model


def _index_of(model, variable) -> int:
    for i, v in enumerate(model.trainable_variables):
        if v is variable:
            return i
    raise ValueError(f"adversarial_training: {variable.path} is not among the model's trainable variables.")


def _perturbation(gradient, epsilon):
    return epsilon * gradient / (ops.sqrt(ops.sum(ops.square(gradient))) + 1e-8)


def _tensorflow_fgm_step(embeddings, epsilon, clean_gradient):
    import tensorflow as tf

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        kwargs = {"training": True} if self._call_has_training_arg else {}
        variables = self.trainable_variables
        index = _index_of(self, embeddings)
        with tf.GradientTape() as tape:
            y_pred = self(x, **kwargs)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
            self._loss_tracker.update_state(
                loss, sample_weight=tf.shape(next(i for i in tf.nest.flatten(x) if i is not None))[0]
            )
            loss = self.optimizer.scale_loss(loss)
        gradients = tape.gradient(loss, variables)
        delta = _perturbation(tf.convert_to_tensor(gradients[index]), epsilon)
        saved = tf.identity(embeddings.value)
        embeddings.assign_add(tf.cast(delta, embeddings.dtype))
        with tf.GradientTape() as tape:
            adversarial_loss = self.compute_loss(
                x=x, y=y, y_pred=self(x, **kwargs), sample_weight=sample_weight, training=True
            )
            adversarial_loss = self.optimizer.scale_loss(adversarial_loss)
        adversarial_gradients = tape.gradient(adversarial_loss, variables)
        embeddings.assign(saved)
        if clean_gradient:
            gradients = [
                a if g is None else g if a is None else tf.convert_to_tensor(g) + tf.convert_to_tensor(a)
                for g, a in zip(gradients, adversarial_gradients)
            ]
        else:
            gradients = adversarial_gradients
        self.optimizer.apply_gradients(zip(gradients, variables))
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    return train_step


def _jax_fgm_step(embeddings, epsilon, clean_gradient):
    import jax

    def train_step(self, state, data):
        trainable, non_trainable, optimizer_variables, metrics_variables = state
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        index = _index_of(self, embeddings)
        grad_fn = jax.value_and_grad(self.compute_loss_and_updates, has_aux=True)
        (_, aux), gradients = grad_fn(
            trainable, non_trainable, metrics_variables, x, y, sample_weight,
            training=True, optimizer_variables=optimizer_variables,
        )
        unscaled_loss, y_pred, non_trainable, metrics_after = aux
        perturbed = list(trainable)
        perturbed[index] = trainable[index] + _perturbation(gradients[index], epsilon).astype(trainable[index].dtype)
        # Stateless: the perturbed embeddings live only in this list, so the model's weights are never changed.
        (_, adversarial_aux), adversarial_gradients = grad_fn(
            perturbed, non_trainable, metrics_variables, x, y, sample_weight,
            training=True, optimizer_variables=optimizer_variables,
        )
        non_trainable = adversarial_aux[2]
        if clean_gradient:
            gradients = jax.tree_util.tree_map(lambda g, a: g + a, list(gradients), list(adversarial_gradients))
        else:
            gradients = adversarial_gradients
        trainable, optimizer_variables = self.optimizer.stateless_apply(optimizer_variables, gradients, trainable)
        logs, metrics_after = self._update_metrics_variables(
            metrics_after, unscaled_loss, x, y, y_pred, sample_weight
        )
        return logs, (trainable, non_trainable, optimizer_variables, metrics_after)

    return train_step
