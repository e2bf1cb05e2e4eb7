"""bert4x's LayerNorm kernels (jax Pallas, `bert4x.kernels.layer_norm`).

The kernels target NVIDIA GPUs; here they run through Pallas' interpreter on CPU (the same kernel code: masked row
blocks padded to a power of two, the backward pass's per-program gamma/beta sums), and their Triton lowering for CUDA
is checked without a GPU. The GPU run itself is in benchmarks/ (RESULTS.md: bench_layer_norm.py's check lines)."""

import keras
import numpy as np
import pytest
from helpers import in_subprocess, run_pytest_on_backend

jax = pytest.importorskip("jax")
jnp = jax.numpy
import bert4x.config  # noqa: E402
from bert4x.kernels import layer_norm as fln  # noqa: E402

# Small tiles so that the backward pass's programs each walk several row blocks and the last block is part padding.
SMALL_BLOCKS = (4, 2, 4, 4, 3)


def _reference(x, gamma, beta, epsilon):
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    variance = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(variance + epsilon) * gamma + beta


@pytest.mark.parametrize("shape,dtype,blocks", [
    ((13, 24), "float32", SMALL_BLOCKS),  # 24 columns padded to 32; 13 rows: 7 blocks of 2 over 3 programs
    ((3, 7, 40), "float32", fln.DEFAULT_BLOCKS),
    ((2, 9, 48), "bfloat16", SMALL_BLOCKS),
])
def test_kernels_equal_the_textbook_layer_norm(shape, dtype, blocks):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape) * 3 + 1, dtype)
    width = shape[-1]
    gamma, beta = (jnp.asarray(rng.standard_normal(width), jnp.float32) for _ in range(2))
    weights = jnp.asarray(rng.standard_normal(shape), jnp.float32)

    def fused(x, gamma, beta):
        return fln.layer_norm(x, gamma, beta, 1e-5, interpret=True, blocks=blocks)

    def loss(norm):
        return lambda x, gamma, beta: jnp.sum(norm(x, gamma, beta).astype(jnp.float32) * weights)

    y = fused(x, gamma, beta)
    assert y.dtype == x.dtype and y.shape == x.shape
    # float32 arithmetic from the same inputs: equal up to float32 rounding, then the output dtype's.
    tolerance = 2e-6 if dtype == "float32" else 0.04
    np.testing.assert_allclose(np.asarray(y, np.float32), _reference(x, gamma, beta, 1e-5), atol=tolerance)
    # Against autodiff of the reference in float32 (the cotangent rounded to x's dtype, as it reaches the kernels).
    rounded = jnp.asarray(weights.astype(dtype), jnp.float32)
    expected = jax.grad(lambda *a: jnp.sum(_reference(*a, 1e-5) * rounded), (0, 1, 2))(
        x.astype(jnp.float32), gamma, beta)
    got = jax.grad(loss(fused), (0, 1, 2))(x, gamma, beta)
    for name, a, b in zip(("dx", "dgamma", "dbeta"), got, expected):
        assert a.dtype == (x.dtype if name == "dx" else gamma.dtype), name
        scale = float(jnp.max(jnp.abs(b)))
        atol = (2e-6 if dtype == "float32" else 0.01) * max(scale, 1.0)
        np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=atol, err_msg=name)


def test_rows_of_constants_stay_finite():
    x = jnp.ones((5, 24), jnp.float32) * 3.0
    gamma, beta = jnp.ones(24), jnp.zeros(24)
    y, grads = jax.value_and_grad(lambda x: jnp.sum(fln.layer_norm(x, gamma, beta, 1e-12, interpret=True) ** 2))(x)
    assert np.isfinite(float(y)) and np.all(np.isfinite(np.asarray(grads)))


def test_unsupported_inputs_are_named():
    gamma = jnp.ones(8)
    with pytest.raises(ValueError, match="width 8192 is above 4096"):
        fln.layer_norm(jnp.ones((2, 8192)), jnp.ones(8192), jnp.ones(8192), 1e-5, interpret=True)
    with pytest.raises(ValueError, match=r"gamma \(8,\) and beta \(7,\) must both be \(8,\)"):
        fln.layer_norm(jnp.ones((2, 8)), gamma, jnp.ones(7), 1e-5, interpret=True)
    with pytest.raises(ValueError, match="blocks must be 5 positive integers"):
        fln.layer_norm(jnp.ones((2, 8)), gamma, gamma, 1e-5, interpret=True, blocks=(3, 4, 4, 4, 8))
    assert fln.supported((4, 768)) is None and "above" in fln.supported((4, 5000))
    assert "int32" in fln.supported((2**21, 1024)) and "not fully known" in fln.supported((None, 768))


@pytest.mark.parametrize("shape", [(32, 512, 768), (8, 100, 1024), (3, 24)])
def test_kernels_lower_to_triton_for_cuda(shape):
    spec = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    weight = jax.ShapeDtypeStruct(shape[-1:], jnp.float32)

    def loss(x, gamma, beta):
        return jnp.sum(fln.layer_norm(x, gamma, beta, 1e-12).astype(jnp.float32))

    exported = jax.export.export(
        jax.jit(jax.grad(loss, (0, 1, 2))), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(spec, weight, weight)
    assert exported.mlir_module().count("xla.gpu.triton") == 2  # forward and backward


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="the kernels are jax-only; re-run on jax below")
@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_layer_runs_the_kernels(monkeypatch, policy):
    """bert4x's LayerNormalization through the kernels = Keras's LayerNormalization, values and gradients."""
    from bert4x.layers import LayerNormalization

    monkeypatch.setattr(bert4x.config, "_FUSED_LAYER_NORM", bert4x.config.fused_layer_norm())  # restored after

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 6, 40)) * 2 + 0.5, jnp.float32)
    layer = LayerNormalization(epsilon=1e-12, dtype=policy)
    reference = keras.layers.LayerNormalization(epsilon=1e-12, dtype=policy)
    weights = [rng.standard_normal(40).astype("float32"), rng.standard_normal(40).astype("float32")]
    for norm in (layer, reference):
        norm.build(x.shape)
        norm.set_weights(weights)

    def run(norm, mode):
        bert4x.config.set_fused_layer_norm(mode)

        def loss(variables, x):
            y, _ = norm.stateless_call(variables, [], x, **({"training": True} if norm is layer else {}))
            return jnp.sum(y.astype(jnp.float32) * jnp.sin(x)), y

        (_, y), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(
            [v.value for v in norm.trainable_variables], x)
        return y, grads

    calls = []
    real = fln.layer_norm
    monkeypatch.setattr(fln, "layer_norm", lambda *a, **k: calls.append(k) or real(*a, **k))
    y, (dweights, dx) = run(layer, "interpret")
    assert calls and calls[0]["interpret"] is True
    y_ref, (dweights_ref, dx_ref) = run(reference, "off")
    tolerance = 1e-5 if policy == "float32" else 0.05
    assert y.dtype == y_ref.dtype
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32), atol=tolerance)
    np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(dx_ref, np.float32), atol=tolerance)
    for a, b in zip(dweights, dweights_ref):
        np.testing.assert_allclose(a, b, rtol=1e-2 if policy != "float32" else 1e-5, atol=tolerance)
    calls.clear()
    bert4x.config.set_fused_layer_norm("interpret")
    np.testing.assert_allclose(np.asarray(layer(x), np.float32), np.asarray(y_ref, np.float32), atol=tolerance)
    assert not calls  # at inference XLA's own LayerNorm runs
    with pytest.raises(ValueError, match="BERT4X_FUSED_LAYER_NORM"):
        bert4x.config.set_fused_layer_norm("sometimes")


def test_one_pass_statistics_stay_below_half_precision_rounding():
    """Rows around 0, rows whose mean is far from 0 (the shift by the first entry keeps the variance from
    cancelling) and rows whose first entry is an outlier (z = 50: the worst case the docstring bounds)."""
    rng = np.random.default_rng(5)
    rows = rng.standard_normal((6, 768))
    rows[2:4] += 1e4
    rows[4:, 0] = 50.0
    rows = rows.astype(np.float32).astype(np.float64)  # the float32 input both computations see
    gamma, beta = rng.standard_normal(768), rng.standard_normal(768)
    mean, std = rows.mean(-1, keepdims=True), np.sqrt(rows.var(-1, keepdims=True) + 1e-12)
    expected = (rows - mean) / std * gamma + beta
    got = keras.ops.convert_to_numpy(fln.layer_norm_one_pass(rows.astype("float32"), gamma.astype("float32"),
                                                             beta.astype("float32"), 1e-12)).astype(np.float64)
    error = np.abs(got - expected) / (np.abs(expected) + 1.0)
    assert error[:2].max() < 1e-5 and error[2:4].max() < 1e-5  # float32 parity where nothing is extreme
    assert error.max() < 2 ** -9  # below bfloat16's rounding (2^-8 relative) even with the outlier


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="the jax paths' choice; re-run on jax below")
def test_layer_runs_one_pass_statistics_at_half_precision_gpu_inference(monkeypatch):
    from bert4x.layers import LayerNormalization

    monkeypatch.setattr(bert4x.config, "_FUSED_LAYER_NORM", "auto")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert fln.choose((8, 768), False, "bfloat16") == "one_pass"
    assert fln.choose((8, 768), False, "float16") == "one_pass"
    assert fln.choose((8, 768), False, "float32") is None  # float32 keeps Keras's two-pass statistics
    assert fln.choose((8, 768), True, "bfloat16") == "kernels"
    calls = []
    real = fln.layer_norm_one_pass
    monkeypatch.setattr(fln, "layer_norm_one_pass", lambda *a: calls.append(1) or real(*a))
    x = jnp.asarray(np.random.default_rng(6).standard_normal((2, 5, 32)) * 4 + 3, jnp.bfloat16)
    layer = LayerNormalization(epsilon=1e-12, dtype="bfloat16")
    reference = keras.layers.LayerNormalization(epsilon=1e-12, dtype="bfloat16")
    reference.build(x.shape)
    layer.build(x.shape)
    weights = [np.random.default_rng(7).standard_normal(32).astype("float32") for _ in range(2)]
    layer.set_weights(weights)
    reference.set_weights(weights)
    y = layer(x)
    assert calls and y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(reference(x), np.float32), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(in_subprocess or keras.backend.backend() == "jax", reason="runs from the top-level process only")
def test_fused_layer_norm_layer_on_jax_backend():
    run_pytest_on_backend("jax", "tests/test_fused_layer_norm.py", "-k", "layer_runs")


def test_benchmark_script_checks_the_kernels(tmp_path):
    """benchmarks/bench_layer_norm.py (what the GPU run uses) runs, and its check line compares with the formula."""
    import importlib.util
    import json

    from helpers import REPO

    spec = importlib.util.spec_from_file_location("bench_layer_norm", REPO / "benchmarks" / "bench_layer_norm.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "ln.jsonl"
    bench.main(["--shapes", "2x16", "--width", "40", "--interpret", "--repeats", "1", "--chain", "2",
                "--out", str(out)])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["variant"] for r in records] == ["xla", "kernels", "check"]
    assert records[1]["forward_backward_ms"] > 0
    errors = records[2]["max_abs_error"]
    assert errors["y"] < 0.02 and errors["dx"] < 0.01 * max(errors["dx_scale"], 1.0), errors
    assert errors["dgamma"] < 1e-4 * errors["dgamma_scale"] and errors["dbeta"] < 1e-4 * errors["dbeta_scale"], errors
