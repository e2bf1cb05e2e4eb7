#! -*- coding: utf-8 -*-
# ruff: noqa: E741, UP009  (bert4keras script style: `l` for a line, a coding line)
# CSL title generation with UniLM: abstract -> title, trained with a Loss layer, decoded greedily.
import numpy as np
from _setup import data_path, tiny_chinese_bert

from bert4x.backend import K, keras
from bert4x.layers import Loss
from bert4x.models import build_transformer_model
from bert4x.optimizers import Adam
from bert4x.snippets import AutoRegressiveDecoder, DataGenerator, sequence_padding
from bert4x.tokenizers import Tokenizer, load_vocab

maxlen = 64
batch_size = 16
config_path, checkpoint_path, dict_path = tiny_chinese_bert(hidden_size=48)


def load_data(filename):
    D = []
    with open(filename, encoding='utf-8') as f:
        for l in f:
            _, content, title = l.strip().split('\t')
            D.append((title, content))
    return D


data = load_data(data_path('datasets', 'summarization', 'csl_title', 'dev.tsv'))
train_data, valid_data = data[:400], data[900:940]
# Keep the tokens of characters seen at least twice in the training data (a small output softmax).
_token_dict = load_vocab(dict_path)
_tokenizer = Tokenizer(_token_dict, do_lower_case=True)
counts = {}
for title, content in train_data:
    for t in _tokenizer.tokenize(title + content)[1:-1]:
        counts[t] = counts.get(t, 0) + 1
token_dict, keep_tokens = {}, []
for t in ['[PAD]', '[UNK]', '[CLS]', '[SEP]'] + [t for t, c in sorted(counts.items()) if c >= 2]:
    if t not in token_dict:
        token_dict[t] = len(token_dict)
        keep_tokens.append(_token_dict[t])
tokenizer = Tokenizer(token_dict, do_lower_case=True)


class data_generator(DataGenerator):
    def __iter__(self, random=False):
        batch_token_ids, batch_segment_ids = [], []
        for is_end, (title, content) in self.sample(random):
            token_ids, segment_ids = tokenizer.encode(content, title, maxlen=maxlen)
            batch_token_ids.append(token_ids)
            batch_segment_ids.append(segment_ids)
            if len(batch_token_ids) == self.batch_size or is_end:
                batch_token_ids = sequence_padding(batch_token_ids)
                batch_segment_ids = sequence_padding(batch_segment_ids)
                yield [batch_token_ids, batch_segment_ids], None
                batch_token_ids, batch_segment_ids = [], []


class CrossEntropy(Loss):
    """Cross entropy of the title tokens only (segment 1), padding excluded."""

    def compute_loss(self, inputs, mask=None):
        y_true, y_mask, y_pred = inputs
        y_true = y_true[:, 1:]
        y_mask = K.cast(y_mask[:, 1:], K.floatx())
        y_pred = y_pred[:, :-1]
        loss = K.sparse_categorical_crossentropy(y_true, y_pred)
        return K.sum(loss * y_mask) / K.sum(y_mask)


model = build_transformer_model(config_path, checkpoint_path, application='unilm', keep_tokens=keep_tokens)
output = CrossEntropy(2)(model.inputs + model.outputs)
model = keras.models.Model(model.inputs, output)
model.compile(optimizer=Adam(3e-3))


class AutoTitle(AutoRegressiveDecoder):
    @AutoRegressiveDecoder.wraps(default_rtype='probas')
    def predict(self, inputs, output_ids, states):
        token_ids, segment_ids = inputs
        token_ids = np.concatenate([token_ids, output_ids], 1)
        segment_ids = np.concatenate([segment_ids, np.ones_like(output_ids)], 1)
        return self.last_token(model).predict([token_ids, segment_ids], verbose=0)

    def generate(self, text):
        token_ids, segment_ids = tokenizer.encode(text, maxlen=maxlen - 16)
        output_ids = self.random_sample([token_ids, segment_ids], n=1, topk=1)[0]  # topk=1: greedy
        return tokenizer.decode(output_ids)


def title_token_accuracy(data):
    """Teacher-forced next-token accuracy on the titles, and that of always guessing the commonest title token."""
    encoded = [tokenizer.encode(content, title, maxlen=maxlen) for title, content in data]
    token_ids = sequence_padding([t for t, _ in encoded])
    segment_ids = sequence_padding([s for _, s in encoded])
    predicted = model.predict([token_ids, segment_ids], verbose=0).argmax(axis=-1)[:, :-1]
    targets, in_title = token_ids[:, 1:], segment_ids[:, 1:] > 0
    values, counts = np.unique(targets[in_title], return_counts=True)
    return (predicted == targets)[in_title].mean(), counts.max() / in_title.sum()


train_generator = data_generator(train_data, batch_size)
history = model.fit(train_generator, epochs=3, verbose=0)
losses = history.history['loss']
predictor = keras.models.Model(model.inputs, model.layers[-1].input[2])
model_for_eval, model = model, predictor
autotitle = AutoTitle(start_id=None, end_id=tokenizer._token_end_id, maxlen=16)
print('generated:', autotitle.generate(valid_data[0][1]), '| reference:', valid_data[0][0])
accuracy, most_common = title_token_accuracy(valid_data)
print(f'FINAL metric=title_token_accuracy value={accuracy:.4f} chance={1 / len(token_dict):.6f} '
      f'unigram={most_common:.4f} loss_first={losses[0]:.4f} loss_last={losses[-1]:.4f}')
