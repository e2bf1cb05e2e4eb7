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
    assert main(["--config", config, "--source", prefix, "--target", str(hf_dir),
                 "--target-format", "huggingface"]) == 0
    assert main(["--config", str(hf_dir / "config.json"), "--source", str(hf_dir), "--target", str(back),
                 "--target-format", "google"]) == 0
    original, returned = open_checkpoint(prefix), open_checkpoint(str(back))
    kept = [k for k in original if "adam" not in k and k != "global_step"]
    assert sorted(kept) == sorted(returned.keys())
    for k in kept:
        np.testing.assert_array_equal(original.get(k), returned.get(k))
    for a, b in zip(predict(config, prefix), predict(str(hf_dir / "config.json"), str(hf_dir))):
        np.testing.assert_array_equal(a, b)


def test_converter_refuses_unmappable_variables(tmp_path, capsys):
    from bert4x.checkpoints import write_google_checkpoint

    folder = shared_path("checkpoints", "keras-bert_test_checkpoint_tf")
    reader = open_checkpoint(str(folder / "bert_model.ckpt"))
    tensors = {k: reader.get(k) for k in reader if "adam" not in k}
    tensors["bert/encoder/layer_2/output/dense/kernel"] = np.zeros((16, 4), "float32")  # a layer the config lacks
    prefix = write_google_checkpoint(tensors, str(tmp_path / "bad" / "bert_model.ckpt"))
    code = main(["--config", str(folder / "bert_config.json"), "--source", prefix, "--target", str(tmp_path / "o"),
                 "--target-format", "huggingface"])
    assert code == 1
    assert "bert/encoder/layer_2/output/dense/kernel" in capsys.readouterr().err


def _convert_args(folder, target, fmt="huggingface", config=None):
    return ["--config", str(config or folder / "bert_config.json"), "--source", str(folder / "bert_model.ckpt"),
            "--target", str(target), "--target-format", fmt]


def test_converter_never_overwrites_without_force(tmp_path, capsys):
    folder = shared_path("checkpoints", "keras-bert_test_checkpoint_tf")
    target = tmp_path / "hf"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"the user's own weights")
    assert main(_convert_args(folder, target)) == 1
    err = capsys.readouterr().err
    assert "would be replaced" in err and str(target / "model.safetensors") in err and "--force" in err
    assert (target / "model.safetensors").read_bytes() == b"the user's own weights"
    assert not (target / "config.json").exists()
    assert main(_convert_args(folder, target) + ["--force"]) == 0
    assert open_checkpoint(str(target)).shape("bert.embeddings.word_embeddings.weight") == (15, 4)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]  # no temporary left


def test_converter_never_overwrites_google_files(tmp_path, capsys):
    folder = shared_path("checkpoints", "keras-bert_test_checkpoint_tf")
    prefix = tmp_path / "g" / "bert_model.ckpt"
    assert main(_convert_args(folder, prefix, "google")) == 0
    before = {p.name: p.read_bytes() for p in prefix.parent.iterdir()}
    assert sorted(before) == ["bert_config.json", "bert_model.ckpt.data-00000-of-00001", "bert_model.ckpt.index"]
    assert main(_convert_args(folder, prefix, "google")) == 1
    err = capsys.readouterr().err
    for name in before:
        assert name in err
    assert {p.name: p.read_bytes() for p in prefix.parent.iterdir()} == before


def test_converter_interrupted_write_leaves_old_files(tmp_path, monkeypatch):
    import weights_converters.convert as convert_module

    folder = shared_path("checkpoints", "keras-bert_test_checkpoint_tf")
    target = tmp_path / "hf"
    assert main(_convert_args(folder, target)) == 0
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(convert_module, "write_safetensors", fail)
    assert main(_convert_args(folder, target) + ["--force"]) == 1
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # old files intact, no temporary left


def test_converter_checks_config_against_weights(tmp_path, capsys):
    import json

    folder = shared_path("checkpoints", "keras-bert_test_checkpoint_tf")
    config = json.loads((folder / "bert_config.json").read_text())
    config["hidden_size"] = 8
    config["intermediate_size"] = 16
    (tmp_path / "wrong.json").write_text(json.dumps(config))
    target = tmp_path / "hf"
    assert main(_convert_args(folder, target, config=tmp_path / "wrong.json")) == 1
    err = capsys.readouterr().err
    assert "do not match config" in err and "bert.embeddings.word_embeddings.weight" in err and "(15, 8)" in err
    assert not target.exists() or not any(target.iterdir())
