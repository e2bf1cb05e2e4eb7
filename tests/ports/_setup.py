"""Setup shared by the ported scripts (not part of the ported code): where ../shared/data is, and a tiny random
Chinese BERT saved as a Google checkpoint, which the scripts then load from its paths as a user would load a
downloaded one."""

import os
import sys
import tempfile

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "data")
DATA = os.path.normpath(DATA)
VOCAB = os.path.join(DATA, "vocab", "bert_chinese", "vocab.txt")


def data_path(*parts):
    path = os.path.join(DATA, *parts)
    if not os.path.exists(path):
        print(f"SKIP: ../shared/data not found (needs {path})")
        sys.exit(0)
    return path


def tiny_chinese_bert(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, seed=0):
    """Saves a random BERT with the bert_chinese vocabulary (and its MLM/NSP heads) as a Google checkpoint;
    returns (config_path, checkpoint_path, dict_path)."""
    import keras

    from bert4x.models import build_transformer_model

    data_path("vocab", "bert_chinese", "vocab.txt")
    keras.utils.set_random_seed(seed)
    with open(VOCAB, encoding="utf-8") as f:
        vocab_size = sum(1 for _ in f)
    config = {"vocab_size": vocab_size, "hidden_size": hidden_size, "num_hidden_layers": num_hidden_layers,
              "num_attention_heads": num_attention_heads, "intermediate_size": 2 * hidden_size,
              "max_position_embeddings": 128, "hidden_act": "gelu", "type_vocab_size": 2,
              "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    folder = tempfile.mkdtemp(prefix="tiny_chinese_bert_")
    bert = build_transformer_model(config, with_mlm=True, with_nsp=True, return_keras_model=False)
    checkpoint_path = bert.save_weights_as_checkpoint(os.path.join(folder, "bert_model.ckpt"), format="google")
    keras.backend.clear_session()
    return os.path.join(folder, "bert_config.json"), checkpoint_path, VOCAB
