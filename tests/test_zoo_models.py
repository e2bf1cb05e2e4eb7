"""The Chinese checkpoint zoo's models equal transformers on the same weights (HF folders), load the same weights
rewritten under the original releases' Google names, round-trip through both formats, and pass the model harness.
GPT2-ML (no transformers class) is checked against a numpy forward written from Grover's / GPT2-ML's description."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from harness import check_model
from helpers import in_subprocess, run_pytest_on_backend

from bert4x.checkpoints import write_google_checkpoint
from bert4x.models import CheckpointError, build_transformer_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 61


def randomize_norms(hf):
    """Untrained LayerNorms are ones/zeros: perturb them so that the mapping of every norm is really tested."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "LayerNorm" in name or "ln_" in name or "layer_norm" in name or name.endswith("predictions.bias"):
                p.add_(torch.randn_like(p) * 0.2)
    return hf


def save_hf(hf, folder):
    hf.save_pretrained(str(folder))
    return folder


def batch(length=9, vocab=VOCAB, segments=True):
    """Right-padded ids (0 = padding) of three lengths, and segment ids."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1, vocab, size=(3, length)).astype("int32")
    ids[1, 6:] = 0
    ids[2, 3:] = 0
    seg = np.zeros_like(ids)
    seg[:, 4:] = 1
    seg[ids == 0] = 0
    return ids, (seg if segments else None)


def run(model, inputs):
    out = model(inputs, training=False)
    if isinstance(out, (list, tuple)):
        return [np.asarray(keras.ops.convert_to_numpy(o)) for o in out]
    return np.asarray(keras.ops.convert_to_numpy(out))


def close_at_tokens(ours, theirs, ids):
    real = ids != 0
    np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- HF -> Google names
def bert_style_google_name(name: str, prefix_from: str, prefix_to: str) -> tuple[str, bool]:
    """Google TF name of a BERT-style HF variable (ELECTRA's), and whether to transpose (TF dense is [in, out])."""
    assert name.startswith(prefix_from) or name.startswith("discriminator_predictions"), name
    name = name.replace(prefix_from, prefix_to, 1).replace("dense_prediction", "dense_1")
    parts = name.split(".")
    out, i = [], 0
    while i < len(parts):
        if parts[i] == "layer" and i + 1 < len(parts) and parts[i + 1].isdigit():
            out.append(f"layer_{parts[i + 1]}")
            i += 2
        else:
            out.append(parts[i])
            i += 1
    leaf, path = out[-1], out[:-1]
    if path[-1] == "LayerNorm":
        return "/".join(path + [{"weight": "gamma", "bias": "beta"}[leaf]]), False
    if path[-1].endswith("_embeddings"):
        return "/".join(path), False
    return "/".join(path + [{"weight": "kernel", "bias": "bias"}[leaf]]), leaf == "weight"


ALBERT_GOOGLE = {  # HF suffix under the shared layer -> Google's name under group_0/inner_group_0/
    "attention.query": "attention_1/self/query", "attention.key": "attention_1/self/key",
    "attention.value": "attention_1/self/value", "attention.dense": "attention_1/output/dense",
    "attention.LayerNorm": "LayerNorm", "ffn": "ffn_1/intermediate/dense",
    "ffn_output": "ffn_1/intermediate/output/dense", "full_layer_layer_norm": "LayerNorm_1",
}


def albert_google_name(name: str) -> tuple[str | None, bool]:
    shared = "albert.encoder.albert_layer_groups.0.albert_layers.0."
    module, _, leaf = name.rpartition(".")
    norm = {"weight": "gamma", "bias": "beta"}
    dense = {"weight": "kernel", "bias": "bias"}
    if name.startswith(shared):
        target = ALBERT_GOOGLE[module[len(shared):]]
        is_norm = "LayerNorm" in target
        return f"bert/encoder/transformer/group_0/inner_group_0/{target}/" + (norm if is_norm else dense)[leaf], (
            leaf == "weight" and not is_norm)
    fixed = {
        "albert.embeddings.word_embeddings.weight": ("bert/embeddings/word_embeddings", False),
        "albert.embeddings.position_embeddings.weight": ("bert/embeddings/position_embeddings", False),
        "albert.embeddings.token_type_embeddings.weight": ("bert/embeddings/token_type_embeddings", False),
        "sop_classifier.classifier.weight": ("cls/seq_relationship/output_weights", False),  # stored [2, hidden]
        "sop_classifier.classifier.bias": ("cls/seq_relationship/output_bias", False),
        "predictions.bias": ("cls/predictions/output_bias", False),
        "predictions.decoder.weight": (None, False),
        "predictions.decoder.bias": (None, False),
    }
    if name in fixed:
        return fixed[name]
    base = {"albert.embeddings.LayerNorm": "bert/embeddings/LayerNorm",
            "albert.encoder.embedding_hidden_mapping_in": "bert/encoder/embedding_hidden_mapping_in",
            "albert.pooler": "bert/pooler/dense", "predictions.dense": "cls/predictions/transform/dense",
            "predictions.LayerNorm": "cls/predictions/transform/LayerNorm"}[module]
    is_norm = "LayerNorm" in base
    return f"{base}/" + (norm if is_norm else dense)[leaf], leaf == "weight" and not is_norm


def gpt_google_tensors(state: dict, gpt2: bool) -> dict:
    """bert4keras's TF names for GPT / GPT-2 (`gpt/...`); HF's Conv1D weights are [in, out] already."""
    tensors = {}
    for name, value in state.items():
        if name == "lm_head.weight":
            continue
        if name in ("transformer.tokens_embed.weight", "transformer.wte.weight"):
            tensors["gpt/embeddings/word_embeddings"] = value
            continue
        if name in ("transformer.positions_embed.weight", "transformer.wpe.weight"):
            tensors["gpt/embeddings/position_embeddings"] = value
            continue
        leaf = {"weight": "gamma", "bias": "beta"}
        if name.startswith("transformer.ln_f."):
            tensors[f"gpt/output/LayerNorm/{leaf[name.rsplit('.', 1)[1]]}"] = value
            continue
        _, _, i, module, *rest = name.split(".")
        p = f"gpt/transformer/layer_{i}/"
        kind = rest[-1]
        dense = {"weight": "kernel", "bias": "bias"}[kind]
        if module == "attn" and rest[0] == "c_attn":
            for n, part in zip(("query", "key", "value"), np.split(value, 3, axis=-1)):
                tensors[p + f"attention/self/{n}/{dense}"] = part
        elif module == "attn":
            tensors[p + f"attention/output/dense/{dense}"] = value
        elif module == "mlp":
            tensors[p + ("intermediate/dense/" if rest[0] == "c_fc" else "output/dense/") + dense] = value
        elif module == "ln_1":
            tensors[p + ("attention/input/LayerNorm/" if gpt2 else "attention/output/LayerNorm/") + leaf[kind]] = value
        elif module == "ln_2":
            tensors[p + ("input/LayerNorm/" if gpt2 else "output/LayerNorm/") + leaf[kind]] = value
        else:
            raise AssertionError(name)
    return tensors


def write_google(tensors: dict, folder, config: dict) -> str:
    folder.mkdir()
    tensors = dict(tensors, global_step=np.array(7, np.int64))
    for name in list(tensors):
        if name != "global_step":
            tensors[name + "/adam_m"] = np.zeros_like(tensors[name])  # optimizer slots: ignored
    prefix = write_google_checkpoint(tensors, str(folder / "model.ckpt"))
    (folder / "config.json").write_text(json.dumps(config))
    return prefix


def hf_state(hf) -> dict:
    return {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}


# ---------------------------------------------------------------------------------------------- ALBERT
ALBERT_CONFIG = dict(vocab_size=VOCAB, embedding_size=12, hidden_size=16, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=24, hidden_act="gelu_new", max_position_embeddings=32,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module")
def albert(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("albert")
    torch.manual_seed(0)
    hf = randomize_norms(transformers.AlbertForPreTraining(transformers.AlbertConfig(**ALBERT_CONFIG)).eval())
    folder = save_hf(hf, tmp / "hf")
    ids, seg = batch()
    with torch.no_grad():
        t = dict(input_ids=torch.tensor(ids).long(), token_type_ids=torch.tensor(seg).long(),
                 attention_mask=torch.tensor(ids != 0).long())
        out = hf(**t)
        pooled = hf.albert(**t).pooler_output.numpy()
    tensors = {}
    for name, value in hf_state(hf).items():
        google, transpose = albert_google_name(name)
        if google is not None:
            tensors[google] = value.T if transpose else value
    google_cfg = dict(ALBERT_CONFIG)
    google_cfg.update(type_vocab_size=2, initializer_range=0.02, num_hidden_groups=1, inner_group_num=1)
    prefix = write_google(tensors, tmp / "google", google_cfg)
    return folder, prefix, tmp / "google" / "config.json", (ids, seg), (pooled, out.prediction_logits.numpy(),
                                                                          out.sop_logits.numpy())


@pytest.mark.parametrize("fmt", ["huggingface", "google"])
def test_albert_logits_equal_transformers(albert, fmt):
    folder, prefix, google_cfg, (ids, seg), (pooled, mlm, sop) = albert
    config, ckpt = (folder / "config.json", folder) if fmt == "huggingface" else (google_cfg, prefix)
    model = build_transformer_model(str(config), str(ckpt), model="albert", with_pool=True, with_mlm="linear")
    ours_pooled, ours_mlm = run(model, [ids, seg])
    np.testing.assert_allclose(ours_pooled, pooled, atol=1e-4, rtol=1e-4)
    close_at_tokens(ours_mlm, mlm, ids)
    nsp = build_transformer_model(str(config), str(ckpt), model="albert", with_nsp="linear")
    np.testing.assert_allclose(run(nsp, [ids, seg]), sop, atol=1e-4, rtol=1e-4)
    # The unshared variant starts from the same weights: same outputs.
    unshared = build_transformer_model(str(config), str(ckpt), model="albert_unshared", with_pool=True,
                                       with_mlm="linear")
    close_at_tokens(run(unshared, [ids, seg])[1], mlm, ids)


def test_albert_round_trips_and_unshared_refuses_diverged_layers(albert, tmp_path):
    folder, *_ = albert
    ids, seg = batch()
    t = build_transformer_model(str(folder / "config.json"), str(folder), model="albert", with_mlm="linear",
                                return_keras_model=False)
    expected = run(t.model, [ids, seg])
    for fmt in ("google", "huggingface"):
        path = t.save_weights_as_checkpoint(str(tmp_path / fmt / ("model.ckpt" if fmt == "google" else "")), fmt)
        config = (tmp_path / fmt / ("albert_config.json" if fmt == "google" else "config.json"))
        again = build_transformer_model(str(config), path, model="albert", with_mlm="linear")
        np.testing.assert_array_equal(run(again, [ids, seg]), expected)
    u = build_transformer_model(str(folder / "config.json"), str(folder), model="albert_unshared",
                                return_keras_model=False)
    u.save_weights_as_checkpoint(str(tmp_path / "u" / "model.ckpt"))  # layers still equal: fine
    w = u.model.get_layer("Transformer-1-FeedForward").weights[0]
    w.assign(w.numpy() + 1.0)
    with pytest.raises(CheckpointError, match="no longer hold the same values"):
        u.save_weights_as_checkpoint(str(tmp_path / "u2" / "model.ckpt"))


# ---------------------------------------------------------------------------------------------- ELECTRA
ELECTRA_CONFIG = dict(vocab_size=VOCAB, embedding_size=12, hidden_size=16, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=24, max_position_embeddings=32,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module")
def electra(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("electra")
    torch.manual_seed(0)
    hf = randomize_norms(transformers.ElectraForPreTraining(transformers.ElectraConfig(**ELECTRA_CONFIG)).eval())
    folder = save_hf(hf, tmp / "hf")
    ids, seg = batch()
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor(ids).long(), token_type_ids=torch.tensor(seg).long(),
                    attention_mask=torch.tensor(ids != 0).long()).logits.numpy()
    tensors = {}
    for name, value in hf_state(hf).items():
        google, transpose = bert_style_google_name(name, "electra.", "electra.")
        tensors[google] = value.T if transpose else value
    tensors["generator/embeddings_project/kernel"] = np.zeros((12, 8), np.float32)  # the generator: not used
    cfg = dict(ELECTRA_CONFIG, type_vocab_size=2)
    prefix = write_google(tensors, tmp / "google", cfg)
    return folder, prefix, tmp / "google" / "config.json", (ids, seg), logits


@pytest.mark.parametrize("fmt", ["huggingface", "google"])
def test_electra_discriminator_equals_transformers(electra, fmt):
    folder, prefix, google_cfg, (ids, seg), logits = electra
    config, ckpt = (folder / "config.json", folder) if fmt == "huggingface" else (google_cfg, prefix)
    model = build_transformer_model(str(config), str(ckpt), model="electra", with_discriminator="linear")
    close_at_tokens(run(model, [ids, seg])[..., 0], logits, ids)
    probs = build_transformer_model(str(config), str(ckpt), model="electra", with_discriminator=True)
    close_at_tokens(run(probs, [ids, seg])[..., 0], 1 / (1 + np.exp(-logits)), ids)


def test_electra_rejects_lm_and_heads():
    with pytest.raises(ValueError, match="application='lm'"):
        build_transformer_model(dict(ELECTRA_CONFIG), model="electra", application="lm")
    with pytest.raises(ValueError, match="no with_mlm head"):
        build_transformer_model(dict(ELECTRA_CONFIG), model="electra", with_mlm=True)


# ---------------------------------------------------------------------------------------------- GPT, GPT-2
GPT_CONFIG = dict(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0, attn_pdrop=0.0,
                  embd_pdrop=0.0)


def make_gpt(kind: str, tmp):
    torch.manual_seed(0)
    if kind == "gpt":
        hf = transformers.OpenAIGPTLMHeadModel(transformers.OpenAIGPTConfig(afn="gelu", **GPT_CONFIG))
    else:
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT_CONFIG))
    hf = randomize_norms(hf.eval())
    return hf, save_hf(hf, tmp / "hf")


@pytest.fixture(scope="module", params=["gpt", "gpt2"])
def gpt(request, tmp_path_factory):
    kind = request.param
    tmp = tmp_path_factory.mktemp(kind)
    hf, folder = make_gpt(kind, tmp)
    ids, _ = batch()
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(ids != 0).long()).logits.numpy()
    cfg = {"vocab_size": VOCAB, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
           "intermediate_size": 64, "hidden_act": "gelu_tanh", "max_position_embeddings": 32,
           "layer_norm_eps": 1e-5, "type_vocab_size": 0}
    prefix = write_google(gpt_google_tensors(hf_state(hf), kind == "gpt2"), tmp / "google", cfg)
    return kind, hf, folder, prefix, tmp / "google" / "config.json", ids, logits


@pytest.mark.parametrize("fmt", ["huggingface", "google"])
def test_gpt_logits_equal_transformers(gpt, fmt):
    kind, hf, folder, prefix, google_cfg, ids, logits = gpt
    config, ckpt = (folder / "config.json", folder) if fmt == "huggingface" else (google_cfg, prefix)
    model = build_transformer_model(str(config), str(ckpt), model=kind, final_activation="linear")
    close_at_tokens(run(model, [ids]), logits, ids)


def test_cdial_gpt_segments_index_the_token_table(tmp_path):
    hf, folder = make_gpt("gpt", tmp_path)
    ids, _ = batch()
    speakers = np.where(np.arange(ids.shape[1]) < 4, 3, 5)[None].repeat(3, 0).astype("int32")
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor(ids).long(), token_type_ids=torch.tensor(speakers).long()).logits.numpy()
    model = build_transformer_model(str(folder / "config.json"), str(folder), model="gpt", final_activation="linear",
                                    segment_vocab_size=VOCAB, shared_segment_embeddings=True)
    close_at_tokens(run(model, [ids, speakers]), logits, ids)


def test_gpt_round_trip(gpt, tmp_path):
    kind, hf, folder, *_ = gpt
    ids, _ = batch()
    t = build_transformer_model(str(folder / "config.json"), str(folder), model=kind, return_keras_model=False)
    expected = run(t.model, [ids])
    for fmt in ("google", "huggingface"):
        path = t.save_weights_as_checkpoint(str(tmp_path / fmt / ("model.ckpt" if fmt == "google" else "")), fmt)
        again = build_transformer_model(str(tmp_path / fmt / "config.json"), path, model=kind)
        np.testing.assert_array_equal(run(again, [ids]), expected)
    # transformers reads the Hugging Face export back.
    back = (transformers.OpenAIGPTLMHeadModel if kind == "gpt" else transformers.GPT2LMHeadModel).from_pretrained(
        str(tmp_path / "huggingface")).eval()
    with torch.no_grad():
        theirs = back(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(ids != 0).long()).logits
    close_at_tokens(np.log(expected), torch.log_softmax(theirs, -1).numpy(), ids)


# ---------------------------------------------------------------------------------------------- GPT2-ML
def layer_norm(x, g, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def gelu(x):
    from math import erf

    return 0.5 * x * (1 + np.vectorize(erf)(x / np.sqrt(2)))


def gpt2_ml_numpy(w: dict, ids: np.ndarray, layers: int, heads: int) -> np.ndarray:
    """GPT2-ML's forward as its release (Grover's modeling code) describes it: embed = LN(word + position); per layer
    h = h + attention(h) (causal, scaled by 1/sqrt(head size)); h = LN1(h + mlp(LN0(h))); logits = h @ word^T."""
    x = w["newslm/embeddings/word_embed"][ids] + w["newslm/embeddings/pos_embed"][: ids.shape[1]]
    norm = "newslm/embeddings/LayerNorm_embed_norm/"
    x = layer_norm(x, w[norm + "gamma"], w[norm + "beta"])
    batch, length, dim = x.shape
    hs = dim // heads
    causal = np.tril(np.ones((length, length), bool))
    for i in range(layers):
        p = f"newslm/layer{i:02d}/"

        def dense(h, name, p=p):
            return h @ w[p + name + "/kernel"] + w[p + name + "/bias"]

        q, k, v = (dense(x, n).reshape(batch, length, heads, hs).transpose(0, 2, 1, 3)
                   for n in ("query_layer", "key_layer", "value_layer"))
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hs)
        scores = np.where(causal, scores, -1e9)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, length, dim)
        x = x + dense(context, "context_projection_layer")
        normed = layer_norm(x, w[p + "LayerNorm_mlp_ln0/gamma"], w[p + "LayerNorm_mlp_ln0/beta"])
        x = layer_norm(x + dense(gelu(dense(normed, "intermediate")), "output"), w[p + "LayerNorm_mlp_ln1/gamma"],
                       w[p + "LayerNorm_mlp_ln1/beta"])
    return x @ w["newslm/embeddings/word_embed"].T


GPT2_ML_CONFIG = {"vocab_size": VOCAB, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "intermediate_size": 40, "hidden_act": "gelu", "max_position_embeddings": 32,
                  "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02}


@pytest.fixture(scope="module")
def gpt2_ml(tmp_path_factory):
    rng = np.random.default_rng(3)
    d, f = 16, 40
    w = {"newslm/embeddings/word_embed": rng.normal(0, 0.5, (VOCAB, d)),
         "newslm/embeddings/pos_embed": rng.normal(0, 0.5, (32, d)),
         "newslm/embeddings/LayerNorm_embed_norm/gamma": 1 + rng.normal(0, 0.2, d),
         "newslm/embeddings/LayerNorm_embed_norm/beta": rng.normal(0, 0.2, d)}
    for i in range(2):
        p = f"newslm/layer{i:02d}/"
        for name, shape in (("query_layer", (d, d)), ("key_layer", (d, d)), ("value_layer", (d, d)),
                            ("context_projection_layer", (d, d)), ("intermediate", (d, f)), ("output", (f, d))):
            w[p + name + "/kernel"] = rng.normal(0, 0.3, shape)
            w[p + name + "/bias"] = rng.normal(0, 0.1, shape[1])
        for n in ("LayerNorm_mlp_ln0", "LayerNorm_mlp_ln1"):
            w[p + n + "/gamma"] = 1 + rng.normal(0, 0.2, d)
            w[p + n + "/beta"] = rng.normal(0, 0.2, d)
    w = {k: np.asarray(v, np.float32) for k, v in w.items()}
    tmp = tmp_path_factory.mktemp("gpt2_ml")
    prefix = write_google(w, tmp / "google", GPT2_ML_CONFIG)
    return w, prefix, tmp / "google" / "config.json"


def test_gpt2_ml_equals_numpy_forward_of_the_release(gpt2_ml, tmp_path):
    w, prefix, config = gpt2_ml
    ids, _ = batch()
    expected = gpt2_ml_numpy({k: v.astype(np.float64) for k, v in w.items()}, ids, layers=2, heads=4)
    t = build_transformer_model(str(config), prefix, model="gpt2_ml", final_activation="linear",
                                return_keras_model=False)
    close_at_tokens(run(t.model, [ids]), expected, ids)
    # Saved back under newslm names, it loads again; there is no Hugging Face format.
    path = t.save_weights_as_checkpoint(str(tmp_path / "again" / "model.ckpt"))
    again = build_transformer_model(str(tmp_path / "again" / "config.json"), path, model="gpt2_ml",
                                    final_activation="linear")
    np.testing.assert_array_equal(run(again, [ids]), run(t.model, [ids]))
    with pytest.raises(ValueError, match="TF checkpoint only"):
        t.save_weights_as_checkpoint(str(tmp_path / "hf"), "huggingface")


# ---------------------------------------------------------------------------------------------- T5 v1.0
T5_CONFIG = dict(vocab_size=VOCAB, d_model=16, d_kv=6, d_ff=24, num_layers=2, num_decoder_layers=2, num_heads=3,
                 relative_attention_num_buckets=8, relative_attention_max_distance=12, dropout_rate=0.0)


def t5_google_tensors(state: dict) -> dict:
    """Mesh-TF's T5 v1.0 names: block_000/layer_000/..., layer_norm/scale, final_layer_norm/scale, matrices [in, out],
    the position table [heads, buckets], and no separate LM head (it is the shared embedding)."""
    tensors = {}
    for name, value in state.items():
        if name.endswith("embed_tokens.weight") or name == "lm_head.weight":
            continue
        if name == "shared.weight":
            tensors["shared/embedding"] = value
            continue
        parts, out, i = name.split("."), [], 0
        while i < len(parts):
            if parts[i] in ("block", "layer"):
                out.append(f"{parts[i]}_{int(parts[i + 1]):03d}")
                i += 2
            else:
                out.append(parts[i])
                i += 1
        leaf, path = out[-2], out[:-2]
        if leaf in ("layer_norm", "final_layer_norm"):
            tensors["/".join(path + [leaf, "scale"])] = value
        elif leaf in ("wi", "wo"):
            tensors["/".join(path + [leaf, "kernel"])] = value.T
        else:
            tensors["/".join(path + [leaf])] = value.T
    return tensors


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("t5")
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**T5_CONFIG)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
            if "relative_attention_bias" in name:
                p.mul_(10.0)
    folder = save_hf(hf, tmp / "hf")
    enc, _ = batch(length=10)
    dec = np.random.default_rng(2).integers(1, VOCAB, size=(3, 7)).astype("int32")
    dec[:, 0] = 0
    with torch.no_grad():
        e = torch.tensor(enc).long()
        logits = hf(input_ids=e, attention_mask=(e != 0).long(), decoder_input_ids=torch.tensor(dec).long()).logits
    cfg = {"vocab_size": VOCAB, "hidden_size": 16, "attention_head_size": 6, "intermediate_size": 24,
           "num_hidden_layers": 2, "num_decoder_layers": 2, "num_attention_heads": 3, "hidden_act": "relu",
           "relative_attention_num_buckets": 8, "relative_attention_max_distance": 12}
    tensors = t5_google_tensors(hf_state(hf))
    prefix = write_google(tensors, tmp / "google", cfg)
    return hf, folder, prefix, tmp / "google" / "config.json", (enc, dec), logits.numpy()


@pytest.mark.parametrize("fmt", ["huggingface", "google"])
def test_t5_v1_0_logits_equal_transformers(t5, fmt):
    hf, folder, prefix, google_cfg, (enc, dec), logits = t5
    config, ckpt = (folder / "config.json", folder) if fmt == "huggingface" else (google_cfg, prefix)
    model = build_transformer_model(str(config), str(ckpt), model="t5.1.0", with_lm="linear")
    np.testing.assert_allclose(run(model, [enc, dec]), logits, atol=1e-4, rtol=1e-4)
    # The _encoder / _decoder variants are the two stacks of the same weights.
    encoder = build_transformer_model(str(config), str(ckpt), model="t5_encoder")
    decoder = build_transformer_model(str(config), str(ckpt), model="t5.1.0_decoder", with_lm="linear")
    np.testing.assert_allclose(run(decoder, [run(encoder, [enc]), dec]), logits, atol=1e-4, rtol=1e-4)


def test_t5_v1_0_round_trip_and_version_errors(t5, tmp_path):
    hf, folder, *_ , (enc, dec), logits = t5
    t = build_transformer_model(str(folder / "config.json"), str(folder), model="t5", with_lm="linear",
                                return_keras_model=False)
    expected = run(t.model, [enc, dec])
    for fmt in ("google", "huggingface"):
        path = t.save_weights_as_checkpoint(str(tmp_path / fmt / ("model.ckpt" if fmt == "google" else "")), fmt)
        again = build_transformer_model(str(tmp_path / fmt / "config.json"), path, model="t5", with_lm="linear")
        np.testing.assert_array_equal(run(again, [enc, dec]), expected)
    with pytest.raises(ValueError, match="gated one is T5.1.1"):
        build_transformer_model(dict(T5_CONFIG, feed_forward_proj="gated-gelu"), model="t5.1.0")
    with pytest.raises(ValueError, match="tie_word_embeddings=False"):
        build_transformer_model(dict(T5_CONFIG, tie_word_embeddings=False), model="t5")
    with pytest.raises(ValueError, match="model='t5.1.0'"):
        build_transformer_model(dict(T5_CONFIG, feed_forward_proj="relu"), model="t5.1.1")


# ---------------------------------------------------------------------------------------------- options
def test_hierarchical_position_follows_its_definition():
    from bert4x.layers.hierarchical_position import HierarchicalPositionEmbedding

    n, alpha = 5, 0.4
    layer = HierarchicalPositionEmbedding(n, 3, hierarchical=True, embeddings_initializer="random_normal")
    out = np.asarray(keras.ops.convert_to_numpy(layer(keras.ops.zeros((1, n * n, 3)))))[0]
    p = np.asarray(layer.embeddings.numpy(), np.float64)
    np.testing.assert_allclose(out[:n], p, atol=1e-6)  # the base table for the first n positions
    u = (p - alpha * p[0]) / (1 - alpha)
    for i in range(n * n):
        np.testing.assert_allclose(out[i], alpha * u[i // n] + (1 - alpha) * u[i % n], atol=1e-5)
    with pytest.raises(ValueError, match="exceeds the 25 positions"):
        layer(keras.ops.zeros((1, 26, 3)))
    # In BERT: a 4-position checkpoint runs 10 tokens, and the first 4 outputs are those of the plain model.
    cfg = dict(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
               max_position=4)
    plain = build_transformer_model(cfg, application="lm", with_mlm="linear")
    hier = build_transformer_model(cfg, application="lm", with_mlm="linear", hierarchical_position=True)
    hier.set_weights(plain.get_weights())
    ids = np.arange(1, 11)[None].astype("int32")
    np.testing.assert_allclose(run(hier, [ids, 0 * ids])[:, :4], run(plain, [ids[:, :4], 0 * ids[:, :4]]), atol=1e-5)


def test_custom_position_ids_and_segment_options():
    cfg = dict(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
               max_position=16)
    plain = build_transformer_model(cfg)
    custom = build_transformer_model(cfg, custom_position_ids=True)
    assert [i.name for i in custom.inputs] == ["Input-Token", "Input-Segment", "Input-Position"]
    custom.set_weights(plain.get_weights())
    ids = np.array([[3, 4, 5, 6]], "int32")
    seg = np.zeros_like(ids)
    np.testing.assert_allclose(run(custom, [ids, seg, np.arange(4)[None]]), run(plain, [ids, seg]), atol=1e-6)
    assert not np.allclose(run(custom, [ids, seg, np.arange(4, 8)[None]]), run(plain, [ids, seg]))
    none = build_transformer_model(cfg, segment_vocab_size=0)
    assert [i.name for i in none.inputs] == ["Input-Token"]
    shared = build_transformer_model(cfg, shared_segment_embeddings=True, segment_vocab_size=30)
    assert not any("Embedding-Segment" in w.path for w in shared.weights)
    factorised = build_transformer_model(cfg, embedding_size=4, with_mlm=True)
    assert factorised.get_layer("Embedding-Mapping").kernel.shape == (4, 8)
    with pytest.raises(ValueError, match="attention_key_size=2 .* not implemented for NEZHA"):
        build_transformer_model(cfg, model="nezha", attention_key_size=2)
    with pytest.raises(ValueError, match="shared_segment_embeddings=True needs segment ids"):
        build_transformer_model(cfg, shared_segment_embeddings=True, segment_vocab_size=0)
    with pytest.raises(ValueError, match="embedding_size=0 must be an integer >= 1"):
        build_transformer_model(cfg, embedding_size=0)


# ---------------------------------------------------------------------------------------------- harness
TINY = dict(vocab_size=40, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
            max_position=16)


@pytest.mark.parametrize("model,extra", [
    ("albert", dict(embedding_size=4, with_mlm=True)),
    ("albert_unshared", dict(embedding_size=4, application="unilm", hierarchical_position=True)),
    ("electra", dict(embedding_size=4, with_discriminator=True)),
    ("gpt", dict(segment_vocab_size=40, shared_segment_embeddings=True)),
    ("gpt2", {}),
    ("gpt2_ml", {}),
])
def test_zoo_models_pass_the_harness(model, extra, tmp_path):
    # Every model gets the float32 checks; the mixed-precision pass (the same layer types in each) runs on ALBERT,
    # whose shared layer is the one path the others lack, to keep CI time down.
    policies = ("float32", "mixed_bfloat16") if model == "albert" else ("float32",)

    def make():
        return build_transformer_model(dict(TINY), model=model, **extra)

    probe = make()
    rng = np.random.default_rng(0)
    inputs = [rng.integers(1, 40, size=(2, 6)).astype("int32") for _ in probe.inputs]
    if len(inputs) > 1 and model != "gpt":
        inputs[1] = np.array([[0, 0, 0, 1, 1, 1]] * 2, "int32")
    targets = np.zeros(tuple(2 if d is None else d for d in probe.output.shape[:1]) + (6,) + tuple(
        probe.output.shape[2:]), "float32") if len(probe.output.shape) == 3 else np.zeros((2, 8), "float32")
    check_model(make, inputs, targets, tmp_path, policies=policies)


def test_t5_v1_0_passes_the_harness(tmp_path):
    cfg = dict(vocab_size=40, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2)

    def make():
        return build_transformer_model(cfg, model="t5.1.0", with_lm="linear")

    enc = np.random.default_rng(0).integers(1, 40, size=(2, 5)).astype("int32")
    dec = np.random.default_rng(1).integers(1, 40, size=(2, 4)).astype("int32")
    check_model(make, [enc, dec], np.ones((2, 4), "int32"), tmp_path,
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), policies=("float32",))


@pytest.mark.skipif(in_subprocess, reason="this test launches the jax run itself")
def test_zoo_parity_on_jax_backend():
    # The forward passes on jax; the Google-format loads differ from the Hugging Face ones only in the (numpy)
    # loader, which the tensorflow run covers.
    run_pytest_on_backend("jax", "tests/test_zoo_models.py", "-k", "(equal or follows) and not google")


def test_a_checkpoint_given_to_the_wrong_model_names_its_family(albert, electra, gpt, t5):
    bert_cfg = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=24, max_position=32)
    with pytest.raises(CheckpointError, match="looks like an ALBERT checkpoint; use model='albert'"):
        build_transformer_model(dict(bert_cfg, embedding_size=12), albert[1], model="bert")
    with pytest.raises(CheckpointError, match="looks like an ELECTRA checkpoint; use model='electra'"):
        build_transformer_model(dict(bert_cfg, embedding_size=12), str(electra[0]), model="bert")
    kind, _, folder, prefix, *_ = gpt
    other = "gpt2" if kind == "gpt" else "gpt"
    family = "GPT-2" if kind == "gpt2" else "GPT"
    with pytest.raises(CheckpointError, match=f"looks like a {family} checkpoint; use model='{kind}'"):
        build_transformer_model(dict(bert_cfg, intermediate_size=64), str(folder), model=other)
    with pytest.raises(CheckpointError, match="looks like a T5 v1.0 checkpoint; use model='t5'"):
        build_transformer_model(dict(T5_CONFIG, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
                                str(t5[1]), model="t5.1.1")
    from bert4x.models.families import family_hint

    assert family_hint(["bert/encoder/layer_0/attention/self/query/kernel"], ["bert", "roberta"]) == ""
    assert family_hint(["something/else"], ["bert"]) == ""


def test_converter_cli_turns_google_names_into_hf_folders(albert, electra, gpt, t5, tmp_path):
    from weights_converters.convert import main

    cases = [("albert", albert[2], albert[1], dict(with_mlm="linear")),
             ("electra", electra[2], electra[1], dict(with_discriminator="linear")),
             (gpt[0], gpt[4], gpt[3], dict(final_activation="linear")),
             ("t5", t5[3], t5[2], dict(with_lm="linear"))]
    for model, config, prefix, options in cases:
        target = tmp_path / model
        assert main(["--model", model, "--config", str(config), "--source", str(prefix), "--target", str(target),
                     "--target-format", "huggingface"]) == 0
        inputs = [t5[4][0], t5[4][1]] if model == "t5" else (
            [batch()[0]] if model.startswith("gpt") else list(batch()))
        a = run(build_transformer_model(str(config), str(prefix), model=model, **options), inputs)
        b = run(build_transformer_model(str(target / "config.json"), str(target), model=model, **options), inputs)
        np.testing.assert_array_equal(a if not isinstance(a, list) else a[-1], b if not isinstance(b, list) else b[-1])
    # transformers reads the converted ALBERT folder and gives the reference logits.
    hf = transformers.AlbertForPreTraining.from_pretrained(str(tmp_path / "albert")).eval()
    ids, seg = batch()
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids).long(), token_type_ids=torch.tensor(seg).long(),
                 attention_mask=torch.tensor(ids != 0).long())
    close_at_tokens(out.prediction_logits.numpy(), albert[4][1], ids)


def test_t5_v1_0_greedy_generation_equals_transformers(t5):
    from bert4x.generation import generate

    hf, folder, *_ = t5
    t = build_transformer_model(str(folder / "config.json"), str(folder), model="t5", return_keras_model=False)
    prompts = [[5, 6, 7, 8, 1], [9, 10, 1]]
    ours = generate(t, prompts, max_len=6, end_id=1)
    for prompt, tokens in zip(prompts, ours):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, num_beams=1,
                              decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
        theirs = out[0, 1:].tolist()
        theirs = theirs[: theirs.index(1) + 1] if 1 in theirs else theirs
        assert tokens == theirs


def test_cdial_gpt_config_without_model_type_reads_afn_as_transformers_does():
    # CDial-GPT's config.json: OpenAIGPT keys, no model_type; transformers' OpenAIGPT 'gelu' is the tanh GELU.
    cfg = {"afn": "gelu", "attn_pdrop": 0.1, "embd_pdrop": 0.1, "finetuning_task": None, "initializer_range": 0.02,
           "layer_norm_epsilon": 1e-05, "n_ctx": 33, "n_embd": 16, "n_head": 4, "n_layer": 1, "n_positions": 33,
           "n_special": 0, "num_labels": 1, "output_attentions": False, "output_hidden_states": False,
           "resid_pdrop": 0.1, "summary_activation": None, "summary_first_dropout": 0.1,
           "summary_proj_to_labels": True, "summary_type": "cls_index", "summary_use_proj": True,
           "torchscript": False, "vocab_size": 50}
    t = build_transformer_model(cfg, model="gpt", return_keras_model=False)
    assert t.hidden_act == "gelu_tanh" and t.intermediate_size == 64 and t.layer_norm_eps == 1e-5
    with pytest.raises(ValueError, match="n_special=2"):
        build_transformer_model(dict(cfg, n_special=2), model="gpt")


def test_embedding_options_raise_where_a_model_builds_its_own_positions():
    cfg = dict(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    with pytest.raises(ValueError, match="RoFormer has no learned position table"):
        build_transformer_model(cfg, model="roformer", custom_position_ids=True)
    with pytest.raises(ValueError, match="builds its own embeddings"):
        build_transformer_model(cfg, model="roformer_v2", shared_segment_embeddings=True)
    assert "Embedding-Segment" not in [layer.name for layer in build_transformer_model(
        cfg, model="roformer", shared_segment_embeddings=True).layers]
