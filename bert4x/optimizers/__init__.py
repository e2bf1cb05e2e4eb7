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

Modules: `extensions` (`Adam`, the `extend_with_*` factories and their combinations), `schedules` (piecewise-linear
learning rates), `layerwise` (layer-wise learning-rate decay), `adversarial` (FGM/PGD, gradient penalty, virtual
adversarial training). Import everything from `bert4x.optimizers`.
"""

from .adversarial import adversarial_training, gradient_penalty, virtual_adversarial_training
from .extensions import (
    Adam,
    AdamEMA,
    AdamGA,
    AdamLA,
    AdamLO,
    AdamLR,
    AdamW,
    extend_with_exponential_moving_average,
    extend_with_gradient_accumulation,
    extend_with_lazy_optimization,
    extend_with_lookahead,
    extend_with_parameter_wise_lr,
    extend_with_piecewise_linear_lr,
    extend_with_weight_decay,
)
from .layerwise import LayerwiseDecayAdamW, layerwise_lr_multipliers
from .schedules import PiecewiseLinearSchedule, piecewise_linear

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
