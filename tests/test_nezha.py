"""NEZHA (`model='nezha'`) against a numpy forward written from its definition (BERT without the absolute position
table; sinusoidal relative positions of the clipped distance j - i added to keys in the scores and to values in the
output), from Huawei's Google names and from `nezha.`-prefixed Hugging Face names; round trips; the model harness."""

from __future__ import annotations

import json
import math

import keras
import numpy as np
import pytest
from harness import check_model

from bert4x.checkpoints import write_google_checkpoint, write_safetensors
from bert4x.layers import RelativePositionEmbedding
from bert4x.models import CheckpointError, build_transformer_model

VOCAB, D, HEADS, FF, LAYERS, CLIP = 61, 16, 4, 24, 2, 3
CONFIG = dict(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
              intermediate_size=FF, hidden_act="gelu", type_vocab_size=2, max_position_embeddings=64,
              max_relative_position=CLIP, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


# ---------------------------------------------------------------------------------------------- the reference
def sinusoid(r: np.ndarray, d: int) -> np.ndarray:
    """PE(r)[2k] = sin(r / 10000^(2k/d)), PE(r)[2k+1] = cos(r / 10000^(2k/d)), elementwise in a Python loop."""
    out = np.zeros(r.shape + (d,))
    for idx in np.ndindex(r.shape):
        for k in range(d // 2):
            theta = r[idx] / 10000 ** (2 * k / d)
            out[idx + (2 * k,)] = math.sin(theta)
            out[idx + (2 * k + 1,)] = math.cos(theta)
    return out


def relative_table(q_len: int, k_len: int, d: int, clip: int) -> np.ndarray:
    r = np.array([[min(max(j - i, -clip), clip) + clip for j in range(k_len)] for i in range(q_len)], float)
    return sinusoid(r, d)


def layer_norm(x, g, b, eps=1e-12):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def gelu(x):
    from scipy.special import erf

    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def nezha_numpy(w: dict, ids: np.ndarray, seg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sequence output and MLM logits from Huawei-named (Google layout) float64 weights."""
    x = w["bert/embeddings/word_embeddings"][ids] + w["bert/embeddings/token_type_embeddings"][seg]
    x = layer_norm(x, w["bert/embeddings/LayerNorm/gamma"], w["bert/embeddings/LayerNorm/beta"])
    batch, length = ids.shape
    hd = D // HEADS
    a = relative_table(length, length, hd, CLIP)  # [i, j, hd]
    keep = ids != 0  # padding keys hidden
    for n in range(LAYERS):
        p = f"bert/encoder/layer_{n}/"

        def dense(t, name, p=p):
            return t @ w[p + name + "/kernel"] + w[p + name + "/bias"]

        q, k, v = (dense(x, f"attention/self/{m}").reshape(batch, length, HEADS, hd) for m in ("query", "key",
                                                                                                  "value"))
        scores = np.einsum("bihd,bjhd->bhij", q, k) + np.einsum("bihd,ijd->bhij", q, a)
        scores = scores / np.sqrt(hd)
        scores = np.where(keep[:, None, None, :], scores, -1e30)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs = probs / probs.sum(-1, keepdims=True)
        ctx = np.einsum("bhij,bjhd->bihd", probs, v) + np.einsum("bhij,ijd->bihd", probs, a)
        y = dense(ctx.reshape(batch, length, D), "attention/output/dense")
        x = layer_norm(x + y, w[p + "attention/output/LayerNorm/gamma"], w[p + "attention/output/LayerNorm/beta"])
        y = dense(gelu(dense(x, "intermediate/dense")), "output/dense")
        x = layer_norm(x + y, w[p + "output/LayerNorm/gamma"], w[p + "output/LayerNorm/beta"])
    h = gelu(x @ w["cls/predictions/transform/dense/kernel"] + w["cls/predictions/transform/dense/bias"])
    h = layer_norm(h, w["cls/predictions/transform/LayerNorm/gamma"], w["cls/predictions/transform/LayerNorm/beta"])
    logits = h @ w["bert/embeddings/word_embeddings"].T + w["cls/predictions/output_bias"]
    return x, logits


# ---------------------------------------------------------------------------------------------- checkpoints
def google_weights(rng) -> dict:
    w = {"bert/embeddings/word_embeddings": rng.normal(0, 0.5, (VOCAB, D)),
         "bert/embeddings/token_type_embeddings": rng.normal(0, 0.5, (2, D)),
         "bert/embeddings/LayerNorm/gamma": 1 + rng.normal(0, 0.2, D),
         "bert/embeddings/LayerNorm/beta": rng.normal(0, 0.2, D),
         "cls/predictions/transform/dense/kernel": rng.normal(0, 0.3, (D, D)),
         "cls/predictions/transform/dense/bias": rng.normal(0, 0.1, D),
         "cls/predictions/transform/LayerNorm/gamma": 1 + rng.normal(0, 0.2, D),
         "cls/predictions/transform/LayerNorm/beta": rng.normal(0, 0.2, D),
         "cls/predictions/output_bias": rng.normal(0, 0.1, VOCAB)}
    for n in range(LAYERS):
        p = f"bert/encoder/layer_{n}/"
        for name, shape in (("attention/self/query", (D, D)), ("attention/self/key", (D, D)),
                            ("attention/self/value", (D, D)), ("attention/output/dense", (D, D)),
                            ("intermediate/dense", (D, FF)), ("output/dense", (FF, D))):
            w[p + name + "/kernel"] = rng.normal(0, 0.3, shape)
            w[p + name + "/bias"] = rng.normal(0, 0.1, shape[1])
        for name in ("attention/output/LayerNorm", "output/LayerNorm"):
            w[p + name + "/gamma"] = 1 + rng.normal(0, 0.2, D)
            w[p + name + "/beta"] = rng.normal(0, 0.2, D)
    return {k: np.asarray(v, np.float32) for k, v in w.items()}


def hf_name(name: str) -> tuple[str, bool]:
    """The `nezha.`-prefixed PyTorch name of a Huawei (Google) variable, and whether it is transposed."""
    if name == "cls/predictions/output_bias":
        return "cls.predictions.bias", False
    name = name.replace("bert/", "nezha/", 1)
    parts = [f"layer.{s[6:]}" if s.startswith("layer_") else s for s in name.split("/")]
    leaf = parts[-1]
    transpose = leaf == "kernel"
    parts[-1] = {"kernel": "weight", "gamma": "weight", "beta": "bias"}.get(leaf, leaf)
    if parts[-1].endswith("_embeddings"):
        parts.append("weight")
    return ".".join(parts), transpose


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    w = google_weights(np.random.default_rng(5))
    tmp = tmp_path_factory.mktemp("nezha")
    (tmp / "google").mkdir()
    prefix = write_google_checkpoint(dict(w, global_step=np.array(3, np.int64)), str(tmp / "google" / "model.ckpt"))
    (tmp / "google" / "bert_config.json").write_text(json.dumps(CONFIG))
    hf = {}
    for name, value in w.items():
        new, transpose = hf_name(name)
        hf[new] = np.ascontiguousarray(value.T if transpose else value)
    for n in range(LAYERS):  # the fixed table as older transformers versions stored it (a buffer): not loaded
        hf[f"nezha.encoder.layer.{n}.attention.self.relative_positions_encoding.positions_encoding"] = \
            relative_table(16, 16, D // HEADS, CLIP).astype(np.float32)
    (tmp / "hf").mkdir()
    write_safetensors(hf, str(tmp / "hf"))
    (tmp / "hf" / "config.json").write_text(json.dumps(dict(CONFIG, model_type="nezha")))
    ids = np.random.default_rng(0).integers(1, VOCAB, size=(3, 9)).astype("int32")
    ids[1, 6:] = 0
    ids[2, 3:] = 0
    seg = np.zeros_like(ids)
    seg[:, 4:] = 1
    seg[ids == 0] = 0
    return w, tmp, prefix, (ids, seg)


def run(model, inputs):
    out = model(inputs, training=False)
    if isinstance(out, (list, tuple)):
        return [np.asarray(keras.ops.convert_to_numpy(o)) for o in out]
    return np.asarray(keras.ops.convert_to_numpy(out))


def test_relative_position_embedding_follows_the_definition():
    layer = RelativePositionEmbedding(output_dim=6, max_relative_position=2)
    out = keras.ops.convert_to_numpy(layer(np.zeros((1, 4, 3), "float32"), key=np.zeros((1, 7, 3), "float32")))
    np.testing.assert_allclose(out, relative_table(4, 7, 6, 2), atol=1e-6)
    # bert4keras's / Huawei's clip of 64: distance 100 reads the row of 64.
    big = keras.ops.convert_to_numpy(RelativePositionEmbedding(output_dim=4)(np.zeros((1, 101, 1), "float32")))
    np.testing.assert_allclose(big[0, 100], sinusoid(np.array(128.0), 4), atol=1e-5)
    np.testing.assert_allclose(big[100, 0], sinusoid(np.array(0.0), 4), atol=1e-6)
    with pytest.raises(ValueError, match="output_dim must be a positive even integer"):
        RelativePositionEmbedding(output_dim=5)


@pytest.mark.parametrize("fmt", ["google", "huggingface"])
def test_nezha_equals_numpy_forward_of_the_definition(release, fmt):
    w, tmp, prefix, (ids, seg) = release
    config, ckpt = (tmp / "google" / "bert_config.json", prefix) if fmt == "google" else (tmp / "hf" / "config.json",
                                                                                           tmp / "hf")
    expected_seq, expected_mlm = nezha_numpy({k: v.astype(np.float64) for k, v in w.items()}, ids, seg)
    real = ids != 0
    seq = build_transformer_model(str(config), str(ckpt), model="nezha")
    np.testing.assert_allclose(run(seq, [ids, seg])[real], expected_seq[real], atol=1e-4, rtol=1e-4)
    mlm = build_transformer_model(str(config), str(ckpt), model="nezha", with_mlm="linear")
    np.testing.assert_allclose(run(mlm, [ids, seg])[real], expected_mlm[real], atol=1e-4, rtol=1e-4)
    assert not any(w.path.startswith("Embedding-Position") for w in seq.weights)


def test_nezha_round_trips_in_both_formats(release, tmp_path):
    _, tmp, prefix, (ids, seg) = release
    t = build_transformer_model(str(tmp / "google" / "bert_config.json"), prefix, model="nezha", with_mlm="linear",
                                return_keras_model=False)
    expected = run(t.model, [ids, seg])
    for fmt, config_name in (("google", "bert_config.json"), ("huggingface", "config.json")):
        path = t.save_weights_as_checkpoint(str(tmp_path / fmt / ("model.ckpt" if fmt == "google" else "")), fmt)
        saved = json.loads((tmp_path / fmt / config_name).read_text())
        assert saved["max_relative_position"] == CLIP
        again = build_transformer_model(str(tmp_path / fmt / config_name), path, model="nezha", with_mlm="linear")
        np.testing.assert_array_equal(run(again, [ids, seg]), expected)


def test_nezha_refuses_what_it_cannot_do(release):
    _, tmp, prefix, _ = release
    cfg = dict(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    with pytest.raises(ValueError, match="not supported by NEZHA"):
        build_transformer_model(dict(cfg), model="nezha", remove_padding=True)
    with pytest.raises(ValueError, match="no learned position table"):
        build_transformer_model(dict(cfg), model="nezha", hierarchical_position=True)
    (tmp / "no_relative.json").write_text(json.dumps(dict(CONFIG, use_relative_position=False)))
    with pytest.raises(ValueError, match="use_relative_position=false"):
        build_transformer_model(str(tmp / "no_relative.json"), model="nezha")
    lm = build_transformer_model(dict(cfg), model="nezha", application="lm", return_keras_model=False)
    assert lm.decoding_unsupported() is None  # test_zoo_decoding.py checks its cached output
    # A BERT checkpoint (with its position table) is no NEZHA checkpoint: the strict load names the extra variable.
    with pytest.raises(Exception, match="position_embeddings"):
        bert_like = dict(google_weights(np.random.default_rng(1)),
                         **{"bert/embeddings/position_embeddings": np.zeros((64, D), np.float32)})
        folder = tmp / "bert_like"
        folder.mkdir(exist_ok=True)
        build_transformer_model(str(tmp / "google" / "bert_config.json"),
                                write_google_checkpoint(bert_like, str(folder / "model.ckpt")), model="nezha")


def test_nezha_passes_the_harness(tmp_path):
    cfg = dict(vocab_size=40, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
               max_relative_position=3)

    def make():
        return build_transformer_model(dict(cfg), model="nezha", with_pool=True)

    rng = np.random.default_rng(0)
    ids = rng.integers(1, 40, size=(2, 6)).astype("int32")
    ids[1, 4:] = 0
    check_model(make, [ids, (ids > 20).astype("int32")], np.zeros((2, 8), "float32"), tmp_path,
                policies=("float32",))


def test_nezha_pruned_last_layer_reads_the_relative_terms_of_cls():
    # [CLS]-only outputs compute the last layer at [CLS] alone: its relative terms are the first query row's.
    cfg = dict(vocab_size=40, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
               max_relative_position=2)
    pruned = build_transformer_model(dict(cfg), model="nezha", with_pool=True)
    full = build_transformer_model(dict(cfg), model="nezha", with_pool=True, prune_last_layer=False)
    full.set_weights(pruned.get_weights())
    ids = np.random.default_rng(3).integers(1, 40, size=(2, 7)).astype("int32")
    ids[1, 5:] = 0
    np.testing.assert_allclose(run(pruned, [ids, np.zeros_like(ids)]), run(full, [ids, np.zeros_like(ids)]),
                               atol=1e-5)


def test_a_nezha_release_given_to_model_bert_names_nezha(release, tmp_path):
    _, tmp, prefix, _ = release
    bert_config = {k: v for k, v in CONFIG.items() if k != "max_relative_position"}
    with pytest.raises(CheckpointError, match="looks like a NEZHA checkpoint; use model='nezha'") as caught:
        build_transformer_model(dict(bert_config), prefix, model="bert")
    assert "bert/embeddings/position_embeddings" in str(caught.value)
    # Huawei's config names NEZHA before any checkpoint is read.
    with pytest.raises(ValueError, match="max_relative_position: this looks like a NEZHA config.*model='nezha'"):
        build_transformer_model(str(tmp / "google" / "bert_config.json"), prefix, model="bert")
    # A BERT checkpoint that lacks a variable is no NEZHA one, with or without its position table.
    bert_weights = dict(google_weights(np.random.default_rng(1)),
                        **{"bert/embeddings/position_embeddings": np.zeros((64, D), np.float32)})
    del bert_weights["bert/encoder/layer_1/attention/self/key/bias"]
    for name, weights in (("one_missing", bert_weights),
                          ("two_missing", {k: v for k, v in bert_weights.items() if "position" not in k})):
        ckpt = write_google_checkpoint(weights, str(tmp_path / name / "model.ckpt"))
        with pytest.raises(CheckpointError, match="layer_1/attention/self/key/bias") as caught:
            build_transformer_model(dict(bert_config), ckpt, model="bert")
        assert "NEZHA" not in str(caught.value)
    from bert4x.models.families import family_hint

    names = list(google_weights(np.random.default_rng(1)))
    assert family_hint(names, ["roformer"]) == ""  # RoFormer's Google checkpoints have no position table either
    assert family_hint(names, ["nezha"]) == ""
    assert "use model='nezha'" in family_hint(names, ["bert", "roberta"])
