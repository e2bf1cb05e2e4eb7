"""Dropout whose mask, on jax, is a counter-based hash (`bert4x.kernels.dropout`)."""

from __future__ import annotations

import keras

from bert4x.kernels import dropout as hashed
from bert4x.layers._common import PACKAGE

__all__ = ["Dropout"]

@keras.saving.register_keras_serializable(package=PACKAGE)
class Dropout(keras.layers.Dropout):
    """`keras.layers.Dropout` whose mask, on the jax backend, comes from a counter-based hash of (seed, position).

    jax draws dropout bits with threefry, 20 rounds of 32-bit arithmetic per pair of words. The hash
    (`bert4x.kernels.dropout`, keyed by a seed from this layer's `seed_generator`, as in bert4x's fused attention)
    gives the same keep rate and a fresh mask at every call, and XLA computes it inside the fusion that applies it
    (benchmarks/PROFILE.md). Other backends, and `noise_shape`, use Keras's own dropout.

    Args:
        rate: the fraction of entries dropped, in [0, 1).
        noise_shape: as in `keras.layers.Dropout` (then Keras's dropout runs on every backend).
        seed: seed of the layer's `seed_generator`.
        **kwargs: `keras.layers.Layer` arguments (name, dtype, ...).

    Example:
    >>> layer = Dropout(0.5, seed=1)
    >>> y = layer(keras.ops.ones((4, 8)), training=True)
    >>> sorted(set(keras.ops.convert_to_numpy(y).ravel().tolist())) in ([0.0, 2.0], [2.0])
    True
    """

    def draw_seed(self):
        """A fresh int32 seed from this layer's generator: what a hashed mask (here or in the fused attention) is keyed
        by, so every training call drops different entries."""
        return keras.random.randint((), 0, 2**31 - 1, seed=self.seed_generator, dtype="int32")

    def call(self, inputs, training=False):
        if not training or self.rate <= 0 or self.noise_shape is not None or keras.backend.backend() != "jax":
            return super().call(inputs, training=training)
        return hashed.hashed_dropout(inputs, self.draw_seed(), self.rate)
