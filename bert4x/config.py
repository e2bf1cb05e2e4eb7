"""bert4x's switches, read once in one place (as `keras.config` holds Keras's).

Each switch starts from its environment variable, read once when this module is first imported (importing
`bert4x.layers` or `bert4x.models` does), and can then be changed with its setter. Layers read the getters when
they are traced; nothing reads the environment afterwards.

- `fused_attention()` / `set_fused_attention(mode)`: `BERT4X_FUSED_ATTENTION`; 'auto', 'recompute', 'interpret',
  'off'.
- `fused_layer_norm()` / `set_fused_layer_norm(mode)`: `BERT4X_FUSED_LAYER_NORM`; 'auto', 'interpret', 'off'.
- `attention_implementation()` / `set_attention_implementation(name)`: `BERT4X_ATTENTION_IMPLEMENTATION`; None or
  the name of an entry of `bert4x.kernels.IMPLEMENTATIONS`, tried first.

Example:
>>> import bert4x.config
>>> previous = bert4x.config.fused_layer_norm()
>>> bert4x.config.set_fused_layer_norm(False)
>>> bert4x.config.fused_layer_norm()
'off'
>>> bert4x.config.set_fused_layer_norm(previous)
"""

from __future__ import annotations

import os

__all__ = [
    "FUSED_ATTENTION_MODES",
    "FUSED_LAYER_NORM_MODES",
    "fused_attention",
    "set_fused_attention",
    "fused_layer_norm",
    "set_fused_layer_norm",
    "attention_implementation",
    "set_attention_implementation",
]

FUSED_ATTENTION_MODES = ("auto", "recompute", "interpret", "off")
FUSED_LAYER_NORM_MODES = ("auto", "interpret", "off")


def _mode(value, choices: tuple, what: str) -> str:
    if value is True:
        value = "auto"
    elif value is False:
        value = "off"
    if not isinstance(value, str) or value.lower() not in choices:
        raise ValueError(f"{what} must be one of {', '.join(repr(c) for c in choices)} (or True/False), "
                         f"got {value!r}.")
    return value.lower()


def _from_environment(variable: str, choices: tuple) -> str:
    return _mode(os.environ.get(variable, "auto"), choices, variable)


_FUSED_ATTENTION = _from_environment("BERT4X_FUSED_ATTENTION", FUSED_ATTENTION_MODES)
_FUSED_LAYER_NORM = _from_environment("BERT4X_FUSED_LAYER_NORM", FUSED_LAYER_NORM_MODES)
_ATTENTION_IMPLEMENTATION = os.environ.get("BERT4X_ATTENTION_IMPLEMENTATION") or None


def fused_attention() -> str:
    """How jax training attention may use bert4x's fused kernels (`bert4x.kernels`).

    'auto' (default): with attention dropout, the Pallas kernels on NVIDIA GPUs in float16/bfloat16; on other jax
    devices (CPU) the version that recomputes the probabilities in the backward pass. 'recompute': that version on
    every device. 'interpret': the Pallas kernels through Pallas' interpreter, on any device (how tests run them on
    CPU). 'off': none of them (cuDNN / Keras / XLA attention only).
    """
    return _FUSED_ATTENTION


def set_fused_attention(mode: str | bool) -> None:
    """Sets `fused_attention()`.

    Args:
        mode: 'auto', 'recompute', 'interpret' or 'off'; True means 'auto' and False 'off'.
    """
    global _FUSED_ATTENTION
    _FUSED_ATTENTION = _mode(mode, FUSED_ATTENTION_MODES, "fused_attention mode (BERT4X_FUSED_ATTENTION)")


def fused_layer_norm() -> str:
    """How `bert4x.layers.LayerNormalization` runs on jax.

    'auto' (default): the Pallas kernels in training on NVIDIA GPUs, the backward pass that keeps only its input on
    CPU, Keras's LayerNorm elsewhere. 'interpret': the kernels through Pallas' interpreter on any jax device (tests).
    'off': Keras's LayerNormalization everywhere.
    """
    return _FUSED_LAYER_NORM


def set_fused_layer_norm(mode: str | bool) -> None:
    """Sets `fused_layer_norm()`.

    Args:
        mode: 'auto', 'interpret' or 'off'; True means 'auto' and False 'off'.
    """
    global _FUSED_LAYER_NORM
    _FUSED_LAYER_NORM = _mode(mode, FUSED_LAYER_NORM_MODES, "fused_layer_norm mode (BERT4X_FUSED_LAYER_NORM)")


def attention_implementation() -> str | None:
    """The attention implementation tried first (a name from `bert4x.kernels.IMPLEMENTATIONS`), or None for the
    table's own order. Where the named implementation refuses an input, the table's order continues after it."""
    return _ATTENTION_IMPLEMENTATION


def set_attention_implementation(name: str | None) -> None:
    """Sets `attention_implementation()`.

    Args:
        name: an entry of `bert4x.kernels.IMPLEMENTATIONS` (e.g. 'xla'), or None for the table's own order.
    """
    global _ATTENTION_IMPLEMENTATION
    if name is not None:
        from bert4x import kernels

        if name not in kernels.implementation_names():
            raise ValueError(f"attention implementation must be None or one of {kernels.implementation_names()}, "
                             f"got {name!r}.")
    _ATTENTION_IMPLEMENTATION = name
