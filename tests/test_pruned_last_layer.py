"""Models whose outputs read only [CLS] compute their last layer at [CLS] alone, with the outputs and gradients of the
full layer; self-attention asked at leading positions equals the full layer's first rows."""

import keras
import numpy as np
import pytest

from bert4x.layers import AttentionMask, MultiHeadAttention
from bert4x.models import build_transformer_model
from bert4x.models.roformer import RotaryEmbedding

rng = np.random.default_rng(7)
TINY = {"vocab_size": 30, "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 16}
IDS = rng.integers(1, 30, size=(3, 7)).astype("int32")
IDS[1, 5:] = 0
SEGMENTS = np.zeros_like(IDS)
SEGMENTS[:, 4:] = 1


@pytest.mark.parametrize("mode", ["encoder", "lm", "unilm"])
@pytest.mark.parametrize("leading", [1, 3])
def test_self_attention_at_leading_positions_equals_the_full_layer(mode, leading):
    x = keras.ops.convert_to_tensor(rng.normal(size=(3, 7, 8)).astype("float32"))
    mask = AttentionMask(mode)(keras.ops.convert_to_tensor(IDS), keras.ops.convert_to_tensor(SEGMENTS))
    bias = keras.ops.convert_to_tensor(rng.normal(size=(1, 2, 7, 7)).astype("float32"))
    rotary = RotaryEmbedding(4)(x)
    layer = MultiHeadAttention(2, 4)
    full = layer(x, attention_mask=mask, attention_bias=bias, rotary=rotary)
    part = layer(x[:, :leading], key_value=x, attention_mask=mask, attention_bias=bias, rotary=rotary)
    assert tuple(part.shape) == (3, leading, 8)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(part), keras.ops.convert_to_numpy(full)[:, :leading],
                               rtol=1e-5, atol=1e-6)


def test_self_attention_refuses_key_value_with_a_cache():
    layer = MultiHeadAttention(2, 4)
    x = keras.ops.ones((1, 3, 8))
    with pytest.raises(ValueError, match="key_value .* or a cache"):
        layer(x[:, :1], key_value=x, cache=keras.ops.zeros((1, 2, 3, 2, 4)))


def _pair(model: str, **kwargs):
    kwargs.setdefault("remove_padding", False)  # pruning alone (tests/test_remove_padding.py covers the two together)
    pruned = build_transformer_model(TINY, model=model, with_pool=True, **kwargs)
    full = build_transformer_model(TINY, model=model, with_pool=True, prune_last_layer=False, **kwargs)
    # Weights far from their small initial values, so that every gradient is well above rounding.
    weights = [rng.normal(scale=0.5, size=w.shape).astype(w.dtype) for w in pruned.get_weights()]
    for m in (pruned, full):
        m.set_weights(weights)
    return pruned, full


@pytest.mark.parametrize("model", ["bert", "roformer"])
def test_pooled_model_computes_its_last_layer_at_cls_only(model):
    pruned, full = _pair(model)
    last = "Transformer-1-FeedForward-Norm"
    assert tuple(pruned.get_layer(last).output.shape) == (None, 1, 8)
    assert tuple(full.get_layer(last).output.shape) == (None, None, 8)
    assert [w.path for w in pruned.weights] == [w.path for w in full.weights]
    np.testing.assert_allclose(pruned.predict([IDS, SEGMENTS], verbose=0), full.predict([IDS, SEGMENTS], verbose=0),
                               rtol=1e-5, atol=1e-6)

    # One SGD step from the same weights on the same batch: equal updates means equal gradients, the query third of
    # the last layer's fused QKV kernel included (it only sees [CLS] in the pruned model).
    before = [w.copy() for w in pruned.get_weights()]
    target = rng.normal(size=(3, 8)).astype("float32")
    for m in (pruned, full):
        m.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
        m.fit([IDS, SEGMENTS], target, batch_size=3, epochs=1, shuffle=False, verbose=0)
    qkv = [i for i, w in enumerate(pruned.weights)
           if w.path.endswith("Transformer-1-MultiHeadSelfAttention/qkv/kernel")]
    assert qkv and np.abs(pruned.get_weights()[qkv[0]] - before[qkv[0]])[:, :8].min() > 0
    for w, a, b in zip(pruned.weights, pruned.get_weights(), full.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=w.path)


def test_models_reading_every_token_keep_the_whole_last_layer():
    for kwargs in ({}, {"with_mlm": True}, {"with_pool": True, "with_mlm": "linear"}, {"with_pool": True,
                                                                                        "prune_last_layer": False}):
        model = build_transformer_model(TINY, remove_padding=False, **kwargs)
        assert not any("FirstToken" in layer.name for layer in model.layers), kwargs
        assert tuple(model.get_layer("Transformer-1-FeedForward-Norm").output.shape) == (None, None, 8), kwargs


def test_pruned_model_with_conditional_layer_norm_and_nsp():
    pruned, full = _pair("bert", with_nsp=True, layer_norm_cond=4)
    condition = rng.normal(size=(3, 4)).astype("float32")
    np.testing.assert_allclose(pruned.predict([IDS, SEGMENTS, condition], verbose=0),
                               full.predict([IDS, SEGMENTS, condition], verbose=0), rtol=1e-5, atol=1e-6)


def test_pruned_model_after_int8_quantization():
    """A quantized fused kernel cannot be sliced; the layer then projects both inputs and keeps the parts it needs."""
    pruned, full = _pair("bert")
    for m in (pruned, full):
        m.quantize("int8")
    assert pruned.get_layer("Transformer-1-MultiHeadSelfAttention").qkv_dense.quantization_mode == "int8"
    np.testing.assert_allclose(pruned.predict([IDS, SEGMENTS], verbose=0), full.predict([IDS, SEGMENTS], verbose=0),
                               rtol=1e-5, atol=1e-6)
