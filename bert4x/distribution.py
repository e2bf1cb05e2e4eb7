"""Training on several devices with the engines Keras already has.

* Data parallel: `keras.distribution.DataParallel` on jax, `tf.distribute.MirroredStrategy` on tensorflow.
  `data_parallel()` returns the right one for the current backend and `scope(strategy)` enters it. Build the model
  (checkpoint included: `build_transformer_model(..., checkpoint_path=...)`), compile and fit inside the scope. The
  batch size given to `fit` (or yielded by a dataset) is the GLOBAL batch: each of the N devices gets 1/N of it, so
  scale it with `global_batch_size(per_device, strategy)`. On jax the loss is computed over the whole global batch,
  so training matches one device on the same batch. On tensorflow each replica computes the loss of its share and
  the gradients are averaged; for a loss averaged over weighted tokens (MLM, reduction 'mean_with_sample_weight')
  that equals the global average only when the replicas hold equally many weighted tokens (nearly so in practice).
* Model parallel (jax): `model_parallel(model_size)` shards every attention and feed-forward kernel of any bert4x
  model (Megatron style: the first projection column-wise, the second row-wise) and the token embedding over the
  'model' axis of a (batch, model) device mesh; `layout_map()` is the recipe by itself.

Multi-host (jax): every host runs the same script and calls, before anything touches a device,

    keras.distribution.initialize(job_addresses="10.0.0.1:1234", num_processes=2, process_id=RANK)

(or sets KERAS_DISTRIBUTION_JOB_ADDRESSES / _NUM_PROCESSES / _PROCESS_ID and calls `initialize()`; only the
coordinator's address is needed on jax). `keras.distribution.list_devices()` then lists the devices of every host,
`data_parallel()` spans all of them, and each host's input pipeline must yield only its own share of the global
batch (`PretrainingDataset(..., shard=(process_id, num_processes))` does that). `initialize_multi_host` wraps the
call. On tensorflow, multi-worker training uses `tf.distribute.MultiWorkerMirroredStrategy` with TF_CONFIG instead.

Example (jax, 4 devices):
>>> strategy = data_parallel()                                       # doctest: +SKIP
>>> with scope(strategy):                                            # doctest: +SKIP
...     model = build_transformer_model(config, checkpoint, with_pool=True)
...     model.compile("adam", "mse")
...     model.fit(x, y, batch_size=global_batch_size(32, strategy))  # 32 per device, 128 in all
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Sequence
from typing import Any

import keras

__all__ = [
    "LAYOUT_RULES",
    "layout_map",
    "model_parallel",
    "data_parallel",
    "scope",
    "num_replicas",
    "global_batch_size",
    "uncovered_kernels",
    "initialize_multi_host",
]

# The model-parallel recipe: {regex over a variable path (re.fullmatch): sharding spec}. "model" is the mesh axis
# the weight is split over. The sub-layer names are those of bert4x's MultiHeadAttention (qkv, q, kv, output) and
# FeedForward (inner, gate, output), so the rules cover every model made of those layers, whatever it names them
# (BERT's 'Transformer-3-MultiHeadSelfAttention', an encoder-decoder's '...-MultiHeadCrossAttention', ...).
# Column-parallel projections also split their bias; row-parallel ones keep the bias whole (it is added after the
# partial results are summed).
LAYOUT_RULES: dict[str, tuple[str | None, ...]] = {
    r".*Attention[^/]*/(qkv|q|kv)/kernel": (None, "model"),
    r".*Attention[^/]*/(qkv|q|kv)/bias": ("model",),
    r".*Attention[^/]*/output/kernel": ("model", None),
    r".*FeedForward[^/]*/(inner|gate)/kernel": (None, "model"),
    r".*FeedForward[^/]*/(inner|gate)/bias": ("model",),
    r".*FeedForward[^/]*/output/kernel": ("model", None),
    # GatedAttentionUnit (GAU-α): its fused u | v | z projection column-parallel, its output row-parallel.
    r".*GatedAttentionUnit[^/]*/i_dense/kernel": (None, "model"),
    r".*GatedAttentionUnit[^/]*/o_dense/kernel": ("model", None),
    # Vocabulary rows: the embedding lookup and the tied MLM/LM output projection both split over the vocab.
    r"(.*/)?Embedding-Token/embeddings": ("model", None),
    # An untied LM head (T5's 'Decoder-Output-LM'): split over its vocabulary columns.
    r"(.*/)?[^/]*Output-LM/kernel": (None, "model"),
}


def _require_backend(what: str, *backends: str) -> None:
    if keras.backend.backend() not in backends:
        raise RuntimeError(
            f"{what} needs KERAS_BACKEND in {backends}; this process runs on {keras.backend.backend()!r}. "
            "Set KERAS_BACKEND before importing keras."
        )


def layout_map(
    device_mesh: keras.distribution.DeviceMesh, model_axis: str = "model"
) -> keras.distribution.LayoutMap:
    """The `LayoutMap` that shards bert4x's attention and feed-forward kernels and token embedding over
    `model_axis` of `device_mesh` (see `LAYOUT_RULES`); every other weight is replicated.

    Every sharded dimension (heads * head_size * 3, intermediate_size, vocab_size) must be divisible by the size of
    `model_axis`.

    Args:
        device_mesh: the mesh whose `model_axis` the kernels are sharded over.
        model_axis: the mesh axis name for model parallelism.

    Returns:
        A `keras.distribution.LayoutMap` keyed by bert4x's variable paths.

    Example:
    >>> mesh = keras.distribution.DeviceMesh((1, 1), ("batch", "model"), keras.distribution.list_devices()[:1])
    >>> layout_map(mesh)["Transformer-0-FeedForward/inner/kernel"].axes
    (None, 'model')
    """
    if model_axis not in device_mesh.axis_names:
        raise ValueError(f"model_axis={model_axis!r} is not an axis of the device mesh {device_mesh.axis_names}.")
    layouts = keras.distribution.LayoutMap(device_mesh)
    for pattern, spec in LAYOUT_RULES.items():
        layouts[pattern] = tuple(model_axis if axis == "model" else axis for axis in spec)
    return layouts


def model_parallel(
    model_size: int | None = None, devices: Sequence[str] | None = None
) -> keras.distribution.ModelParallel:
    """A `keras.distribution.ModelParallel` (jax) over a (batch, model) mesh of `devices` (default: all), with
    `model_size` devices per model replica (default: all devices, i.e. pure model parallelism) and bert4x's
    `layout_map`. Build the model inside `scope(...)` of it, or after `keras.distribution.set_distribution(it)`.

    Args:
        model_size: devices per model replica (default: all devices).
        devices: Keras device names, e.g. 'gpu:0' (default: every device).

    Returns:
        A `keras.distribution.ModelParallel` with bert4x's `layout_map`.

    Example:
    >>> distribution = model_parallel(model_size=4)                 # doctest: +SKIP
    >>> with distribution.scope():                                  # doctest: +SKIP
    ...     model = build_transformer_model(config, checkpoint)     # weights land already sharded
    """
    _require_backend("keras.distribution.ModelParallel", "jax")
    devices = list(devices or keras.distribution.list_devices())
    model_size = model_size or len(devices)
    if model_size < 1 or len(devices) % model_size:
        raise ValueError(f"model_size={model_size} must divide the number of devices ({len(devices)}).")
    mesh = keras.distribution.DeviceMesh((len(devices) // model_size, model_size), ("batch", "model"), devices)
    return keras.distribution.ModelParallel(layout_map=layout_map(mesh), batch_dim_name="batch")


def data_parallel(devices: Sequence[str] | None = None) -> Any:
    """Data parallelism for the current backend over `devices` (default: every device).

    jax: a `keras.distribution.DataParallel` (devices as Keras names them, e.g. 'gpu:0');
    tensorflow: a `tf.distribute.MirroredStrategy` (devices as TF names them, e.g. '/gpu:0').
    Enter it with `scope(strategy)`.

    Args:
        devices: device names as the backend spells them (default: every device).

    Returns:
        The backend's data-parallel distribution or strategy.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        return keras.distribution.DataParallel(devices=list(devices) if devices else None)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.distribute.MirroredStrategy(devices=list(devices) if devices else None)
    raise RuntimeError(
        f"bert4x's data-parallel helpers support the jax and tensorflow backends, not {backend!r} "
        "(on torch, launch with torchrun and wrap the model in torch's DistributedDataParallel)."
    )


def scope(strategy: Any) -> contextlib.AbstractContextManager:
    """The context in which to build, compile and fit: `strategy.scope()` for both Keras distributions and
    tf.distribute strategies; `None` gives a no-op context (single device).

    Args:
        strategy: a `keras.distribution.Distribution`, a `tf.distribute.Strategy`, or None.

    Returns:
        A context manager.
    """
    if strategy is None:
        return contextlib.nullcontext()
    if not hasattr(strategy, "scope"):
        raise TypeError(
            f"strategy must be a keras.distribution.Distribution or a tf.distribute.Strategy, got {strategy!r}.")
    return strategy.scope()


def num_replicas(strategy: Any) -> int:
    """How many copies of the model a data-parallel step runs: the batch is split this many ways.

    Args:
        strategy: a `keras.distribution.Distribution`, a `tf.distribute.Strategy`, or None (one replica).

    Returns:
        The number of replicas.
    """
    if strategy is None:
        return 1
    if hasattr(strategy, "num_replicas_in_sync"):  # tf.distribute
        return int(strategy.num_replicas_in_sync)
    mesh = getattr(strategy, "device_mesh", None)
    if mesh is None:
        raise TypeError(f"Cannot tell the number of replicas of {strategy!r}.")
    batch_dim = getattr(strategy, "batch_dim_name", None) or mesh.axis_names[0]
    return int(mesh.shape[list(mesh.axis_names).index(batch_dim)])


def global_batch_size(per_replica: int, strategy: Any) -> int:
    """The batch size to give `fit` so that each replica sees `per_replica` samples.

    Args:
        per_replica: samples each replica should see per step.
        strategy: as for `num_replicas`.

    Returns:
        `per_replica` times the number of replicas.
    """
    if per_replica < 1:
        raise ValueError(f"per_replica must be a positive batch size, got {per_replica}.")
    return per_replica * num_replicas(strategy)


def uncovered_kernels(model: keras.Model, layouts: keras.distribution.LayoutMap | None = None) -> list[str]:
    """Paths of attention / feed-forward kernels and token embeddings that the recipe leaves replicated.

    Walks the model for bert4x `MultiHeadAttention` and `FeedForward` layers (and 'Embedding-Token'), so a new model
    whose names escape `LAYOUT_RULES` shows up here instead of silently training unsharded.

    Args:
        model: a built bert4x model.
        layouts: the layout map to check (default: the patterns of `LAYOUT_RULES`).

    Returns:
        The variable paths left replicated, empty when every kernel is covered.
    """
    from bert4x.layers import FeedForward, GatedAttentionUnit, MultiHeadAttention

    patterns = [re.compile(p) for p in (LAYOUT_RULES if layouts is None else list(layouts.keys()))]
    expected = []
    for layer in _walk_layers(model):
        if isinstance(layer, (MultiHeadAttention, FeedForward, GatedAttentionUnit)) or layer.name == "Embedding-Token":
            expected.extend(w.path for w in layer.weights if w.path.endswith(("/kernel", "/embeddings")))
    return [path for path in expected if not any(p.fullmatch(path) for p in patterns)]


def _walk_layers(layer: keras.layers.Layer) -> Iterable[keras.layers.Layer]:
    for sub in getattr(layer, "layers", None) or []:
        yield sub
        yield from _walk_layers(sub)


def initialize_multi_host(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Joins a multi-host jax cluster: `keras.distribution.initialize` with the coordinator's 'host:port'.

    Call it first thing on every host (same script, `process_id` 0..num_processes-1); arguments left None are read
    from KERAS_DISTRIBUTION_JOB_ADDRESSES / KERAS_DISTRIBUTION_NUM_PROCESSES / KERAS_DISTRIBUTION_PROCESS_ID.

    Args:
        coordinator_address: 'host:port' of process 0.
        num_processes: number of hosts in the cluster.
        process_id: this host's index, 0 .. num_processes - 1.
    """
    _require_backend("keras.distribution.initialize", "jax")
    keras.distribution.initialize(coordinator_address, num_processes, process_id)
