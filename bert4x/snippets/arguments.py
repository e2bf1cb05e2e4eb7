"""Decorators with bert4keras's semantics that add or forbid keyword arguments of a method (mostly `__init__`)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

__all__ = ["insert_arguments", "delete_arguments"]


def insert_arguments(**arguments: Any) -> Callable:
    """Adds keyword arguments with defaults to a method: each is taken out of the call's kwargs (or its default
    used) and set as an attribute of `self` before the method runs.

    Example:
    >>> class Layer:
    ...     @insert_arguments(rate=0.1)
    ...     def __init__(self, units):
    ...         self.units = units
    >>> Layer(3, rate=0.5).rate, Layer(3).rate
    (0.5, 0.1)
    """

    def decorate(method):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            for key, default in arguments.items():
                setattr(self, key, kwargs.pop(key, default))
            return method(self, *args, **kwargs)

        return wrapper

    return decorate


def delete_arguments(*names: str) -> Callable:
    """Forbids keyword arguments of a method (e.g. ones a base class takes that a subclass does not support): a
    call passing one raises `TypeError`.

    Example:
    >>> class Layer:
    ...     @delete_arguments("bias")
    ...     def __init__(self, **kwargs):
    ...         pass
    >>> Layer(bias=True)
    Traceback (most recent call last):
    TypeError: Layer got an unexpected keyword argument 'bias'
    """

    def decorate(method):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            for name in names:
                if name in kwargs:
                    raise TypeError(f"{type(self).__name__} got an unexpected keyword argument {name!r}")
            return method(self, *args, **kwargs)

        return wrapper

    return decorate
