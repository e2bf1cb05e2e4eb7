"""mT5 / T5.1.1 equals transformers' MT5ForConditionalGeneration on the same weights (HF and Google checkpoints),
round-trips exactly through both checkpoint formats, trims its vocabulary with keep_tokens, decodes with a KV cache
token-for-token like transformers' greedy generate, and rejects what it does not implement."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from harness import check_model
from helpers import in_subprocess, run_pytest_on_backend, shared_path

from bert4x.checkpoints import write_google_checkpoint, write_safetensors
from bert4x.layers.t5 import relative_position_bucket
from bert4x.models import CheckpointError, build_transformer_model, load_keep_tokens

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# heads * d_kv (24) != d_model (32), as in mT5-small (6 * 64 != 512); more decoder than encoder layers;
# few buckets and a short max distance so that short test sequences reach the logarithmic and the clipped buckets.
TINY = dict(
    vocab_size=99, d_model=32, d_kv=6, d_ff=40, num_layers=2, num_decoder_layers=3, num_heads=4,
    relative_attention_num_buckets=16, relative_attention_max_distance=20, dropout_rate=0.1,
    layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu",
)


UNUSED_HF_TABLE = "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"


def hf_config_json() -> dict:
    return dict(TINY, model_type="mt5", tie_word_embeddings=False, is_encoder_decoder=True, pad_token_id=0,
                eos_token_id=1, decoder_start_token_id=0, architectures=["MT5ForConditionalGeneration"])


def make_hf_model(tmp_path, seed=0):
    """A random MT5ForConditionalGeneration with an untied LM head, saved as an HF folder."""
    torch.manual_seed(seed)
    hf = transformers.MT5ForConditionalGeneration(transformers.MT5Config(**TINY)).eval()
    # transformers 5 forces the head tied to the embedding for mT5: untie it explicitly, with its own weights.
    hf.lm_head.weight = torch.nn.Parameter(torch.randn(TINY["vocab_size"], TINY["d_model"]) * 0.3)
    hf.config.tie_word_embeddings = False
    with torch.no_grad():  # untrained norms are all ones: randomise them so the mapping is really tested
        for name, p in hf.named_parameters():
            if "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
            if "relative_attention_bias" in name:
                p.mul_(10.0)  # make position effects visible in the logits
    assert not torch.equal(hf.lm_head.weight, hf.shared.weight)
    folder = tmp_path / "hf"
    folder.mkdir()
    state = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
    # Old transformers versions saved an unused cross-attention position table; loading must ignore it, as HF does.
    state[UNUSED_HF_TABLE] = np.ones((TINY["relative_attention_num_buckets"], TINY["num_heads"]), np.float32)
    write_safetensors(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(hf_config_json()))
    return hf, folder


def hf_to_google_name(name: str) -> tuple[str, bool]:
    """Google's name for an HF T5 variable and whether it is transposed, written from the two formats' conventions
    (mesh-tensorflow stores every matrix `[in, out]` and the position table `[heads, buckets]`)."""
    if name == "shared.weight":
        return "shared/embedding", False
    if name == "lm_head.weight":
        return "decoder/logits/kernel", True
    parts = name.split(".")
    out, i = [], 0
    while i < len(parts):
        if parts[i] in ("block", "layer"):
            out.append(f"{parts[i]}_{int(parts[i + 1]):03d}")
            i += 2
        else:
            out.append(parts[i])
            i += 1
    leaf, path = out[-2], out[:-2]
    if leaf in ("layer_norm", "final_layer_norm"):
        return "/".join(path + ["rms_norm", "scale"]), False
    if leaf in ("wi_0", "wi_1", "wo"):
        return "/".join(path + [leaf, "kernel"]), True
    return "/".join(path + [leaf]), True  # q, k, v, o, relative_attention_bias


def write_google_from_hf(hf, folder) -> str:
    folder.mkdir()
    tensors = {"global_step": np.array(100, dtype=np.int64)}
    for name, value in hf.state_dict().items():
        if name.endswith("embed_tokens.weight"):
            continue
        google_name, transpose = hf_to_google_name(name)
        value = value.detach().numpy()
        tensors[google_name] = np.ascontiguousarray(value.T if transpose else value)
        tensors[google_name + "_slot_vc"] = np.zeros(value.shape[-1:], np.float32)  # Adafactor slots: ignored
    assert len([n for n in tensors if "_slot_" not in n]) == 1 + 6 + 9 * 2 + 14 * 3  # step, globals, blocks
    prefix = write_google_checkpoint(tensors, str(folder / "model.ckpt"))
    config = {  # the bert4keras-style JSON (hidden_act spelled as bert4x reads the tanh GELU)
        "vocab_size": TINY["vocab_size"], "hidden_size": TINY["d_model"], "attention_head_size": TINY["d_kv"],
        "intermediate_size": TINY["d_ff"], "num_hidden_layers": TINY["num_layers"],
        "num_decoder_layers": TINY["num_decoder_layers"], "num_attention_heads": TINY["num_heads"],
        "hidden_act": ["gelu_tanh", "linear"], "hidden_dropout_prob": 0.1,
        "relative_attention_num_buckets": TINY["relative_attention_num_buckets"],
        "relative_attention_max_distance": TINY["relative_attention_max_distance"], "initializer_range": 0.02,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return prefix


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One random model as an HF folder and as a Google checkpoint: (hf, hf_dir, google_config, google_prefix)."""
    tmp_path = tmp_path_factory.mktemp("t5")
    hf, hf_dir = make_hf_model(tmp_path)
    prefix = write_google_from_hf(hf, tmp_path / "google")
    return hf, hf_dir, tmp_path / "google" / "config.json", prefix


def run(model, inputs):
    return keras.ops.convert_to_numpy(model(inputs, training=False))


def batch():
    """Encoder inputs of different lengths (right-padded with 0) and teacher-forced decoder inputs starting at 0."""
    rng = np.random.default_rng(1)
    encoder_ids = rng.integers(2, TINY["vocab_size"], size=(3, 30))
    encoder_ids[1, 17:] = 0
    encoder_ids[2, 5:] = 0
    decoder_ids = rng.integers(2, TINY["vocab_size"], size=(3, 26))
    decoder_ids[:, 0] = 0
    return encoder_ids.astype("int32"), decoder_ids.astype("int32")


def hf_logits(hf, encoder_ids, decoder_ids):
    with torch.no_grad():
        e = torch.tensor(encoder_ids, dtype=torch.long)
        out = hf(input_ids=e, attention_mask=(e != 0).long(), decoder_input_ids=torch.tensor(decoder_ids).long())
    return out.logits.numpy()


def test_relative_position_buckets_equal_transformers():
    from transformers.models.mt5.modeling_mt5 import MT5Attention

    relative = np.arange(-300, 301)
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (16, 20), (8, 64)):
            ours = relative_position_bucket(keras.ops.convert_to_tensor(relative), bidirectional, buckets, distance)
            ref = MT5Attention._relative_position_bucket(torch.tensor(relative), bidirectional, buckets, distance)
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(ours), ref.numpy())


def test_logits_equal_transformers_hf_and_google_checkpoints(checkpoints):
    hf, hf_dir, google_config, prefix = checkpoints
    encoder_ids, decoder_ids = batch()
    ref = hf_logits(hf, encoder_ids, decoder_ids)
    for config, checkpoint in ((hf_dir / "config.json", hf_dir), (hf_dir / "config.json", hf_dir / "model.safetensors"),
                               (google_config, prefix)):
        model = build_transformer_model(str(config), str(checkpoint), model="mt5.1.1", with_lm="linear")
        np.testing.assert_allclose(run(model, [encoder_ids, decoder_ids]), ref, atol=1e-4, rtol=0)
    # The probabilities head is the softmax of the same logits.
    probs = run(build_transformer_model(str(hf_dir / "config.json"), str(hf_dir), model="mt5.1.1"),
                [encoder_ids, decoder_ids])
    np.testing.assert_allclose(probs, torch.softmax(torch.tensor(ref), -1).numpy(), atol=1e-5)


def test_encoder_and_decoder_models_compose_to_the_full_model(checkpoints):
    hf, hf_dir, _, _ = checkpoints
    encoder_ids, decoder_ids = batch()
    t5 = build_transformer_model(str(hf_dir / "config.json"), str(hf_dir), model="mt5.1.1", with_lm="linear",
                                 return_keras_model=False)
    context = run(t5.encoder, encoder_ids)
    assert np.all(context[encoder_ids == 0] == 0) and np.all(np.abs(context[encoder_ids != 0]).sum(-1) > 0)
    with torch.no_grad():
        e = torch.tensor(encoder_ids).long()
        ref_context = hf.encoder(input_ids=e, attention_mask=(e != 0).long()).last_hidden_state.numpy()
    np.testing.assert_allclose(context[encoder_ids != 0], ref_context[encoder_ids != 0], atol=1e-4)
    logits = run(t5.decoder, [context, decoder_ids])
    np.testing.assert_allclose(logits, run(t5.model, [encoder_ids, decoder_ids]), atol=1e-5)


def test_load_reports_ignore_optimizer_slots_and_unused_tables(checkpoints):
    _, hf_dir, google_config, prefix = checkpoints
    t5 = build_transformer_model(str(google_config), model="mt5.1.1", return_keras_model=False)
    report = t5.load_weights_from_checkpoint(prefix)
    assert report.ok and len(report.loaded) == len(t5.model.weights)
    assert "global_step" in report.ignored and "shared/embedding_slot_vc" in report.ignored
    assert sum("_slot_" in name for name in report.ignored) == 66
    report = t5.load_weights_from_checkpoint(str(hf_dir))
    assert report.ok and report.ignored == [UNUSED_HF_TABLE]
    # The table-driven converter (weights_converters) maps the HF checkpoint to Google names, value for value.
    converted = t5.convert_checkpoint(str(hf_dir), "google")
    expected = t5.checkpoint_tensors("google")
    assert sorted(converted) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(converted[name], value)


@pytest.mark.parametrize("fmt", ["google", "huggingface"])
def test_checkpoint_round_trip_is_exact(tmp_path, checkpoints, fmt):
    _, hf_dir, _, _ = checkpoints
    encoder_ids, decoder_ids = batch()
    t5 = build_transformer_model(str(hf_dir / "config.json"), str(hf_dir), model="mt5.1.1", with_lm="linear",
                                 return_keras_model=False)
    before = run(t5.model, [encoder_ids, decoder_ids])
    out = tmp_path / "out"
    out.mkdir()
    path = t5.save_weights_as_checkpoint(str(out / "model.ckpt") if fmt == "google" else str(out), format=fmt)
    again = build_transformer_model(str(out / "config.json"), path, model="mt5.1.1", with_lm="linear")
    np.testing.assert_array_equal(run(again, [encoder_ids, decoder_ids]), before)
    if fmt == "google":  # Google's variable names, as the released checkpoints spell them
        from bert4x.checkpoints import open_checkpoint

        names = set(open_checkpoint(path).keys())
        assert {"shared/embedding", "decoder/logits/kernel", "encoder/rms_norm/scale",
                "encoder/block_000/layer_000/SelfAttention/relative_attention_bias",
                "decoder/block_002/layer_001/EncDecAttention/k",
                "decoder/block_002/layer_002/DenseReluDense/wi_1/kernel"} <= names
    else:  # and transformers reads the export (T5ForConditionalGeneration honours tie_word_embeddings=false)
        ref = transformers.T5ForConditionalGeneration.from_pretrained(str(out)).eval()
        assert not torch.equal(ref.lm_head.weight, ref.shared.weight)
        np.testing.assert_allclose(hf_logits(ref, encoder_ids, decoder_ids), before, atol=1e-4)


def test_keep_tokens_trims_embedding_and_lm_head_together(checkpoints):
    hf, hf_dir, google_config, prefix = checkpoints
    keep = [0, 1, 2] + list(range(40, 99, 3)) + [7, 5]  # unsorted on purpose
    rng = np.random.default_rng(4)
    encoder_new = rng.integers(2, len(keep), size=(2, 9)).astype("int32")
    encoder_new[1, 6:] = 0
    decoder_new = rng.integers(2, len(keep), size=(2, 7)).astype("int32")
    decoder_new[:, 0] = 0
    to_old = np.array(keep)
    ref = hf_logits(hf, to_old[encoder_new], to_old[decoder_new])[..., keep]
    for config, checkpoint in ((hf_dir / "config.json", hf_dir), (google_config, prefix)):
        t5 = build_transformer_model(str(config), str(checkpoint), model="mt5.1.1", with_lm="linear",
                                     keep_tokens=keep, return_keras_model=False)
        assert t5.layers["Embedding-Token"].embeddings.shape == (len(keep), TINY["d_model"])
        assert t5.layers["Decoder-Output-LM"].kernel.shape == (TINY["d_model"], len(keep))
        np.testing.assert_allclose(run(t5.model, [encoder_new, decoder_new]), ref, atol=1e-4)


def test_cached_decode_step_equals_full_decoder(checkpoints):
    _, hf_dir, _, _ = checkpoints
    encoder_ids, decoder_ids = batch()
    t5 = build_transformer_model(str(hf_dir / "config.json"), str(hf_dir), model="mt5.1.1", with_lm="linear",
                                 return_keras_model=False)
    full = run(t5.model, [encoder_ids, decoder_ids])
    state = t5.generation_state(encoder_ids, max_length=decoder_ids.shape[1])
    # A 3-token chunk first (positions 0..2), then one token at a time.
    logits, state = t5.decode_chunk(decoder_ids[:, :3], 0, state)
    steps = [keras.ops.convert_to_numpy(logits)]
    for index in range(3, decoder_ids.shape[1]):
        logits, state = t5.decode_chunk(decoder_ids[:, index:index + 1], index, state)
        steps.append(keras.ops.convert_to_numpy(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-4)


def generation_model(tmp_path):
    """A model on which greedy search ends some rows early (</s> close to a token it likes, 33) and not others."""
    hf, hf_dir = make_hf_model(tmp_path, seed=6)
    with torch.no_grad():
        noise = torch.randn(32, generator=torch.Generator().manual_seed(2))
        hf.lm_head.weight[1] = hf.lm_head.weight[33] + 0.15 * noise
    write_safetensors({k: v.detach().numpy().copy() for k, v in hf.state_dict().items()},
                      str(hf_dir / "model.safetensors"))
    t5 = build_transformer_model(str(hf_dir / "config.json"), str(hf_dir), model="mt5.1.1", with_lm="linear",
                                 return_keras_model=False)
    return hf, t5


def prompts(rng, lengths=(12, 7, 3, 9)):
    return [rng.integers(2, TINY["vocab_size"], size=n).tolist() for n in lengths]


def test_greedy_generation_equals_transformers_generate(tmp_path):
    from bert4x.generation import generate

    hf, t5 = generation_model(tmp_path)
    batch_prompts = prompts(np.random.default_rng(7))
    ours = generate(t5, batch_prompts, max_len=24, end_id=1)
    encoder_ids = np.zeros((len(batch_prompts), 12), dtype="int64")
    for row, p in enumerate(batch_prompts):
        encoder_ids[row, :len(p)] = p
    with torch.no_grad():
        e = torch.tensor(encoder_ids)
        ref = hf.generate(input_ids=e, attention_mask=(e != 0).long(), num_beams=1, do_sample=False,
                          max_new_tokens=24, min_new_tokens=0, use_cache=False).numpy()
    expected = []
    for row in ref[:, 1:].tolist():  # drop the start id; cut after </s> (transformers pads finished rows with 0)
        expected.append(row[: row.index(1) + 1] if 1 in row else row)
    assert any(o[-1] == 1 for o in expected) and any(o[-1] != 1 for o in expected)
    assert ours == expected


def sequence_log_prob(t5, prompt, output) -> float:
    logits = run(t5.model, [np.array([prompt], "int32"), np.array([[0] + output[:-1]], "int32")])[0]
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    return float(sum(log_probs[i, token] for i, token in enumerate(output)))


def test_beam_sampling_and_constraints_through_the_shared_generator(tmp_path):
    from bert4x.generation import Generator
    from bert4x.snippets import PrefixTree

    _, t5 = generation_model(tmp_path)
    generator = Generator(t5, jit=False)  # eager: five search settings, no compilation each
    batch_prompts = prompts(np.random.default_rng(8), lengths=(10, 4))
    greedy = generator.generate(batch_prompts, max_len=8, end_id=1)
    assert generator.generate(batch_prompts, max_len=8, end_id=1, do_sample=True, top_k=1) == greedy
    beam = generator.generate(batch_prompts, max_len=8, end_id=1, num_beams=4, exact=True)
    for p, g, b in zip(batch_prompts, greedy, beam):
        if g[-1] == 1 or len(g) == 8:  # both are complete hypotheses: the exact beam one scores at least as well
            assert sequence_log_prob(t5, p, b) >= sequence_log_prob(t5, p, g) - 1e-4
    # The default (bert4keras) rule: the best hypothesis of the beam once it ends, so it is a complete one too; the
    # keras model reaches the same decoding interface as the T5 object.
    default = Generator(t5.model, jit=False).generate(batch_prompts, max_len=8, end_id=1, num_beams=4)
    assert all(o[-1] == 1 or len(o) == 8 for o in default)
    for output in generator.generate(batch_prompts, max_len=8, end_id=1, min_len=6):
        assert 1 not in output[:5]
    tree = PrefixTree([[7, 8, 9], [7, 10], [11]], end_id=1)
    for output in generator.generate(batch_prompts, max_len=8, end_id=1, num_beams=2, prefix_tree=tree):
        assert output in tree


def test_beam_rules_equal_their_references_on_the_uncached_model(tmp_path):
    """Every beam rule through the cached decoder equals its pure-Python reimplementation (test_beam_search.py) fed
    with log-probabilities from the whole uncached model."""
    from test_beam_search import ref_bert4keras, ref_exact, ref_transformers

    from bert4x.generation import Generator

    _, t5 = generation_model(tmp_path)
    generator = Generator(t5.model, jit=False)
    batch_prompts = prompts(np.random.default_rng(8), lengths=(10, 4))

    def logp(prompt):
        memo = {}

        def fn(seq):
            if seq not in memo:
                decoder_ids = np.zeros((1, 8), "int32")  # causal: the right padding changes no earlier position
                decoder_ids[0, 1:len(seq) + 1] = seq
                logits = run(t5.model, [np.array([prompt], "int32"), decoder_ids])[0, len(seq)].astype(np.float64)
                memo[seq] = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
            return memo[seq]

        return fn

    rules = (({}, lambda f: ref_bert4keras(f, 3, 6, 1)), ({"exact": True}, lambda f: ref_exact(f, 3, 6, 1)),
             ({"length_penalty": 1.0}, lambda f: ref_transformers(f, 3, 6, 1, 1.0)))
    outputs = []
    for kwargs, reference in rules:
        expected = [reference(logp(p)) for p in batch_prompts]
        outputs += generator.generate(batch_prompts, max_len=6, end_id=1, num_beams=3, **kwargs)
        assert outputs[-2:] == expected, kwargs
    assert len({len(o) for o in outputs}) > 1, f"degenerate test: every output has the same length: {outputs}"


@pytest.mark.skipif(in_subprocess, reason="already in a subprocess")
def test_benchmark_runs_on_jax_without_tensorflow():
    import os
    import subprocess
    import sys

    from helpers import REPO

    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    # `sys.modules['tensorflow'] = None` makes any `import tensorflow` fail, as on a machine without it.
    code = ("import sys, runpy; sys.modules['tensorflow'] = None; sys.argv = ['bench'] + sys.argv[1:]; "
            "runpy.run_path('benchmarks/bench_mt5.py', run_name='__main__')")
    args = ["--size", "tiny", "--batch-sizes", "2", "--prompt-len", "8", "--new-tokens", "6", "--repeats", "1"]
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    records = [json.loads(line[6:]) for line in proc.stdout.splitlines() if line.startswith("BENCH ")]
    ours = next(r for r in records if r["impl"] == "bert4x")
    assert ours["backend"] == "jax" and ours["greedy_tokens_agree"] == 1.0, records


def test_harness_on_tiny_mt5(tmp_path):
    config = dict(TINY, dropout_rate=0.0, num_layers=1, num_decoder_layers=1)
    rng = np.random.default_rng(8)
    encoder_ids = rng.integers(1, TINY["vocab_size"], size=(4, 10)).astype("int32")
    encoder_ids[2, 6:] = 0
    decoder_ids = rng.integers(1, TINY["vocab_size"], size=(4, 8)).astype("int32")
    decoder_ids[:, 0] = 0
    targets = rng.integers(1, TINY["vocab_size"], size=(4, 8)).astype("int32")

    def make():
        return build_transformer_model(config, model="mt5.1.1", with_lm="linear")

    check_model(make, [encoder_ids, decoder_ids], targets, tmp_path,
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))


def test_bad_configs_and_checkpoints_raise(tmp_path):
    base = dict(TINY, model_type="mt5")
    with pytest.raises(ValueError, match="tie_word_embeddings=True"):
        build_transformer_model(dict(base, tie_word_embeddings=True), model="mt5.1.1")
    with pytest.raises(ValueError, match="feed_forward_proj='relu'.*T5 v1.0"):
        build_transformer_model(dict(base, feed_forward_proj="relu"), model="mt5.1.1")
    with pytest.raises(ValueError, match="does not set tie_word_embeddings"):  # HF's T5Config default ties
        build_transformer_model(dict(TINY, model_type="t5"), model="t5.1.1")
    with pytest.raises(ValueError, match="model_type='bert'"):
        build_transformer_model(dict(base, model_type="bert"), model="mt5.1.1")
    with pytest.raises(ValueError, match="does not understand.*'relative_attention'"):
        build_transformer_model(dict(base, relative_attention=True), model="mt5.1.1")
    with pytest.raises(ValueError, match="second \\(gate\\) activation"):
        build_transformer_model({"vocab_size": 9, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                                 "intermediate_size": 8, "hidden_act": ["gelu", "gelu"]}, model="mt5.1.1")
    with pytest.raises(ValueError, match="gated feed-forward"):
        build_transformer_model({"vocab_size": 9, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                                 "intermediate_size": 8, "hidden_act": "gelu"}, model="mt5.1.1")
    # A checkpoint without an LM head (e.g. MT5Model) fails strictly, naming the head.
    hf, hf_dir = make_hf_model(tmp_path, seed=9)
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    write_safetensors(state, str(hf_dir / "model.safetensors"))
    with pytest.raises(CheckpointError, match="Decoder-Output-LM/kernel <- lm_head.weight"):
        build_transformer_model(str(hf_dir / "config.json"), str(hf_dir), model="mt5.1.1")
    # ... and loads into a decoder without the head (with_lm=False gives hidden states).
    t5 = build_transformer_model(str(hf_dir / "config.json"), str(hf_dir), model="mt5.1.1", with_lm=False)
    assert t5.output.shape[-1] == TINY["d_model"]


def test_trimmed_chinese_vocabulary_pair():
    folder = shared_path("vocab", "mt5_cn_trimmed")
    keep_path, model_path = folder / "sentencepiece_cn_keep_tokens.json", folder / "sentencepiece_cn.model"
    full = load_keep_tokens(str(keep_path))
    assert len(full) == 32598 and full[-2:] == [250100, 250101]
    keep = load_keep_tokens(str(keep_path), str(model_path))
    assert keep == full[:32596] and keep[:3] == [0, 1, 2] and keep[-1] == 250099  # <extra_id_0>
    assert load_keep_tokens(str(keep_path), str(model_path), keep_unused=True) == full
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2)
    assert sp.id_to_piece(32595) == "▁<extra_id_0>" and sp.id_to_piece(32496) == "▁<extra_id_99>"


def test_keep_tokens_pair_mismatch_raises(tmp_path):
    folder = shared_path("vocab", "mt5_cn_trimmed")
    short = tmp_path / "short.json"
    short.write_text(json.dumps(list(range(100))))
    with pytest.raises(ValueError, match="not a pair"):
        load_keep_tokens(str(short), str(folder / "sentencepiece_cn.model"))
    real_extra = tmp_path / "extra.json"
    real_extra.write_text(json.dumps(list(range(32596)) + [40000]))
    with pytest.raises(ValueError, match="real mT5 tokens"):
        load_keep_tokens(str(real_extra), str(folder / "sentencepiece_cn.model"))


@pytest.mark.skipif(in_subprocess, reason="this test launches the jax run itself")
def test_parity_on_jax_backend():
    run_pytest_on_backend(
        "jax", "tests/test_t5.py", "-k",
        "logits_equal or generation_equals",
    )
