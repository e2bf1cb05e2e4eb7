"""bert4keras's `attention_key_size`: queries and keys of `heads * key_size` units, values of `heads * head_size`, the
scores scaled by 1/sqrt(key_size) (RoFormer: RoPE over the key size). Checked against a numpy forward written from
that definition, through the attention seam's refusals, `.keras` save/load and checkpoint round trips."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from harness import check_model
from helpers import in_subprocess, run_pytest_on_backend

from bert4x import kernels
from bert4x.checkpoints import open_checkpoint, write_google_checkpoint
from bert4x.layers import MultiHeadAttention
from bert4x.models import CheckpointError, build_transformer_model

VOCAB, D, HEADS, KEY, FF, LAYERS = 37, 12, 3, 2, 20, 2  # head size 4, key size 2
HEAD = D // HEADS
CONFIG = dict(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
              intermediate_size=FF, hidden_act="gelu", type_vocab_size=2, max_position_embeddings=16,
              attention_key_size=KEY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


# ---------------------------------------------------------------------------------------------- the reference
def layer_norm(x, g, b, eps=1e-12):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * g + b


def gelu(x):
    from scipy.special import erf

    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def rope(x):
    """Interleaved RoPE on `[len, heads, d]`: pair (2i, 2i+1) at position p turned by p * 10000^(-2i/d)."""
    out = np.empty_like(x)
    d = x.shape[-1]
    for p in range(x.shape[0]):
        for i in range(d // 2):
            a = p * 10000 ** (-2 * i / d)
            even, odd = x[p, :, 2 * i], x[p, :, 2 * i + 1]
            out[p, :, 2 * i] = even * np.cos(a) - odd * np.sin(a)
            out[p, :, 2 * i + 1] = odd * np.cos(a) + even * np.sin(a)
    return out


def forward(w: dict, ids: np.ndarray, seg: np.ndarray, rotary: bool = False) -> np.ndarray:
    """BERT's sequence output (RoFormer's with `rotary`: no position table, RoPE on q and k), one row at a time, with
    q and k heads KEY wide and v heads HEAD wide, and the scores scaled by 1/sqrt(KEY)."""
    out = np.zeros(ids.shape + (D,))
    for b in range(ids.shape[0]):
        x = w["bert/embeddings/word_embeddings"][ids[b]] + w["bert/embeddings/token_type_embeddings"][seg[b]]
        if not rotary:
            x = x + w["bert/embeddings/position_embeddings"][: ids.shape[1]]
        x = layer_norm(x, w["bert/embeddings/LayerNorm/gamma"], w["bert/embeddings/LayerNorm/beta"])
        visible = ids[b] != 0
        for n in range(LAYERS):
            p = f"bert/encoder/layer_{n}/"

            def dense(h, name, p=p):
                return h @ w[p + name + "/kernel"] + w[p + name + "/bias"]

            q = dense(x, "attention/self/query").reshape(-1, HEADS, KEY)
            k = dense(x, "attention/self/key").reshape(-1, HEADS, KEY)
            v = dense(x, "attention/self/value").reshape(-1, HEADS, HEAD)
            if rotary:
                q, k = rope(q), rope(k)
            heads = []
            for h in range(HEADS):
                scores = q[:, h] @ k[:, h].T / np.sqrt(KEY)
                scores = np.where(visible[None, :], scores, -np.inf)
                probs = np.exp(scores - scores.max(-1, keepdims=True))
                probs /= probs.sum(-1, keepdims=True)
                heads.append(probs @ v[:, h])
            attended = dense(np.concatenate(heads, axis=-1), "attention/output/dense")
            x = layer_norm(x + attended, w[p + "attention/output/LayerNorm/gamma"],
                           w[p + "attention/output/LayerNorm/beta"])
            ffn = dense(gelu(dense(x, "intermediate/dense")), "output/dense")
            x = layer_norm(x + ffn, w[p + "output/LayerNorm/gamma"], w[p + "output/LayerNorm/beta"])
        out[b] = x
    return out


def google_weights(rng, key: int = KEY, positions: bool = True) -> dict:
    w = {"bert/embeddings/word_embeddings": rng.normal(0, 0.5, (VOCAB, D)),
         "bert/embeddings/token_type_embeddings": rng.normal(0, 0.5, (2, D)),
         "bert/embeddings/LayerNorm/gamma": 1 + rng.normal(0, 0.2, D),
         "bert/embeddings/LayerNorm/beta": rng.normal(0, 0.2, D)}
    if positions:
        w["bert/embeddings/position_embeddings"] = rng.normal(0, 0.5, (16, D))
    for n in range(LAYERS):
        p = f"bert/encoder/layer_{n}/"
        for name, shape in (("attention/self/query", (D, HEADS * key)), ("attention/self/key", (D, HEADS * key)),
                            ("attention/self/value", (D, D)), ("attention/output/dense", (D, D)),
                            ("intermediate/dense", (D, FF)), ("output/dense", (FF, D))):
            w[p + name + "/kernel"] = rng.normal(0, 0.4, shape)
            w[p + name + "/bias"] = rng.normal(0, 0.1, shape[1])
        for name in ("attention/output/LayerNorm", "output/LayerNorm"):
            w[p + name + "/gamma"] = 1 + rng.normal(0, 0.2, D)
            w[p + name + "/beta"] = rng.normal(0, 0.2, D)
    return {k: np.asarray(v, np.float32) for k, v in w.items()}


def inputs():
    ids = np.random.default_rng(0).integers(1, VOCAB, size=(3, 7)).astype("int32")
    ids[1, 5:] = 0
    ids[2, 2:] = 0
    seg = np.zeros_like(ids)
    seg[:, 3:] = 1
    seg[ids == 0] = 0
    return ids, seg


def run(model, x):
    return np.asarray(keras.ops.convert_to_numpy(model(x, training=False)))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("key_size")
    out = {}
    for model in ("bert", "roformer"):
        w = google_weights(np.random.default_rng(3), positions=model == "bert")
        (tmp / model).mkdir()
        prefix = write_google_checkpoint(w, str(tmp / model / "model.ckpt"))
        (tmp / model / "bert_config.json").write_text(json.dumps(CONFIG))
        out[model] = (w, tmp / model / "bert_config.json", prefix)
    return out


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("model", ["bert", "roformer"])
def test_key_size_equals_numpy_forward_of_the_definition(release, model):
    w, config, prefix = release[model]
    ids, seg = inputs()
    expected = forward({k: v.astype(np.float64) for k, v in w.items()}, ids, seg, rotary=model == "roformer")
    t = build_transformer_model(str(config), prefix, model=model, return_keras_model=False)
    attention = t.model.get_layer("Transformer-0-MultiHeadSelfAttention")
    assert (attention.key_size, attention.head_size) == (KEY, HEAD)
    assert tuple(attention.qkv_dense.kernel.shape) == (D, 2 * HEADS * KEY + D)
    real = ids != 0
    np.testing.assert_allclose(run(t.model, [ids, seg])[real], expected[real], atol=1e-4, rtol=1e-4)


def test_the_attention_seam_refuses_unequal_head_sizes_where_it_must(release):
    _, config, prefix = release["bert"]
    model = build_transformer_model(str(config), prefix)
    explanation = kernels.explain(model, sequence_length=8, batch_size=2, print_report=False)
    text = str(explanation)
    assert len(explanation.rows) == LAYERS
    for row in explanation.rows:
        for spec, choice in (row.training, row.inference):
            assert (spec.head_size, spec.value_head_size) == (KEY, HEAD)
            assert choice.name == "xla"
            reasons = dict(choice.refusals)
            assert "one head size for q, k and v" in reasons["dot_product_attention"]
    assert "dot_product_attention refused: takes one head size for q, k and v (q/k heads are 2 wide, v heads 4" \
        in text
    # On an NVIDIA GPU under jax, in half precision, the fused entries refuse for the head sizes and XLA runs it:
    # the Pallas kernels in training with dropout, cuDNN and keras.ops.dot_product_attention at inference.
    spec = kernels.AttentionSpec(backend="jax", platform="gpu", dtype="bfloat16", batch=2, q_len=128, k_len=128,
                                 heads=2, head_size=32, value_head_size=64, mask="keys", dropout_rate=0.1,
                                 training=True, packed_qkv=False)
    inference = spec.__class__(**{**spec.__dict__, "training": False})
    for case, names in ((spec, ("pallas", "recompute")), (inference, ("cudnn", "dot_product_attention"))):
        choice = kernels.choose(case)
        assert choice.name == "xla"
        for name in names:
            reason = dict(choice.refusals)[name]
            assert "one head size for q, k and v (q/k heads are 32 wide, v heads 64" in reason, (name, reason)
    tokens = kernels.choose(spec.__class__(**{**spec.__dict__, "layout": "tokens"}))
    assert "one head size for q, k and v" in dict(tokens.refusals)["pallas_tokens"]
    equal = kernels.choose(spec.__class__(**{**spec.__dict__, "head_size": 64, "value_head_size": None}))
    assert equal.name == "pallas"


def test_the_layer_keeps_key_size_in_its_config_and_refuses_a_cache():
    layer = MultiHeadAttention(heads=2, head_size=4, key_size=6, name="mha")
    x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype("float32")
    y = keras.ops.convert_to_numpy(layer(x))
    config = layer.get_config()
    assert config["key_size"] == 6
    again = MultiHeadAttention.from_config(config)
    again(x)
    again.set_weights(layer.get_weights())
    np.testing.assert_allclose(keras.ops.convert_to_numpy(again(x)), y, atol=1e-6)
    # A config without key_size (saved before the option existed) keeps one head size.
    old = {k: v for k, v in MultiHeadAttention(heads=2, head_size=4).get_config().items() if k != "key_size"}
    assert MultiHeadAttention.from_config(old).key_size == 4
    with pytest.raises(ValueError, match="a cache stacks keys and values .* key_size \\(6\\) equal to head_size"):
        layer(x, cache=np.zeros((2, 2, 5, 2, 4), "float32"), cache_update_index=0)
    with pytest.raises(ValueError, match="key_size must be a positive integer"):
        MultiHeadAttention(heads=2, head_size=4, key_size=0)


@pytest.mark.parametrize("model", ["bert", "roformer"])
def test_keras_save_and_load_round_trip(release, tmp_path, model):
    _, config, prefix = release[model]
    ids, seg = inputs()
    built = build_transformer_model(str(config), prefix, model=model)
    built.save(str(tmp_path / "m.keras"))
    loaded = keras.saving.load_model(str(tmp_path / "m.keras"))
    assert loaded.get_layer("Transformer-1-MultiHeadSelfAttention").key_size == KEY
    np.testing.assert_allclose(run(loaded, [ids, seg]), run(built, [ids, seg]), atol=1e-6)


@pytest.mark.parametrize("model", ["bert", "roformer"])
def test_checkpoint_round_trips_keep_the_key_size(release, tmp_path, model):
    w, config, prefix = release[model]
    ids, seg = inputs()
    t = build_transformer_model(str(config), prefix, model=model, return_keras_model=False)
    expected = run(t.model, [ids, seg])
    formats = [("google", "bert_config.json")] + ([("huggingface", "config.json")] if model == "bert" else [])
    for fmt, config_name in formats:
        path = t.save_weights_as_checkpoint(str(tmp_path / fmt / ("model.ckpt" if fmt == "google" else "")), fmt)
        saved = json.loads((tmp_path / fmt / config_name).read_text())
        assert saved["attention_key_size"] == KEY
        reader = open_checkpoint(path)
        if fmt == "google":  # the release's names and shapes, value for value
            for name, value in w.items():
                np.testing.assert_array_equal(reader.get(name), value)
        else:  # PyTorch Linear layout [out, in]
            assert reader.shape("bert.encoder.layer.0.attention.self.key.weight") == (HEADS * KEY, D)
            assert reader.shape("bert.encoder.layer.0.attention.self.value.weight") == (D, D)
        again = build_transformer_model(str(tmp_path / fmt / config_name), path, model=model)
        np.testing.assert_array_equal(run(again, [ids, seg]), expected)


def test_roformer_v2_takes_a_key_size_and_round_trips(tmp_path):
    cfg = dict(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
               hidden_act=["silu", "linear"], attention_key_size=6)
    t = build_transformer_model(dict(cfg), model="roformer_v2", with_mlm="linear", return_keras_model=False)
    ids = np.array([[3, 4, 5, 6, 0]], "int32")
    expected = run(t.model, [ids, 0 * ids])
    path = t.save_weights_as_checkpoint(str(tmp_path / "model.ckpt"))
    reader = open_checkpoint(path)
    assert reader.shape("bert/encoder/layer_0/attention/self/query/kernel") == (8, 12)
    assert reader.shape("bert/encoder/layer_0/attention/self/value/kernel") == (8, 8)
    again = build_transformer_model(str(tmp_path / "bert_config.json"), path, model="roformer_v2", with_mlm="linear")
    np.testing.assert_array_equal(run(again, [ids, 0 * ids]), expected)


def test_the_converter_keeps_the_key_size_widths(release, tmp_path):
    from weights_converters.convert import convert

    w, config, prefix = release["bert"]
    ids, seg = inputs()
    expected = run(build_transformer_model(str(config), prefix), [ids, seg])
    folder = convert("bert", str(config), prefix, str(tmp_path / "hf"), "huggingface")
    reader = open_checkpoint(folder)
    np.testing.assert_array_equal(reader.get("bert.encoder.layer.1.attention.self.key.weight"),
                                  w["bert/encoder/layer_1/attention/self/key/kernel"].T)
    back = convert("bert", str(tmp_path / "hf" / "config.json"), folder, str(tmp_path / "google" / "model.ckpt"),
                   "google")
    np.testing.assert_array_equal(run(build_transformer_model(str(config), back), [ids, seg]), expected)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(dict(CONFIG, attention_key_size=HEAD)))
    with pytest.raises(CheckpointError, match=r"query/kernel: checkpoint \(12, 6\), config implies \(12, 12\)"):
        convert("bert", str(wrong), prefix, str(tmp_path / "bad"), "google")


def test_a_config_and_checkpoint_key_size_mismatch_names_the_variable_and_both_shapes(release):
    _, config, prefix = release["bert"]
    cfg = json.loads(config.read_text())
    with pytest.raises(CheckpointError, match=r"Transformer-0-MultiHeadSelfAttention/qkv/kernel <- "
                                              r"bert/encoder/layer_0/attention/self/query/kernel \(12, 6\), "
                                              r"the model's part is \(12, 9\)"):
        build_transformer_model(dict(cfg, attention_key_size=3), prefix)
    with pytest.raises(CheckpointError, match=r"attention/self/query/kernel \(12, 6\), the model's part is \(12, 12\)"):
        build_transformer_model({k: v for k, v in cfg.items() if k != "attention_key_size"}, prefix)


def test_options_that_do_not_combine_with_a_key_size_raise():
    cfg = dict(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    for model in ("nezha", "electra", "albert", "gpt"):
        with pytest.raises(ValueError, match=f"attention_key_size=2 .* not implemented for {model.upper()[:4]}"):
            build_transformer_model(dict(cfg), model=model, attention_key_size=2)
    with pytest.raises(ValueError, match="RoPE needs an even head size of the queries and keys, got 3"):
        build_transformer_model(dict(cfg), model="roformer", attention_key_size=3)
    with pytest.raises(ValueError, match="attention_key_size must be a positive integer"):
        build_transformer_model(dict(cfg), attention_key_size=-1)
    lm = build_transformer_model(dict(cfg), application="lm", attention_key_size=2, return_keras_model=False)
    assert "attention_key_size differs from the head size" in lm.decoding_unsupported()


def test_a_key_size_model_passes_the_harness(tmp_path):
    cfg = dict(vocab_size=30, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
               max_position=16, attention_key_size=2)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 30, size=(2, 6)).astype("int32")
    ids[1, 4:] = 0
    check_model(lambda: build_transformer_model(dict(cfg), model="roformer", with_pool=True),
                [ids, (ids > 15).astype("int32")], np.zeros((2, 8), "float32"), tmp_path, policies=("float32",))


@pytest.mark.skipif(in_subprocess, reason="this test launches the jax run itself")
def test_key_size_on_jax_backend():
    run_pytest_on_backend("jax", "tests/test_attention_key_size.py", "-k", "numpy or seam or layer_keeps")
