"""Padding tokens skipped: `RemovePadding`/`RestorePadding`, self-attention on non-padding tokens, and BERT/RoFormer
built with `remove_padding`, which give the outputs and gradients of the padded computation at every real token.
On jax such a model takes the positions of the real tokens as a last input (`packing_positions`); the models' tests
run there too (test_remove_padding_on_jax_backend)."""

import keras
import numpy as np
import pytest
from harness import check_model
from helpers import in_subprocess, run_pytest_on_backend

from bert4x.layers import AttentionMask, MultiHeadAttention, RemovePadding, RestorePadding
from bert4x.models import build_transformer_model
from bert4x.models.roformer import RotaryEmbedding
from bert4x.snippets import packing_positions

rng = np.random.default_rng(11)
TINY = {"vocab_size": 30, "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 16}
IDS = rng.integers(1, 30, size=(4, 7)).astype("int32")
IDS[0, 5:] = 0
IDS[1, 2:] = 0
IDS[3, :] = 0  # a row of padding only
SEGMENTS = np.zeros_like(IDS)
SEGMENTS[:, 3:] = 1
REAL = IDS != 0
SKIPS = keras.backend.backend() != "jax"  # jax keeps every position (static shapes)
SKIPS_BY_DEFAULT = keras.backend.backend() == "torch" or (
    keras.backend.backend() == "tensorflow" and not keras.distribution.list_devices("gpu"))


def _numpy(x):
    return keras.ops.convert_to_numpy(x)


def test_remove_and_restore_padding():
    x = rng.normal(size=(4, 7, 3)).astype("float32")
    tokens, positions, slots = RemovePadding()(x, IDS)
    kept = REAL.reshape(-1) if SKIPS else np.ones(IDS.size, bool)
    assert _numpy(tokens).shape == (kept.sum(), 3)
    np.testing.assert_array_equal(_numpy(tokens), x.reshape(-1, 3)[kept])
    np.testing.assert_array_equal(_numpy(positions), np.flatnonzero(kept))
    assert _numpy(slots).shape == (4, 7)
    restored = _numpy(RestorePadding()(tokens, positions, slots))
    np.testing.assert_array_equal(restored, np.where(kept.reshape(4, 7, 1), x, 0.0))


def test_remove_restore_padding_through_the_harness(tmp_path):
    """Config round trip, .keras save/load, jit_compile fit and mixed_bfloat16, with a trainable layer in between."""

    def make():
        x, ids = keras.Input((7, 3)), keras.Input((7,), dtype="int32")
        tokens, positions, slots = RemovePadding(name="remove")(keras.layers.Dense(5)(x), ids)
        return keras.Model([x, ids], RestorePadding(name="restore")(keras.layers.Dense(3)(tokens), positions, slots))

    x = rng.normal(size=(4, 7, 3)).astype("float32")
    check_model(make, [x, IDS], np.where(REAL[..., None], x, 0.0), tmp_path)


@pytest.mark.parametrize("mode", ["encoder", "lm", "unilm"])
def test_self_attention_on_non_padding_tokens_equals_the_padded_layer(mode):
    x = rng.normal(size=(4, 7, 8)).astype("float32")
    mask = AttentionMask(mode)(IDS, SEGMENTS)
    rotary = RotaryEmbedding(4)(keras.ops.convert_to_tensor(x))
    layer = MultiHeadAttention(2, 4)
    padded = _numpy(layer(x, attention_mask=mask, rotary=rotary))
    tokens, positions, slots = RemovePadding()(x, IDS)
    out = _numpy(layer(tokens, attention_mask=mask, rotary=rotary, padding_index=(positions, slots)))
    kept = REAL if SKIPS else np.ones_like(REAL)
    np.testing.assert_allclose(out, padded[kept], rtol=1e-5, atol=1e-6)


def test_self_attention_on_tokens_refuses_key_value():
    tokens, positions, slots = RemovePadding()(np.ones((4, 7, 8), "float32"), IDS)
    with pytest.raises(ValueError, match="padding_index"):
        MultiHeadAttention(2, 4)(tokens, key_value=np.ones((4, 7, 8), "float32"), padding_index=(positions, slots))


def _inputs(model, ids, segments, buckets: int = 32):
    """`[ids, segments]`, and the packing positions where the model takes them (jax)."""
    if "Input-Packing" in [t.name for t in model.inputs]:
        return [ids, segments, packing_positions(ids, buckets=buckets)]
    return [ids, segments]


def _pair(**kwargs):
    """The same weights with padding removed and kept."""
    skipping = build_transformer_model(TINY, remove_padding=True, **kwargs)
    padded = build_transformer_model(TINY, remove_padding=False, **kwargs)
    weights = [rng.normal(scale=0.5, size=w.shape).astype(w.dtype) for w in padded.get_weights()]
    for m in (skipping, padded):
        m.set_weights(weights)
    assert [w.path for w in skipping.weights] == [w.path for w in padded.weights]
    return skipping, padded


@pytest.mark.parametrize("model,kwargs", [
    ("bert", {"with_pool": True}),
    ("bert", {"with_pool": True, "prune_last_layer": False}),
    ("roformer", {"with_pool": True}),
    ("bert", {"with_mlm": "linear"}),
    ("bert", {}),
    ("bert", {"application": "lm"}),
    ("bert", {"application": "unilm"}),
])
def test_models_without_padding_equal_padded_ones_at_every_real_token(model, kwargs):
    skipping, padded = _pair(model=model, **kwargs)
    assert {"Remove-Padding", "Restore-Padding"} <= {layer.name for layer in skipping.layers}
    a, b = (m.predict(_inputs(m, IDS, SEGMENTS), verbose=0) for m in (skipping, padded))
    if a.ndim == 3:  # sequence outputs: real tokens as the padded model, zeros at padding
        np.testing.assert_allclose(a[REAL], b[REAL], rtol=1e-5, atol=1e-5)
        if not kwargs:
            np.testing.assert_array_equal(a[~REAL], 0.0)
    else:  # [CLS]-only outputs; the all-padding row has no real token to compare
        np.testing.assert_allclose(a[REAL[:, 0]], b[REAL[:, 0]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs", [{"with_pool": True}, {"with_mlm": "linear"}])
def test_one_training_step_without_padding_equals_the_padded_one(kwargs):
    """Equal weights after an SGD step on rows with padding: the gradients (own gradients of the gathers included)
    are those of the padded computation."""
    ids = IDS[:3]  # no all-padding row: its [CLS] output differs (zeros in, not padding tokens) and would feed the loss
    skipping, padded = _pair(**kwargs)
    before = [w.copy() for w in padded.get_weights()]
    target = rng.normal(size=(3, 8) if kwargs.get("with_pool") else (3, 7, 30)).astype("float32")
    weights = None if kwargs.get("with_pool") else REAL[:3].astype("float32")  # loss at real tokens only
    for m in (skipping, padded):
        m.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
        m.fit(_inputs(m, ids, SEGMENTS[:3]), target, sample_weight=weights, batch_size=3, epochs=1, shuffle=False,
              verbose=0)
    changed = 0
    for w, a, b, old in zip(padded.weights, skipping.get_weights(), padded.get_weights(), before):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=w.path)
        changed += not np.allclose(b, old)
    assert changed > len(before) // 2


def test_default_skips_padding_only_where_no_output_changes():
    def layer_names(**kwargs):
        return {layer.name for layer in build_transformer_model(TINY, **kwargs).layers}

    assert ("Remove-Padding" in layer_names(with_pool=True)) == SKIPS_BY_DEFAULT
    for kwargs in ({}, {"with_mlm": True}, {"with_pool": True, "with_mlm": "linear"},
                   {"with_pool": True, "layer_norm_cond": 4}):
        assert "Remove-Padding" not in layer_names(**kwargs), kwargs
    assert "Remove-Padding" not in layer_names(with_pool=True, remove_padding=False)


def test_remove_padding_refusals():
    with pytest.raises(ValueError, match="layer_norm_cond"):
        build_transformer_model(TINY, with_pool=True, layer_norm_cond=4, remove_padding=True)
    with pytest.raises(ValueError, match="RoFormerV2"):
        build_transformer_model(TINY, model="roformer_v2", remove_padding=True)


def test_remove_padding_on_jax_takes_the_packing_input():
    model = build_transformer_model(TINY, with_pool=True, remove_padding=True)
    names = [t.name for t in model.inputs]
    assert names == (["Input-Token", "Input-Segment", "Input-Packing"] if keras.backend.backend() == "jax"
                     else ["Input-Token", "Input-Segment"])


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="the packing input is jax's; re-run on jax below")
def test_a_packing_too_small_or_of_another_batch_gives_nan_not_a_wrong_result():
    skipping, _ = _pair(with_pool=True)
    small = packing_positions(IDS, buckets=7)[:, :2]  # 8 slots for the batch's 13 real tokens
    out = skipping.predict([IDS, SEGMENTS, small], verbose=0)
    assert np.isnan(out[REAL[:, 0]]).all()  # every row with a token (the padding-only row reads zeros, as always)
    other = packing_positions(np.roll(IDS, 1, axis=0), buckets=7)  # another batch's list, of the same size
    assert np.isnan(skipping.predict([IDS, SEGMENTS, other], verbose=0)[REAL[:, 0]]).all()
    exact = skipping.predict(_inputs(skipping, IDS, SEGMENTS, buckets=7), verbose=0)
    np.testing.assert_allclose(skipping.predict(_inputs(skipping, IDS, SEGMENTS, buckets=1), verbose=0), exact,
                               rtol=1e-6, atol=1e-6)  # any capacity that holds the tokens: the same outputs


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="the Pallas kernels are jax's; re-run on jax below")
def test_inference_without_padding_runs_the_token_kernel_without_dropout(monkeypatch):
    """At inference the varlen kernel reads the rows in place (no gather into the padded layout and back), and a
    model built with attention dropout applies none outside training."""
    import bert4x.config
    from bert4x import kernels

    monkeypatch.setattr(bert4x.config, "_FUSED_ATTENTION", bert4x.config.fused_attention())
    bert4x.config.set_fused_attention("interpret")  # the Pallas kernels' own code, through the interpreter on CPU
    config = dict(TINY, hidden_size=32, intermediate_size=32, attention_probs_dropout_prob=0.3)
    skipping = build_transformer_model(config, remove_padding=True)
    padded = build_transformer_model(config, remove_padding=False)
    padded.set_weights(skipping.get_weights())
    row = kernels.explain(skipping, print_report=False).rows[0]
    assert row.inference[1].name == "pallas_tokens" and not row.inference[1].gathered
    ids = np.zeros((3, 16), "int32")
    for b, n in enumerate((16, 9, 3)):
        ids[b, :n] = rng.integers(1, 30, size=n)
    real = ids != 0
    a = skipping.predict([ids, np.zeros_like(ids), packing_positions(ids)], verbose=0)
    b = padded.predict([ids, np.zeros_like(ids)], verbose=0)
    np.testing.assert_allclose(a[real], b[real], rtol=1e-5, atol=1e-5)


def test_saved_model_without_padding_reloads(tmp_path):
    skipping, _ = _pair(with_pool=True)
    path = str(tmp_path / "m.keras")
    skipping.save(path)
    loaded = keras.saving.load_model(path)
    assert "Remove-Padding" in {layer.name for layer in loaded.layers}
    np.testing.assert_allclose(loaded.predict(_inputs(loaded, IDS, SEGMENTS), verbose=0),
                               skipping.predict(_inputs(skipping, IDS, SEGMENTS), verbose=0), rtol=1e-6, atol=1e-6)


def test_model_without_padding_after_int8_quantization():
    skipping, padded = _pair(with_pool=True)
    for m in (skipping, padded):
        m.quantize("int8")
    np.testing.assert_allclose(skipping.predict(_inputs(skipping, IDS[:3], SEGMENTS[:3]), verbose=0),
                               padded.predict([IDS[:3], SEGMENTS[:3]], verbose=0), rtol=1e-5, atol=1e-5)


def test_theseus_asks_for_models_with_padding():
    from bert4x.techniques import theseus_encoder

    predecessor = build_transformer_model(TINY, with_pool=True, remove_padding=True, name="p")
    successor = build_transformer_model(dict(TINY, num_hidden_layers=1), remove_padding=False, name="s")
    with pytest.raises(ValueError, match="remove_padding=False"):
        theseus_encoder(predecessor, successor)


def test_prompt_tuning_keeps_padding_removal():
    from bert4x.techniques import prompt_tuning_model

    model = build_transformer_model(TINY, with_pool=True)
    tuned = prompt_tuning_model(model, [1, 2, 3])
    assert ({layer.name for layer in tuned.layers} >= {"Remove-Padding"}) == SKIPS_BY_DEFAULT
    np.testing.assert_allclose(tuned.predict([IDS, SEGMENTS], verbose=0), model.predict([IDS, SEGMENTS], verbose=0),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(in_subprocess or keras.backend.backend() == "jax", reason="runs from the top-level process only")
def test_remove_padding_on_jax_backend():
    run_pytest_on_backend("jax", "tests/test_remove_padding.py")
