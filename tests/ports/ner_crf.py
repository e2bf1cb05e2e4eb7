#! -*- coding: utf-8 -*-
# ruff: noqa: E741, UP009  (bert4keras script style: `l` for a line, a coding line)
# People's Daily NER with BERT + CRF, decoded with Viterbi, scored by entity F1.
from _setup import data_path, tiny_chinese_bert

from bert4x.backend import keras
from bert4x.layers import ConditionalRandomField
from bert4x.models import build_transformer_model
from bert4x.optimizers import Adam
from bert4x.snippets import DataGenerator, ViterbiDecoder, sequence_padding, to_array
from bert4x.tokenizers import Tokenizer

maxlen = 64
batch_size = 32
crf_lr_multiplier = 100
config_path, checkpoint_path, dict_path = tiny_chinese_bert()


def load_data(filename):
    D = []
    with open(filename, encoding='utf-8') as f:
        for l in f.read().split('\n\n'):
            if not l.strip():
                continue
            d = []
            for c in l.split('\n'):
                char, flag = c.split(' ')
                if flag[0] == 'B':
                    d.append([char, flag[2:]])
                elif flag[0] == 'I' and d:
                    d[-1][0] += char
                else:
                    d.append([char, 'O'])
            D.append(d)
    return D


data = load_data(data_path('datasets', 'ner', 'china-people-daily-ner-corpus', 'example.dev'))
train_data, valid_data = data[:1200], data[1600:1900]
tokenizer = Tokenizer(dict_path, do_lower_case=True)
labels = ['PER', 'LOC', 'ORG']
id2label = dict(enumerate(labels))
label2id = {j: i for i, j in id2label.items()}
num_labels = len(labels) * 2 + 1


class data_generator(DataGenerator):
    def __iter__(self, random=False):
        batch_token_ids, batch_segment_ids, batch_labels = [], [], []
        for is_end, item in self.sample(random):
            token_ids, label_ids = [tokenizer._token_start_id], [0]
            for w, l in item:
                w_token_ids = tokenizer.encode(w)[0][1:-1]
                if len(token_ids) + len(w_token_ids) < maxlen:
                    token_ids += w_token_ids
                    if l == 'O':
                        label_ids += [0] * len(w_token_ids)
                    else:
                        B = label2id[l] * 2 + 1
                        I = label2id[l] * 2 + 2
                        label_ids += ([B] + [I] * (len(w_token_ids) - 1))
                else:
                    break
            token_ids += [tokenizer._token_end_id]
            label_ids += [0]
            batch_token_ids.append(token_ids)
            batch_segment_ids.append([0] * len(token_ids))
            batch_labels.append(label_ids)
            if len(batch_token_ids) == self.batch_size or is_end:
                batch_token_ids = sequence_padding(batch_token_ids)
                batch_segment_ids = sequence_padding(batch_segment_ids)
                batch_labels = sequence_padding(batch_labels)
                yield [batch_token_ids, batch_segment_ids], batch_labels
                batch_token_ids, batch_segment_ids, batch_labels = [], [], []


model = build_transformer_model(config_path, checkpoint_path)
output = keras.layers.Dense(num_labels)(model.output)
CRF = ConditionalRandomField(lr_multiplier=crf_lr_multiplier)
output = CRF(output)
model = keras.models.Model(model.input, output)
model.compile(loss=CRF.sparse_loss, optimizer=Adam(5e-3), metrics=[CRF.sparse_accuracy])


class NamedEntityRecognizer(ViterbiDecoder):
    def recognize(self, text):
        tokens = tokenizer.tokenize(text, maxlen=maxlen)
        mapping = tokenizer.rematch(text, tokens)
        token_ids = tokenizer.tokens_to_ids(tokens)
        segment_ids = [0] * len(token_ids)
        token_ids, segment_ids = to_array([token_ids], [segment_ids])
        nodes = model.predict([token_ids, segment_ids], verbose=0)[0]
        labels = self.decode(nodes)
        entities, starting = [], False
        for i, label in enumerate(labels):
            if label > 0:
                if label % 2 == 1:
                    starting = True
                    entities.append([[i], id2label[(label - 1) // 2]])
                elif starting:
                    entities[-1][0].append(i)
                else:
                    starting = False
            else:
                starting = False
        return [(mapping[w[0]][0], mapping[w[-1]][-1], l) for w, l in entities if mapping[w[0]] and mapping[w[-1]]]


def evaluate(data):
    X, Y, Z = 1e-10, 1e-10, 1e-10
    for d in data:
        text = ''.join([i[0] for i in d])
        R = set(NER.recognize(text))
        T, i = set(), 0
        for w, l in d:
            if l != 'O':
                T.add((i, i + len(w) - 1, l))
            i += len(w)
        X += len(R & T)
        Y += len(R)
        Z += len(T)
    return 2 * X / (Y + Z)


train_generator = data_generator(train_data, batch_size)
history = model.fit(train_generator, epochs=3, verbose=0)
losses = history.history['loss']
NER = NamedEntityRecognizer(trans=keras.ops.convert_to_numpy(CRF.trans), starts=[0], ends=[0])
f1 = evaluate(valid_data[:100])
print(f'FINAL metric=entity_f1 value={f1:.4f} chance=0.0000 loss_first={losses[0]:.4f} loss_last={losses[-1]:.4f}')
