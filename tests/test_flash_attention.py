"""bert4x's fused attention-with-dropout kernels (jax Pallas, `bert4x.kernels.flash_attention` / `flash_varlen`).

The kernels target NVIDIA GPUs; here they run through Pallas' interpreter on CPU, which executes the same kernel
code (block loops, online softmax, in-kernel dropout hash, recomputation in the backward pass), and their Triton
lowering for CUDA is checked without a GPU. The GPU run itself is in benchmarks/ (RESULTS.md)."""


import keras
import numpy as np
import pytest
from helpers import in_subprocess, run_pytest_on_backend

jax = pytest.importorskip("jax")
jnp = jax.numpy
import bert4x.config  # noqa: E402
from bert4x.kernels import dropout as hashed  # noqa: E402
from bert4x.kernels import flash_attention as fa  # noqa: E402
from bert4x.kernels import flash_varlen as fv  # noqa: E402

# Small tiles so that every kernel walks several query and key blocks; the second runs head pairs per program.
SMALL_BLOCKS = (32, 16, 16, 32, 4, 2)
SMALL_PAIRED_BLOCKS = (32, 16, 16, 32, 4, 2, 2)


def _fused(monkeypatch, attention=None, layer_norm=None):
    """Sets bert4x.config's fused attention / LayerNorm modes for one test (restored after it)."""
    if attention is not None:
        monkeypatch.setattr(bert4x.config, "_FUSED_ATTENTION", bert4x.config.fused_attention())
        bert4x.config.set_fused_attention(attention)
    if layer_norm is not None:
        monkeypatch.setattr(bert4x.config, "_FUSED_LAYER_NORM", bert4x.config.fused_layer_norm())
        bert4x.config.set_fused_layer_norm(layer_norm)


def _inputs(batch=2, length=64, heads=3, head_size=16, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v, weights = (jnp.asarray(rng.standard_normal((batch, length, heads, head_size)), jnp.float32)
                        for _ in range(4))
    lengths = np.array([length, 37, 5] + [length // 2] * (batch - 3))[:batch]
    key_mask = jnp.asarray(np.arange(length)[None, :] < lengths[:, None])
    return q, k, v, weights, key_mask


@pytest.mark.parametrize("implementation,blocks,heads", [
    ("pallas", SMALL_BLOCKS, 4), ("pallas", SMALL_PAIRED_BLOCKS, 4), ("pallas", SMALL_PAIRED_BLOCKS, 3),
    ("recompute", None, 4),
])
@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_kernels_equal_plain_attention_with_the_same_mask(rate, implementation, blocks, heads):
    """One head or a head pair per program (with 3 heads, pairs fall back to one head per program). Rows of 64, 37
    and 5 visible keys: the kernels skip the key blocks past a row's last visible key."""
    q, k, v, weights, key_mask = _inputs(batch=3, heads=heads)
    seed = jnp.int32(12345)
    options = dict(interpret=True, implementation=implementation, **({"blocks": blocks} if blocks else {}))

    def fused(q, k, v):
        out = fa.flash_attention(q, k, v, key_mask, seed, rate, 0.25, **options)
        return jnp.sum(out * weights), out

    def plain(q, k, v):
        out = fa.reference_attention(q, k, v, key_mask, seed, rate, 0.25)
        return jnp.sum(out * weights), out

    (_, fused_out), fused_grads = jax.value_and_grad(fused, (0, 1, 2), has_aux=True)(q, k, v)
    (_, plain_out), plain_grads = jax.value_and_grad(plain, (0, 1, 2), has_aux=True)(q, k, v)
    np.testing.assert_allclose(fused_out, plain_out, atol=2e-6)
    for name, a, b in zip("qkv", fused_grads, plain_grads):
        np.testing.assert_allclose(a, b, atol=5e-6, err_msg=f"d{name}")
    # Keys beyond a row's length get no gradient and do not change the output.
    assert float(jnp.abs(fused_grads[1][1, 37:]).max()) == 0.0 and float(jnp.abs(fused_grads[1][2, 5:]).max()) == 0.0


def test_no_mask_and_a_row_with_no_visible_key_stay_finite():
    q, k, v, _, _ = _inputs(batch=2, length=32)
    out = fa.flash_attention(q, k, v, None, jnp.int32(0), 0.1, 0.25, interpret=True, blocks=SMALL_BLOCKS)
    np.testing.assert_allclose(out, fa.reference_attention(q, k, v, None, jnp.int32(0), 0.1, 0.25), atol=2e-6)
    nothing_visible = jnp.zeros((2, 32), bool)
    out = fa.flash_attention(q, k, v, nothing_visible, jnp.int32(0), 0.0, 0.25, interpret=True, blocks=SMALL_BLOCKS)
    # Every key equally (un)visible: a uniform average over the keys, never NaN.
    np.testing.assert_allclose(out, jnp.broadcast_to(jnp.mean(v, axis=1, keepdims=True), v.shape), atol=2e-6)


def test_dropout_mask_is_uniform_independent_and_changes_with_the_seed():
    rate = 0.1
    keep = np.asarray(fa.dropout_keep_mask(jnp.int32(7), 4, 12, 128, 128, rate))
    n = keep.size
    # Keep rate within 5 standard deviations of its binomial expectation.
    assert abs(keep.mean() - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / n), keep.mean()
    # Neighbouring entries (along keys, queries, heads) are uncorrelated.
    x = keep.astype(np.float64) - keep.mean()
    for axis in (3, 2, 1):
        a = np.moveaxis(x, axis, 0)
        corr = np.mean(a[1:] * a[:-1]) / x.var()
        assert abs(corr) < 0.01, (axis, corr)
    # Every (batch, head) map differs, and a new seed gives a new mask.
    maps = keep.reshape(48, -1)
    assert len({m.tobytes() for m in maps}) == 48
    other = np.asarray(fa.dropout_keep_mask(jnp.int32(8), 4, 12, 128, 128, rate))
    assert 0.15 < np.mean(other != keep) < 0.2  # ~2 * 0.1 * 0.9 for independent masks
    # Heads 2j and 2j+1 read the two halves of one hash: their masks are as unrelated as any two.
    pairs = x.reshape(4, 6, 2, -1)
    assert abs(np.mean(pairs[:, :, 0] * pairs[:, :, 1]) / x.var()) < 0.01
    # The rate is a multiple of 2**-16, the nearest one; an odd head count gives each head its own hash.
    assert fa.attention_rate(0.1) == 6554 / 65536 and abs(fa.attention_rate(0.1) - 0.1) < 7.7e-6
    odd = np.asarray(fa.dropout_keep_mask(jnp.int32(7), 2, 3, 64, 64, rate)).reshape(6, -1)
    assert len({m.tobytes() for m in odd}) == 6
    assert abs(odd.mean() - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / odd.size)


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_hashed_dropout_mask_is_uniform_independent_and_changes_with_the_seed(rate):
    """The hidden-state dropout mask of `bert4x.layers.Dropout` on jax."""
    keep = np.asarray(hashed.hashed_keep_mask(jnp.int32(11), (16, 128, 96), rate))
    n = keep.size
    assert abs(keep.mean() - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / n), keep.mean()
    x = keep.astype(np.float64) - keep.mean()
    for axis in (2, 1, 0):
        a = np.moveaxis(x, axis, 0)
        assert abs(np.mean(a[1:] * a[:-1]) / x.var()) < 0.01, axis
    other = np.asarray(hashed.hashed_keep_mask(jnp.int32(12), (16, 128, 96), rate))
    assert abs(np.mean(other != keep) - 2 * rate * (1 - rate)) < 0.01
    np.testing.assert_array_equal(keep, np.asarray(hashed.hashed_keep_mask(jnp.int32(11), (16, 128, 96), rate)))
    with pytest.raises(ValueError, match="32-bit"):
        hashed.hashed_keep_mask(jnp.int32(0), (2**16, 2**16), rate)


def test_hashed_dropout_gradient_is_the_same_mask_behind_a_barrier():
    """The gradient of hidden-state dropout is the forward's mask on the incoming gradient, returned through an
    optimization barrier (so XLA:GPU cannot fuse the mask into the matmuls that read it)."""
    x = jnp.asarray(np.random.default_rng(5).standard_normal((4, 16, 8)), jnp.bfloat16)
    weights = jnp.asarray(np.random.default_rng(6).standard_normal(x.shape), jnp.bfloat16)
    keep = hashed.hashed_keep_mask(jnp.int32(21), x.shape, 0.2)
    out = hashed.hashed_dropout(x, jnp.int32(21), 0.2)
    np.testing.assert_array_equal(np.asarray(out, np.float32),
                                  np.asarray(jnp.where(keep, x / jnp.bfloat16(0.8), 0), np.float32))

    def loss(x):
        return jnp.sum((hashed.hashed_dropout(x, jnp.int32(21), 0.2) * weights).astype(jnp.float32))

    grad = jax.grad(loss)(x)
    assert grad.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(grad, np.float32),
                                  np.asarray(jnp.where(keep, weights / jnp.bfloat16(0.8), 0), np.float32))
    assert "optimization_barrier" in str(jax.make_jaxpr(jax.grad(loss))(x))


def test_head_pairing_choice():
    """Pairing 0 (the default) pairs heads only where a kernel keeps enough programs to fill the GPU."""
    assert fa.DEFAULT_BLOCKS[6] == 0
    assert fa._heads_per_program(0, 12, 128 // 64, 32) == 1  # BERT-base 32 x 128: 384 paired programs
    assert fa._heads_per_program(0, 12, 512 // 64, 32) == 2  # 32 x 512: 1,536
    assert fa._heads_per_program(0, 12, 128 // 64, 128) == 2  # 128 x 128: 1,536
    assert fa._heads_per_program(2, 12, 1, 1) == 2 and fa._heads_per_program(1, 12, 64, 64) == 1
    assert fa._heads_per_program(2, 3, 64, 64) == 1  # an odd head count never pairs


def test_unsupported_inputs_are_named():
    q = jnp.zeros((1, 16, 2, 24), jnp.float32)
    with pytest.raises(ValueError, match="head size 24"):
        fa.flash_attention(q, q, q, None, jnp.int32(0), 0.1, 0.2, interpret=True)
    q = jnp.zeros((1, 20, 2, 16), jnp.float32)
    with pytest.raises(ValueError, match="multiples of 16"):
        fa.flash_attention(q, q, q, None, jnp.int32(0), 0.1, 0.2, interpret=True)
    with pytest.raises(ValueError, match="rate must be in"):
        fa.flash_attention(q, q, q, None, jnp.int32(0), 1.0, 0.2, interpret=True)
    with pytest.raises(ValueError, match="implementation must be"):
        fa.flash_attention(q, q, q, None, jnp.int32(0), 0.1, 0.2, implementation="cudnn")
    with pytest.raises(ValueError, match="head pairing of 0"):
        fa.flash_attention(q, q, q, None, jnp.int32(0), 0.1, 0.2, interpret=True, blocks=SMALL_BLOCKS + (3,))
    # The recomputing version takes any length and head size.
    q = jnp.ones((1, 20, 2, 24), jnp.float32)
    assert fa.flash_attention(q, q, q, None, jnp.int32(0), 0.1, 0.2, implementation="recompute").shape == q.shape


@pytest.mark.parametrize("batch,length,blocks", [
    (32, 128, fa.DEFAULT_BLOCKS), (8, 512, fa.DEFAULT_BLOCKS[:6] + (2,)), (8, 512, fa.DEFAULT_BLOCKS[:6] + (1,)),
])
def test_kernels_lower_to_triton_for_cuda(batch, length, blocks):
    """The forward and both backward kernels lower to Triton for CUDA (no GPU needed to lower), for separate q, k, v,
    for packed ones (whose dQ kernel writes into the dK/dV kernel's output buffer: an aliased operand) and for the
    token layout."""
    spec = jax.ShapeDtypeStruct((batch, length, 12, 64), jnp.bfloat16)
    mask = jax.ShapeDtypeStruct((batch, length), jnp.bool_)
    disabled = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]

    def loss(q, k, v, key_mask):
        out = fa.flash_attention(q, k, v, key_mask, jnp.int32(3), 0.1, 0.125, blocks=blocks)
        return jnp.sum(out.astype(jnp.float32))

    exported = jax.export.export(jax.jit(jax.grad(loss, (0, 1, 2))), platforms=["cuda"], disabled_checks=disabled)(
        spec, spec, spec, mask)
    assert exported.mlir_module().count("xla.gpu.triton") == 3

    def packed_loss(qkv, key_mask):
        out = fa.flash_self_attention(qkv, key_mask, jnp.int32(3), 0.1, 0.125, blocks=blocks)
        return jnp.sum(out.astype(jnp.float32))

    packed = jax.ShapeDtypeStruct((batch, length, 3, 12, 64), jnp.bfloat16)
    module = jax.export.export(jax.jit(jax.grad(packed_loss)), platforms=["cuda"], disabled_checks=disabled)(
        packed, mask).mlir_module()
    assert module.count("xla.gpu.triton") == 3 and module.count("output_operand_aliases") == 1

    def varlen_loss(qkv, lengths):
        out = fv.flash_varlen_self_attention(qkv, lengths, jnp.int32(3), 0.1, 0.125, length, blocks=blocks)
        return jnp.sum(out.astype(jnp.float32))

    tokens = jax.ShapeDtypeStruct((batch * length * 3 // 4 + 5, 3, 12, 64), jnp.bfloat16)  # any capacity
    module = jax.export.export(jax.jit(jax.grad(varlen_loss)), platforms=["cuda"], disabled_checks=disabled)(
        tokens, jax.ShapeDtypeStruct((batch,), jnp.int32)).mlir_module()
    assert module.count("xla.gpu.triton") == 3 and module.count("output_operand_aliases") == 1


@pytest.mark.parametrize("blocks", [SMALL_BLOCKS, SMALL_PAIRED_BLOCKS])
def test_kernels_skipping_padded_queries_equal_plain_attention_at_real_queries(blocks):
    """With skip_padded_queries, query blocks starting at or after a row's last visible key are skipped: the real
    queries' outputs are the plain ones, skipped blocks are zero, and when nothing reads the padded queries (zero
    upstream gradient there) every gradient is the plain one."""
    q, k, v, weights, key_mask = _inputs(batch=3, heads=4)
    weights = weights * key_mask[:, :, None, None]  # nothing reads the padded queries
    seed = jnp.int32(99)

    def fused(q, k, v):
        out = fa.flash_attention(q, k, v, key_mask, seed, 0.3, 0.25, interpret=True, blocks=blocks,
                                 skip_padded_queries=True)
        return jnp.sum(out * weights), out

    def plain(q, k, v):
        out = fa.reference_attention(q, k, v, key_mask, seed, 0.3, 0.25)
        return jnp.sum(out * weights), out

    (_, fused_out), fused_grads = jax.value_and_grad(fused, (0, 1, 2), has_aux=True)(q, k, v)
    (_, plain_out), plain_grads = jax.value_and_grad(plain, (0, 1, 2), has_aux=True)(q, k, v)
    real = np.asarray(key_mask)
    np.testing.assert_allclose(np.asarray(fused_out)[real], np.asarray(plain_out)[real], atol=2e-6)
    block_q = blocks[0]
    assert float(jnp.abs(fused_out[2, block_q:]).max()) == 0.0  # row of 5 keys: its second query block skipped
    assert float(jnp.abs(fused_out[2, 5:block_q]).max()) > 0.0  # a block holding a real query is computed whole
    for name, a, b in zip("qkv", fused_grads, plain_grads):
        np.testing.assert_allclose(a, b, atol=5e-6, err_msg=f"d{name}")


@pytest.mark.parametrize("blocks", [SMALL_BLOCKS, SMALL_PAIRED_BLOCKS])
@pytest.mark.parametrize("rate,skip", [(0.0, False), (0.3, False), (0.3, True)])
def test_packed_self_attention_equals_attention_on_the_parts(blocks, rate, skip):
    """q, k, v packed in one `[batch, len, 3, heads, head_size]` array: the kernels read the parts in place and write
    d(qkv) as one array (dK/dV kernel parts 1-2, dQ kernel part 0 into the same buffer). Same outputs and gradients
    as the kernels on the three parts (bit for bit: the same kernel code), and as plain attention."""
    rng = np.random.default_rng(5)
    qkv = jnp.asarray(rng.standard_normal((3, 64, 3, 4, 16)), jnp.float32)
    _, _, _, weights, key_mask = _inputs(batch=3, heads=4)
    if skip:
        weights = weights * key_mask[:, :, None, None]  # nothing reads the skipped padded queries
    seed = jnp.int32(77)
    options = dict(interpret=True, blocks=blocks, skip_padded_queries=skip)

    def packed(x):
        out = fa.flash_self_attention(x, key_mask, seed, rate, 0.25, **options)
        return jnp.sum(out * weights), out

    def parts(x):
        out = fa.flash_attention(x[:, :, 0], x[:, :, 1], x[:, :, 2], key_mask, seed, rate, 0.25, **options)
        return jnp.sum(out * weights), out

    def plain(x):
        out = fa.reference_attention(x[:, :, 0], x[:, :, 1], x[:, :, 2], key_mask, seed, rate, 0.25)
        return jnp.sum(out * weights), out

    (_, packed_out), packed_grad = jax.value_and_grad(packed, has_aux=True)(qkv)
    (_, parts_out), parts_grad = jax.value_and_grad(parts, has_aux=True)(qkv)
    (_, plain_out), plain_grad = jax.value_and_grad(plain, has_aux=True)(qkv)
    np.testing.assert_array_equal(packed_out, parts_out)
    np.testing.assert_array_equal(packed_grad, parts_grad)
    real = np.asarray(key_mask)
    np.testing.assert_allclose(np.asarray(packed_out)[real], np.asarray(plain_out)[real], atol=2e-6)
    np.testing.assert_allclose(packed_grad, plain_grad, atol=5e-6)
    assert float(jnp.abs(packed_grad[:, :, 0]).max()) > 0.1  # dQ landed in part 0, next to dK and dV
    with pytest.raises(ValueError, match=r"qkv must be \[batch, len, 3, heads, head_size\]"):
        fa.flash_self_attention(qkv[:, :, :2], key_mask, seed, rate, 0.25, **options)
    with pytest.raises(ValueError, match="flash_self_attention: unsupported input .*head size 24"):
        fa.flash_self_attention(jnp.zeros((1, 16, 3, 2, 24)), None, seed, rate, 0.25, interpret=True)


def _tokens(padded, keep, capacity: int, fill: float = 7.0):
    """Rows of `padded` ([batch, len, ...]) at `keep`, one after another, then `fill` up to `capacity` slots."""
    flat = padded.reshape((-1,) + padded.shape[2:])[np.flatnonzero(keep)]
    tail = jnp.full((capacity - flat.shape[0],) + padded.shape[2:], fill, padded.dtype)
    return jnp.concatenate([flat, tail])


@pytest.mark.parametrize("blocks", [SMALL_BLOCKS, SMALL_PAIRED_BLOCKS])
@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_varlen_self_attention_equals_the_padded_kernels_at_real_tokens(blocks, rate):
    """Rows stored one after another without padding (the token layout): the same outputs and d(qkv) at every real
    token as the padded kernels on the same rows, bit for bit (same blocks, same dropout counters), and zeros in the
    unused tail slots, which the interpreter would otherwise leave as NaN (it does not zero outputs)."""
    rng = np.random.default_rng(8)
    lengths = np.array([64, 37, 5, 0, 50])
    keep = np.arange(64)[None, :] < lengths[:, None]
    qkv = jnp.asarray(rng.standard_normal((5, 64, 3, 4, 16)), jnp.float32)
    weights = jnp.asarray(rng.standard_normal((5, 64, 4, 16)), jnp.float32) * keep[:, :, None, None]
    real, capacity = int(keep.sum()), int(keep.sum()) + 21
    seed = jnp.int32(31)

    def padded(x):
        out = fa.flash_self_attention(x, jnp.asarray(keep), seed, rate, 0.25, interpret=True, blocks=blocks)
        return jnp.sum(out * weights), out

    def varlen(x):
        out = fv.flash_varlen_self_attention(x, jnp.asarray(lengths, jnp.int32), seed, rate, 0.25, 64,
                                             interpret=True, blocks=blocks)
        return jnp.sum(out * _tokens(weights, keep, capacity)), out

    (_, padded_out), padded_grad = jax.value_and_grad(padded, has_aux=True)(qkv)
    (_, varlen_out), varlen_grad = jax.value_and_grad(varlen, has_aux=True)(_tokens(qkv, keep, capacity))
    np.testing.assert_array_equal(varlen_out[:real], _tokens(padded_out, keep, real))
    np.testing.assert_array_equal(varlen_grad[:real], _tokens(padded_grad, keep, real))
    assert float(jnp.abs(varlen_out[real:]).max()) == 0.0 and float(jnp.abs(varlen_grad[real:]).max()) == 0.0
    assert float(jnp.abs(varlen_grad[:real, 0]).max()) > 0.1  # dQ landed in part 0, next to dK and dV
    with pytest.raises(ValueError, match=r"qkv must be \[tokens, 3, heads, head_size\]"):
        fv.flash_varlen_self_attention(qkv, jnp.asarray(lengths), seed, rate, 0.25, 64, interpret=True)
    with pytest.raises(ValueError, match=r"lengths must be a \[batch\] integer array, got float32\(5,\)"):
        fv.flash_varlen_self_attention(qkv[0], jnp.ones(5), seed, rate, 0.25, 64, interpret=True)
    with pytest.raises(ValueError, match="flash_varlen_self_attention: unsupported input .*lengths 40/40"):
        fv.flash_varlen_self_attention(qkv[0], jnp.asarray(lengths), seed, rate, 0.25, 40, interpret=True)


def test_triton_ir_of_the_kernels_verifies(monkeypatch, capsys):
    """The interpreter cannot see a mistyped Triton program: a loop bound that Pallas lowered as i1 (so 0 iterations:
    dK/dV all zero on a GPU) still exported. MLIR prints a module that fails verification in its generic form
    (`"scf.for"(...)`, `"arith.constant"()`), so the kernels' printed IR must have none."""
    import functools

    from jax.experimental import pallas as pl

    monkeypatch.setattr(pl, "pallas_call", functools.partial(pl.pallas_call, debug=True))
    spec = jax.ShapeDtypeStruct((8, 512, 12, 64), jnp.bfloat16)

    for skip in (False, True):
        def loss(q, k, v, key_mask, skip=skip):
            out = fa.flash_attention(q, k, v, key_mask, jnp.int32(3), 0.1, 0.125, skip_padded_queries=skip)
            return jnp.sum(out.astype(jnp.float32))

        jax.export.export(
            jax.jit(jax.grad(loss, (0, 1, 2))), platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
        )(spec, spec, spec, jax.ShapeDtypeStruct((8, 512), jnp.bool_))
        printed = capsys.readouterr().out
        assert printed.count("scf.for") == 3, skip  # one key or query loop in each of the three kernels
        assert '"scf.for"(' not in printed and '"arith.' not in printed, skip

        def packed_loss(qkv, key_mask, skip=skip):
            out = fa.flash_self_attention(qkv, key_mask, jnp.int32(3), 0.1, 0.125, skip_padded_queries=skip)
            return jnp.sum(out.astype(jnp.float32))

        jax.export.export(
            jax.jit(jax.grad(packed_loss)), platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
        )(jax.ShapeDtypeStruct((8, 512, 3, 12, 64), jnp.bfloat16), jax.ShapeDtypeStruct((8, 512), jnp.bool_))
        printed = capsys.readouterr().out
        assert printed.count("scf.for") == 3, ("packed", skip)
        assert '"scf.for"(' not in printed and '"arith.' not in printed, ("packed", skip)

    def varlen_loss(qkv, lengths):
        out = fv.flash_varlen_self_attention(qkv, lengths, jnp.int32(3), 0.1, 0.125, 512)
        return jnp.sum(out.astype(jnp.float32))

    jax.export.export(
        jax.jit(jax.grad(varlen_loss)), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(jax.ShapeDtypeStruct((3000, 3, 12, 64), jnp.bfloat16), jax.ShapeDtypeStruct((8,), jnp.int32))
    printed = capsys.readouterr().out
    assert printed.count("scf.for") == 5  # key/query loops, and the tail's zeroing loops in the forward and dK/dV
    assert '"scf.for"(' not in printed and '"arith.' not in printed


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="the fused kernels are jax-only; re-run on jax below")
@pytest.mark.parametrize("mode", ["interpret", "auto"])  # auto = the recomputing version on CPU
def test_attention_layer_runs_the_kernels_in_training(monkeypatch, mode):
    from bert4x.layers import MultiHeadAttention

    _fused(monkeypatch, attention=mode)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 32, 24)), jnp.float32)
    mask = jnp.asarray(np.arange(32)[None, None, None, :] < np.array([32, 20])[:, None, None, None])
    mha = MultiHeadAttention(heads=2, head_size=16, attention_dropout=0.2)
    mha(x, attention_mask=mask)
    generator = mha.dropout.seed_generator
    state = np.asarray(generator.state.value)
    out = mha(x, attention_mask=mask, training=True)
    # The seed the layer drew, drawn again from the same generator state.
    generator.state.assign(state)
    seed = keras.random.randint((), 0, 2**31 - 1, seed=generator, dtype="int32")
    qkv = jnp.reshape(mha.qkv_dense(x), (2, 32, 3, 2, 16))
    expected = fa.reference_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask[:, 0, 0], seed, 0.2, 0.25)
    expected = mha.output_dense(jnp.reshape(expected, (2, 32, 32)))
    np.testing.assert_allclose(out, expected, atol=1e-5)
    # A second training call draws a new seed: a different dropout mask.
    assert float(jnp.abs(mha(x, attention_mask=mask, training=True) - out).max()) > 1e-3
    _fused(monkeypatch, attention="off")
    assert float(jnp.abs(mha(x, attention_mask=mask, training=False) - mha(x, attention_mask=mask)).max()) == 0.0
    with pytest.raises(ValueError, match="BERT4X_FUSED_ATTENTION"):
        bert4x.config.set_fused_attention("sometimes")


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="the fused kernels are jax-only; re-run on jax below")
def test_keynorm_attention_gives_the_kernels_its_own_q_and_k(monkeypatch):
    """KeyNorm rescales q and normalises k before the kernels: they must get those, not the projection's packed
    q, k, v (which plain softmax self-attention hands them to read in place)."""
    from bert4x.layers import MultiHeadAttention
    from bert4x.layers import attention_variants as av

    _fused(monkeypatch, attention="interpret")
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((2, 32, 24)), jnp.float32)
    mask = jnp.asarray(np.arange(32)[None, None, None, :] < np.array([32, 20])[:, None, None, None])
    mha = MultiHeadAttention(heads=2, head_size=16, attention_dropout=0.2, attention_type="keynorm",
                             keynorm_scale=3.0)
    mha(x, attention_mask=mask)
    state = np.asarray(mha.dropout.seed_generator.state.value)
    out = mha(x, attention_mask=mask, training=True)
    mha.dropout.seed_generator.state.assign(state)
    seed = keras.random.randint((), 0, 2**31 - 1, seed=mha.dropout.seed_generator, dtype="int32")
    qkv = jnp.reshape(mha.qkv_dense(x), (2, 32, 3, 2, 16))
    q, k, scale = av.keynorm_inputs(qkv[:, :, 0], qkv[:, :, 1], 3.0)
    expected = fa.reference_attention(q, k, qkv[:, :, 2], mask[:, 0, 0], seed, 0.2, scale)
    np.testing.assert_allclose(out, mha.output_dense(jnp.reshape(expected, (2, 32, 32))), atol=1e-5)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="the hashed dropout is jax-only; re-run on jax below")
def test_dropout_layer_uses_the_hash_in_training():
    from bert4x.layers import Dropout

    x = jnp.asarray(np.random.default_rng(4).standard_normal((3, 40, 24)), jnp.bfloat16)
    layer = Dropout(0.25, seed=9, dtype="mixed_bfloat16")
    state = np.asarray(layer.seed_generator.state.value)
    out = layer(x, training=True)
    layer.seed_generator.state.assign(state)
    seed = keras.random.randint((), 0, 2**31 - 1, seed=layer.seed_generator, dtype="int32")
    expected = jnp.where(hashed.hashed_keep_mask(seed, x.shape, 0.25), x / jnp.bfloat16(0.75), 0)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(expected, np.float32))
    assert not np.array_equal(np.asarray(layer(x, training=True), np.float32), np.asarray(out, np.float32))
    np.testing.assert_array_equal(np.asarray(layer(x), np.float32), np.asarray(x, np.float32))
    # noise_shape keeps Keras's own dropout (one decision per broadcast slice).
    shared = np.asarray(Dropout(0.5, noise_shape=(3, 1, 24), seed=1)(x, training=True), np.float32)
    assert np.array_equal(shared[:, 0] == 0, shared[:, 1] == 0)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="the fused kernels are jax-only; re-run on jax below")
def test_bf16_bert_fit_through_the_kernels_learns(monkeypatch):
    from harness import dtype_policy

    from bert4x.models import build_transformer_model

    _fused(monkeypatch, attention="interpret")
    _fused(monkeypatch, layer_norm="interpret")  # and the LayerNorm kernels (fused_layer_norm)
    from bert4x.kernels import layer_norm as fused_layer_norm

    norms, real_norm = [], fused_layer_norm.layer_norm
    monkeypatch.setattr(fused_layer_norm, "layer_norm", lambda *a, **k: norms.append(1) or real_norm(*a, **k))
    attentions, real_self_attention = [], fa.flash_self_attention
    monkeypatch.setattr(fa, "flash_self_attention",
                        lambda *a, **k: attentions.append(1) or real_self_attention(*a, **k))
    # Two layers: the last one attends from [CLS] alone (the pooled model prunes it), which the kernels do not take.
    config = {"vocab_size": 40, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "intermediate_size": 64, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 40, size=(32, 16)).astype("int32")
    ids[np.arange(16)[None, :] >= rng.integers(4, 17, size=32)[:, None]] = 0
    labels = (ids[:, 1] % 2).astype("int32")
    with dtype_policy("mixed_bfloat16"):
        keras.utils.set_random_seed(0)
        bert = build_transformer_model(config, with_pool=True)
        model = keras.Model(bert.inputs, keras.layers.Dense(2)(bert.output))
        model.compile(keras.optimizers.AdamW(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        losses = model.fit([ids, np.zeros_like(ids)], labels, batch_size=16, epochs=10, verbose=0).history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses
    assert len(norms) >= 3  # fit traced its train step through them: embedding, attention and FFN LayerNorms
    assert len(attentions) >= 1  # and through the attention kernels (the first layer), on the packed q/k/v


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="the fused kernels are jax-only; re-run on jax below")
def test_pooled_bert_skips_padded_queries_with_the_same_training_step(monkeypatch):
    """A model reading [CLS] only keeps its padding on jax, and its attention kernels skip the padded queries: one
    SGD step gives the weights that it gives with every query computed (remove_padding=False)."""
    from bert4x.models import build_transformer_model

    _fused(monkeypatch, attention="interpret")
    skips, real_attention = [], fa.flash_self_attention
    monkeypatch.setattr(fa, "flash_self_attention",
                        lambda *a, **k: skips.append(k.get("skip_padded_queries")) or real_attention(*a, **k))
    config = {"vocab_size": 40, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2,
              "intermediate_size": 64}
    rng = np.random.default_rng(3)
    ids = rng.integers(5, 40, size=(4, 128)).astype("int32")  # blocks of 64: rows of 20 and 3 skip their second
    ids[np.arange(128)[None, :] >= np.array([128, 70, 20, 3])[:, None]] = 0
    skipping = build_transformer_model(config, with_pool=True)
    padded = build_transformer_model(config, with_pool=True, remove_padding=False)
    weights = [rng.normal(scale=0.3, size=w.shape).astype("float32") for w in padded.get_weights()]
    target = rng.normal(size=(4, 32)).astype("float32")
    for m in (skipping, padded):
        m.set_weights(weights)
        m.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
        m.fit([ids, np.zeros_like(ids)], target, batch_size=4, epochs=1, shuffle=False, verbose=0)
    assert True in skips and False in skips and None not in skips, skips
    for w, a, b in zip(padded.weights, skipping.get_weights(), padded.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=w.path)
    assert not np.allclose(padded.get_weights()[0], weights[0])


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="the fused kernels are jax-only; re-run on jax below")
def test_packed_bert_trains_through_the_token_layout_kernels(monkeypatch):
    """remove_padding=True on jax: the layers run on the batch's real tokens (`Input-Packing`) and attention in the
    token-layout kernels. With attention dropout 0.1 (the same mask as the padded kernels draw) and no hidden
    dropout, two SGD steps give the weights of the padded model."""
    from bert4x.layers import MultiHeadAttention
    from bert4x.models import build_transformer_model
    from bert4x.snippets import packing_positions

    _fused(monkeypatch, attention="interpret")
    calls, real_attention = [], fv.flash_varlen_self_attention  # (capacity, dropout rate) of each traced call
    monkeypatch.setattr(fv, "flash_varlen_self_attention",
                        lambda *a, **k: calls.append((a[0].shape[0], a[3])) or real_attention(*a, **k))
    config = {"vocab_size": 40, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2,
              "intermediate_size": 64, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.1}
    rng = np.random.default_rng(3)
    ids = rng.integers(5, 40, size=(4, 32)).astype("int32")
    ids[np.arange(32)[None, :] >= np.array([32, 17, 9, 3])[:, None]] = 0
    packed = build_transformer_model(config, with_pool=True, remove_padding=True)
    padded = build_transformer_model(config, with_pool=True, remove_padding=False)
    weights = [rng.normal(scale=0.3, size=w.shape).astype("float32") for w in padded.get_weights()]
    target = rng.normal(size=(4, 32)).astype("float32")
    inputs = [ids, np.zeros_like(ids)]
    for layer in padded.layers:  # the same dropout seeds (each model's generators start from their own)
        if isinstance(layer, MultiHeadAttention):
            packed.get_layer(layer.name).dropout.seed_generator.state.assign(
                np.array(layer.dropout.seed_generator.state.value))
    for m, x in ((packed, inputs + [packing_positions(ids, buckets=8)]), (padded, inputs)):
        m.set_weights(weights)
        m.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
        m.fit([np.concatenate([a, a]) for a in x], np.concatenate([target, target]), batch_size=4, epochs=1,
              shuffle=False, verbose=0)
    # Training: layers 0 and 1 on 61 tokens in 64 slots (the last is at [CLS]); Keras's inference traces (rate 0)
    # run the same kernel.
    assert [c for c in calls if c[1] > 0] == [(64, 0.1), (64, 0.1)], calls
    assert {capacity for capacity, _ in calls} == {64}, calls
    for w, a, b in zip(padded.weights, packed.get_weights(), padded.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=w.path)
    assert not np.allclose(padded.get_weights()[0], weights[0])


@pytest.mark.skipif(in_subprocess or keras.backend.backend() == "jax", reason="runs from the top-level process only")
def test_flash_attention_layer_on_jax_backend():
    run_pytest_on_backend("jax", "tests/test_flash_attention.py", "-k",
                          "layer_runs or bert_fit or layer_uses or skips_padded or keynorm or packed_bert")
