#! -*- coding: utf-8 -*-
# ruff: noqa: E741, UP009  (bert4keras script style: `l` for a line, a coding line)
# IFLYTEK app-description classification (few-shot split) with FGM adversarial training on the token embeddings.
import json

import numpy as np
from _setup import data_path, tiny_chinese_bert

from bert4x.backend import keras
from bert4x.models import build_transformer_model
from bert4x.optimizers import Adam, adversarial_training
from bert4x.snippets import DataGenerator, sequence_padding
from bert4x.tokenizers import Tokenizer, load_vocab

maxlen = 32
batch_size = 32
config_path, checkpoint_path, dict_path = tiny_chinese_bert()


def load_data(filename):
    D = []
    with open(filename, encoding='utf-8') as f:
        for l in f:
            l = json.loads(l)
            D.append((l['sentence'], int(l['label'])))
    return D


train_data = load_data(data_path('datasets', 'clue_fewclue', 'iflytek', 'train_few_all.json'))
valid_data = load_data(data_path('datasets', 'clue_fewclue', 'iflytek', 'dev_few_all.json'))
# The ten commonest app categories keep the run short; labels are renumbered 0..9.
top = [label for label, _ in sorted(
    enumerate(np.bincount([l for _, l in train_data])), key=lambda x: -x[1])[:10]]
relabel = {label: i for i, label in enumerate(top)}
train_data = [(text, relabel[label]) for text, label in train_data if label in relabel]
valid_data = [(text, relabel[label]) for text, label in valid_data if label in relabel]
num_classes = len(top)
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
                               keep_tokens=keep_tokens)
output = keras.layers.Dense(units=num_classes, activation='softmax')(bert.output)
model = keras.models.Model(bert.input, output)
model.compile(loss='sparse_categorical_crossentropy', optimizer=Adam(5e-3), metrics=['sparse_categorical_accuracy'])
adversarial_training(model, 'Embedding-Token', 0.1)


def evaluate(data):
    total, right = 0., 0.
    for x_true, y_true in data:
        y_pred = model.predict(x_true, verbose=0).argmax(axis=1)
        y_true = y_true[:, 0]
        total += len(y_true)
        right += (y_true == y_pred).sum()
    return right / total


history = model.fit(data_generator(train_data, batch_size), epochs=6, verbose=0)
losses = history.history['loss']
accuracy = evaluate(data_generator(valid_data, batch_size))
majority = np.bincount([label for _, label in valid_data]).max() / len(valid_data)
print(f'FINAL metric=accuracy value={accuracy:.4f} chance={majority:.4f} loss_first={losses[0]:.4f} '
      f'loss_last={losses[-1]:.4f}')
