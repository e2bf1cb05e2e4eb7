#! -*- coding: utf-8 -*-
# ruff: noqa: E741, UP009  (bert4keras script style: `l` for a line, a coding line)
# A character language model (application='lm') on food-delivery reviews, trained with a Loss layer.
import csv
import random

import numpy as np
from _setup import data_path, tiny_chinese_bert

from bert4x.backend import K, keras
from bert4x.layers import Loss
from bert4x.models import build_transformer_model
from bert4x.optimizers import Adam
from bert4x.snippets import AutoRegressiveDecoder, DataGenerator, sequence_padding
from bert4x.tokenizers import Tokenizer, load_vocab

maxlen = 40
batch_size = 32
config_path, checkpoint_path, dict_path = tiny_chinese_bert()

with open(data_path('datasets', 'sentiment', 'waimai_10k.csv'), encoding='utf-8') as f:
    texts = [row['review'] for row in csv.DictReader(f)]
random.Random(0).shuffle(texts)
train_data, valid_data = texts[:1500], texts[1500:1700]

_token_dict = load_vocab(dict_path)
_tokenizer = Tokenizer(_token_dict, do_lower_case=True)
counts = {}
for text in train_data:
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
        batch_token_ids = []
        for is_end, text in self.sample(random):
            token_ids, _ = tokenizer.encode(text, maxlen=maxlen)
            batch_token_ids.append(token_ids)
            if len(batch_token_ids) == self.batch_size or is_end:
                batch_token_ids = sequence_padding(batch_token_ids)
                yield batch_token_ids, None
                batch_token_ids = []


class CrossEntropy(Loss):
    def compute_loss(self, inputs, mask=None):
        y_true, y_pred = inputs
        y_mask = K.cast(K.not_equal(y_true, 0), K.floatx())[:, 1:]
        loss = K.sparse_categorical_crossentropy(y_true[:, 1:], y_pred[:, :-1])
        return K.sum(loss * y_mask) / K.sum(y_mask)


model = build_transformer_model(config_path, checkpoint_path, application='lm', keep_tokens=keep_tokens,
                                segment_vocab_size=0)
output = CrossEntropy(1)([model.inputs[0], model.outputs[0]])
train_model = keras.models.Model(model.inputs, output)
train_model.compile(optimizer=Adam(3e-3))


class TextCompletion(AutoRegressiveDecoder):
    @AutoRegressiveDecoder.wraps(default_rtype='probas')
    def predict(self, inputs, output_ids, states):
        token_ids = np.concatenate([inputs[0], output_ids], 1)
        return self.last_token(model).predict(token_ids, verbose=0)

    def generate(self, text):
        token_ids = tokenizer.encode(text)[0][:-1]
        output_ids = self.random_sample([token_ids], n=1, topk=1)[0]
        return text + tokenizer.decode(output_ids)


def next_token_accuracy(data):
    token_ids = sequence_padding([tokenizer.encode(t, maxlen=maxlen)[0] for t in data])
    predicted = model.predict(token_ids, verbose=0).argmax(axis=-1)[:, :-1]
    targets = token_ids[:, 1:]
    real = targets > 0
    values, counts = np.unique(targets[real], return_counts=True)
    return (predicted == targets)[real].mean(), counts.max() / real.sum()


history = train_model.fit(data_generator(train_data, batch_size), epochs=3, verbose=0)
losses = history.history['loss']
print('completion:', TextCompletion(start_id=None, end_id=tokenizer._token_end_id, maxlen=12).generate('味道'))
accuracy, unigram = next_token_accuracy(valid_data)
print(f'FINAL metric=next_token_accuracy value={accuracy:.4f} chance={1 / len(token_dict):.6f} unigram={unigram:.4f} '
      f'loss_first={losses[0]:.4f} loss_last={losses[-1]:.4f}')
