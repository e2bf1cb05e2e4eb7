#! -*- coding: utf-8 -*-
# ruff: noqa: E741, UP009  (bert4keras script style: `l` for a line, a coding line)
# Sentiment classification (waimai reviews) with BERT's pooled [CLS] vector, written as a bert4keras script.
import csv
import random

import numpy as np
from _setup import data_path, tiny_chinese_bert

from bert4x.backend import keras
from bert4x.models import build_transformer_model
from bert4x.optimizers import Adam
from bert4x.snippets import DataGenerator, sequence_padding
from bert4x.tokenizers import Tokenizer, load_vocab

maxlen = 48
batch_size = 32
config_path, checkpoint_path, dict_path = tiny_chinese_bert()


def load_data(filename):
    D = []
    with open(filename, encoding='utf-8') as f:
        for row in csv.DictReader(f):
            D.append((row['review'], int(row['label'])))
    return D


data = load_data(data_path('datasets', 'sentiment', 'waimai_10k.csv'))
random.Random(0).shuffle(data)
train_data, valid_data = data[:1600], data[1600:2000]

token_dict, keep_tokens = load_vocab(dict_path, simplified=True, startswith=['[PAD]', '[UNK]', '[CLS]', '[SEP]'])
tokenizer = Tokenizer(token_dict, do_lower_case=True)


class data_generator(DataGenerator):
    def __iter__(self, random=False):
        batch_token_ids, batch_segment_ids, batch_labels = [], [], []
        for is_end, (text, label) in self.sample(random):
            token_ids, segment_ids = tokenizer.encode(text, maxlen=maxlen)
            batch_token_ids.append(token_ids)
            batch_segment_ids.append(segment_ids)
            batch_labels.append([label])
            if len(batch_token_ids) == self.batch_size or is_end:
                batch_token_ids = sequence_padding(batch_token_ids)
                batch_segment_ids = sequence_padding(batch_segment_ids)
                batch_labels = sequence_padding(batch_labels)
                yield [batch_token_ids, batch_segment_ids], batch_labels
                batch_token_ids, batch_segment_ids, batch_labels = [], [], []


bert = build_transformer_model(config_path=config_path, checkpoint_path=checkpoint_path, with_pool=True,
                               keep_tokens=keep_tokens, return_keras_model=False)
output = keras.layers.Dropout(rate=0.1)(bert.model.output)
output = keras.layers.Dense(units=2, activation='softmax', kernel_initializer=bert.initializer)(output)
model = keras.models.Model(bert.model.input, output)
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


history = model.fit(train_generator.forfit(), steps_per_epoch=len(train_generator), epochs=3, verbose=0)
losses = history.history['loss']
accuracy = evaluate(valid_generator)
majority = max(np.mean([label for _, label in valid_data]), 1 - np.mean([label for _, label in valid_data]))
print(f'FINAL metric=accuracy value={accuracy:.4f} chance={majority:.4f} loss_first={losses[0]:.4f} '
      f'loss_last={losses[-1]:.4f}')
