#! -*- coding: utf-8 -*-
# ruff: noqa: E741, UP009  (bert4keras script style: `l` for a line, a coding line)
# Masked-LM fine-tuning (with_mlm=True) on reviews: 15% of the characters are masked and predicted.
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
for t in ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + [t for t, c in sorted(counts.items()) if c >= 3]:
    if t not in token_dict:
        token_dict[t] = len(token_dict)
        keep_tokens.append(_token_dict[t])
tokenizer = Tokenizer(token_dict, do_lower_case=True)
mask_id = token_dict['[MASK]']


def random_masking(token_ids, rng):
    """15% of the characters: [MASK] in 80% of cases, a random token in 10%, unchanged in 10%."""
    source, target = [], []
    for t in token_ids:
        r = rng.random()
        if t in (tokenizer._token_start_id, tokenizer._token_end_id) or r >= 0.15:
            source.append(t)
            target.append(0)
        else:
            r /= 0.15
            source.append(mask_id if r < 0.8 else rng.randrange(5, len(token_dict)) if r < 0.9 else t)
            target.append(t)
    return source, target


class data_generator(DataGenerator):
    def __iter__(self, random=False):
        rng = __import__('random').Random(len(self.data))
        batch_token_ids, batch_segment_ids, batch_output_ids = [], [], []
        for is_end, text in self.sample(random):
            token_ids, segment_ids = tokenizer.encode(text, maxlen=maxlen)
            source, target = random_masking(token_ids, rng)
            batch_token_ids.append(source)
            batch_segment_ids.append(segment_ids)
            batch_output_ids.append(target)
            if len(batch_token_ids) == self.batch_size or is_end:
                batch_token_ids = sequence_padding(batch_token_ids)
                batch_segment_ids = sequence_padding(batch_segment_ids)
                batch_output_ids = sequence_padding(batch_output_ids)
                yield [batch_token_ids, batch_segment_ids, batch_output_ids], None
                batch_token_ids, batch_segment_ids, batch_output_ids = [], [], []


class CrossEntropy(Loss):
    """Cross entropy at the masked positions only (target id 0 elsewhere)."""

    def compute_loss(self, inputs, mask=None):
        y_true, y_pred = inputs
        y_mask = K.cast(K.not_equal(y_true, 0), K.floatx())
        loss = K.sparse_categorical_crossentropy(y_true, y_pred)
        return K.sum(loss * y_mask) / K.maximum(K.sum(y_mask), 1.0)


bert = build_transformer_model(config_path, checkpoint_path, with_mlm=True, keep_tokens=keep_tokens)
target_in = keras.layers.Input(shape=(None,), dtype='int32')
output = CrossEntropy(1)([target_in, bert.output])
train_model = keras.models.Model(bert.inputs + [target_in], output)
train_model.compile(optimizer=Adam(3e-3))


def masked_accuracy(data):
    batch = next(iter(data_generator(data, len(data))))[0]
    token_ids, segment_ids, targets = batch
    predicted = bert.predict([token_ids, segment_ids], verbose=0).argmax(axis=-1)
    real = targets > 0
    values, counts = np.unique(targets[real], return_counts=True)
    return (predicted == targets)[real].mean(), counts.max() / real.sum()


history = train_model.fit(data_generator(train_data, batch_size), epochs=3, verbose=0)
losses = history.history['loss']
accuracy, unigram = masked_accuracy(valid_data)
print(f'FINAL metric=masked_token_accuracy value={accuracy:.4f} chance={1 / len(token_dict):.6f} '
      f'unigram={unigram:.4f} loss_first={losses[0]:.4f} loss_last={losses[-1]:.4f}')
