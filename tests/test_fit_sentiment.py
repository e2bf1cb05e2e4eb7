"""A classifier on a BERT body, trained with model.fit on real ChnSentiCorp from a tiny random config, beats the
majority-class baseline on dev. Runs the example's own code (examples/sentiment_classifier.py)."""

import importlib.util

from helpers import REPO, shared_path


def load_example():
    spec = importlib.util.spec_from_file_location("sentiment_classifier", REPO / "examples" / "sentiment_classifier.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fit_beats_majority_baseline():
    shared_path("datasets", "sentiment", "chnsenticorp.zip")
    shared_path("vocab", "bert_chinese", "vocab.txt")
    example = load_example()
    result = example.run(epochs=2, batch_size=32, maxlen=64, train_limit=3200, dev_limit=600, verbose=0)
    print(result)
    assert result["dev_accuracy"] > result["majority_baseline"] + 0.1, result
