"""sequence_padding, truncate_sequences and DataGenerator (with a real model.fit)."""

import keras
import numpy as np
import pytest

from bert4x.snippets.data import DataGenerator, packing_positions, sequence_padding, truncate_sequences

# --------------------------------------------------------------------------
# sequence_padding
# --------------------------------------------------------------------------


def test_sequence_padding_post_and_pre():
    np.testing.assert_array_equal(sequence_padding([[1, 2, 3], [4]]), [[1, 2, 3], [4, 0, 0]])
    np.testing.assert_array_equal(
        sequence_padding([[1, 2, 3], [4]], mode="pre", value=-1), [[1, 2, 3], [-1, -1, 4]]
    )
    np.testing.assert_array_equal(sequence_padding([[1], [2, 3]], length=4), [[1, 0, 0, 0], [2, 3, 0, 0]])


def test_sequence_padding_truncates_to_length_keeping_the_start():
    np.testing.assert_array_equal(sequence_padding([[1, 2, 3, 4], [5]], length=2), [[1, 2], [5, 0]])
    np.testing.assert_array_equal(sequence_padding([[1, 2, 3, 4], [5]], length=2, mode="pre"), [[1, 2], [0, 5]])
    assert sequence_padding([[1, 2], [3]], length=0).shape == (2, 0)


def test_sequence_padding_trailing_dims_and_seq_dims_2():
    # Items of shape (len, 3): only the first dim is padded.
    out = sequence_padding([np.ones((2, 3)), np.ones((1, 3))])
    assert out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out[1], [[1, 1, 1], [0, 0, 0]])
    # [n, n] grids (e.g. GlobalPointer labels) padded in both dims.
    grids = [np.ones((2, 2), int), np.ones((3, 3), int)]
    out = sequence_padding(grids, seq_dims=2)
    assert out.shape == (2, 3, 3) and out[0].sum() == 4 and out[1].sum() == 9
    out = sequence_padding(grids, length=[2, 4], seq_dims=2, value=7)
    assert out.shape == (2, 2, 4)
    np.testing.assert_array_equal(out[1], [[1, 1, 1, 7], [1, 1, 1, 7]])
    assert sequence_padding(grids, length=5, seq_dims=2).shape == (2, 5, 5)


def test_sequence_padding_keeps_dtype():
    assert sequence_padding([np.array([1.5]), np.array([2.5, 3.5])]).dtype == np.float64
    assert sequence_padding([np.array([1], np.int32), np.array([2, 3], np.int32)]).dtype == np.int32


def test_sequence_padding_errors():
    with pytest.raises(ValueError, match="mode"):
        sequence_padding([[1]], mode="middle")
    with pytest.raises(ValueError, match="empty"):
        sequence_padding([])
    with pytest.raises(ValueError, match=r"inputs\[1\]"):
        sequence_padding([[[1, 2]], [[1, 2], [3]]])  # ragged below the padded dim
    with pytest.raises(ValueError, match=r"inputs\[1\]"):
        sequence_padding([np.ones((2, 3)), np.ones((2, 4))])  # trailing shapes differ
    with pytest.raises(ValueError, match="sequence dim"):
        sequence_padding([[1, 2], [3]], seq_dims=2)  # not deep enough
    with pytest.raises(ValueError, match="length has 1 entries"):
        sequence_padding([np.ones((2, 2))], length=[2], seq_dims=2)


# --------------------------------------------------------------------------
# truncate_sequences
# --------------------------------------------------------------------------


def test_truncate_sequences_pops_from_the_longest():
    a, b = [1, 2, 3, 4, 5, "SEP"], [6, 7, "SEP"]
    result = truncate_sequences(6, -2, a, b)
    assert a == [1, 2, "SEP"] and b == [6, 7, "SEP"]  # in place, [SEP] kept
    assert result[0] is a and result[1] is b
    # Ties go to the first sequence; one index per sequence.
    a, b = ["CLS", 1, 2], ["CLS", 3, 4]
    assert truncate_sequences(4, [1, -1], a, b) == [["CLS", 2], ["CLS", 3]]
    # None is skipped; short enough input is left alone.
    a = [1, 2]
    assert truncate_sequences(5, -1, a, None) == [[1, 2]]


def test_truncate_sequences_errors():
    with pytest.raises(ValueError, match="too small"):
        truncate_sequences(0, -2, ["only"])
    with pytest.raises(ValueError, match="indices"):
        truncate_sequences(1, [0], [1], [2])


# --------------------------------------------------------------------------
# DataGenerator
# --------------------------------------------------------------------------


class PairBatches(DataGenerator):
    """bert4keras-style: yields (x, y) with x = [[sample_id, feature]]."""

    def __iter__(self, random=False):
        xs, ys = [], []
        for is_end, sample_id in self.sample(random):
            xs.append([sample_id, sample_id / 10.0])
            ys.append([sample_id % 2])
            if len(xs) == self.batch_size or is_end:
                yield np.array(xs, "float32"), np.array(ys, "float32")
                xs, ys = [], []


def test_sample_flags_the_last_item_and_shuffles():
    generator = PairBatches(list(range(7)), batch_size=3)
    assert list(generator.sample()) == [(False, i) for i in range(6)] + [(True, 6)]
    np.random.seed(0)
    shuffled = [item for _, item in generator.sample(random=True)]
    assert sorted(shuffled) == list(range(7)) and shuffled != list(range(7))
    assert list(PairBatches([], batch_size=3).sample()) == []


def test_len_and_batches():
    generator = PairBatches(list(range(10)), batch_size=4)
    assert len(generator) == 3 and generator.num_batches == 3
    batches = list(generator)  # iter() = __iter__(random=False)
    assert [len(x) for x, _ in batches] == [4, 4, 2]
    assert np.concatenate([x[:, 0] for x, _ in batches]).tolist() == list(range(10))
    # Keras-style indexing gives each epoch's batches in turn.
    assert [len(generator[i][0]) for i in range(3)] == [4, 4, 2]
    assert [len(generator[i][0]) for i in range(3)] == [4, 4, 2]
    with pytest.raises(IndexError, match="out of range"):
        generator[3]


def test_batches_read_before_an_epoch_do_not_shorten_it():
    generator = PairBatches(list(range(10)), batch_size=4)
    generator[0], generator[1]  # what Keras's TF backend does to infer shapes
    generator.on_epoch_begin()
    epoch = [generator[i] for i in (2, 0, 1)]  # any index order
    assert sorted(np.concatenate([x[:, 0] for x, _ in epoch]).tolist()) == list(range(10))


def test_unsized_data_is_an_endless_dataset():
    generator = PairBatches(iter(range(10)), batch_size=4, buffer_size=3)
    assert generator.num_batches is None
    with pytest.raises(TypeError, match="no len"):
        len(generator)
    seen = [sample for x, _ in generator.__iter__(random=True) for sample in x[:, 0].tolist()]
    assert sorted(seen) == list(range(10))  # the shuffle buffer loses nothing


def test_forfit_and_fortest():
    generator = PairBatches(list(range(5)), batch_size=2)
    stream = iter(generator.forfit())  # a tf.data.Dataset on tensorflow, a generator elsewhere
    two_passes = [tuple(np.asarray(part) for part in next(stream)) for _ in range(2 * len(generator))]
    for epoch in (two_passes[:3], two_passes[3:]):
        assert sorted(np.concatenate([x[:, 0] for x, _ in epoch]).tolist()) == list(range(5))
        assert sorted(len(x) for x, _ in epoch) == [1, 2, 2]
    inputs = next(generator.fortest())
    assert inputs.shape == (2, 2) and inputs[:, 0].tolist() == [0, 1]


def test_wrong_number_of_batches_is_reported():
    class DropsLastBatch(DataGenerator):
        def __iter__(self, random=False):
            batch = []
            for _, item in self.sample(random):
                batch.append(item)
                if len(batch) == self.batch_size:  # forgets is_end
                    yield np.array(batch)
                    batch = []

    generator = DropsLastBatch(list(range(5)), batch_size=2)
    generator[0], generator[1]
    with pytest.raises(RuntimeError, match="yielded 2 batches but len\\(\\) is 3"):
        generator[2]

    class OneSamplePerBatch(DataGenerator):
        def __iter__(self, random=False):
            for _, item in self.sample(random):
                yield np.array([item])

    generator = OneSamplePerBatch(list(range(4)), batch_size=2)
    generator[0]
    with pytest.raises(RuntimeError, match="more than len\\(\\) = 2"):
        generator[1]


def test_errors_for_unusable_setups():
    with pytest.raises(NotImplementedError, match="__iter__"):
        iter(DataGenerator([1, 2, 3]))
    with pytest.raises(ValueError, match="batch_size"):
        PairBatches([1], batch_size=0)
    with pytest.raises(RuntimeError, match="workers=1"):
        PairBatches(list(range(4)), batch_size=2, workers=2)[0]


def tiny_model(seen):
    """Dense model on [id, feature] inputs; records the ids of every batch it trains on."""

    class Recorder(keras.layers.Layer):
        def call(self, x):
            try:  # real batches (run_eagerly=True); skip symbolic traces
                ids = keras.ops.convert_to_numpy(x[:, 0])
            except Exception:
                return x
            seen.append(ids.astype(int).tolist())
            return x

        def compute_output_shape(self, input_shape):
            return input_shape

    inputs = keras.Input((2,))
    outputs = keras.layers.Dense(1, activation="sigmoid")(Recorder()(inputs))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="sgd", loss="binary_crossentropy", run_eagerly=True)
    return model


def epochs_of(seen):
    epochs, current = [], None
    for entry in seen:
        if entry == "epoch":
            current = []
            epochs.append(current)
        else:
            current.append(entry)
    return epochs


@pytest.mark.parametrize("shuffle", [True, False])
def test_model_fit_sees_every_sample_once_per_epoch(shuffle):
    np.random.seed(1)
    seen = []
    model = tiny_model(seen)
    mark_epoch = keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: seen.append("epoch"))
    generator = PairBatches(list(range(23)), batch_size=5)
    history = model.fit(generator, epochs=3, shuffle=shuffle, callbacks=[mark_epoch], verbose=0)
    assert len(history.history["loss"]) == 3

    epochs = epochs_of(seen)
    assert len(epochs) == 3
    for batches in epochs:
        assert sorted(len(b) for b in batches) == [3, 5, 5, 5, 5]  # last batch: 23 - 4 * 5
        ids = [i for b in batches for i in b]
        assert sorted(ids) == list(range(23))  # every sample exactly once
    orders = [tuple(i for b in batches for i in b) for batches in epochs]
    assert len(set(orders)) == 3  # reshuffled every epoch


def test_model_fit_with_forfit_as_in_bert4keras():
    seen = []
    model = tiny_model(seen)
    mark_epoch = keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: seen.append("epoch"))
    generator = PairBatches(list(range(10)), batch_size=4)
    model.fit(generator.forfit(), steps_per_epoch=len(generator), epochs=2, callbacks=[mark_epoch], verbose=0)
    for batches in epochs_of(seen):
        assert sorted(i for b in batches for i in b) == list(range(10))


def test_model_predict_in_order_with_random_false():
    seen = []
    model = tiny_model(seen)
    predictions = model.predict(PairBatches(list(range(11)), batch_size=4, random=False), verbose=0)
    assert predictions.shape == (11, 1)
    assert [i for b in seen for i in b] == list(range(11))


def test_pydataset_style_subclass():
    class Indexed(DataGenerator):
        def __getitem__(self, index):
            ids = self.data[index * self.batch_size : (index + 1) * self.batch_size]
            x = np.array([[i, i / 10.0] for i in ids], "float32")
            return x, np.array([[i % 2] for i in ids], "float32")

    generator = Indexed(list(range(9)), batch_size=4)
    assert [len(x) for x, _ in generator] == [4, 4, 1]
    shuffled = [x[0, 0] for x, _ in generator.__iter__(random=True)]
    assert sorted(shuffled) == [0, 4, 8]
    seen = []
    tiny_model(seen).fit(generator, epochs=1, verbose=0)
    assert sorted(i for b in seen for i in b) == list(range(9))


def test_packing_positions_lists_the_real_tokens_in_a_bucketed_capacity():
    ids = sequence_padding([[101, 5, 6], [101], [101, 7, 8, 9, 10, 11, 12]], length=8)
    packed = packing_positions(ids, buckets=4)  # 11 tokens in a capacity of 12 (steps of 3 rows x 2 positions)
    assert packed.shape == (3, 4) and packed.dtype == np.int32
    np.testing.assert_array_equal(packed.reshape(-1)[:11], np.flatnonzero(ids))
    np.testing.assert_array_equal(packed.reshape(-1)[11:], -1)
    assert packing_positions(np.ones((2, 5), "int32"), buckets=2).shape == (2, 5)  # never above len
    assert packing_positions(np.ones((2, 8), "int32") * (np.arange(8) < 3), buckets=64).shape == (2, 3)
    with pytest.raises(ValueError, match=r"token_ids must be \[batch, len\], got shape \(8,\)"):
        packing_positions(ids[0])
    with pytest.raises(ValueError, match="buckets must be a positive int, got 0"):
        packing_positions(ids, buckets=0)


# --------------------------------------------------------------------------
# bert4keras ports on Keras 3: (inputs, None), lengths that vary, forfit, to_dataset, failures
# --------------------------------------------------------------------------
class LengthBatches(DataGenerator):
    """Batches of 4 rows padded to the lengths listed, labels the row sums."""

    def __init__(self, lengths, labels=True, **kwargs):
        super().__init__(list(range(4 * len(lengths))), batch_size=4, **kwargs)
        self.lengths, self.labels = lengths, labels

    def __iter__(self, random=False):
        for length in self.lengths:
            ids = np.random.randint(1, 9, size=(4, length)).astype("int32")
            yield [ids], (ids.sum(axis=1, keepdims=True).astype("float32") if self.labels else None)


def length_model(add_loss=False):
    ids = keras.Input((None,), dtype="int32")
    x = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(10, 4)(ids))
    out = keras.layers.Dense(1)(x)
    if add_loss:
        from bert4x.layers import Loss

        class SquareLoss(Loss):
            def compute_loss(self, inputs, mask=None):
                return keras.ops.mean(keras.ops.square(inputs - 1.0))

        out = SquareLoss()(out)
    model = keras.Model(ids, out)
    model.compile(optimizer="sgd", loss=None if add_loss else "mse")
    return model


@pytest.mark.parametrize("via_forfit", [False, True])
def test_two_equal_lengths_then_a_shorter_batch_fit(via_forfit):
    generator = LengthBatches([10, 10, 6, 8])
    model = length_model()
    if via_forfit:
        history = model.fit(generator.forfit(), steps_per_epoch=len(generator), epochs=2, verbose=0).history
    else:
        history = model.fit(generator, epochs=2, verbose=0).history
    assert len(history["loss"]) == 2 and np.isfinite(history["loss"]).all()
    assert model.predict(LengthBatches([10, 10, 3], random=False), verbose=0).shape == (12, 1)


def test_a_second_batch_one_longer_than_the_first_does_not_fix_the_length():
    model = length_model()
    history = model.fit(LengthBatches([6, 7, 3, 6]), epochs=1, verbose=0).history  # 7 - 1 == 6 must not fix 6
    assert np.isfinite(history["loss"]).all()
    batches = LengthBatches([6, 7, 3])
    assert [batches[i][0][0].shape for i in range(3)] == [(4, 6), (4, 7), (4, 3)]  # a user's reads are untouched


@pytest.mark.parametrize("via_forfit", [False, True])
def test_batches_without_labels_fit_models_with_added_losses(via_forfit):
    generator = LengthBatches([5, 5, 3], labels=False)
    model = length_model(add_loss=True)
    data = generator.forfit() if via_forfit else generator
    history = model.fit(data, steps_per_epoch=len(generator) if via_forfit else None, epochs=3, verbose=0).history
    assert history["loss"][-1] < history["loss"][0]


def test_to_dataset_batches_single_samples():
    class Samples(DataGenerator):
        def __iter__(self, random=False):
            for _, n in self.sample(random):
                yield [n] * n, n

    dataset = Samples([1, 3, 2, 2], batch_size=2, random=False).to_dataset(("int32", "int32"), ([None], []),
                                                                           padded_batch=True)
    first, second = (tuple(np.asarray(t) for t in b) for b in dataset.take(2))
    assert first[0].tolist() == [[1, 0, 0], [3, 3, 3]] and first[1].tolist() == [1, 3]
    assert second[0].tolist() == [[2, 2], [2, 2]]
    named = Samples([2, 2], batch_size=2, random=False).to_dataset(("int32", "int32"), ([2], []), names=("x", "y"))
    batch = next(iter(named))
    assert sorted(batch) == ["x", "y"] and tuple(batch["x"].shape) == (2, 2)


FAILING_FIT = """
import numpy as np, keras
from bert4x.snippets import DataGenerator
class Fails(DataGenerator):
    def __iter__(self, random=False):
        yield np.ones((2, 3), "int32"), np.ones((2, 1), "float32")
        raise KeyError("bad sample")
x = keras.Input((3,), dtype="int32")
model = keras.Model(x, keras.layers.Dense(1)(keras.layers.Flatten()(keras.layers.Embedding(5, 2)(x))))
model.compile(optimizer="sgd", loss="mse")
data = Fails(list(range(8)), batch_size=2)
model.fit(data.forfit() if {forfit} else data, steps_per_epoch=4 if {forfit} else None, epochs=2, verbose=0)
"""


@pytest.mark.parametrize("forfit", [False, True])
def test_a_generator_failing_inside_fit_ends_the_process(forfit):
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.getcwd(), TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", FAILING_FIT.format(forfit=forfit)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "bad sample" in proc.stderr
