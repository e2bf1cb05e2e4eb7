"""Models, losses, logging, checkpoints and a time budget for pretraining."""

from __future__ import annotations

import csv
import logging
import os
import time
from collections.abc import Iterable
from typing import Any

import keras

from bert4x.models import Transformer, build_transformer_model

logger = logging.getLogger("bert4x")

__all__ = [
    "build_pretraining_model",
    "compile_for_pretraining",
    "save_checkpoints",
    "PretrainingLogger",
    "CheckpointSaver",
    "TimeBudget",
    "APPLICATIONS",
    "CHECKPOINT_FORMATS",
]

# Objective -> the model application whose attention mask it needs.
APPLICATIONS = {"mlm": "encoder", "lm": "lm", "unilm": "unilm"}
CHECKPOINT_FORMATS = ("keras", "keras_model", "google", "huggingface")
DEFAULT_FORMATS = ("keras", "google", "huggingface")


def build_pretraining_model(
    config: str | dict,
    model: str = "bert",
    objective: str = "mlm",
    checkpoint_path: str | None = None,
    **kwargs,
) -> Transformer:
    """Builds `model` for `objective` ('mlm' encoder, 'lm' causal, 'unilm' seq2seq) with the MLM head returning
    logits (`with_mlm='linear'`), and returns the `Transformer` (its `.model` is the Keras model; it also saves
    Google / Hugging Face checkpoints). Any registered model with an MLM head works (bert, wobert, roformer, ...).

    Args:
        config: a model config (dict) or the path of its JSON file.
        model: a registered model name.
        objective: 'mlm', 'lm' or 'unilm'.
        checkpoint_path: weights to start from (default: random).
        **kwargs: more arguments of `build_transformer_model`.

    Returns:
        The `Transformer`.

    Example:
    >>> t = build_pretraining_model({"vocab_size": 30, "hidden_size": 8, "num_hidden_layers": 1,
    ...     "num_attention_heads": 2, "intermediate_size": 16}, objective="lm")
    >>> t.model.output.shape
    (None, None, 30)
    """
    if objective not in APPLICATIONS:
        raise ValueError(f"objective must be one of {sorted(APPLICATIONS)}, got {objective!r}.")
    kwargs.setdefault("with_mlm", "linear")
    return build_transformer_model(
        config, checkpoint_path, model=model, application=APPLICATIONS[objective], return_keras_model=False, **kwargs
    )


def compile_for_pretraining(
    model: keras.Model,
    learning_rate: float = 1e-4,
    weight_decay: float = 0.01,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    optimizer: keras.optimizers.Optimizer | None = None,
    **compile_kwargs,
) -> keras.Model:
    """Compiles a pretraining model: token-level cross-entropy averaged over the weighted (masked / target) tokens,
    and their accuracy as the metric 'accuracy' (the MLM accuracy for 'mlm').

    The default optimizer is AdamW with linear warm-up over `warmup_steps` then linear decay to 0 at `total_steps`
    (constant after warm-up when `total_steps` is None). Embeddings, biases and norms are not decayed.

    Args:
        model: the Keras model of `build_pretraining_model`.
        learning_rate: peak learning rate.
        weight_decay: AdamW's decoupled weight decay.
        warmup_steps: linear warm-up steps.
        total_steps: steps of the linear decay's end (None: constant after warm-up).
        optimizer: used instead of the default AdamW.
        **compile_kwargs: more arguments of `model.compile` (e.g. `jit_compile`, `steps_per_execution`).

    Returns:
        `model`, compiled.
    """
    if optimizer is None:
        schedule: Any = learning_rate
        if warmup_steps or total_steps:
            schedule = _WarmupLinear(learning_rate, warmup_steps, total_steps)
        optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=weight_decay)
        optimizer.exclude_from_weight_decay(var_names=["bias", "beta", "gamma", "embeddings"])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="mean_with_sample_weight")
    compile_kwargs.setdefault("weighted_metrics", [keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    model.compile(optimizer=optimizer, loss=loss, **compile_kwargs)
    return model


@keras.saving.register_keras_serializable(package="bert4x")
class _WarmupLinear(keras.optimizers.schedules.LearningRateSchedule):
    def __init__(self, peak: float, warmup_steps: int, total_steps: int | None):
        self.peak, self.warmup_steps, self.total_steps = peak, warmup_steps, total_steps

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        rate = self.peak * keras.ops.minimum(1.0, (step + 1.0) / max(1, self.warmup_steps))
        if self.total_steps:
            span = max(1, self.total_steps - self.warmup_steps)
            rate = rate * keras.ops.clip(1.0 - (step - self.warmup_steps) / span, 0.0, 1.0)
        return rate

    def get_config(self):
        return dict(peak=self.peak, warmup_steps=self.warmup_steps, total_steps=self.total_steps)


def save_checkpoints(
    transformer: Transformer, directory: str | os.PathLike, formats: Iterable[str] = DEFAULT_FORMATS
) -> dict[str, str]:
    """Saves the model in each of `formats` under `directory` and returns {format: path}:

    'keras': `model.weights.h5` (bert4x's own: load with `model.load_weights`), 'keras_model': `model.keras`
    (architecture, weights and optimizer state: `keras.saving.load_model`), 'google':
    `google/bert_model.ckpt` + `bert_config.json` (needs tensorflow to write; read back by bert4x without it),
    'huggingface': `huggingface/model.safetensors` + `config.json`. Both checkpoint formats load back through
    `build_transformer_model(config, checkpoint)` with the same model and application.

    Args:
        transformer: the `Transformer` to save.
        directory: where the files go (created if missing).
        formats: any of 'keras', 'keras_model', 'google', 'huggingface'.

    Returns:
        `{format: path}` of what was written.
    """
    directory = str(directory)
    os.makedirs(directory, exist_ok=True)
    paths = {}
    for fmt in formats:
        if fmt == "keras":
            path = os.path.join(directory, "model.weights.h5")
            transformer.model.save_weights(path)
        elif fmt == "keras_model":
            path = os.path.join(directory, "model.keras")
            transformer.model.save(path)
        elif fmt == "google":
            folder = os.path.join(directory, "google")
            os.makedirs(folder, exist_ok=True)
            path = transformer.save_weights_as_checkpoint(os.path.join(folder, "bert_model.ckpt"), format="google")
        elif fmt == "huggingface":
            path = transformer.save_weights_as_checkpoint(os.path.join(directory, "huggingface"), format="huggingface")
        else:
            raise ValueError(f"Unknown checkpoint format {fmt!r}; choose from {CHECKPOINT_FORMATS}.")
        paths[fmt] = path
    return paths


class PretrainingLogger(keras.callbacks.Callback):
    """Writes the training curve to a CSV file every `every` steps: step, epoch, seconds, token positions per
    second (batch_size x seq_len per step), and the loss / accuracy that Keras reports (running means since the
    epoch began). With `held_out` (a dataset, e.g. an unshuffled `PretrainingDataset` of held-out rows) it also
    evaluates there every `eval_every` steps and at the end of training: 'held_out_loss' and
    'held_out_accuracy' are the MLM loss and accuracy on text the model never trained on.

    `history` keeps every row written, as dicts.

    Args:
        csv_path: the CSV file written.
        tokens_per_step: token positions per step (batch_size x seq_len), for the throughput column.
        every: write a row every this many steps.
        held_out: a dataset to evaluate on (None: no evaluation).
        eval_every: evaluate every this many steps (None: only at the end).
        eval_steps: batches of `held_out` per evaluation (None: all).
    """

    FIELDS = ("step", "epoch", "seconds", "tokens_per_second", "loss", "accuracy", "held_out_loss",
              "held_out_accuracy")

    def __init__(
        self,
        csv_path: str | os.PathLike,
        tokens_per_step: int,
        every: int = 50,
        held_out: Any = None,
        eval_every: int | None = None,
        eval_steps: int | None = None,
    ):
        super().__init__()
        self.csv_path = str(csv_path)
        self.tokens_per_step = tokens_per_step
        self.every = max(1, every)
        self.held_out = held_out
        self.eval_every = eval_every
        self.eval_steps = eval_steps
        self.history: list[dict] = []
        self.step = 0
        self.epoch = 0

    def on_train_begin(self, logs=None):
        os.makedirs(os.path.dirname(os.path.abspath(self.csv_path)), exist_ok=True)
        with open(self.csv_path, "w", newline="") as f:
            csv.writer(f).writerow(self.FIELDS)
        self.start = self.window_start = time.perf_counter()
        self.window_steps = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        self.window_steps += 1
        evaluate = bool(self.held_out is not None and self.eval_every and self.step % self.eval_every == 0)
        if self.step % self.every == 0 or evaluate:
            self._write(logs or {}, evaluate)

    def on_train_end(self, logs=None):
        if self.history and self.history[-1]["step"] == self.step and self.history[-1]["held_out_loss"] != "":
            return
        self._write(logs or {}, self.held_out is not None)

    def _write(self, logs: dict, evaluate: bool):
        now = time.perf_counter()
        elapsed = max(now - self.window_start, 1e-9)
        row = dict(
            step=self.step, epoch=self.epoch, seconds=round(now - self.start, 3),
            tokens_per_second=round(self.window_steps * self.tokens_per_step / elapsed, 1),
            loss=_number(logs.get("loss")), accuracy=_number(logs.get("accuracy")),
            held_out_loss="", held_out_accuracy="",
        )
        if evaluate:
            results = self.model.evaluate(self.held_out, steps=self.eval_steps, verbose=0, return_dict=True)
            row.update(held_out_loss=_number(results.get("loss")), held_out_accuracy=_number(results.get("accuracy")))
        self.history.append(row)
        with open(self.csv_path, "a", newline="") as f:
            csv.writer(f).writerow([row[k] for k in self.FIELDS])
        logger.info("pretraining %s", row)
        # The evaluation's time does not count against the training throughput.
        self.window_start, self.window_steps = time.perf_counter(), 0


def _number(value) -> float | str:
    return "" if value is None else round(float(value), 6)


class CheckpointSaver(keras.callbacks.Callback):
    """Saves `transformer` in `formats` under `directory` every `every_epochs` epochs (if set) and when training
    ends (see `save_checkpoints`). `paths` holds the last saved {format: path}.

    Args:
        transformer: the `Transformer` to save.
        directory: where the files go.
        formats: as for `save_checkpoints`.
        every_epochs: also save every this many epochs (None: only at the end).
    """

    def __init__(self, transformer: Transformer, directory: str | os.PathLike, formats: Iterable[str] = DEFAULT_FORMATS,
                 every_epochs: int | None = None):
        super().__init__()
        self.transformer = transformer
        self.directory = str(directory)
        self.formats = tuple(formats)
        for fmt in self.formats:
            if fmt not in CHECKPOINT_FORMATS:
                raise ValueError(f"Unknown checkpoint format {fmt!r}; choose from {CHECKPOINT_FORMATS}.")
        self.every_epochs = every_epochs
        self.paths: dict[str, str] = {}

    def _save(self):
        _ = self.model  # on jax this property copies the training state back into the variables first
        self.paths = save_checkpoints(self.transformer, self.directory, self.formats)
        logger.info("saved checkpoints: %s", self.paths)

    def on_epoch_end(self, epoch, logs=None):
        if self.every_epochs and (epoch + 1) % self.every_epochs == 0:
            self._save()

    def on_train_end(self, logs=None):
        self._save()


class TimeBudget(keras.callbacks.Callback):
    """Stops training once `minutes` have passed since training began (checked after every step).

    Args:
        minutes: the training time allowed; must be positive.
    """

    def __init__(self, minutes: float):
        super().__init__()
        if minutes <= 0:
            raise ValueError(f"minutes must be positive, got {minutes}.")
        self.seconds = minutes * 60.0
        self.stopped_at_step: int | None = None
        self._steps = 0

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1
        if time.perf_counter() - self.start >= self.seconds:
            self.stopped_at_step = self._steps
            self.model.stop_training = True
