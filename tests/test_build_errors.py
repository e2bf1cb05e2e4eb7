"""Bad input gets a clear error naming the problem; keep_tokens/compound_tokens slice exactly; partial loads report."""

import logging

import numpy as np
import pytest
from helpers import shared_path

from bert4x.checkpoints import open_checkpoint, write_google_checkpoint, write_safetensors
from bert4x.models import CheckpointError, build_transformer_model

TINY = {"vocab_size": 15, "hidden_size": 4, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 16, "max_position_embeddings": 16, "type_vocab_size": 2, "hidden_act": "gelu"}


@pytest.fixture
def google_ckpt():
    folder = shared_path("checkpoints", "keras-bert_test_checkpoint_tf")
    return str(folder / "bert_config.json"), str(folder / "bert_model.ckpt")


def test_missing_files(tmp_path, google_ckpt):
    config, prefix = google_ckpt
    with pytest.raises(FileNotFoundError, match="nope.json"):
        build_transformer_model(str(tmp_path / "nope.json"))
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        build_transformer_model(config, str(tmp_path / "missing.ckpt"))


def test_config_missing_and_unknown_keys(tmp_path):
    with pytest.raises(ValueError, match="intermediate_size"):
        build_transformer_model({k: v for k, v in TINY.items() if k != "intermediate_size"})
    with pytest.raises(ValueError, match="rotary_dims"):
        build_transformer_model(dict(TINY, rotary_dims=8))
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        build_transformer_model(str(path))
    with pytest.raises(TypeError, match="with_poool"):
        build_transformer_model(TINY, with_poool=True)
    with pytest.raises(ValueError, match="Unknown model 'gpt5'"):
        build_transformer_model(TINY, model="gpt5")
    with pytest.raises(ValueError, match="application='seq2seq'"):
        build_transformer_model(TINY, application="seq2seq")
    with pytest.raises(ValueError, match="divisible"):
        build_transformer_model(dict(TINY, num_attention_heads=3))


def test_config_of_another_model_type():
    with pytest.raises(ValueError, match="model_type='t5'"):
        build_transformer_model(dict(TINY, model_type="t5"))
    with pytest.raises(ValueError, match="relative_key"):
        build_transformer_model(dict(TINY, model_type="bert", position_embedding_type="relative_key"))


def test_checkpoint_of_another_model_type(tmp_path):
    tensors = {"shared.weight": np.zeros((15, 4), "float32"),
               "encoder.block.0.layer.0.SelfAttention.q.weight": np.zeros((4, 4), "float32")}
    path = write_safetensors(tensors, str(tmp_path / "t5"))
    with pytest.raises(CheckpointError, match="does not look like a BERT checkpoint") as err:
        build_transformer_model(TINY, path)
    assert "encoder.block.0.layer.0.SelfAttention.q.weight" in str(err.value)


def test_layer_count_mismatch_names_every_offender(google_ckpt):
    config, prefix = google_ckpt
    with pytest.raises(CheckpointError) as err:
        build_transformer_model(config, prefix, num_hidden_layers=1)
    message = str(err.value)
    assert "bert/encoder/layer_1/attention/self/query/kernel" in message
    assert "bert/encoder/layer_1/output/LayerNorm/gamma" in message


def test_shape_mismatch_is_reported(google_ckpt):
    config, prefix = google_ckpt
    with pytest.raises(CheckpointError, match="vocabulary has 15 rows, config says vocab_size=20"):
        build_transformer_model(config, prefix, vocab_size=20)


def test_partial_load_reports_what_it_skipped(google_ckpt, tmp_path, caplog):
    config, prefix = google_ckpt
    reader = open_checkpoint(prefix)
    tensors = {k: reader.get(k) for k in reader if "pooler" not in k}
    partial = write_google_checkpoint(tensors, str(tmp_path / "p" / "bert_model.ckpt"))
    with pytest.raises(CheckpointError, match="Pooler-Dense/kernel"):
        build_transformer_model(config, partial, with_pool=True)
    bert = build_transformer_model(config, with_pool=True, return_keras_model=False)
    with caplog.at_level(logging.WARNING, logger="bert4x"):
        report = bert.load_weights_from_checkpoint(partial, strict=False)
    assert not report.ok and any("Pooler-Dense/kernel" in m for m in report.missing)
    assert "Pooler-Dense/kernel" in caplog.text
    np.testing.assert_array_equal(
        bert.model.get_layer("Embedding-Token").get_weights()[0], reader.get("bert/embeddings/word_embeddings")
    )


def test_keep_tokens_slices_embedding_and_mlm_bias(google_ckpt):
    config, prefix = google_ckpt
    keep = [0, 1, 2, 3, 4, 9, 12]
    full = build_transformer_model(config, prefix, with_mlm="linear")
    small = build_transformer_model(config, prefix, with_mlm="linear", keep_tokens=keep)
    reader = open_checkpoint(prefix)
    np.testing.assert_array_equal(
        small.get_layer("Embedding-Token").get_weights()[0], reader.get("bert/embeddings/word_embeddings")[keep]
    )
    np.testing.assert_array_equal(small.get_layer("MLM-Bias").get_weights()[0],
                                  reader.get("cls/predictions/output_bias")[keep])
    # Same text in the new ids gives the full model's logits restricted to the kept columns.
    full_ids = np.array([[2, 9, 12, 3]], dtype="int32")
    small_ids = np.array([[2, 5, 6, 3]], dtype="int32")
    seg = np.zeros_like(full_ids)
    np.testing.assert_allclose(
        small.predict([small_ids, seg], verbose=0), full.predict([full_ids, seg], verbose=0)[..., keep], atol=1e-6
    )
    with pytest.raises(ValueError,
                       match=r"keep_tokens has 2 ids outside the checkpoint vocabulary \[0, 15\): \[15, -1\]"):
        build_transformer_model(config, prefix, keep_tokens=[0, 1, 15, -1])


def test_compound_tokens_append_mean_rows(google_ckpt):
    config, prefix = google_ckpt
    compound = [[5, 6], [7, 8, 9]]
    model = build_transformer_model(config, prefix, with_mlm=True, compound_tokens=compound)
    table = model.get_layer("Embedding-Token").get_weights()[0]
    original = open_checkpoint(prefix).get("bert/embeddings/word_embeddings")
    assert table.shape == (17, 4)
    np.testing.assert_allclose(table[15], original[[5, 6]].mean(0), atol=1e-7)
    np.testing.assert_allclose(table[16], original[[7, 8, 9]].mean(0), atol=1e-7)
    with pytest.raises(ValueError, match="compound_tokens entry"):
        build_transformer_model(config, prefix, compound_tokens=[[]])


def test_untied_decoder_copy_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    bert = build_transformer_model(TINY, with_mlm=True, return_keras_model=False)
    tensors = bert.checkpoint_tensors("huggingface")
    tensors["cls.predictions.decoder.weight"] = rng.normal(size=(15, 4)).astype("float32")
    path = write_safetensors(tensors, str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match="unties weights"):
        build_transformer_model(TINY, path, with_mlm=True)


def test_wobert_end_to_end_with_jieba():
    import jieba

    from bert4x.tokenizers import Tokenizer

    config = shared_path("vocab", "wobert", "wobert_chinese_base.config.json")
    vocab = shared_path("vocab", "wobert", "wobert_chinese_base.vocab.txt")
    tokenizer = Tokenizer(str(vocab), do_lower_case=True, pre_tokenize=lambda s: jieba.cut(s, HMM=False))
    model = build_transformer_model(str(config), model="wobert", with_mlm=True, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64)
    token_ids, segment_ids = tokenizer.encode("今天天气不错，我们去公园散步吧")
    assert len(token_ids) - 2 < len("今天天气不错，我们去公园散步吧")  # words, not characters
    probs = model.predict([np.array([token_ids]), np.array([segment_ids])], verbose=0)
    assert probs.shape == (1, len(token_ids), 33586)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-4)
