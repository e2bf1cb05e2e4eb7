"""Training-step rewrites on the embedding matrix, installed in `model.fit` (tensorflow and jax backends): FGM / PGD
adversarial training, the gradient penalty, and virtual adversarial training."""

from __future__ import annotations

import types

import keras
from keras import ops


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
