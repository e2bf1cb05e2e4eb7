"""Piecewise-linear learning-rate multipliers: bert4keras's `piecewise_linear` and a Keras schedule built on it."""

from __future__ import annotations

from collections.abc import Mapping

import keras
from keras import ops

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
