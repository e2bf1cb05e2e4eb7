"""The command-line converter: Google <-> Hugging Face through the mapping tables, with nothing dropped."""

import numpy as np
from helpers import shared_path

from bert4x.checkpoints import open_checkpoint
from bert4x.models import build_transformer_model
from weights_converters.convert import main


def predict(config, ckpt):
    model = build_transformer_model(config, ckpt, with_nsp=True, with_mlm="linear")
    ids = np.array([[2, 5, 6, 7, 3, 8, 9, 3, 0]], dtype="int32")
    seg = np.array([[0, 0, 0, 0, 0, 1, 1, 1, 0]], dtype="int32")
    return model.predict([ids, seg], verbose=0)


def test_google_to_hf_to_google_is_exact(tmp_path):
    folder = shared_path("checkpoints", "keras-bert_test_checkpoint_tf")
    config, prefix = str(folder / "bert_config.json"), str(folder / "bert_model.ckpt")
    hf_dir, back = tmp_path / "hf", tmp_path / "back" / "bert_model.ckpt"
    assert main(["--config", config, "--source", prefix, "--target", str(hf_dir), "--target-format", "huggingface"]) == 0
    assert main(["--config", str(hf_dir / "config.json"), "--source", str(hf_dir), "--target", str(back),
                 "--target-format", "google"]) == 0
    original, returned = open_checkpoint(prefix), open_checkpoint(str(back))
    kept = [k for k in original.keys() if "adam" not in k and k != "global_step"]
    assert sorted(kept) == sorted(returned.keys())
    for k in kept:
        np.testing.assert_array_equal(original.get(k), returned.get(k))
    for a, b in zip(predict(config, prefix), predict(str(hf_dir / "config.json"), str(hf_dir))):
        np.testing.assert_array_equal(a, b)


def test_converter_refuses_unmappable_variables(tmp_path, capsys):
    from bert4x.checkpoints import write_google_checkpoint

    folder = shared_path("checkpoints", "keras-bert_test_checkpoint_tf")
    reader = open_checkpoint(str(folder / "bert_model.ckpt"))
    tensors = {k: reader.get(k) for k in reader.keys() if "adam" not in k}
    tensors["bert/encoder/layer_2/output/dense/kernel"] = np.zeros((16, 4), "float32")  # a layer the config lacks
    prefix = write_google_checkpoint(tensors, str(tmp_path / "bad" / "bert_model.ckpt"))
    code = main(["--config", str(folder / "bert_config.json"), "--source", prefix, "--target", str(tmp_path / "o"),
                 "--target-format", "huggingface"])
    assert code == 1
    assert "bert/encoder/layer_2/output/dense/kernel" in capsys.readouterr().err
