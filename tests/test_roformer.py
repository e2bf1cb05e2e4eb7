"""RoPE ops, RoFormer (== transformers' RoFormer on the same weights), RoFormerV2 (== an independent numpy forward),
checkpoint round trips, unsupported options, and the shared harness."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from harness import check_model
from helpers import in_subprocess, run_pytest_on_backend

from bert4x import backend
from bert4x.checkpoints import open_checkpoint, write_google_checkpoint
from bert4x.models import CheckpointError, build_transformer_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(
    vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
    max_position_embeddings=64, type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12,
)


def batch(length=11):
    rng = np.random.default_rng(1)
    token_ids = rng.integers(5, TINY["vocab_size"], size=(3, length))
    token_ids[1, 7:] = 0
    token_ids[2, 4:] = 0
    segment_ids = np.zeros_like(token_ids)
    segment_ids[:, 5:] = 1
    segment_ids[token_ids == 0] = 0
    return token_ids.astype("int32"), segment_ids.astype("int32")


# ------------------------------------------------------------------------------------------------ RoPE as an op
def test_rotary_matches_the_definition_and_is_relative():
    dim, rng = 8, np.random.default_rng(0)
    x = rng.normal(size=(dim,)).astype("float32")
    cos, sin = (np.asarray(t) for t in backend.rotary_cos_sin(np.array([3]), dim))
    rotated = np.asarray(backend.apply_rotary(x[None], cos, sin))[0]
    # The definition: pair (2i, 2i+1) rotated by 3·θ_i with θ_i = 10000^(-2i/d).
    expected = np.empty_like(x)
    for i in range(dim // 2):
        angle = 3 * 10000 ** (-2 * i / dim)
        c, s = np.cos(angle), np.sin(angle)
        expected[2 * i] = x[2 * i] * c - x[2 * i + 1] * s
        expected[2 * i + 1] = x[2 * i + 1] * c + x[2 * i] * s
    np.testing.assert_allclose(rotated, expected, atol=1e-6)
    # q_m · k_n depends on m - n only.
    q, k = rng.normal(size=(2, dim)).astype("float32")

    def score(m, n):
        cq, sq = backend.rotary_cos_sin(np.array([m]), dim)
        ck, sk = backend.rotary_cos_sin(np.array([n]), dim)
        return float(np.dot(np.asarray(backend.apply_rotary(q[None], cq, sq))[0],
                            np.asarray(backend.apply_rotary(k[None], ck, sk))[0]))

    assert score(7, 2) == pytest.approx(score(105, 100), abs=1e-4)
    assert score(7, 2) != pytest.approx(score(7, 3), abs=1e-3)


def test_rotary_2d_is_two_1d_rotations_on_the_halves():
    dim, rng = 16, np.random.default_rng(2)
    x = rng.normal(size=(1, 3, dim)).astype("float32")
    rows, cols = np.array([[0, 2, 5]]), np.array([[4, 1, 3]])
    cos, sin = backend.rotary_cos_sin_2d(rows, cols, dim)
    both = np.asarray(backend.apply_rotary(x, cos, sin))
    first = np.asarray(backend.apply_rotary(x[..., :8], *backend.rotary_cos_sin(rows, 8)))
    second = np.asarray(backend.apply_rotary(x[..., 8:], *backend.rotary_cos_sin(cols, 8)))
    np.testing.assert_allclose(both, np.concatenate([first, second], -1), atol=1e-6)
    # Scores depend on (Δx, Δy) only.
    q, k = rng.normal(size=(2, dim)).astype("float32")

    def score(p, r):
        (cq, sq), (ck, sk) = (backend.rotary_cos_sin_2d(np.array([a]), np.array([b]), dim) for a, b in (p, r))
        return float(np.dot(np.asarray(backend.apply_rotary(q[None], cq, sq))[0],
                            np.asarray(backend.apply_rotary(k[None], ck, sk))[0]))

    assert score((3, 4), (1, 1)) == pytest.approx(score((13, 9), (11, 6)), abs=1e-4)
    with pytest.raises(ValueError, match="multiple of 4"):
        backend.rotary_cos_sin_2d(rows, cols, 6)


# ------------------------------------------------------------------------------------------------ RoFormer v1
def make_hf_model(tmp_path, seed=0):
    torch.manual_seed(seed)
    config = transformers.RoFormerConfig(**TINY, embedding_size=TINY["hidden_size"], initializer_range=0.2)
    hf = transformers.RoFormerForMaskedLM(config).eval()
    with torch.no_grad():  # untrained LayerNorms and biases are trivial: randomise them so the mapping is tested
        for name, p in hf.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    return hf, folder


def hf_outputs(hf, token_ids, segment_ids):
    with torch.no_grad():
        t = torch.tensor(token_ids, dtype=torch.long)
        out = hf(input_ids=t, token_type_ids=torch.tensor(segment_ids, dtype=torch.long),
                 attention_mask=(t != 0).long(), output_hidden_states=True)
    return out.hidden_states[-1].numpy(), out.logits.numpy()


def ours(config, checkpoint, token_ids, segment_ids, **kwargs):
    model = build_transformer_model(config, checkpoint, model="roformer", with_mlm="linear", **kwargs)
    last = model.get_layer(f"Transformer-{TINY['num_hidden_layers'] - 1}-FeedForward-Norm").output
    probe = keras.Model(model.inputs, [last, model.output])
    return [np.asarray(o) for o in probe.predict([token_ids, segment_ids], verbose=0)]


def hf_to_google(hf) -> dict:
    """Google (BERT-named) tensors from an HF RoFormer, converted independently of bert4x's tables."""
    tensors = {}
    for name, value in hf.state_dict().items():
        if name.startswith("cls.predictions.decoder") or "embed_positions" in name:
            continue
        value = value.numpy()
        if name == "cls.predictions.bias":
            tensors["cls/predictions/output_bias"] = value
            continue
        parts = name.replace("roformer.", "bert.", 1).replace("encoder.layer.", "encoder.layer_").split(".")
        leaf = parts[-1]
        if "LayerNorm" in parts:
            parts[-1] = {"weight": "gamma", "bias": "beta"}[leaf]
        elif parts[-2].endswith("embeddings"):
            parts = parts[:-1]
        elif leaf == "weight":
            parts[-1], value = "kernel", value.T
        tensors["/".join(parts)] = value
    return tensors


def test_parity_with_transformers_roformer(tmp_path):
    hf, folder = make_hf_model(tmp_path)
    token_ids, segment_ids = batch()
    theirs = hf_outputs(hf, token_ids, segment_ids)
    valid = token_ids != 0
    for checkpoint in (str(folder), str(folder / "model.safetensors")):
        hidden, logits = ours(str(folder / "config.json"), checkpoint, token_ids, segment_ids)
        np.testing.assert_allclose(hidden[valid], theirs[0][valid], atol=1e-4, rtol=0)
        np.testing.assert_allclose(logits[valid], theirs[1][valid], atol=1e-4, rtol=0)
    # The same weights as a Google checkpoint with BERT's names (how RoFormer was released).
    google = tmp_path / "google"
    google.mkdir()
    prefix = write_google_checkpoint(hf_to_google(hf), str(google / "bert_model.ckpt"))
    config = {k: v for k, v in TINY.items() if k != "layer_norm_eps"}
    (google / "bert_config.json").write_text(json.dumps(config))
    hidden, logits = ours(str(google / "bert_config.json"), prefix, token_ids, segment_ids)
    np.testing.assert_allclose(hidden[valid], theirs[0][valid], atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits[valid], theirs[1][valid], atol=1e-4, rtol=0)


def test_any_sequence_length_and_no_position_table(tmp_path):
    model = build_transformer_model({**TINY, "max_position_embeddings": 8}, model="roformer")
    assert not any("Position" in w.path and "Rotary" not in w.path for w in model.weights)
    ids = np.random.default_rng(0).integers(1, 99, size=(2, 40)).astype("int32")  # 5x max_position_embeddings
    out = model.predict([ids, np.zeros_like(ids)], verbose=0)
    assert out.shape == (2, 40, 32) and np.all(np.isfinite(out))


@pytest.mark.parametrize("fmt", ["google", "huggingface"])
def test_save_round_trip_is_exact(tmp_path, fmt):
    hf, folder = make_hf_model(tmp_path, seed=4)
    token_ids, segment_ids = batch()
    roformer = build_transformer_model(
        str(folder / "config.json"), str(folder), model="roformer", with_mlm="linear", return_keras_model=False
    )
    before = roformer.model.predict([token_ids, segment_ids], verbose=0)
    out = tmp_path / "out"
    out.mkdir()
    target = str(out / "bert_model.ckpt") if fmt == "google" else str(out)
    path = roformer.save_weights_as_checkpoint(target, format=fmt)
    if fmt == "google":  # BERT's variable names, no position table
        names = set(open_checkpoint(path).keys())
        assert "bert/encoder/layer_0/attention/self/query/kernel" in names
        assert not any("position" in n for n in names)
    config = out / ("bert_config.json" if fmt == "google" else "config.json")
    again = build_transformer_model(str(config), path, model="roformer", with_mlm="linear")
    np.testing.assert_array_equal(before, again.predict([token_ids, segment_ids], verbose=0))
    if fmt == "huggingface":  # transformers reads our export
        ref = transformers.RoFormerForMaskedLM.from_pretrained(str(out)).eval()
        valid = token_ids != 0
        np.testing.assert_allclose(hf_outputs(ref, token_ids, segment_ids)[1][valid], before[valid], atol=1e-4)


def test_unsupported_roformer_options_raise(tmp_path):
    with pytest.raises(ValueError, match="embedding_size"):
        build_transformer_model({**TINY, "embedding_size": 16}, model="roformer")
    with pytest.raises(ValueError, match="rotary_value"):
        build_transformer_model({**TINY, "rotary_value": True}, model="roformer")
    with pytest.raises(ValueError, match="model_type"):
        build_transformer_model({**TINY, "model_type": "bert"}, model="roformer")
    # A BERT checkpoint has a position table that RoFormer has no place for: strict loading names it.
    hf_bert = transformers.BertModel(transformers.BertConfig(**TINY)).eval()
    hf_bert.save_pretrained(tmp_path / "bert")
    with pytest.raises(CheckpointError, match="position_embeddings"):
        build_transformer_model({**TINY}, str(tmp_path / "bert"), model="roformer")


# ------------------------------------------------------------------------------------------------ RoFormer v2
V2 = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
          type_vocab_size=2)


def numpy_roformer_v2(tensors: dict, token_ids, segment_ids, heads: int, gated: bool) -> np.ndarray:
    """An independent RoFormerV2 forward from Google-format weights: embeddings -> norm; per layer
    norm(x + attention(x)), norm(x + ffn(x)); weightless RMS norms; RoPE on q, k; relu or silu-GLU; tied logits."""

    def norm(x):
        return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-12)

    def rope(x):  # [len, heads, d]
        d = x.shape[-1]
        theta = 10000.0 ** (-np.arange(0, d, 2) / d)
        angle = np.arange(x.shape[0])[:, None, None] * theta
        even, odd = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = even * np.cos(angle) - odd * np.sin(angle)
        out[..., 1::2] = odd * np.cos(angle) + even * np.sin(angle)
        return out

    word = tensors["bert/embeddings/word_embeddings"]
    x = norm(word[token_ids] + tensors["bert/embeddings/token_type_embeddings"][segment_ids])
    length, hidden = x.shape
    d = hidden // heads
    for i in range(V2["num_hidden_layers"]):
        p = f"bert/encoder/layer_{i}/"
        q, k, v = (x @ tensors[p + f"attention/self/{n}/kernel"] for n in ("query", "key", "value"))
        q, k, v = (t.reshape(length, heads, d) for t in (q, k, v))
        q, k = rope(q), rope(k)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        attended = np.einsum("hqk,khd->qhd", probs, v).reshape(length, hidden)
        x = norm(x + attended @ tensors[p + "attention/output/dense/kernel"])
        inner = x @ tensors[p + "intermediate/dense/kernel"]
        if gated:
            inner = inner / (1 + np.exp(-inner)) * (x @ tensors[p + "intermediate/dense_1/kernel"])
        else:
            inner = np.maximum(inner, 0)
        x = norm(x + inner @ tensors[p + "output/dense/kernel"])
    return x @ word.T


@pytest.mark.parametrize("hidden_act", ["relu", ["silu", "linear"]])
def test_roformer_v2_matches_an_independent_numpy_forward(tmp_path, hidden_act):
    config = {**V2, "hidden_act": hidden_act}
    gated = isinstance(hidden_act, list)
    rng = np.random.default_rng(3)
    # Random Google-format weights under bert4keras's names (no biases, no LayerNorm variables).
    h, f = V2["hidden_size"], V2["intermediate_size"]
    tensors = {
        "bert/embeddings/word_embeddings": rng.normal(size=(V2["vocab_size"], h)),
        "bert/embeddings/token_type_embeddings": rng.normal(size=(2, h)),
    }
    for i in range(V2["num_hidden_layers"]):
        p = f"bert/encoder/layer_{i}/"
        for n in ("query", "key", "value"):
            tensors[p + f"attention/self/{n}/kernel"] = rng.normal(size=(h, h)) * 0.3
        tensors[p + "attention/output/dense/kernel"] = rng.normal(size=(h, h)) * 0.3
        tensors[p + "intermediate/dense/kernel"] = rng.normal(size=(h, f)) * 0.3
        if gated:
            tensors[p + "intermediate/dense_1/kernel"] = rng.normal(size=(h, f)) * 0.3
        tensors[p + "output/dense/kernel"] = rng.normal(size=(f, h)) * 0.3
    tensors = {k: v.astype("float32") for k, v in tensors.items()}
    prefix = write_google_checkpoint(tensors, str(tmp_path / "bert_model.ckpt"))
    model = build_transformer_model(config, prefix, model="roformer_v2", with_mlm="linear")
    assert not any(w.path.endswith(("bias", "gamma", "beta")) for w in model.weights)
    token_ids = rng.integers(1, V2["vocab_size"], size=(1, 9)).astype("int32")
    segment_ids = np.array([[0] * 5 + [1] * 4], dtype="int32")
    logits = model.predict([token_ids, segment_ids], verbose=0)[0]
    expected = numpy_roformer_v2(tensors, token_ids[0], segment_ids[0], V2["num_attention_heads"], gated)
    np.testing.assert_allclose(logits, expected, atol=1e-3, rtol=1e-4)


def test_roformer_v2_round_trip_and_unsupported_options(tmp_path):
    v2 = build_transformer_model({**V2, "hidden_act": ["silu", "linear"]}, model="roformer_v2", with_mlm="linear",
                                 return_keras_model=False)
    ids = np.random.default_rng(0).integers(1, 50, size=(2, 7)).astype("int32")
    before = v2.model.predict([ids, np.zeros_like(ids)], verbose=0)
    prefix = v2.save_weights_as_checkpoint(str(tmp_path / "bert_model.ckpt"), format="google")
    again = build_transformer_model(str(tmp_path / "bert_config.json"), prefix, model="roformer_v2", with_mlm="linear")
    np.testing.assert_array_equal(before, again.predict([ids, np.zeros_like(ids)], verbose=0))
    with pytest.raises(ValueError, match="Google"):
        v2.save_weights_as_checkpoint(str(tmp_path / "hf"), format="huggingface")
    with pytest.raises(ValueError, match="pooler"):
        build_transformer_model(V2, model="roformer_v2", with_pool=True)
    with pytest.raises(ValueError, match="GLU"):
        build_transformer_model({**V2, "hidden_act": ["silu", "gelu"]}, model="roformer_v2")


# ------------------------------------------------------------------------------------------------ harness
HARNESS = {"vocab_size": 30, "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
           "intermediate_size": 16, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}


@pytest.mark.parametrize("model,application,extra,heads", [
    ("roformer", "unilm", {}, {"with_pool": True}),  # outputs [pooled, next-token distribution]
    ("roformer_v2", "lm", {"hidden_act": ["silu", "linear"]}, {}),
])
def test_roformer_harness(tmp_path, model, application, extra, heads):
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 30, size=(4, 6)).astype("int32")
    ids[1, 4:] = 0
    segments = np.zeros_like(ids)
    segments[:, 3:] = 1
    targets = rng.dirichlet(np.ones(30), size=(4, 6))
    if heads:
        targets = [rng.normal(size=(4, 8)), targets]
    check_model(
        lambda: build_transformer_model({**HARNESS, **extra}, model=model, application=application, **heads),
        [ids, segments], targets, tmp_path,
    )


@pytest.mark.skipif(in_subprocess, reason="this test launches the jax run itself")
def test_roformer_on_jax_backend():
    run_pytest_on_backend("jax", "tests/test_roformer.py", "-k", "parity or numpy or rotary or round_trip")
