"""BERT equals Hugging Face transformers on the same weights: HF safetensors, Google checkpoints, real weights."""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import pytest
from helpers import in_subprocess, run_pytest_on_backend, shared_path

from bert4x.models import CheckpointError, build_transformer_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(
    vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
    max_position_embeddings=64, type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12,
)


def hf_to_google_name(name: str) -> tuple[str, bool]:
    """Google's name for an HF BERT variable, and whether the tensor is transposed. Written independently of
    bert4x's tables, from the two formats' conventions."""
    name = name.replace("bert.", "bert/", 1).replace("cls.", "cls/", 1)
    name = name.replace("encoder.layer.", "encoder/layer_")
    if name == "cls/seq_relationship.weight":
        return "cls/seq_relationship/output_weights", False
    if name == "cls/seq_relationship.bias":
        return "cls/seq_relationship/output_bias", False
    if name == "cls/predictions.bias":
        return "cls/predictions/output_bias", False
    parts = name.replace(".", "/").split("/")
    leaf = parts[-1]
    if "LayerNorm" in parts:
        parts[-1] = {"weight": "gamma", "bias": "beta"}[leaf]
        return "/".join(parts), False
    if parts[-2].endswith("embeddings"):
        return "/".join(parts[:-1]), False
    if leaf == "weight":
        parts[-1] = "kernel"
        return "/".join(parts), True
    return "/".join(parts), False


def make_hf_model(tmp_path, seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(**TINY, initializer_range=0.2)
    hf = transformers.BertForPreTraining(config).eval()
    with torch.no_grad():  # untrained LayerNorms are identity: randomise them so the mapping is really tested
        for name, p in hf.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    hf_dir = tmp_path / "hf"
    hf.save_pretrained(hf_dir)
    return hf, hf_dir


def write_google_from_hf(hf, path) -> str:
    from bert4x.checkpoints import write_google_checkpoint

    tensors = {}
    for name, value in hf.state_dict().items():
        if name.endswith("position_ids") or name.startswith("cls.predictions.decoder"):
            continue
        gname, transpose = hf_to_google_name(name)
        value = value.numpy()
        tensors[gname] = value.T if transpose else value
    tensors["global_step"] = np.array(7, dtype=np.int64)
    prefix = write_google_checkpoint(tensors, str(path / "bert_model.ckpt"))
    config = {k: v for k, v in TINY.items() if k != "layer_norm_eps"}
    config.update(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, initializer_range=0.02)
    with open(path / "bert_config.json", "w") as f:
        json.dump(config, f)
    return prefix


def batch():
    rng = np.random.default_rng(1)
    token_ids = rng.integers(5, TINY["vocab_size"], size=(3, 11))
    token_ids[1, 7:] = 0  # padding in the batch
    token_ids[2, 4:] = 0
    segment_ids = np.zeros_like(token_ids)
    segment_ids[:, 5:] = 1
    segment_ids[token_ids == 0] = 0
    return token_ids.astype("int32"), segment_ids.astype("int32")


def hf_outputs(hf, token_ids, segment_ids):
    with torch.no_grad():
        t = torch.tensor(token_ids, dtype=torch.long)
        s = torch.tensor(segment_ids, dtype=torch.long)
        out = hf(input_ids=t, token_type_ids=s, attention_mask=(t != 0).long(), output_hidden_states=True)
        pooled = hf.bert.pooler(out.hidden_states[-1])
    return (out.hidden_states[-1].numpy(), pooled.numpy(), out.prediction_logits.numpy(),
            out.seq_relationship_logits.numpy())


def bert4x_outputs(config_path, checkpoint_path, token_ids, segment_ids, **kwargs):
    model = build_transformer_model(config_path, checkpoint_path, with_pool=True, with_mlm="linear", **kwargs)
    last = model.get_layer(f"Transformer-{TINY['num_hidden_layers'] - 1}-FeedForward-Norm").output
    probe = keras.Model(model.inputs, [last] + model.outputs)
    return [np.asarray(o) for o in probe.predict([token_ids, segment_ids], verbose=0)]


def assert_parity(ours, theirs, valid):
    sequence, pooled, mlm = ours
    ref_sequence, ref_pooled, ref_mlm, _ = theirs
    np.testing.assert_allclose(sequence[valid], ref_sequence[valid], atol=1e-4, rtol=0)
    np.testing.assert_allclose(pooled, ref_pooled, atol=1e-4, rtol=0)
    np.testing.assert_allclose(mlm[valid], ref_mlm[valid], atol=1e-4, rtol=0)


def test_parity_with_transformers_hf_and_google_checkpoints(tmp_path):
    hf, hf_dir = make_hf_model(tmp_path)
    token_ids, segment_ids = batch()
    theirs = hf_outputs(hf, token_ids, segment_ids)
    valid = token_ids != 0
    # Hugging Face folder, its model.safetensors file, and a Google checkpoint written from the same weights.
    assert_parity(bert4x_outputs(str(hf_dir / "config.json"), str(hf_dir), token_ids, segment_ids), theirs, valid)
    assert_parity(
        bert4x_outputs(str(hf_dir / "config.json"), str(hf_dir / "model.safetensors"), token_ids, segment_ids),
        theirs, valid,
    )
    google_dir = tmp_path / "google"
    google_dir.mkdir()
    prefix = write_google_from_hf(hf, google_dir)
    assert_parity(bert4x_outputs(str(google_dir / "bert_config.json"), prefix, token_ids, segment_ids), theirs, valid)


def test_pytorch_bin_and_bare_keys(tmp_path):
    hf, hf_dir = make_hf_model(tmp_path, seed=3)
    bare = tmp_path / "bare"
    bare.mkdir()
    # A BertModel checkpoint (no 'bert.' prefix, no heads) saved as pytorch_model.bin.
    torch.save(dict(hf.bert.state_dict().items()), bare / "pytorch_model.bin")
    token_ids, segment_ids = batch()
    theirs = hf_outputs(hf, token_ids, segment_ids)
    model = build_transformer_model(str(hf_dir / "config.json"), str(bare / "pytorch_model.bin"), with_pool=True)
    np.testing.assert_allclose(model.predict([token_ids, segment_ids], verbose=0), theirs[1], atol=1e-4)
    # Heads that the checkpoint lacks make a strict load fail, naming them.
    with pytest.raises(CheckpointError, match="MLM-Bias/bias"):
        build_transformer_model(str(hf_dir / "config.json"), str(bare / "pytorch_model.bin"), with_mlm=True)


@pytest.mark.parametrize("fmt", ["google", "huggingface"])
def test_save_round_trip_is_exact(tmp_path, fmt):
    hf, hf_dir = make_hf_model(tmp_path, seed=5)
    token_ids, segment_ids = batch()
    bert = build_transformer_model(
        str(hf_dir / "config.json"), str(hf_dir), with_nsp=True, with_mlm="linear", return_keras_model=False
    )
    before = bert.model.predict([token_ids, segment_ids], verbose=0)
    out = tmp_path / "out"
    target = str(out / "bert_model.ckpt") if fmt == "google" else str(out)
    os.makedirs(out, exist_ok=True)
    path = bert.save_weights_as_checkpoint(target, format=fmt)
    config = out / ("bert_config.json" if fmt == "google" else "config.json")
    again = build_transformer_model(str(config), path, with_nsp=True, with_mlm="linear")
    after = again.predict([token_ids, segment_ids], verbose=0)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    if fmt == "huggingface":  # and transformers reads our export
        ref = transformers.BertForPreTraining.from_pretrained(str(out)).eval()
        np.testing.assert_allclose(hf_outputs(ref, token_ids, segment_ids)[2], after[1], atol=1e-4)


def test_real_google_bert_checkpoint(tmp_path):
    """The checkpoint written by Google's own BERT code loads strictly and matches transformers on its weights."""
    folder = shared_path("checkpoints", "keras-bert_test_checkpoint_tf")
    prefix = str(folder / "bert_model.ckpt")
    bert = build_transformer_model(
        str(folder / "bert_config.json"), prefix, with_nsp=True, with_mlm="linear", return_keras_model=False
    )
    from bert4x.checkpoints import open_checkpoint

    report = bert.load_weights_from_checkpoint(prefix)
    assert report.ok and "global_step" in report.ignored
    assert any(name.endswith("adam_m") for name in report.ignored)
    # Same weights into transformers, through the independent name conversion above.
    config = json.loads((folder / "bert_config.json").read_text())
    hf = transformers.BertForPreTraining(transformers.BertConfig(**config)).eval()
    reader = open_checkpoint(prefix)
    state = {}
    for name in hf.state_dict():
        if name.endswith("position_ids"):
            continue
        if name.startswith("cls.predictions.decoder"):
            gname, transpose = ("bert/embeddings/word_embeddings", False) if name.endswith("weight") else (
                "cls/predictions/output_bias", False)
        else:
            gname, transpose = hf_to_google_name(name)
        value = reader.get(gname)
        state[name] = torch.tensor(value.T if transpose else value)
    hf.load_state_dict(state, strict=False)
    token_ids = np.array([[2, 5, 6, 7, 8, 3, 9, 10, 3], [2, 11, 12, 3, 13, 3, 0, 0, 0]], dtype="int32")
    segment_ids = np.array([[0] * 6 + [1] * 3, [0] * 4 + [1] * 2 + [0] * 3], dtype="int32")
    with torch.no_grad():
        t = torch.tensor(token_ids, dtype=torch.long)
        out = hf(input_ids=t, token_type_ids=torch.tensor(segment_ids, dtype=torch.long),
                 attention_mask=(t != 0).long())
    nsp, mlm = bert.model.predict([token_ids, segment_ids], verbose=0)
    valid = token_ids != 0
    np.testing.assert_allclose(mlm[valid], out.prediction_logits.numpy()[valid], atol=1e-4)
    np.testing.assert_allclose(nsp, torch.softmax(out.seq_relationship_logits, -1).numpy(), atol=1e-5)


@pytest.mark.skipif(in_subprocess, reason="this test launches the jax run itself")
def test_parity_on_jax_backend():
    run_pytest_on_backend(
        "jax", "tests/test_bert_parity.py", "-k", "transformers_hf_and_google or real_google or round_trip"
    )
