"""bert4keras's `Adam` and the `extend_with_*` class factories: each takes an optimizer class and returns a Keras 3
subclass with one of bert4keras's extra arguments; `AdamW`, `AdamLR`, ... are the usual combinations, made once."""

from __future__ import annotations

import re
from collections.abc import Mapping

import keras
from keras import ops

from .schedules import PiecewiseLinearSchedule

_PACKAGE = "bert4x"
# The factories' classes are not registered with Keras: a saved optimizer names its class by module and name, and
# `bert4x.optimizers` (the package, which re-exports `AdamW` & co.) is the module that has always resolved them.
_PUBLIC_MODULE = __name__.rpartition(".")[0]


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
    return type(name, (base,), {"__module__": _PUBLIC_MODULE, "__qualname__": name, **body})


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
