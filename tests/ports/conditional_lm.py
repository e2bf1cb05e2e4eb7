#! -*- coding: utf-8 -*-
# ruff: noqa: E741, UP009  (bert4keras script style: `l` for a line, a coding line)
# A conditional language model: the sentiment label conditions every LayerNorm (layer_norm_cond), so the model
# writes positive or negative reviews on demand.
import csv
import random

import numpy as np
from _setup import data_path, tiny_chinese_bert

from bert4x.backend import K, keras
from bert4x.layers import Loss
from bert4x.models import build_transformer_model
from bert4x.optimizers import Adam
from bert4x.snippets import DataGenerator, sequence_padding
from bert4x.tokenizers import Tokenizer, load_vocab

maxlen = 40
batch_size = 32
num_classes = 2
config_path, checkpoint_path, dict_path = tiny_chinese_bert()

with open(data_path('datasets', 'sentiment', 'waimai_10k.csv'), encoding='utf-8') as f:
    data = [(row['review'], int(row['label'])) for row in csv.DictReader(f)]
random.Random(0).shuffle(data)
train_data, valid_data = data[:1500], data[1500:1700]

_token_dict = load_vocab(dict_path)
_tokenizer = Tokenizer(_token_dict, do_lower_case=True)
counts = {}
for text, _ in train_data:
    for t in _tokenizer.tokenize(text)[1:-1]:
        counts[t] = counts.get(t, 0) + 1
token_dict, keep_tokens = {}, []
for t in ['[PAD]', '[UNK]', '[CLS]', '[SEP]'] + [t for t, c in sorted(counts.items()) if c >= 3]:
    if t not in token_dict:
        token_dict[t] = len(token_dict)
        keep_tokens.append(_token_dict[t])
tokenizer = Tokenizer(token_dict, do_lower_case=True)


class data_generator(DataGenerator):
    def __iter__(self, random=False):
        batch_token_ids, batch_labels = [], []
        for is_end, (text, label) in self.sample(random):
            token_ids, _ = tokenizer.encode(text, maxlen=maxlen)
            batch_token_ids.append(token_ids)
            batch_labels.append([label])
            if len(batch_token_ids) == self.batch_size or is_end:
                batch_token_ids = sequence_padding(batch_token_ids)
                batch_labels = sequence_padding(batch_labels)
                yield [batch_token_ids, batch_labels], None
                batch_token_ids, batch_labels = [], []


class CrossEntropy(Loss):
    def compute_loss(self, inputs, mask=None):
        y_true, y_pred = inputs
        y_mask = K.cast(K.not_equal(y_true, 0), K.floatx())[:, 1:]
        loss = K.sparse_categorical_crossentropy(y_true[:, 1:], y_pred[:, :-1])
        return K.sum(loss * y_mask) / K.sum(y_mask)


c_in = keras.layers.Input(shape=(1,))
c = keras.layers.Embedding(num_classes, 32)(c_in)
c = keras.layers.Reshape((32,))(c)

model = build_transformer_model(config_path, checkpoint_path, application='lm', keep_tokens=keep_tokens,
                                segment_vocab_size=0, layer_norm_cond=c, layer_norm_cond_hidden_size=16,
                                layer_norm_cond_hidden_act='swish', additional_input_layers=c_in)
output = CrossEntropy(1)([model.inputs[0], model.outputs[0]])
train_model = keras.models.Model(model.inputs, output)
train_model.compile(optimizer=Adam(3e-3))


def label_accuracy(data):
    """Classify each validation review by which condition gives it the higher likelihood."""
    token_ids = sequence_padding([tokenizer.encode(t, maxlen=maxlen)[0] for t, _ in data])
    targets, real = token_ids[:, 1:], token_ids[:, 1:] > 0
    scores = []
    for label in range(num_classes):
        probas = model.predict([token_ids, np.full((len(data), 1), label)], verbose=0)[:, :-1]
        picked = np.take_along_axis(probas, targets[..., None], axis=-1)[..., 0]
        scores.append((np.log(picked + 1e-12) * real).sum(axis=1))
    predicted = np.argmax(scores, axis=0)
    labels = np.array([label for _, label in data])
    return (predicted == labels).mean(), max(labels.mean(), 1 - labels.mean())


def next_token_accuracy(data):
    token_ids = sequence_padding([tokenizer.encode(t, maxlen=maxlen)[0] for t, _ in data])
    labels = np.array([[label] for _, label in data])
    predicted = model.predict([token_ids, labels], verbose=0).argmax(axis=-1)[:, :-1]
    targets = token_ids[:, 1:]
    real = targets > 0
    values, counts = np.unique(targets[real], return_counts=True)
    return (predicted == targets)[real].mean(), counts.max() / real.sum()


history = train_model.fit(data_generator(train_data, batch_size), epochs=3, verbose=0)
losses = history.history['loss']
condition_accuracy, majority = label_accuracy(valid_data)
print(f'condition accuracy {condition_accuracy:.4f} (majority {majority:.4f})')
accuracy, unigram = next_token_accuracy(valid_data)
print(f'FINAL metric=next_token_accuracy value={accuracy:.4f} chance={1 / len(token_dict):.6f} unigram={unigram:.4f} '
      f'loss_first={losses[0]:.4f} loss_last={losses[-1]:.4f}')
