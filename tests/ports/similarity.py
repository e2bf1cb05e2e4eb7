#! -*- coding: utf-8 -*-
# ruff: noqa: E741, UP009  (bert4keras script style: `l` for a line, a coding line)
# LCQMC-style sentence-pair similarity: both sentences in one input, a softmax over the pooled [CLS] vector.
import random

import numpy as np
from _setup import data_path, tiny_chinese_bert

from bert4x.backend import keras
from bert4x.models import build_transformer_model
from bert4x.optimizers import Adam
from bert4x.snippets import DataGenerator, sequence_padding
from bert4x.tokenizers import Tokenizer

maxlen = 40
batch_size = 32
config_path, checkpoint_path, dict_path = tiny_chinese_bert()


def load_data(filename):
    D = []
    with open(filename, encoding='utf-8') as f:
        for l in f:
            text1, text2, label = l.strip().split('\t')
            D.append((text1, text2, int(label)))
    return D


data = load_data(data_path('datasets', 'sentence_pairs', 'LCQMC', 'dev.txt'))
random.Random(0).shuffle(data)
train_data, valid_data = data[:2000], data[2400:2800]
tokenizer = Tokenizer(dict_path, do_lower_case=True)


class data_generator(DataGenerator):
    def __iter__(self, random=False):
        batch_token_ids, batch_segment_ids, batch_labels = [], [], []
        for is_end, (text1, text2, label) in self.sample(random):
            token_ids, segment_ids = tokenizer.encode(text1, text2, maxlen=maxlen)
            batch_token_ids.append(token_ids)
            batch_segment_ids.append(segment_ids)
            batch_labels.append([label])
            if len(batch_token_ids) == self.batch_size or is_end:
                batch_token_ids = sequence_padding(batch_token_ids)
                batch_segment_ids = sequence_padding(batch_segment_ids)
                batch_labels = sequence_padding(batch_labels)
                yield [batch_token_ids, batch_segment_ids], batch_labels
                batch_token_ids, batch_segment_ids, batch_labels = [], [], []


bert = build_transformer_model(config_path=config_path, checkpoint_path=checkpoint_path, with_pool=True)
output = keras.layers.Dropout(rate=0.1)(bert.output)
output = keras.layers.Dense(units=2, activation='softmax')(output)
model = keras.models.Model(bert.input, output)
model.compile(loss='sparse_categorical_crossentropy', optimizer=Adam(2e-3), metrics=['accuracy'])

train_generator = data_generator(train_data, batch_size)
valid_generator = data_generator(valid_data, batch_size)


def evaluate(data):
    total, right = 0., 0.
    for x_true, y_true in data:
        y_pred = model.predict(x_true, verbose=0).argmax(axis=1)
        y_true = y_true[:, 0]
        total += len(y_true)
        right += (y_true == y_pred).sum()
    return right / total


history = model.fit(train_generator, epochs=3, verbose=0)
losses = history.history['loss']
accuracy = evaluate(valid_generator)
positive = np.mean([d[2] for d in valid_data])
print(f'FINAL metric=accuracy value={accuracy:.4f} chance={max(positive, 1 - positive):.4f} '
      f'loss_first={losses[0]:.4f} loss_last={losses[-1]:.4f}')
