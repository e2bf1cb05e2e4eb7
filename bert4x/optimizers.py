"""Optimizers and training helpers that work with `model.fit` (tensorflow and jax backends).

bert4keras's names: `Adam` (with `bias_correction`) and the `extend_with_*` functions, each of which takes an
optimizer class and returns a Keras 3 subclass with bert4keras's extra arguments, mapped onto Keras's own options
where Keras has one: `extend_with_weight_decay` (`weight_decay_rate`, `exclude_from_weight_decay`),
`extend_with_piecewise_linear_lr` (`lr_schedule`), `extend_with_exponential_moving_average` (`ema_momentum`,
`apply_ema_weights()` / `reset_old_weights()`), `extend_with_gradient_accumulation` (`grad_accum_steps`),
`extend_with_lookahead` (`steps_per_slow_update`, `slow_step_size`), `extend_with_lazy_optimization`
(`include_in_lazy_optimization`) and `extend_with_parameter_wise_lr` (`paramwise_lr_schedule`). They compose:
`extend_with_piecewise_linear_lr(extend_with_weight_decay(Adam))`. `AdamW`, `AdamLR`, `AdamEMA`, `AdamGA`, `AdamLA`,
`AdamLO` are the usual combinations, made once here.

- `PiecewiseLinearSchedule(lr, {step: multiplier})`: bert4keras's piecewise-linear warmup/decay as a Keras schedule.
- `LayerwiseDecayAdamW`: Keras's `AdamW` with the learning rate (and decoupled weight decay) of Transformer layer i
  multiplied by `layer_decay ** (num_layers - i)`; embeddings get `layer_decay ** (num_layers + 1)`, heads 1.
- `adversarial_training(model, 'Embedding-Token', epsilon)`: FGM on the embedding matrix (PGD with `steps > 1`);
  `gradient_penalty` and `virtual_adversarial_training` are its relatives.

Use Keras's own optimizer options for the rest; nothing here re-implements them:

    optimizer = keras.optimizers.AdamW(
        learning_rate=PiecewiseLinearSchedule(2e-5, {1000: 1.0, 10000: 0.1}),
        weight_decay=0.01,
        gradient_accumulation_steps=4,  # one update every 4 batches, on the mean gradient
        use_ema=True, ema_momentum=0.999,  # exponential moving average of the weights
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
    "Adam",
    "extend_with_weight_decay",
    "extend_with_piecewise_linear_lr",
    "extend_with_exponential_moving_average",
    "extend_with_gradient_accumulation",
    "extend_with_lookahead",
    "extend_with_lazy_optimization",
    "extend_with_parameter_wise_lr",
    "AdamW",
    "AdamLR",
    "AdamEMA",
    "AdamGA",
    "AdamLA",
    "AdamLO",
    "piecewise_linear",
    "PiecewiseLinearSchedule",
    "layerwise_lr_multipliers",
    "LayerwiseDecayAdamW",
    "adversarial_training",
    "gradient_penalty",
    "virtual_adversarial_training",
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

    def __init__(self, learning_rate, schedule: Mapping[int, float], from_zero: bool = True):
        if isinstance(learning_rate, dict):  # a serialized schedule, from get_config
            learning_rate = keras.optimizers.schedules.deserialize(learning_rate)
        if not isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule):
            learning_rate = float(learning_rate)
        self.learning_rate = learning_rate
        self.schedule = {int(k): float(v) for k, v in schedule.items()}
        self.from_zero = from_zero
        _sorted_schedule(self.schedule, from_zero)

    def __call__(self, step):
        base = self.learning_rate(step) if callable(self.learning_rate) else self.learning_rate
        return base * piecewise_linear(step, self.schedule, self.from_zero)

    def get_config(self):
        learning_rate = self.learning_rate
        if isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule):
            learning_rate = keras.optimizers.schedules.serialize(learning_rate)
        # JSON object keys are strings: from_config turns them back into ints.
        return {"learning_rate": learning_rate, "schedule": {str(k): v for k, v in self.schedule.items()},
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
    model: keras.Model,
    embedding_name: str = "Embedding-Token",
    epsilon: float = 1.0,
    clean_gradient: bool = False,
    steps: int = 1,
    step_size: float | None = None,
) -> keras.Model:
    """FGM (or, with `steps > 1`, PGD) adversarial training on the embedding matrix E, installed in `model.fit`
    (tensorflow and jax backends).

    Each training step computes the gradient g of the loss, perturbs `E <- E + r` with
    `r = epsilon * g_E / ||g_E||` (g_E: the gradient w.r.t. E, Frobenius norm), computes the gradient g_adv of the
    loss at the perturbed embeddings, restores E exactly, and applies `g_adv` (the default, bert4keras's
    `adversarial_training`) or `g + g_adv` with `clean_gradient=True`. The reported loss is the clean one.
    PGD takes `steps` ascent steps instead: `r <- r + step_size * g_E(E + r) / ||g_E(E + r)||`, projected back onto
    the ball `||r|| <= epsilon` after each, from `r = 0`. Call it after `compile`; it returns the same model.

    Args:
        model: a compiled model containing the embedding layer.
        embedding_name: the layer whose `embeddings` are perturbed.
        epsilon: the perturbation's norm (FGM) or its largest norm (PGD).
        clean_gradient: also add the gradient at the clean embeddings.
        steps: 1 for FGM, more for PGD.
        step_size: PGD's step (default `epsilon / steps`; FGM's is `epsilon`).

    Example:
    >>> model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")  # doctest: +SKIP
    >>> adversarial_training(model, "Embedding-Token", epsilon=0.5)  # doctest: +SKIP
    >>> model.fit(x, y)  # doctest: +SKIP
    """
    if epsilon <= 0:
        raise ValueError(f"adversarial_training: epsilon must be positive, got {epsilon}.")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"adversarial_training: steps must be a positive int, got {steps!r}.")
    step_size = epsilon if steps == 1 else (step_size or epsilon / steps)
    if step_size <= 0:
        raise ValueError(f"adversarial_training: step_size must be positive, got {step_size}.")
    embeddings = _trainable_embeddings(model, embedding_name, "adversarial_training")
    backend = keras.backend.backend()
    if backend == "tensorflow":
        step = _tensorflow_fgm_step(embeddings, epsilon, clean_gradient, steps, step_size)
    elif backend == "jax":
        step = _jax_fgm_step(embeddings, epsilon, clean_gradient, steps, step_size)
    else:
        raise NotImplementedError(f"adversarial_training supports the tensorflow and jax backends, not {backend!r}.")
    model.train_step = types.MethodType(step, model)
    model.train_function = None  # rebuilt with the new step on the next fit
    return model


def _trainable_embeddings(model, embedding_name, caller):
    layer = _find_layer(model, embedding_name)
    embeddings = getattr(layer, "embeddings", None)
    if embeddings is None:
        raise ValueError(f"{caller}: layer {embedding_name!r} ({type(layer).__name__}) has no `embeddings`.")
    if not embeddings.trainable:
        raise ValueError(f"{caller}: {embeddings.path} is not trainable, so it has no gradient to follow.")
    return embeddings


def _index_of(model, variable) -> int:
    for i, v in enumerate(model.trainable_variables):
        if v is variable:
            return i
    raise ValueError(f"adversarial_training: {variable.path} is not among the model's trainable variables.")


def _perturbation(gradient, epsilon):
    return epsilon * gradient / (ops.sqrt(ops.sum(ops.square(gradient))) + 1e-8)


def _pgd_update(r, gradient, epsilon, step_size):
    """One ascent step of the perturbation, projected back onto the ball of radius epsilon."""
    r = r + _perturbation(gradient, step_size)
    norm = ops.sqrt(ops.sum(ops.square(r)))
    return r * ops.minimum(1.0, epsilon / (norm + 1e-12))


def _tensorflow_fgm_step(embeddings, epsilon, clean_gradient, steps=1, step_size=None):
    import tensorflow as tf

    step_size = epsilon if step_size is None else step_size

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
        saved = tf.identity(embeddings.value)
        delta = _pgd_update(tf.zeros_like(saved), tf.convert_to_tensor(gradients[index]), epsilon, step_size)
        for _ in range(steps - 1):  # PGD's further ascent steps
            embeddings.assign(saved + tf.cast(delta, embeddings.dtype))
            with tf.GradientTape() as tape:
                ascent_loss = self.compute_loss(
                    x=x, y=y, y_pred=self(x, **kwargs), sample_weight=sample_weight, training=True
                )
            delta = _pgd_update(delta, tf.convert_to_tensor(tape.gradient(ascent_loss, embeddings)), epsilon,
                                step_size)
        embeddings.assign(saved + tf.cast(delta, embeddings.dtype))
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


def _jax_fgm_step(embeddings, epsilon, clean_gradient, steps=1, step_size=None):
    import jax

    step_size = epsilon if step_size is None else step_size

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
        delta = _pgd_update(jax.numpy.zeros_like(trainable[index]), gradients[index], epsilon, step_size)
        for _ in range(steps - 1):  # PGD's further ascent steps
            perturbed[index] = trainable[index] + delta.astype(trainable[index].dtype)
            _, ascent_gradients = grad_fn(
                perturbed, non_trainable, metrics_variables, x, y, sample_weight,
                training=True, optimizer_variables=optimizer_variables,
            )
            delta = _pgd_update(delta, ascent_gradients[index], epsilon, step_size)
        perturbed[index] = trainable[index] + delta.astype(trainable[index].dtype)
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


def gradient_penalty(model: keras.Model, embedding_name: str = "Embedding-Token", epsilon: float = 1.0) -> keras.Model:
    """Gradient penalty on the embeddings, installed in `model.fit` (tensorflow and jax backends): each step
    minimises `loss + epsilon / 2 * ||d loss / d E||^2` (E: the embedding matrix), the first-order expansion of
    adversarial training (bert4keras's gradient-penalty recipe). The reported loss is the unpenalised one. Call it
    after `compile`; it returns the same model.

    Args:
        model: a compiled model containing the embedding layer.
        embedding_name: the layer whose `embeddings` the gradient is taken of.
        epsilon: the penalty's weight.

    Example:
    >>> model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")  # doctest: +SKIP
    >>> gradient_penalty(model, "Embedding-Token", epsilon=1.0)  # doctest: +SKIP
    """
    if epsilon <= 0:
        raise ValueError(f"gradient_penalty: epsilon must be positive, got {epsilon}.")
    embeddings = _trainable_embeddings(model, embedding_name, "gradient_penalty")
    backend = keras.backend.backend()
    if backend == "tensorflow":
        step = _tensorflow_penalty_step(embeddings, epsilon)
    elif backend == "jax":
        step = _jax_penalty_step(embeddings, epsilon)
    else:
        raise NotImplementedError(f"gradient_penalty supports the tensorflow and jax backends, not {backend!r}.")
    model.train_step = types.MethodType(step, model)
    model.train_function = None
    return model


def _tensorflow_penalty_step(embeddings, epsilon):
    import tensorflow as tf

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        kwargs = {"training": True} if self._call_has_training_arg else {}
        variables = self.trainable_variables
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                y_pred = self(x, **kwargs)
                loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
            self._loss_tracker.update_state(
                loss, sample_weight=tf.shape(next(i for i in tf.nest.flatten(x) if i is not None))[0]
            )
            gradient = tf.convert_to_tensor(inner.gradient(loss, embeddings))
            total = self.optimizer.scale_loss(loss + 0.5 * epsilon * tf.reduce_sum(tf.square(gradient)))
        self.optimizer.apply_gradients(zip(outer.gradient(total, variables), variables))
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    return train_step


def _jax_penalty_step(embeddings, epsilon):
    import jax

    def train_step(self, state, data):
        trainable, non_trainable, optimizer_variables, metrics_variables = state
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        index = _index_of(self, embeddings)
        grad_fn = jax.value_and_grad(self.compute_loss_and_updates, has_aux=True)

        def penalized(trainable):
            (loss, aux), gradients = grad_fn(
                trainable, non_trainable, metrics_variables, x, y, sample_weight,
                training=True, optimizer_variables=optimizer_variables,
            )
            return loss + 0.5 * epsilon * jax.numpy.sum(jax.numpy.square(gradients[index])), aux

        (_, aux), gradients = jax.value_and_grad(penalized, has_aux=True)(trainable)
        unscaled_loss, y_pred, non_trainable_after, metrics_after = aux
        trainable, optimizer_variables = self.optimizer.stateless_apply(optimizer_variables, gradients, trainable)
        logs, metrics_after = self._update_metrics_variables(
            metrics_after, unscaled_loss, x, y, y_pred, sample_weight
        )
        return logs, (trainable, non_trainable_after, optimizer_variables, metrics_after)

    return train_step


def virtual_adversarial_training(
    model: keras.Model,
    embedding_name: str = "Embedding-Token",
    epsilon: float = 1.0,
    xi: float = 10.0,
    weight: float = 1.0,
    seed: int = 0,
) -> keras.Model:
    """Virtual adversarial training on the embeddings, installed in `model.fit` (tensorflow and jax backends), for a
    model with one output of class probabilities (softmax).

    Each step adds `weight * KL(p || p_adv)` to the loss, where `p` is the model's (constant) prediction and
    `p_adv` its prediction with the embedding matrix moved by `r = epsilon * g / ||g||`; `g` is the gradient of
    `KL(p || p(E + d))` for a random direction `d` of norm `xi` (one power iteration). No labels enter the extra
    term, so it regularises with unlabelled inputs too. The reported loss is the supervised one.

    Args:
        model: a compiled model containing the embedding layer, with one probability output.
        embedding_name: the layer whose `embeddings` are perturbed.
        epsilon: the adversarial perturbation's norm.
        xi: the norm of the random direction of the power iteration.
        weight: the KL term's weight.
        seed: seeds the random directions.

    Example:
    >>> model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")  # doctest: +SKIP
    >>> virtual_adversarial_training(model, "Embedding-Token", epsilon=1.0)  # doctest: +SKIP
    """
    if epsilon <= 0 or xi <= 0 or weight < 0:
        raise ValueError(f"virtual_adversarial_training: epsilon and xi must be positive and weight >= 0, got "
                         f"{epsilon}, {xi}, {weight}.")
    embeddings = _trainable_embeddings(model, embedding_name, "virtual_adversarial_training")
    if len(model.outputs) != 1:
        raise ValueError(f"virtual_adversarial_training needs a model with one output, got {len(model.outputs)}.")
    backend = keras.backend.backend()
    if backend == "tensorflow":
        step = _tensorflow_vat_step(embeddings, epsilon, xi, weight, seed)
    elif backend == "jax":
        step = _jax_vat_step(embeddings, epsilon, xi, weight, seed)
    else:
        raise NotImplementedError(f"virtual_adversarial_training supports tensorflow and jax, not {backend!r}.")
    model.train_step = types.MethodType(step, model)
    model.train_function = None
    return model


def _kl(p, q):
    p = ops.clip(ops.cast(p, "float32"), 1e-7, 1.0)
    q = ops.clip(ops.cast(q, "float32"), 1e-7, 1.0)
    return ops.mean(ops.sum(p * (ops.log(p) - ops.log(q)), axis=-1))


def _tensorflow_vat_step(embeddings, epsilon, xi, weight, seed):
    import tensorflow as tf

    generator = tf.random.Generator.from_seed(seed)

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        kwargs = {"training": True} if self._call_has_training_arg else {}
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            y_pred = self(x, **kwargs)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
            self._loss_tracker.update_state(
                loss, sample_weight=tf.shape(next(i for i in tf.nest.flatten(x) if i is not None))[0]
            )
            loss = self.optimizer.scale_loss(loss)
        gradients = tape.gradient(loss, variables)
        p = tf.stop_gradient(y_pred)
        saved = tf.identity(embeddings.value)
        direction = _perturbation(generator.normal(tf.shape(saved)), xi)
        embeddings.assign(saved + tf.cast(direction, embeddings.dtype))
        with tf.GradientTape() as tape:
            divergence = _kl(p, self(x, **kwargs))
        r = _perturbation(tf.convert_to_tensor(tape.gradient(divergence, embeddings)), epsilon)
        embeddings.assign(saved + tf.cast(r, embeddings.dtype))
        with tf.GradientTape() as tape:
            penalty = self.optimizer.scale_loss(weight * _kl(p, self(x, **kwargs)))
        penalty_gradients = tape.gradient(penalty, variables)
        embeddings.assign(saved)
        gradients = [
            a if g is None else g if a is None else tf.convert_to_tensor(g) + tf.convert_to_tensor(a)
            for g, a in zip(gradients, penalty_gradients)
        ]
        self.optimizer.apply_gradients(zip(gradients, variables))
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    return train_step


def _jax_vat_step(embeddings, epsilon, xi, weight, seed):
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
        unscaled_loss, y_pred, non_trainable_after, metrics_after = aux
        p = jax.lax.stop_gradient(y_pred)

        def divergence(variables):
            q, _ = self.stateless_call(variables, non_trainable, x, training=True)
            return _kl(p, q)

        step = optimizer_variables[self.optimizer.variables.index(self.optimizer.iterations)]
        key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
        direction = _perturbation(jax.random.normal(key, trainable[index].shape), xi)
        perturbed = list(trainable)
        perturbed[index] = trainable[index] + direction.astype(trainable[index].dtype)
        r = _perturbation(jax.grad(divergence)(perturbed)[index], epsilon)
        perturbed[index] = trainable[index] + jax.lax.stop_gradient(r).astype(trainable[index].dtype)
        penalty_gradients = jax.grad(lambda v: self.optimizer.scale_loss(weight * divergence(v)))(perturbed)
        gradients = jax.tree_util.tree_map(lambda g, a: g + a, list(gradients), list(penalty_gradients))
        trainable, optimizer_variables = self.optimizer.stateless_apply(optimizer_variables, gradients, trainable)
        logs, metrics_after = self._update_metrics_variables(
            metrics_after, unscaled_loss, x, y, y_pred, sample_weight
        )
        return logs, (trainable, non_trainable_after, optimizer_variables, metrics_after)

    return train_step


# ------------------------------------------------------------------------------------------ bert4keras's optimizers
@keras.saving.register_keras_serializable(package=_PACKAGE)
class Adam(keras.optimizers.Adam):
    """bert4keras's `Adam`: Keras's, with bert4keras's default `epsilon=1e-6` and a `bias_correction` switch.

    Args:
        learning_rate: a float or a `LearningRateSchedule`.
        beta_1: decay of the first-moment average.
        beta_2: decay of the second-moment average.
        epsilon: added to the root of the second moment.
        bias_correction: divide the moments by `1 - beta^t` (True, Adam's rule) or not (False).
        **kwargs: any `keras.optimizers.Adam` argument (`weight_decay`, `clipnorm`, `use_ema`, ...).

    Example:
    >>> Adam(1e-3, bias_correction=False).bias_correction
    False
    """

    def __init__(self, learning_rate=0.001, beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-6,
                 bias_correction: bool = True, name: str = "adam", **kwargs):
        super().__init__(learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon, name=name,
                         **kwargs)
        self.bias_correction = bias_correction

    def update_step(self, gradient, variable, learning_rate):
        if self.bias_correction:
            return super().update_step(gradient, variable, learning_rate)
        if self.amsgrad:
            raise ValueError("Adam: bias_correction=False does not combine with amsgrad=True.")
        gradient = ops.cast(gradient, variable.dtype)
        index = self._get_variable_index(variable)
        m, v = self._momentums[index], self._velocities[index]
        self.assign_add(m, (gradient - m) * (1 - self.beta_1))
        self.assign_add(v, (ops.square(gradient) - v) * (1 - self.beta_2))
        self.assign_sub(variable, ops.cast(learning_rate, variable.dtype) * m / (ops.sqrt(v) + self.epsilon))

    def get_config(self):
        config = super().get_config()
        config.update(bias_correction=self.bias_correction)
        return config


def _subclass(base: type, name: str | None, default_name: str, body: dict) -> type:
    if not (isinstance(base, type) and issubclass(base, keras.optimizers.Optimizer)):
        raise TypeError(f"{default_name}: base must be a keras Optimizer class, got {base!r}.")
    name = name or f"{base.__name__}{default_name}"
    return type(name, (base,), {"__module__": __name__, "__qualname__": name, **body})


def _patterns_match(patterns, path: str) -> bool:
    return any(re.search(p, path) for p in patterns)


def _current(variable):
    """A snapshot of the variable's value now (inside jax's stateless optimizer step too)."""
    return ops.copy(variable)


def _path(optimizer, variable) -> str:
    """The Keras path of a variable given to `update_step` (tensorflow passes the backend's own variable there)."""
    return optimizer._trainable_variables[optimizer._get_variable_index(variable)].path


def extend_with_weight_decay(base: type, name: str | None = None) -> type:
    """bert4keras's decoupled weight decay: `w <- w - lr * weight_decay_rate * w` besides the update of `base`.

    The new class takes `weight_decay_rate` (Keras's `weight_decay`) and `exclude_from_weight_decay`, a list of
    regular expressions searched in each variable's path (e.g. `["Norm", "bias"]` matches
    `Transformer-0-FeedForward-Norm/gamma`; Keras's own option matches the short name only).

    Args:
        base: an optimizer class (e.g. `Adam`).
        name: the new class's name.

    Example:
    >>> AdamW = extend_with_weight_decay(Adam, "AdamW")
    >>> AdamW(1e-3, weight_decay_rate=0.01, exclude_from_weight_decay=["Norm", "bias"]).weight_decay
    0.01
    """

    def __init__(self, *args, weight_decay_rate: float = 0.01, exclude_from_weight_decay=None, **kwargs):
        kwargs.setdefault("weight_decay", weight_decay_rate)
        base.__init__(self, *args, **kwargs)
        self.exclude_patterns = list(exclude_from_weight_decay or [])

    def _use_weight_decay(self, variable):
        if _patterns_match(self.exclude_patterns, getattr(variable, "path", variable.name)):
            return False
        return base._use_weight_decay(self, variable)

    def get_config(self):
        config = base.get_config(self)
        config.update(weight_decay_rate=config.pop("weight_decay"), exclude_from_weight_decay=self.exclude_patterns)
        return config

    return _subclass(base, name, "WeightDecay", {"__init__": __init__, "_use_weight_decay": _use_weight_decay,
                                                 "get_config": get_config})


def extend_with_piecewise_linear_lr(base: type, name: str | None = None) -> type:
    """bert4keras's piecewise-linear learning rate: the learning rate times `piecewise_linear(step, lr_schedule)`.

    The new class takes `lr_schedule`, `{step: multiplier}` (from (0, 0) unless step 0 is given, so `{1000: 1}`
    is a 1000-step warmup); it becomes a `PiecewiseLinearSchedule` learning rate.

    Args:
        base: an optimizer class.
        name: the new class's name.

    Example:
    >>> AdamLR = extend_with_piecewise_linear_lr(Adam, "AdamLR")
    >>> optimizer = AdamLR(1e-3, lr_schedule={1000: 1.0})
    >>> round(float(optimizer._learning_rate(500)), 6)
    0.0005
    """

    def __init__(self, *args, lr_schedule: Mapping[int, float] | None = None, **kwargs):
        schedule = {int(k): float(v) for k, v in (lr_schedule or {0: 1.0}).items()}
        learning_rate = kwargs.pop("learning_rate", args[0] if args else 0.001)
        if not isinstance(learning_rate, PiecewiseLinearSchedule):
            learning_rate = PiecewiseLinearSchedule(learning_rate, schedule)
        base.__init__(self, learning_rate, *args[1:], **kwargs)
        self.lr_schedule = schedule

    def get_config(self):
        config = base.get_config(self)
        schedule = self._learning_rate
        config.update(learning_rate=keras.optimizers.schedules.serialize(schedule.learning_rate)
                      if callable(schedule.learning_rate) else schedule.learning_rate,
                      lr_schedule={str(k): v for k, v in self.lr_schedule.items()})
        return config

    return _subclass(base, name, "LR", {"__init__": __init__, "get_config": get_config})


def extend_with_exponential_moving_average(base: type, name: str | None = None) -> type:
    """bert4keras's weight averaging, on Keras's `use_ema`: the optimizer keeps `ema = m * ema + (1 - m) * w`.

    The new class takes `ema_momentum` and has `apply_ema_weights()` (swap the averages into the model, e.g.
    before evaluating or saving) and `reset_old_weights()` (swap the trained weights back). Keras starts the
    average at the weights of the first step, not at zero, so it needs no bias correction; `apply_ema_weights`
    accepts bert4keras's `bias_correction` argument for that reason and has nothing to correct.

    Args:
        base: an optimizer class.
        name: the new class's name.

    Example:
    >>> AdamEMA = extend_with_exponential_moving_average(Adam, "AdamEMA")
    >>> AdamEMA(1e-3, ema_momentum=0.999).use_ema
    True
    """

    def __init__(self, *args, ema_momentum: float = 0.999, **kwargs):
        kwargs.update(use_ema=True, ema_momentum=ema_momentum)
        base.__init__(self, *args, **kwargs)
        self._old_weights = None

    def apply_ema_weights(self, bias_correction: bool = True):
        if not self.built:
            raise RuntimeError(f"{type(self).__name__}.apply_ema_weights: the optimizer is not built (train first).")
        if self._old_weights is None:
            self._old_weights = [ops.convert_to_numpy(v) for v in self._trainable_variables]
        for variable, average in zip(self._trainable_variables, self._model_variables_moving_average):
            variable.assign(average)

    def reset_old_weights(self):
        if self._old_weights is None:
            raise RuntimeError(f"{type(self).__name__}.reset_old_weights: apply_ema_weights() was not called.")
        for variable, value in zip(self._trainable_variables, self._old_weights):
            variable.assign(value)
        self._old_weights = None

    def get_config(self):
        config = base.get_config(self)
        config.pop("use_ema", None)
        return config

    return _subclass(base, name, "EMA", {"__init__": __init__, "apply_ema_weights": apply_ema_weights,
                                         "reset_old_weights": reset_old_weights, "get_config": get_config})


def extend_with_gradient_accumulation(base: type, name: str | None = None) -> type:
    """bert4keras's gradient accumulation, on Keras's `gradient_accumulation_steps`: one update every
    `grad_accum_steps` batches, with the mean of their gradients.

    Args:
        base: an optimizer class.
        name: the new class's name.

    Example:
    >>> AdamGA = extend_with_gradient_accumulation(Adam, "AdamGA")
    >>> AdamGA(1e-3, grad_accum_steps=4).gradient_accumulation_steps
    4
    """

    def __init__(self, *args, grad_accum_steps: int = 2, **kwargs):
        if not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be a positive int, got {grad_accum_steps!r}.")
        kwargs["gradient_accumulation_steps"] = grad_accum_steps if grad_accum_steps > 1 else None
        base.__init__(self, *args, **kwargs)

    def get_config(self):
        config = base.get_config(self)
        config["grad_accum_steps"] = config.pop("gradient_accumulation_steps", None) or 1
        return config

    return _subclass(base, name, "GA", {"__init__": __init__, "get_config": get_config})


def _scaled_update(base, optimizer, gradient, variable, learning_rate, scale):
    """Runs `base`'s update of `variable`, then keeps `scale` times its change (a tensor broadcast to the variable)."""
    old = _current(variable)
    base.update_step(optimizer, gradient, variable, learning_rate)
    new = _current(variable)
    optimizer.assign(variable, old + (new - old) * ops.cast(scale, variable.dtype))


def extend_with_lookahead(base: type, name: str | None = None) -> type:
    """Lookahead (Zhang et al. 2019) around `base`: slow weights `s` start at the weights; every
    `steps_per_slow_update` steps, `s <- s + slow_step_size * (w - s)` and the weights `w` are set to `s`.

    Args:
        base: an optimizer class.
        name: the new class's name.

    Example:
    >>> AdamLA = extend_with_lookahead(Adam, "AdamLA")
    >>> AdamLA(1e-3, steps_per_slow_update=5, slow_step_size=0.5).steps_per_slow_update
    5
    """

    def __init__(self, *args, steps_per_slow_update: int = 5, slow_step_size: float = 0.5, **kwargs):
        base.__init__(self, *args, **kwargs)
        if steps_per_slow_update < 1 or not 0 < slow_step_size <= 1:
            raise ValueError(f"Lookahead: steps_per_slow_update must be >= 1 and slow_step_size in (0, 1], got "
                             f"{steps_per_slow_update}, {slow_step_size}.")
        self.steps_per_slow_update = steps_per_slow_update
        self.slow_step_size = slow_step_size

    def build(self, var_list):
        if self.built:
            return
        base.build(self, var_list)
        # Zeros here; the first update step sets them to the weights (the value building may not know yet: weights
        # are often loaded after the optimizer is built, and jax defers variable creation when tracing).
        self._slow_weights = [self.add_variable_from_reference(v, "slow") for v in var_list]

    def update_step(self, gradient, variable, learning_rate):
        slow = self._slow_weights[self._get_variable_index(variable)]
        slow_value = ops.where(ops.equal(self.iterations, 0), _current(variable), _current(slow))
        base.update_step(self, gradient, variable, learning_rate)
        sync = ops.equal((self.iterations + 1) % self.steps_per_slow_update, 0)
        fast = _current(variable)
        moved = slow_value + ops.cast(self.slow_step_size, variable.dtype) * (fast - slow_value)
        self.assign(slow, ops.where(sync, moved, slow_value))
        self.assign(variable, ops.where(sync, moved, fast))

    def get_config(self):
        config = base.get_config(self)
        config.update(steps_per_slow_update=self.steps_per_slow_update, slow_step_size=self.slow_step_size)
        return config

    return _subclass(base, name, "LA", {"__init__": __init__, "build": build, "update_step": update_step,
                                        "get_config": get_config})


def extend_with_lazy_optimization(base: type, name: str | None = None) -> type:
    """bert4keras's lazy updates: a variable whose path matches `include_in_lazy_optimization` (regular
    expressions) changes only in the rows (slices along its last axis) whose gradient is not all zero, e.g. the
    embedding rows of the tokens in the batch. The optimizer's moments update as usual.

    Args:
        base: an optimizer class.
        name: the new class's name.

    Example:
    >>> AdamLO = extend_with_lazy_optimization(Adam, "AdamLO")
    >>> AdamLO(1e-3, include_in_lazy_optimization=["Embedding-Token"]).include_in_lazy_optimization
    ['Embedding-Token']
    """

    def __init__(self, *args, include_in_lazy_optimization=None, **kwargs):
        base.__init__(self, *args, **kwargs)
        self.include_in_lazy_optimization = list(include_in_lazy_optimization or [])

    def update_step(self, gradient, variable, learning_rate):
        if not _patterns_match(self.include_in_lazy_optimization, _path(self, variable)):
            return base.update_step(self, gradient, variable, learning_rate)
        touched = ops.any(ops.not_equal(gradient, 0), axis=-1, keepdims=True)
        _scaled_update(base, self, gradient, variable, learning_rate, touched)

    def get_config(self):
        config = base.get_config(self)
        config.update(include_in_lazy_optimization=self.include_in_lazy_optimization)
        return config

    return _subclass(base, name, "LO", {"__init__": __init__, "update_step": update_step, "get_config": get_config})


def extend_with_parameter_wise_lr(base: type, name: str | None = None) -> type:
    """bert4keras's per-parameter learning rates: a variable whose path matches a key of `paramwise_lr_schedule`
    (a regular expression; the first matching key wins) has its update multiplied by that key's value.

    Args:
        base: an optimizer class.
        name: the new class's name.

    Example:
    >>> AdamPW = extend_with_parameter_wise_lr(Adam, "AdamPW")
    >>> AdamPW(1e-3, paramwise_lr_schedule={"Embedding": 0.1}).paramwise_lr_schedule
    {'Embedding': 0.1}
    """

    def __init__(self, *args, paramwise_lr_schedule: Mapping[str, float] | None = None, **kwargs):
        base.__init__(self, *args, **kwargs)
        self.paramwise_lr_schedule = {str(k): float(v) for k, v in (paramwise_lr_schedule or {}).items()}

    def update_step(self, gradient, variable, learning_rate):
        path = _path(self, variable)
        for pattern, multiplier in self.paramwise_lr_schedule.items():
            if re.search(pattern, path):
                return _scaled_update(base, self, gradient, variable, learning_rate, multiplier)
        return base.update_step(self, gradient, variable, learning_rate)

    def get_config(self):
        config = base.get_config(self)
        config.update(paramwise_lr_schedule=self.paramwise_lr_schedule)
        return config

    return _subclass(base, name, "PW", {"__init__": __init__, "update_step": update_step, "get_config": get_config})


AdamW = extend_with_weight_decay(Adam, "AdamW")
AdamLR = extend_with_piecewise_linear_lr(Adam, "AdamLR")
AdamEMA = extend_with_exponential_moving_average(Adam, "AdamEMA")
AdamGA = extend_with_gradient_accumulation(Adam, "AdamGA")
AdamLA = extend_with_lookahead(Adam, "AdamLA")
AdamLO = extend_with_lazy_optimization(Adam, "AdamLO")
