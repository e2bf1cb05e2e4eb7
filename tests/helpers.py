"""Shared test helpers: where ../shared/data is, a skip marker for it, running tests on another backend, gradients."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data, skipping the calling test (with the reason) when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"../shared/data not found at {SHARED_DATA} (needs {'/'.join(parts)}); CI provides it")
    return path


def run_pytest_on_backend(backend: str, *args: str, timeout: int = 900) -> None:
    """Runs pytest on `args` in a subprocess with KERAS_BACKEND=backend and fails with its output if it fails."""
    env = dict(os.environ, KERAS_BACKEND=backend, BERT4X_SUBPROCESS="1", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"{backend} backend run failed:\n{tail}"
    assert " passed" in proc.stdout, f"{backend} backend run passed nothing:\n{tail}"


# Tests that re-run this suite on other backends only run from the top-level (tensorflow) process.
in_subprocess = os.environ.get("BERT4X_SUBPROCESS") == "1"


def grad_of(fn, x):
    """d sum(fn(x)) / dx on the current backend."""
    import keras
    import numpy as np

    name = keras.backend.backend()
    x = np.asarray(x, "float32")
    if name == "tensorflow":
        import tensorflow as tf

        t = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(t)
            y = tf.reduce_sum(fn(t))
        return tf.convert_to_tensor(tape.gradient(y, t)).numpy()  # a gather's gradient comes as IndexedSlices
    if name == "jax":
        import jax

        return np.asarray(jax.grad(lambda t: fn(t).sum())(x))
    import torch

    t = torch.tensor(x, requires_grad=True)
    fn(t).sum().backward()
    return t.grad.numpy()
