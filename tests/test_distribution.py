"""Data and model parallelism on simulated devices: jax with 4 host devices (XLA_FLAGS), tensorflow with 2 logical
CPUs. Both run in subprocesses, since devices are fixed when the backend starts."""

import os

# tf.distribute needs the logical CPUs declared before TensorFlow starts its runtime: only the subprocess asks.
if os.environ.get("BERT4X_TF_LOGICAL_CPUS"):
    import tensorflow as tf

    _cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        _cpu, [tf.config.LogicalDeviceConfiguration()] * int(os.environ["BERT4X_TF_LOGICAL_CPUS"])
    )

import re
import subprocess
import sys

import keras
import numpy as np
import pytest
from helpers import REPO, in_subprocess

from bert4x.distribution import (
    LAYOUT_RULES,
    data_parallel,
    global_batch_size,
    model_parallel,
    num_replicas,
    scope,
    uncovered_kernels,
)
from bert4x.models import MODELS, build_transformer_model

BACKEND = keras.backend.backend()
TINY = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
            max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
rng = np.random.default_rng(0)
TOKENS = rng.integers(1, 40, size=(8, 12)).astype("int32")
TOKENS[:, 10:] = 0  # padding, at the same place in every row: every replica holds as many real tokens
SEGMENTS = np.zeros_like(TOKENS)
TARGETS = rng.integers(1, 40, size=(8, 12)).astype("int32")
WEIGHTS = (TOKENS > 0).astype("float32")


def run_pytest_on_devices(backend: str, devices: int, *args: str, timeout: int = 600) -> None:
    """Re-runs pytest on `args` in a subprocess on `backend` with `devices` simulated CPU devices."""
    env = dict(os.environ, KERAS_BACKEND=backend, BERT4X_SUBPROCESS="1")
    if backend == "jax":
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    else:
        env.update(BERT4X_TF_LOGICAL_CPUS=str(devices))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"{backend} with {devices} devices failed:\n{tail}"
    assert " passed" in proc.stdout and " skipped" not in proc.stdout, f"{backend} run passed nothing:\n{tail}"


@pytest.mark.skipif(in_subprocess, reason="already in a subprocess")
def test_on_jax_with_4_simulated_devices():
    run_pytest_on_devices("jax", 4, "tests/test_distribution.py", "-k", "test_jax_")


@pytest.mark.skipif(in_subprocess, reason="already in a subprocess")
def test_on_tensorflow_with_2_logical_cpus():
    run_pytest_on_devices("tensorflow", 2, "tests/test_distribution.py", "-k", "test_tf_")


def _checkpoint(tmp_path):
    """A tiny MLM BERT saved as a Hugging Face checkpoint (writing needs no tensorflow): (config, checkpoint)."""
    keras.utils.set_random_seed(1)
    reference = build_transformer_model(TINY, with_mlm="linear", return_keras_model=False)
    folder = str(tmp_path / "hf")
    reference.save_weights_as_checkpoint(folder, format="huggingface")
    return os.path.join(folder, "config.json"), folder


def _train(model, steps=4):
    """Loss after each of `steps` SGD steps on the same global batch of 8."""
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="mean_with_sample_weight"),
    )
    history = model.fit([TOKENS, SEGMENTS], TARGETS, sample_weight=WEIGHTS, batch_size=8, epochs=steps,
                        shuffle=False, verbose=0)
    return np.array(history.history["loss"])


def _predict(model):
    return np.asarray(model.predict([TOKENS, SEGMENTS], batch_size=8, verbose=0), dtype=np.float32)


# ----------------------------------------------------------------- the recipe, on any backend
@pytest.mark.parametrize("name", sorted(MODELS))
def test_layout_rules_cover_every_registered_model(name):
    for application in ("encoder", "lm", "unilm"):
        try:
            transformer = build_transformer_model(
                None, model=name, application=application, return_keras_model=False,
                vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
            )
        except ValueError as e:
            if "application" in str(e):
                continue  # the model does not offer this application
            raise
        paths = [w.path for w in transformer.model.weights]
        assert uncovered_kernels(transformer.model) == [], name
        for path in paths:  # at most one rule per weight (keras.distribution refuses two)
            assert sum(bool(re.fullmatch(p, path)) for p in LAYOUT_RULES) <= 1, path
        sharded = [p for p in paths if any(re.fullmatch(r, p) for r in LAYOUT_RULES) and not p.endswith("/bias")]
        # The token embedding and, per distinct layer, the attention's two kernels and the feed-forward's two (or
        # three), or a gated attention unit's two; ALBERT's layers share one set of weights.
        layers = {p.split("/")[0] for p in paths if p.split("/")[0].endswith("MultiHeadSelfAttention")}
        units = {p.split("/")[0] for p in paths if p.split("/")[0].endswith("GatedAttentionUnit")}
        assert layers or units, (name, paths)
        per_layer = 4 if layers else 2
        assert len(sharded) >= 1 + per_layer * min(len(layers or units), transformer.num_hidden_layers), (name, sharded)


def test_layout_rules_match_the_sublayers_of_attention_and_feed_forward():
    def rule(path):
        found = [spec for p, spec in LAYOUT_RULES.items() if re.fullmatch(p, path)]
        return found[0] if found else None

    assert rule("Transformer-0-MultiHeadSelfAttention/qkv/kernel") == (None, "model")
    assert rule("Decoder-Transformer-1-MultiHeadCrossAttention/q/kernel") == (None, "model")
    assert rule("Decoder-Transformer-1-MultiHeadCrossAttention/kv/bias") == ("model",)
    assert rule("Encoder-Transformer-2-MultiHeadSelfAttention/output/kernel") == ("model", None)
    assert rule("Transformer-0-FeedForward/gate/kernel") == (None, "model")
    assert rule("Decoder-Transformer-0-FeedForward/output/kernel") == ("model", None)
    assert rule("Embedding-Token/embeddings") == ("model", None)
    assert rule("Decoder-Output-LM/kernel") == (None, "model")
    for replicated in ("Transformer-0-MultiHeadSelfAttention-Norm/gamma", "Transformer-0-FeedForward/output/bias",
                       "Embedding-Position/embeddings", "MLM-Dense/kernel", "Pooler-Dense/kernel"):
        assert rule(replicated) is None, replicated


def test_helpers_check_their_arguments():
    assert num_replicas(None) == 1 and global_batch_size(4, None) == 4
    with pytest.raises(ValueError, match="per_replica"):
        global_batch_size(0, None)
    with pytest.raises(TypeError, match="strategy"), scope(object()):
        pass
    if BACKEND != "jax":
        with pytest.raises(RuntimeError, match="KERAS_BACKEND"):
            model_parallel(2)


@pytest.mark.skipif(in_subprocess, reason="already in a subprocess")
def test_data_parallel_benchmark_runs_on_cpu_without_tensorflow():
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    # `sys.modules['tensorflow'] = None` makes any `import tensorflow` fail, as on a machine without it.
    code = ("import sys, runpy; sys.modules['tensorflow'] = None; sys.argv = ['bench'] + sys.argv[1:]; "
            "runpy.run_path('benchmarks/bench_data_parallel.py', run_name='__main__')")
    # Two devices only (the 1-device case is the same code with a smaller mesh): the CPU is shared.
    args = ["--size", "tiny", "--devices", "2", "--steps", "1", "--warmup", "2", "--dtype", "float32",
            "--per-device-batch", "2", "--seq-len", "16"]
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert re.search(r"^\| 2 \| 4 \| \d+", proc.stdout, re.M), proc.stdout


# ----------------------------------------------------------------- jax, 4 simulated devices
jax_only = pytest.mark.skipif(
    BACKEND != "jax" or len(keras.distribution.list_devices()) < 4 if BACKEND == "jax" else True,
    reason="needs KERAS_BACKEND=jax with 4 devices (test_on_jax_with_4_simulated_devices runs it)",
)


@jax_only
def test_jax_data_parallel_trains_like_one_device_and_loads_checkpoints_in_scope(tmp_path):
    config, checkpoint = _checkpoint(tmp_path)
    single = build_transformer_model(config, checkpoint, with_mlm="linear")
    expected_outputs = _predict(single)
    expected = _train(single)

    distribution = data_parallel()
    assert num_replicas(distribution) == 4 and global_batch_size(2, distribution) == 8
    with scope(distribution):
        # Weights load straight into the replicated variables: no dummy predict first.
        model = build_transformer_model(config, checkpoint, with_mlm="linear")
        for w in model.weights:
            assert len(w.value.sharding.device_set) == 4 and w.value.sharding.is_fully_replicated, w.path
        np.testing.assert_allclose(_predict(model), expected_outputs, atol=1e-5)
        losses = _train(model)  # the global batch of 8 is split 2 per device
    print("single-device losses", expected, "\ndata-parallel losses", losses)
    assert expected[-1] < expected[0]
    np.testing.assert_allclose(losses, expected, rtol=1e-4)
    for a, b in zip(model.weights, single.weights):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(a.value), keras.ops.convert_to_numpy(b.value),
                                   atol=1e-5, err_msg=a.path)


@jax_only
def test_jax_model_parallel_places_kernels_as_the_layout_says_and_matches_unsharded(tmp_path):
    from jax.sharding import PartitionSpec

    config, checkpoint = _checkpoint(tmp_path)
    single = build_transformer_model(config, checkpoint, with_mlm="linear")
    expected_outputs = _predict(single)
    expected_losses = _train(single, steps=2)

    distribution = model_parallel(model_size=2)  # a (batch 2, model 2) mesh
    with scope(distribution):
        model = build_transformer_model(config, checkpoint, with_mlm="linear")
        placed = 0
        for w in model.weights:
            spec = next((s for p, s in LAYOUT_RULES.items() if re.fullmatch(p, w.path)), (None,) * len(w.shape))
            assert w.value.sharding.spec == PartitionSpec(*spec), (w.path, w.value.sharding.spec, spec)
            shard = tuple(n // 2 if axis == "model" else n for n, axis in zip(w.shape, spec))
            assert all(s.data.shape == shard for s in w.value.addressable_shards), (w.path, shard)
            placed += "model" in spec
        # token embedding + (qkv kernel, qkv bias, output, inner kernel, inner bias, output) x 2
        assert placed == 1 + 2 * 6
        np.testing.assert_allclose(_predict(model), expected_outputs, atol=1e-5)
        losses = _train(model, steps=2)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-4)


# ----------------------------------------------------------------- tensorflow, 2 logical CPUs
tf_only = pytest.mark.skipif(
    not os.environ.get("BERT4X_TF_LOGICAL_CPUS") or BACKEND != "tensorflow",
    reason="needs tensorflow with logical CPUs (test_on_tensorflow_with_2_logical_cpus runs it)",
)


@tf_only
def test_tf_mirrored_strategy_trains_like_one_device_and_loads_checkpoints_in_scope(tmp_path):
    import tensorflow as tf

    config, checkpoint = _checkpoint(tmp_path)
    single = build_transformer_model(config, checkpoint, with_mlm="linear")
    expected_outputs = _predict(single)
    expected = _train(single)

    strategy = data_parallel(devices=["/cpu:0", "/cpu:1"])
    assert isinstance(strategy, tf.distribute.MirroredStrategy) and num_replicas(strategy) == 2
    with scope(strategy):
        model = build_transformer_model(config, checkpoint, with_mlm="linear")
        for w in model.weights:
            copies = strategy.experimental_local_results(w.value)
            assert len(copies) == 2 and all(np.array_equal(copies[0], c) for c in copies), w.path
        np.testing.assert_allclose(_predict(model), expected_outputs, atol=1e-5)
        losses = _train(model)
    print("single-device losses", expected, "\nmirrored losses", losses)
    np.testing.assert_allclose(losses, expected, rtol=1e-4)
