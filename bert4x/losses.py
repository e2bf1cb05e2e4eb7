"""Losses of the seed articles, as functions (bert4keras's names) and serializable `keras.losses.Loss` classes.

Every function maps `(y_true, y_pred)` to one loss per sample, so Keras handles reduction and sample weights.

- Multi-label softmax-CE ("generalising softmax + CE to multi-label"), for scores s, positives P and negatives N:
  `log(1 + sum_{i in N} e^{s_i}) + log(1 + sum_{j in P} e^{-s_j})`; predict positive iff s > 0.
  `multilabel_categorical_crossentropy` (dense 0/1 labels), `sparse_multilabel_categorical_crossentropy` (the
  positive indices only) and their GlobalPointer forms `global_pointer_crossentropy` and
  `sparse_global_pointer_crossentropy`.
- Class imbalance: focal loss `-alpha_t (1 - p_t)^gamma log p_t` (`sparse_categorical_focal_crossentropy`; for
  one-hot labels use Keras's own `keras.losses.CategoricalFocalCrossentropy`, which computes the same formula), and
  logit adjustment: train on `s + tau log(prior)` (`logit_adjusted_crossentropy`) or subtract `tau log(prior)` at
  inference (`adjust_logits`). Plain weighted CE is Keras's `class_weight=` argument of `fit`.
- AM-Softmax: `CE(softmax(scale * (cos - margin * onehot(y))))` on cosine logits (`bert4x.layers.NormalizedDense`).
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
from keras import ops

__all__ = [
    "multilabel_categorical_crossentropy",
    "sparse_multilabel_categorical_crossentropy",
    "global_pointer_crossentropy",
    "sparse_global_pointer_crossentropy",
    "sparse_categorical_focal_crossentropy",
    "logit_adjusted_crossentropy",
    "adjust_logits",
    "am_softmax_crossentropy",
    "MultilabelCategoricalCrossentropy",
    "SparseMultilabelCategoricalCrossentropy",
    "GlobalPointerCrossentropy",
    "SparseGlobalPointerCrossentropy",
    "SparseCategoricalFocalCrossentropy",
    "LogitAdjustedCrossentropy",
    "AMSoftmaxCrossentropy",
]

_PACKAGE = "bert4x"
_LARGE = 1e12  # removes a class from a logsumexp without producing inf - inf


def _logsumexp_with_zero(x):
    """`log(1 + sum(exp(x)))` over the last axis, stably."""
    zeros = ops.zeros_like(x[..., :1])
    return ops.logsumexp(ops.concatenate([x, zeros], axis=-1), axis=-1)


@keras.saving.register_keras_serializable(package=_PACKAGE)
def multilabel_categorical_crossentropy(y_true, y_pred):
    """Multi-label softmax-CE over the last axis; `y_true` 0/1, `y_pred` scores (threshold 0, no sigmoid).

    Args:
        y_true: 0/1 labels, the same shape as `y_pred`.
        y_pred: scores, any leading shape; classes on the last axis.

    Returns:
        The loss per row, `y_pred`'s shape without the last axis.

    Example:
    >>> float(multilabel_categorical_crossentropy([[1., 0.]], [[3., -3.]])[0])  # doctest: +ELLIPSIS
    0.0971...
    """
    y_pred = ops.cast(y_pred, "float32")
    positive = ops.cast(y_true, "bool")
    negative_scores = ops.where(positive, -_LARGE, y_pred)
    positive_scores = ops.where(positive, -y_pred, -_LARGE)
    return _logsumexp_with_zero(negative_scores) + _logsumexp_with_zero(positive_scores)


@keras.saving.register_keras_serializable(package=_PACKAGE)
def sparse_multilabel_categorical_crossentropy(y_true, y_pred, mask_zero: bool = False):
    """Multi-label softmax-CE given only the positive class indices `y_true` `[..., num_positive]` (int).

    The negative term `log(1 + sum_N e^s)` is computed without listing N as
    `log(1 + sum_all e^s) + log(1 - sum_P e^s / (1 + sum_all e^s))`. Indices must be distinct within a row. With
    `mask_zero=True` class 0 is never a class: index 0 pads the positive lists (and score 0 is ignored).

    Args:
        y_true: int indices of the positive classes, `[..., num_positive]`.
        y_pred: scores `[..., num_classes]`.
        mask_zero: treat class 0 as padding of the index lists, never a class.

    Returns:
        The loss per row, `y_pred`'s shape without the last axis.

    Example:
    >>> float(sparse_multilabel_categorical_crossentropy([[0]], [[3., -3.]])[0])  # doctest: +ELLIPSIS
    0.0971...
    """
    y_pred = ops.cast(y_pred, "float32")
    y_true = ops.cast(y_true, "int32")
    if mask_zero:
        is_zero = ops.equal(ops.arange(ops.shape(y_pred)[-1]), 0)
        y_pred = ops.where(is_zero, -_LARGE, y_pred)
    positive_scores = ops.take_along_axis(y_pred, y_true, axis=-1)
    negative_of_positive = -positive_scores
    if mask_zero:
        negative_of_positive = ops.where(ops.equal(y_true, 0), -_LARGE, negative_of_positive)
    positive_loss = _logsumexp_with_zero(negative_of_positive)
    all_loss = _logsumexp_with_zero(y_pred)
    # log(sum_P e^s) - log(1 + sum_all e^s) = log of the positives' share, < 0.
    share = ops.logsumexp(positive_scores, axis=-1) - all_loss
    remainder = ops.clip(1.0 - ops.exp(share), keras.config.epsilon(), 1.0)
    return positive_loss + all_loss + ops.log(remainder)


def _flatten_spans(y_true, y_pred):
    shape = ops.shape(y_pred)
    return ops.reshape(y_true, (shape[0], shape[1], -1)), ops.reshape(y_pred, (shape[0], shape[1], -1))


@keras.saving.register_keras_serializable(package=_PACKAGE)
def global_pointer_crossentropy(y_true, y_pred):
    """GlobalPointer's loss: multi-label CE over all spans of each type, averaged over types, per sample.

    The batch mean equals bert4keras's value.

    Args:
        y_true: 0/1 span labels `[batch, heads, len, len]`.
        y_pred: span logits `[batch, heads, len, len]` (GlobalPointer's output).

    Returns:
        The loss per sample, `[batch]`.
    """
    y_true, y_pred = _flatten_spans(y_true, y_pred)
    return ops.mean(multilabel_categorical_crossentropy(y_true, y_pred), axis=1)


@keras.saving.register_keras_serializable(package=_PACKAGE)
def sparse_global_pointer_crossentropy(y_true, y_pred):
    """GlobalPointer's loss from sparse labels `y_true` `[batch, heads, max_entities, 2]` of (start, end) pairs.

    Pad each type's list with (0, 0) (the [CLS] span, never an entity). Memory is O(entities) for the labels instead
    of O(len^2): see `bert4x.snippets.global_pointer_sparse_labels`.

    Args:
        y_true: int (start, end) pairs `[batch, heads, max_entities, 2]`, padded with (0, 0).
        y_pred: span logits `[batch, heads, len, len]`.

    Returns:
        The loss per sample, `[batch]`.
    """
    shape = ops.shape(y_pred)
    y_true = ops.cast(y_true, "int32")
    flat_index = y_true[..., 0] * shape[2] + y_true[..., 1]
    y_pred = ops.reshape(y_pred, (shape[0], shape[1], -1))
    return ops.mean(sparse_multilabel_categorical_crossentropy(flat_index, y_pred, mask_zero=True), axis=1)


@keras.saving.register_keras_serializable(package=_PACKAGE)
def sparse_categorical_focal_crossentropy(y_true, y_pred, gamma: float = 2.0, alpha=None, from_logits: bool = False):
    """Focal loss `-alpha_t (1 - p_t)^gamma log p_t` with integer labels.

    `gamma=0` and `alpha=None` give plain CE.

    Args:
        y_true: int labels, `y_pred`'s shape without the last axis (or with a trailing 1).
        y_pred: probabilities (or logits with `from_logits=True`) `[..., num_classes]`.
        gamma: focusing exponent; 0 turns focusing off.
        alpha: None (no class weights), a float, or one weight per class.
        from_logits: whether `y_pred` are logits.

    Returns:
        The loss per example, `y_pred`'s shape without the last axis.

    Example:
    >>> float(sparse_categorical_focal_crossentropy([1], [[0.2, 0.8]], gamma=0.0)[0])  # doctest: +ELLIPSIS
    0.2231...
    """
    y_pred = ops.cast(y_pred, "float32")
    y_true = ops.cast(ops.reshape(ops.convert_to_tensor(y_true), ops.shape(y_pred)[:-1]), "int32")
    if from_logits:
        log_probs = ops.log_softmax(y_pred, axis=-1)
    else:
        probs = y_pred / ops.sum(y_pred, axis=-1, keepdims=True)
        log_probs = ops.log(ops.clip(probs, keras.config.epsilon(), 1.0))
    log_p_t = ops.squeeze(ops.take_along_axis(log_probs, ops.expand_dims(y_true, -1), axis=-1), -1)
    loss = -ops.power(1.0 - ops.exp(log_p_t), gamma) * log_p_t
    if alpha is not None:
        alpha = ops.convert_to_tensor(alpha, "float32")
        loss = loss * (ops.take(alpha, y_true) if len(alpha.shape) else alpha)
    return loss


def _log_prior(prior):
    prior = np.asarray(prior, dtype="float64")
    if prior.ndim != 1 or np.any(prior <= 0):
        raise ValueError(f"prior must be a 1-D list of positive class frequencies, got {prior!r}.")
    return ops.convert_to_tensor(np.log(prior / prior.sum()).astype("float32"))


@keras.saving.register_keras_serializable(package=_PACKAGE)
def logit_adjusted_crossentropy(y_true, y_pred, prior, tau: float = 1.0):
    """Logit-adjusted CE: sparse softmax-CE on `logits + tau * log(prior)` (class priors; normalised here).

    Train with it and predict with the raw `argmax(logits)`: rare classes then need less evidence to win.

    Args:
        y_true: int labels, `y_pred`'s shape without the last axis.
        y_pred: logits `[..., num_classes]`.
        prior: positive class frequencies, one per class (normalised here).
        tau: the adjustment's strength.

    Returns:
        The loss per example.

    Example:
    >>> float(logit_adjusted_crossentropy([0], [[0., 0.]], prior=[0.5, 0.5])[0])  # doctest: +ELLIPSIS
    0.6931...
    """
    logits = ops.cast(y_pred, "float32") + tau * _log_prior(prior)
    y_true = ops.reshape(ops.convert_to_tensor(y_true), ops.shape(logits)[:-1])
    return keras.losses.sparse_categorical_crossentropy(y_true, logits, from_logits=True)


def adjust_logits(logits, prior, tau: float = 1.0):
    """Post-hoc logit adjustment for a model trained with plain CE: `logits - tau * log(prior)`.

    Args:
        logits: `[..., num_classes]`.
        prior: positive class frequencies, one per class (normalised here).
        tau: the adjustment's strength.

    Returns:
        The adjusted float32 logits.

    Example:
    >>> [round(float(v), 4) for v in keras.ops.convert_to_numpy(adjust_logits(keras.ops.zeros((1, 2)), [0.5, 0.5]))[0]]
    [0.6931, 0.6931]
    """
    return ops.cast(logits, "float32") - tau * _log_prior(prior)


@keras.saving.register_keras_serializable(package=_PACKAGE)
def am_softmax_crossentropy(y_true, y_pred, scale: float = 30.0, margin: float = 0.35):
    """AM-Softmax: `CE(softmax(scale * (cos - margin * onehot(y))))` on cosines `y_pred` (integer labels).

    Args:
        y_true: int labels, `y_pred`'s shape without the last axis.
        y_pred: cosine similarities `[..., num_classes]` (e.g. `NormalizedDense`'s output).
        scale: multiplies the margin-shifted cosines.
        margin: subtracted from the true class's cosine.

    Returns:
        The loss per example.

    Example:
    >>> float(am_softmax_crossentropy([0], [[1.0, 0.0]], scale=1.0, margin=0.0)[0])  # doctest: +ELLIPSIS
    0.3132...
    """
    y_pred = ops.cast(y_pred, "float32")
    y_true = ops.cast(ops.reshape(ops.convert_to_tensor(y_true), ops.shape(y_pred)[:-1]), "int32")
    one_hot = ops.one_hot(y_true, ops.shape(y_pred)[-1], dtype="float32")
    logits = scale * (y_pred - margin * one_hot)
    return keras.losses.sparse_categorical_crossentropy(y_true, logits, from_logits=True)


# ---------------------------------------------------------------------------------------------- Loss classes
class _Loss(keras.losses.Loss):
    """A Loss around one of the functions above, with its keyword options in the config."""

    fn = None
    option_names: tuple[str, ...] = ()

    def __init__(self, reduction="sum_over_batch_size", name=None, dtype=None, **options):
        super().__init__(reduction=reduction, name=name or _snake(type(self).__name__), dtype=dtype)
        self.options = options

    def call(self, y_true, y_pred):
        return type(self).fn(y_true, y_pred, **self.options)

    def get_config(self):
        config = super().get_config()
        config.update(self.options)
        return config


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() and i else c.lower() for i, c in enumerate(name))


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MultilabelCategoricalCrossentropy(_Loss):
    """Loss class of `multilabel_categorical_crossentropy`."""

    fn = multilabel_categorical_crossentropy


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SparseMultilabelCategoricalCrossentropy(_Loss):
    """Loss class of `sparse_multilabel_categorical_crossentropy`.

    Args:
        mask_zero: treat class 0 as padding of the index lists, never a class.
        **kwargs: `reduction`, `name`, `dtype` of `keras.losses.Loss`.
    """

    fn = sparse_multilabel_categorical_crossentropy

    def __init__(self, mask_zero: bool = False, **kwargs):
        super().__init__(mask_zero=mask_zero, **kwargs)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class GlobalPointerCrossentropy(_Loss):
    """Loss class of `global_pointer_crossentropy` (dense `[batch, heads, len, len]` labels).

    Example:
    >>> model.compile(optimizer="adam", loss=GlobalPointerCrossentropy())  # doctest: +SKIP
    """

    fn = global_pointer_crossentropy


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SparseGlobalPointerCrossentropy(_Loss):
    """Loss class of `sparse_global_pointer_crossentropy` (`[batch, heads, max_entities, 2]` labels)."""

    fn = sparse_global_pointer_crossentropy


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SparseCategoricalFocalCrossentropy(_Loss):
    """Loss class of `sparse_categorical_focal_crossentropy`.

    Args:
        gamma: focusing exponent; 0 turns focusing off.
        alpha: None (no class weights), a float, or one weight per class.
        from_logits: whether predictions are logits.
        **kwargs: `reduction`, `name`, `dtype` of `keras.losses.Loss`.
    """

    fn = sparse_categorical_focal_crossentropy

    def __init__(self, gamma: float = 2.0, alpha: float | Sequence[float] | None = None, from_logits: bool = False,
                 **kwargs):
        alpha = list(alpha) if isinstance(alpha, (list, tuple, np.ndarray)) else alpha
        super().__init__(gamma=gamma, alpha=alpha, from_logits=from_logits, **kwargs)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LogitAdjustedCrossentropy(_Loss):
    """Loss class of `logit_adjusted_crossentropy` (logits in, integer labels).

    Args:
        prior: positive class frequencies, one per class (normalised; a bad prior raises `ValueError` here).
        tau: the adjustment's strength.
        **kwargs: `reduction`, `name`, `dtype` of `keras.losses.Loss`.

    Example:
    >>> loss = LogitAdjustedCrossentropy(prior=[0.9, 0.1], tau=1.0)
    >>> float(loss([1], [[0., 0.]])) > float(loss([0], [[0., 0.]]))
    True
    """

    fn = logit_adjusted_crossentropy

    def __init__(self, prior: Sequence[float], tau: float = 1.0, **kwargs):
        _log_prior(prior)  # validate early
        super().__init__(prior=[float(p) for p in prior], tau=tau, **kwargs)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class AMSoftmaxCrossentropy(_Loss):
    """Loss class of `am_softmax_crossentropy` (cosine logits in, integer labels).

    Args:
        scale: multiplies the margin-shifted cosines.
        margin: subtracted from the true class's cosine.
        **kwargs: `reduction`, `name`, `dtype` of `keras.losses.Loss`.
    """

    fn = am_softmax_crossentropy

    def __init__(self, scale: float = 30.0, margin: float = 0.35, **kwargs):
        super().__init__(scale=scale, margin=margin, **kwargs)
