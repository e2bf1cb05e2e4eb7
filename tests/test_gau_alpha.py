"""GAU-α (`model='gau_alpha'`) and its `GatedAttentionUnit` against a numpy forward written from the GAU paper (Hua et
al. 2022) and the GAU-α release description (RoFormerV2's embeddings, weightless RMS norms after each residual, RoPE,
single-head gated attention with 'softmax_plus' scores, tied MLM head); the release's checkpoint names, strict
loading and round trips; the model harness."""

from __future__ import annotations

import json
import math

import keras
import numpy as np
import pytest
from harness import check_model
from helpers import in_subprocess, run_pytest_on_backend

from bert4x.checkpoints import open_checkpoint, write_google_checkpoint
from bert4x.layers import GatedAttentionUnit
from bert4x.models import CheckpointError, build_transformer_model

VOCAB, D, UNITS, KEY, LAYERS = 71, 16, 24, 8, 2
CONFIG = dict(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS, intermediate_size=UNITS,
              attention_key_size=KEY, hidden_act="swish", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
              max_position_embeddings=64, type_vocab_size=2, embedding_size=D)


# ---------------------------------------------------------------------------------------------- the reference
def rms_norm(x, eps=1e-12):
    """x / sqrt(mean(x²) + eps): no centring, no weights."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def swish(x):
    return x / (1.0 + np.exp(-x))


def rope(x):
    """Rotates pair (2i, 2i+1) of the last axis of `[batch, len, d]` at position m by m·10000^(-2i/d), in loops."""
    out = np.empty_like(x)
    d = x.shape[-1]
    for m in range(x.shape[1]):
        for i in range(d // 2):
            angle = m * 10000.0 ** (-2 * i / d)
            c, s = math.cos(angle), math.sin(angle)
            a, b = x[:, m, 2 * i], x[:, m, 2 * i + 1]
            out[:, m, 2 * i], out[:, m, 2 * i + 1] = a * c - b * s, b * c + a * s
    return out


def normalise(scores, allowed, method, min_length):
    """The GAU score normalisations over the keys each query may see (`allowed`), n = how many it sees."""
    n = allowed.sum(-1, keepdims=True).astype(float)
    if method == "squared_relu":
        return np.where(allowed, np.maximum(scores, 0) ** 2, 0.0) / n
    if method == "softmax_plus":
        scores = scores * np.log(np.maximum(n, min_length)) / math.log(512)
    scores = np.where(allowed, scores, -np.inf)
    e = np.exp(scores - scores.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def gau_numpy(x, w, allowed, method="softmax_plus", min_length=16, rotary=True, scale=True):
    """One gated attention unit: u | v | z = act(x W_i + b_i); q, k = z·γ + β (RoPE'd); o = (u ⊙ A v) W_o + b_o."""
    h = swish(x @ w["i_kernel"] + w.get("i_bias", 0.0))
    u, v, z = h[..., :UNITS], h[..., UNITS:2 * UNITS], h[..., 2 * UNITS:]
    q, k = z * w["q_gamma"] + w.get("q_beta", 0.0), z * w["k_gamma"] + w.get("k_beta", 0.0)
    if rotary:
        q, k = rope(q), rope(k)
    scores = np.einsum("bid,bjd->bij", q, k) / (math.sqrt(KEY) if scale else 1.0)
    a = normalise(scores, allowed, method, min_length)
    return (u * np.einsum("bij,bjd->bid", a, v)) @ w["o_kernel"] + w.get("o_bias", 0.0)


def allowed_keys(ids, seg, application):
    """[batch, query, key] booleans: keys that are not padding, and causal ('lm') or UniLM's rule ('unilm')."""
    keys = (ids != 0)[:, None, :]
    length = ids.shape[1]
    if application == "lm":
        return keys & (np.arange(length)[None, :] <= np.arange(length)[:, None])[None]
    if application == "unilm":
        c = np.cumsum(seg, axis=1)
        return keys & (c[:, None, :] <= c[:, :, None])
    return np.broadcast_to(keys, (ids.shape[0], length, length))


def gau_alpha_numpy(w, ids, seg, application="encoder", min_length=16):
    """Sequence output and MLM logits from the release's variable names (float64)."""
    x = rms_norm(w["bert/embeddings/word_embeddings"][ids] + w["bert/embeddings/token_type_embeddings"][seg])
    allowed = allowed_keys(ids, seg, application)
    for n in range(LAYERS):
        p = f"GAU_alpha/encoder/layer_{n}/gau/"
        unit = {"i_kernel": w[p + "i_dense/kernel"], "o_kernel": w[p + "o_dense/kernel"],
                "q_gamma": w[p + "q_scaleoffset/gamma"], "k_gamma": w[p + "k_scaleoffset/gamma"]}
        x = rms_norm(x + gau_numpy(x, unit, allowed, "softmax_plus", min_length))
    return x, x @ w["bert/embeddings/word_embeddings"].T


# ---------------------------------------------------------------------------------------------- checkpoints
def release_weights(rng) -> dict:
    w = {"bert/embeddings/word_embeddings": rng.normal(0, 0.5, (VOCAB, D)),
         "bert/embeddings/token_type_embeddings": rng.normal(0, 0.5, (2, D))}
    for n in range(LAYERS):
        p = f"GAU_alpha/encoder/layer_{n}/gau/"
        w[p + "i_dense/kernel"] = rng.normal(0, 0.4, (D, 2 * UNITS + KEY))
        w[p + "o_dense/kernel"] = rng.normal(0, 0.3, (UNITS, D))
        w[p + "q_scaleoffset/gamma"] = 1 + rng.normal(0, 0.3, KEY)
        w[p + "k_scaleoffset/gamma"] = 1 + rng.normal(0, 0.3, KEY)
    return {k: np.asarray(v, np.float32) for k, v in w.items()}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    w = release_weights(np.random.default_rng(5))
    tmp = tmp_path_factory.mktemp("gau_alpha")
    prefix = write_google_checkpoint(dict(w, global_step=np.array(7, np.int64)), str(tmp / "bert_model.ckpt"))
    (tmp / "bert_config.json").write_text(json.dumps(CONFIG))
    rng = np.random.default_rng(0)
    ids = rng.integers(1, VOCAB, size=(3, 9)).astype("int32")
    ids[1, 6:] = 0
    ids[2, 3:] = 0
    seg = np.zeros_like(ids)
    seg[:, 4:] = 1
    seg[ids == 0] = 0
    return w, tmp, prefix, (ids, seg)


def run(model, inputs):
    return np.asarray(keras.ops.convert_to_numpy(model(inputs, training=False)))


def write_variant(tmp, name, weights):
    folder = tmp / name
    folder.mkdir(exist_ok=True)
    return write_google_checkpoint(weights, str(folder / "bert_model.ckpt"))


# ---------------------------------------------------------------------------------------------- the unit
@pytest.mark.parametrize("normalization,use_bias,min_length", [
    ("softmax_plus", False, 16), ("softmax_plus", False, 1), ("squared_relu", True, 16), ("softmax", True, 16),
])
def test_gated_attention_unit_follows_the_definition(normalization, use_bias, min_length):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 7, D)).astype("float32")
    ids = np.array([[3, 4, 5, 6, 7, 8, 9], [3, 4, 5, 6, 0, 0, 0]])
    unit = GatedAttentionUnit(UNITS, KEY, use_bias=use_bias, normalization=normalization,
                              softmax_plus_min_length=min_length)
    unit.build(x.shape)
    for weight in unit.weights:  # random values everywhere, so that every weight matters
        weight.assign(rng.normal(0, 0.4, weight.shape).astype("float32"))
    from bert4x.models.roformer import RotaryEmbedding

    rotary = RotaryEmbedding(KEY)(x)
    mask = (ids != 0)[:, None, None, :]
    out = keras.ops.convert_to_numpy(unit(x, attention_mask=mask, rotary=rotary))
    w = {"i_kernel": unit.i_dense.kernel, "o_kernel": unit.o_dense.kernel, "q_gamma": unit.q_gamma,
         "k_gamma": unit.k_gamma}
    if use_bias:
        w.update(i_bias=unit.i_dense.bias, o_bias=unit.o_dense.bias, q_beta=unit.q_beta, k_beta=unit.k_beta)
    w = {k: np.asarray(keras.ops.convert_to_numpy(v), np.float64) for k, v in w.items()}
    expected = gau_numpy(x.astype(np.float64), w, allowed_keys(ids, None, "encoder"), normalization, min_length)
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=1e-4)


def test_gated_attention_unit_refuses_bad_arguments():
    with pytest.raises(ValueError, match="normalization must be one of"):
        GatedAttentionUnit(8, 4, normalization="relu")
    with pytest.raises(ValueError, match="key_size must be a positive integer"):
        GatedAttentionUnit(8, 0)
    with pytest.raises(ValueError, match="softmax_plus_min_length must be an integer >= 1"):
        GatedAttentionUnit(8, 4, softmax_plus_min_length=0)


# ---------------------------------------------------------------------------------------------- the model
@pytest.mark.parametrize("application,min_length", [("encoder", 16), ("encoder", 1), ("lm", 16), ("unilm", 1)])
def test_gau_alpha_equals_numpy_forward_of_the_release(release, application, min_length):
    w, tmp, prefix, (ids, seg) = release
    expected_seq, expected_mlm = gau_alpha_numpy({k: v.astype(np.float64) for k, v in w.items()}, ids, seg,
                                                 application, min_length)
    real = ids != 0
    mlm = build_transformer_model(str(tmp / "bert_config.json"), prefix, model="gau_alpha", application=application,
                                  with_mlm="linear", softmax_plus_min_length=min_length)
    np.testing.assert_allclose(run(mlm, [ids, seg])[real], expected_mlm[real], atol=1e-4, rtol=1e-4)
    if application == "encoder":
        seq = build_transformer_model(str(tmp / "bert_config.json"), prefix, model="gau_alpha",
                                      softmax_plus_min_length=min_length)
        np.testing.assert_allclose(run(seq, [ids, seg])[real], expected_seq[real], atol=1e-4, rtol=1e-4)


def test_gau_alpha_round_trips_under_the_release_names(release, tmp_path):
    w, tmp, prefix, (ids, seg) = release
    t = build_transformer_model(str(tmp / "bert_config.json"), prefix, model="gau_alpha", with_mlm="linear",
                                return_keras_model=False)
    expected = run(t.model, [ids, seg])
    path = t.save_weights_as_checkpoint(str(tmp_path / "bert_model.ckpt"))
    assert set(open_checkpoint(path)) == set(w)  # exactly the release's variables, under its names
    saved = json.loads((tmp_path / "bert_config.json").read_text())
    assert saved["attention_key_size"] == KEY and saved["normalization"] == "softmax_plus"
    again = build_transformer_model(str(tmp_path / "bert_config.json"), path, model="gau_alpha", with_mlm="linear")
    np.testing.assert_array_equal(run(again, [ids, seg]), expected)


def test_gau_alpha_strict_load_names_missing_and_misnamed_variables(release):
    w, tmp, _, _ = release
    config = str(tmp / "bert_config.json")
    gamma = "GAU_alpha/encoder/layer_1/gau/q_scaleoffset/gamma"
    missing = {k: v for k, v in w.items() if k != gamma}
    with pytest.raises(CheckpointError, match=gamma):
        build_transformer_model(config, write_variant(tmp, "missing", missing), model="gau_alpha")
    misnamed = dict(missing, **{"GAU_alpha/encoder/layer_1/gau/q_scale/gamma": w[gamma]})
    with pytest.raises(CheckpointError, match="q_scale/gamma") as error:
        build_transformer_model(config, write_variant(tmp, "misnamed", misnamed), model="gau_alpha")
    assert gamma in str(error.value)
    # Given to RoFormerV2, the checkpoint is recognised as GAU-α's.
    with pytest.raises(CheckpointError, match="use model='gau_alpha'"):
        build_transformer_model(dict(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS,
                                     num_attention_heads=2, intermediate_size=UNITS),
                                str(tmp / "bert_model.ckpt"), model="roformer_v2")


def test_gau_alpha_refuses_what_it_does_not_implement(release):
    _, tmp, _, _ = release
    config = json.loads((tmp / "bert_config.json").read_text())
    with pytest.raises(ValueError, match="use_bias=True is not implemented"):
        build_transformer_model(dict(config, use_bias=True), model="gau_alpha")
    with pytest.raises(ValueError, match="attention_key_size must be a positive even integer"):
        build_transformer_model(dict(config, attention_key_size=7), model="gau_alpha")
    with pytest.raises(ValueError, match="not supported by GAU_alpha"):
        build_transformer_model(dict(config), model="gau_alpha", remove_padding=True)
    with pytest.raises(ValueError, match="no pooler"):
        build_transformer_model(dict(config), model="gau_alpha", with_pool=True)
    t = build_transformer_model(dict(config), model="gau_alpha", application="lm", return_keras_model=False)
    assert "no cached decoding" in t.decoding_unsupported()
    with pytest.raises(ValueError, match="Google \\(bert4keras\\) format only"):
        t.save_weights_as_checkpoint(str(tmp / "hf_out"), format="huggingface")


def test_explain_reports_the_units_normalised_scores(release):
    import bert4x

    _, tmp, _, _ = release
    model = build_transformer_model(str(tmp / "bert_config.json"), model="gau_alpha", application="lm")
    report = bert4x.kernels.explain(model, print_report=False)
    assert [row.layer for row in report.rows] == [f"Transformer-{i}-GatedAttentionUnit" for i in range(LAYERS)]
    assert {row.inference[1].name for row in report.rows} == {"normalized_scores"}
    assert all(row.inference[0].mask == "full" for row in report.rows)  # the causal mask of 'lm'


def test_gau_alpha_passes_the_harness(tmp_path):
    cfg = dict(vocab_size=40, hidden_size=8, num_hidden_layers=2, intermediate_size=12, attention_key_size=4,
               hidden_act="swish", attention_probs_dropout_prob=0.1)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 40, size=(2, 6)).astype("int32")
    ids[1, 4:] = 0
    segments = np.zeros_like(ids)
    segments[:, 3:] = 1
    targets = rng.dirichlet(np.ones(40), size=(2, 6)).astype("float32")
    check_model(lambda: build_transformer_model(dict(cfg), model="gau_alpha", application="unilm"),
                [ids, segments], targets, tmp_path, policies=("float32",))  # the layer harness runs bfloat16


@pytest.mark.skipif(in_subprocess, reason="this test launches the jax run itself")
def test_gau_alpha_on_jax_backend():
    run_pytest_on_backend("jax", "tests/test_gau_alpha.py", "-k", "definition or numpy or round_trip or strict")
