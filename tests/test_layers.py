"""Every public layer of `bert4x.layers` through `harness.LayerTestCase.run_layer_test`, one line each.

The run checks config round trip, symbolic vs eager outputs, jit_compile predict, `.keras` save/load, mixed_bfloat16
and a fit step (tests/harness.py). `test_every_exported_layer_has_a_case` fails when a layer is exported without a
line here. Shapes are tiny: batch 2, length 5, width 8.
"""

import inspect

import keras
import numpy as np
import pytest
from harness import LayerTestCase

import bert4x.layers
from bert4x import losses
from bert4x.layers import (
    AttentionMask,
    BiasAdd,
    ConditionalLayerNormalization,
    ConditionalRandomField,
    ContextMask,
    Dropout,
    EfficientGlobalPointer,
    Embedding,
    EmbeddingSum,
    FeedForward,
    FirstToken,
    GatedAttentionUnit,
    GlobalPointer,
    HierarchicalPositionEmbedding,
    LayerNormalization,
    Loss,
    MaskPadding,
    MultiHeadAttention,
    NormalizedDense,
    PositionEmbedding,
    PromptEmbedding,
    RelativePositionBias,
    RelativePositionEmbedding,
    RemovePadding,
    RestorePadding,
)

rng = np.random.default_rng(0)
X = rng.normal(size=(2, 5, 8)).astype("float32")
IDS = np.array([[3, 7, 9, 4, 2], [5, 8, 1, 0, 0]], "int32")  # the second row is padded
MASK = (IDS != 0).astype("int32")
MASK4 = (IDS != 0)[:, None, None, :]
SEGMENTS = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], "int32")
COND = rng.normal(size=(2, 3)).astype("float32")
SPANS = np.zeros((2, 2, 5, 5), "float32")
SPANS[:, 0, 1, 2] = SPANS[:, 1, 0, 3] = 1
SPAN_LOSS = dict(loss=losses.global_pointer_crossentropy, targets=SPANS)
CRF_LOSS = dict(layer_loss=lambda crf: crf.sparse_loss, targets=rng.integers(0, 8, size=(2, 5)).astype("int32"))
# What RestorePadding takes: RemovePadding's outputs for X and IDS (computed eagerly, so on this backend).
TOKENS, POSITIONS, SLOTS = (keras.ops.convert_to_numpy(t) for t in RemovePadding()(X, IDS))



@keras.saving.register_keras_serializable(package="bert4x_tests")
class MeanSquareLoss(Loss):
    """The smallest concrete `Loss`: the mean square of its input, which it passes through."""

    def compute_loss(self, inputs, mask=None):
        return keras.ops.mean(keras.ops.square(inputs))


# (layer class, constructor arguments, input data, run_layer_test options): one line per layer, and per variant.
CASES = [
    (Embedding, dict(input_dim=10, output_dim=8), IDS, {}),
    (Embedding, dict(input_dim=10, output_dim=8), X, dict(call_kwargs={"mode": "dense"})),
    (PromptEmbedding, dict(input_dim=10, output_dim=8, prompt_ids=[1, 3, 5, 7, 9]), IDS, {}),
    (PositionEmbedding, dict(input_dim=16, output_dim=8), X, {}),
    (EmbeddingSum, {}, [X, X], {}),
    (HierarchicalPositionEmbedding, dict(input_dim=3, output_dim=8, hierarchical=True), X, {}),
    (MultiHeadAttention, dict(heads=2, head_size=4, attention_dropout=0.1), {"query": X, "attention_mask": MASK4}, {}),
    (MultiHeadAttention, dict(heads=2, head_size=4, cross_attention=True), {"query": X[:, :3], "key_value": X}, {}),
    # glorot (bert4keras's default): at stddev 0.02 relu² scores are ~1e-6 and their gradients fall under Adam's eps
    (GatedAttentionUnit, dict(units=12, key_size=4, attention_dropout=0.1, kernel_initializer="glorot_uniform"),
     {"inputs": X, "attention_mask": MASK4}, {}),
    (FeedForward, dict(units=16), X, {}),
    (FeedForward, dict(units=16, gated=True, use_bias=False), X, {}),
    (BiasAdd, {}, X, {}),
    (FirstToken, {}, X, {}),
    (LayerNormalization, dict(epsilon=1e-12), X, {}),
    (Dropout, dict(rate=0.2, seed=3), X, {}),
    (RemovePadding, {}, {"inputs": X, "token_ids": IDS}, {}),
    (RestorePadding, {}, {"tokens": TOKENS, "positions": POSITIONS, "slots": SLOTS}, {}),
    (AttentionMask, dict(mode="unilm"), {"token_ids": IDS, "segment_ids": SEGMENTS}, dict(trainable=False)),
    (GlobalPointer, dict(heads=2, head_size=4), {"inputs": X, "mask": MASK}, SPAN_LOSS),
    (EfficientGlobalPointer, dict(heads=2, head_size=4), {"inputs": X, "mask": MASK}, SPAN_LOSS),
    (ConditionalRandomField, dict(lr_multiplier=2), {"inputs": X, "mask": MASK}, CRF_LOSS),
    (ConditionalLayerNormalization, dict(hidden_units=4), [X, COND], {}),
    (NormalizedDense, dict(units=3), X[:, 0], {}),
    (RelativePositionBias, dict(heads=2, num_buckets=8, max_distance=16), X, {}),
    (RelativePositionEmbedding, dict(output_dim=4, max_relative_position=2), X, dict(trainable=False)),
    (MaskPadding, {}, {"inputs": X, "token_ids": IDS}, {}),
    (ContextMask, {}, X * MASK[..., None], dict(trainable=False)),
    (MeanSquareLoss, dict(output_axis=0), X, {}),
]


def _case_id(case):
    layer_cls, init_kwargs, _, options = case
    extra = "-".join(f"{k}={v}" for k, v in {**init_kwargs, **options.get("call_kwargs", {})}.items()
                     if isinstance(v, (bool, str)))
    return layer_cls.__name__ + (f"[{extra}]" if extra else "")


class TestLayers(LayerTestCase):
    @pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
    def test_layer(self, case):
        layer_cls, init_kwargs, input_data, options = case
        self.run_layer_test(layer_cls, init_kwargs, input_data, **options)


def test_every_exported_layer_has_a_case():
    exported = {obj for _, obj in inspect.getmembers(bert4x.layers, inspect.isclass)
                if issubclass(obj, keras.layers.Layer) and obj.__module__.startswith("bert4x.")}
    covered = {cls for case in CASES for cls in case[0].__mro__}  # an abstract base counts through its test subclass
    missing = sorted(cls.__name__ for cls in exported - covered)
    assert not missing, f"layers exported by bert4x.layers without a line in tests/test_layers.py's CASES: {missing}"


def test_layer_test_case_catches_a_broken_config():
    """The harness is not vacuous: a layer whose get_config drops an argument fails it."""

    class Forgetful(keras.layers.Layer):
        def __init__(self, units=3, **kwargs):
            super().__init__(**kwargs)
            self.units = units

        def build(self, input_shape):
            self.w = self.add_weight(shape=(input_shape[-1], self.units))

        def call(self, x):
            return keras.ops.matmul(x, self.w)

        def get_config(self):
            config = super().get_config()
            config.pop("units", None)  # the bug under test: Keras would otherwise record the argument itself
            return config

    with pytest.raises(AssertionError, match="clone's shapes|round-trip"):
        LayerTestCase().run_layer_test(Forgetful, {"units": 5}, X)
