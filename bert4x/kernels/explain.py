"""`explain(model)`: which attention implementation each attention layer of a model runs, and why."""

from __future__ import annotations

import dataclasses

import keras

from bert4x.kernels.dispatch import AttentionSpec, Choice, choose

__all__ = ["explain", "Explanation", "LayerChoice"]


@dataclasses.dataclass(frozen=True)
class LayerChoice:
    """The choices for one call of one attention layer.

    Args:
        layer: the layer's name.
        training: the spec and choice of a training call.
        inference: the spec and choice of an inference call.
    """

    layer: str
    training: tuple[AttentionSpec, Choice]
    inference: tuple[AttentionSpec, Choice]

    def __str__(self) -> str:
        lines = [f"{self.layer}:"]
        for title, (spec, choice) in (("training", self.training), ("inference", self.inference)):
            lines.append(f"  {title:<9} -> {str(choice).splitlines()[0]}   [{spec}]")
            lines.extend("    " + line.strip() for line in str(choice).splitlines()[1:])
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Explanation:
    """What `explain` found: one `LayerChoice` per call of an attention layer.

    Args:
        header: backend, device, dtype policy and assumed shapes.
        rows: the layers' choices, in the model's order.
    """

    header: str
    rows: tuple[LayerChoice, ...]

    def __str__(self) -> str:
        return "\n".join([self.header] + [str(row) for row in self.rows])


def _layers(model):
    """Every layer of `model`, nested models' included, each once, in order."""
    seen = []
    stack = list(reversed(getattr(model, "layers", [])))
    while stack:
        layer = stack.pop()
        if any(layer is s for s in seen):
            continue
        seen.append(layer)
        stack.extend(reversed(getattr(layer, "layers", []) if isinstance(layer, keras.Model) else []))
    return seen


def _calls(layer):
    """The (args, kwargs) of each symbolic call of `layer` recorded in the functional graph."""
    calls = []
    for node in getattr(layer, "_inbound_nodes", []):
        arguments = getattr(node, "arguments", None)
        if arguments is not None:
            calls.append((tuple(arguments.args), dict(arguments.kwargs)))
    return calls


def explain(model, sequence_length: int = 128, batch_size: int = 8, print_report: bool = True) -> Explanation:
    """Which attention implementation every attention layer of `model` runs, in training and at inference, on the
    current backend, device and dtype, and why each implementation tried before it refused.

    Reads the calls recorded in the model's graph (no computation runs). Attention layers are those with a
    `kernel_spec` method (`bert4x.layers.MultiHeadAttention`). Where the graph leaves the length or batch size
    unknown, `sequence_length` and `batch_size` are assumed (the fused kernels' choice depends on the length).

    Args:
        model: a built Keras model (e.g. from `build_transformer_model`).
        sequence_length: the length assumed where unknown.
        batch_size: the batch size assumed where unknown.
        print_report: print the report too.

    Returns:
        An `Explanation`; `str()` of it is the printed report.
    """
    rows = []
    for layer in _layers(model):
        if not hasattr(layer, "kernel_spec"):
            continue
        calls = _calls(layer) or [((keras.KerasTensor((None, None, 1)),), {})]
        for index, (args, kwargs) in enumerate(calls):
            kwargs = {k: v for k, v in kwargs.items() if k != "training"}
            found = {}
            for training in (True, False):
                spec = layer.kernel_spec(*args, **kwargs, training=training, sequence_length=sequence_length,
                                         batch_size=batch_size)
                found[training] = (spec, choose(spec))
            name = layer.name if len(calls) == 1 else f"{layer.name} (call {index})"
            rows.append(LayerChoice(name, found[True], found[False]))
    from bert4x.kernels.dispatch import _platform

    backend_name = keras.backend.backend()
    header = (f"bert4x.kernels.explain({getattr(model, 'name', model)!r}): backend {backend_name}, device "
              f"{_platform(backend_name)}, dtype policy {keras.config.dtype_policy().name}; unknown lengths taken "
              f"as {sequence_length}, unknown batch sizes as {batch_size}")
    explanation = Explanation(header, tuple(rows))
    if print_report:
        print(explanation)
    return explanation
