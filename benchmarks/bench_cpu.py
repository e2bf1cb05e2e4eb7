"""CPU inference and training: bert4x vs keras-hub vs Hugging Face transformers, on the same work, in one run.

The work (issue 6): BERT-base Chinese config as a 2-class sequence classifier with random weights, float32, no dropout
(`--dropout 0.1` trains with BERT's dropout on hidden states, attention probabilities and the classifier input, as in
the GPU fine-tuning work; forwards run in inference mode either way):
  - forward at 8x128 and 1x128 (median wall time of repeated calls after warm-up/compilation);
  - one training step (forward, backward, AdamW update) at 8x128;
  - peak host memory: the RSS high-water mark of a process that builds the model and runs the forwards (inference)
    or the training steps (training), each measurement in its own fresh process.

Peers (each runs in its own subprocess, with its Keras backend set before import):
  bert4x_tf, bert4x_jax, bert4x_torch   bert4x on Keras 3 with that backend (tensorflow is the default backend)
  bert4x_full_tf, bert4x_full_jax        bert4x with prune_last_layer=False: the last layer at every position, as the
                                         other peers compute it (bert4x computes it at [CLS] alone, the classifier's
                                         only input)
  bert4x_padded_tf, bert4x_padded_torch  bert4x with remove_padding=False: padding tokens computed, as the other peers
                                         do (on tensorflow and torch bert4x skips them by default for this model)
  bert4x_packed_jax                      bert4x on jax with remove_padding=True: each batch's real tokens listed on the
                                         host (`packing_positions`, inside the timed call), padding skipped as on
                                         tensorflow
  keras_hub_jax, keras_hub_tf            keras-hub BertBackbone + BertTextClassifier head, same config
  hf_torch                               transformers BertForSequenceClassification (sdpa attention), torch eager

Keras peers run forward through `predict_on_batch` and training through `train_on_batch`, with each Keras backend's
default compilation (jit_compile="auto") unless --jit-compile says otherwise.

Example (a smoke test; drop --config/--repeats for the real figures on a quiet machine):
    python benchmarks/bench_cpu.py --config tiny --repeats 3 --train-repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402

PEERS = ("bert4x_tf", "bert4x_jax", "keras_hub_jax", "keras_hub_tf", "hf_torch")
OPTIONAL_PEERS = ("bert4x_torch", "bert4x_full_tf", "bert4x_full_jax", "bert4x_padded_tf", "bert4x_padded_torch",
                  "bert4x_packed_jax")
FORWARD_SHAPES = ("8x128", "1x128")
TRAIN_SHAPE = "8x128"


def _rss_mib() -> float:
    """Current resident set size."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _backend_of(peer: str) -> str:
    return {"tf": "tensorflow", "jax": "jax", "torch": "torch"}[peer.rsplit("_", 1)[1]]


# ----------------------------------------------------------------------------------------------- keras peers
def _keras_model(peer: str, cfg: dict, dropout: float):
    import keras

    if peer.startswith("bert4x"):
        from bert4x.models import build_transformer_model

        bert = build_transformer_model(dict(cfg, hidden_act="gelu", hidden_dropout_prob=dropout,
                                            attention_probs_dropout_prob=dropout), with_pool=True,
                                       prune_last_layer=not peer.startswith("bert4x_full"),
                                       remove_padding={"bert4x_padded": False, "bert4x_packed": True}.get(
                                           peer.rsplit("_", 1)[0]))
        pooled = keras.layers.Dropout(dropout, name="Classifier-Dropout")(bert.output)
        logits = keras.layers.Dense(common.NUM_CLASSES, name="Classifier")(pooled)
        return keras.Model(bert.inputs, logits)
    import keras_hub

    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=cfg["vocab_size"], num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
        hidden_dim=cfg["hidden_size"], intermediate_dim=cfg["intermediate_size"], dropout=dropout,
        max_sequence_length=cfg["max_position_embeddings"], num_segments=cfg["type_vocab_size"],
    )
    return keras_hub.models.BertTextClassifier(backbone, num_classes=common.NUM_CLASSES, preprocessor=None,
                                               dropout=dropout)


def _keras_inputs(peer: str, data: dict):
    if peer.startswith("keras_hub"):
        return {k: data[k] for k in ("token_ids", "segment_ids", "padding_mask")}
    return [data["token_ids"], data["segment_ids"]]


def _call_inputs(peer: str, x):
    """What each timed call passes: for bert4x_packed the packing positions, made in the call as a user's data
    pipeline makes them."""
    if peer.startswith("bert4x_packed"):
        from bert4x.snippets import packing_positions

        return x + [packing_positions(x[0])]
    return x


def run_keras(args, cfg: dict, rss_import: float) -> list[dict]:
    import keras

    if args.dtype == "bfloat16":  # bfloat16 compute, float32 weights (Keras' mixed precision)
        keras.config.set_dtype_policy("mixed_bfloat16")
    model = _keras_model(args.peer, cfg, args.dropout)
    rss_built = _rss_mib()
    jit = {"auto": "auto", "true": True, "false": False}[args.jit_compile]
    # keras-hub tasks wrap predict/train in a data pipeline (grain or tf.data); keras.Model's own methods run the
    # same compiled functions as bert4x's on the arrays.
    base = keras.Model
    records = []
    if args.mode == "forward":
        model.compile(jit_compile=jit)
        for shape in args.shapes.split(","):
            batch, seq = common.parse_shape(shape)
            x = _keras_inputs(args.peer, common.random_batches(cfg, batch, seq, 1, seed=2, full_rows=args.full_rows))
            first = time.perf_counter()
            base.predict_on_batch(model, _call_inputs(args.peer, x))
            compile_s = time.perf_counter() - first
            median, times = common.median_time(lambda: base.predict_on_batch(model, _call_inputs(args.peer, x)),
                                               args.repeats, warmup=1)
            records.append(_record(args, cfg, "forward", shape, median, times, compile_s))
    else:
        batch, seq = common.parse_shape(TRAIN_SHAPE)
        data = common.random_batches(cfg, batch, seq, 1, seed=3, full_rows=args.full_rows)
        x, y = _keras_inputs(args.peer, data), data["labels"]
        model.compile(optimizer=keras.optimizers.AdamW(common.LEARNING_RATE, weight_decay=common.WEIGHT_DECAY),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=jit)
        first = time.perf_counter()
        base.train_on_batch(model, _call_inputs(args.peer, x), y)
        compile_s = time.perf_counter() - first
        median, times = common.median_time(lambda: base.train_on_batch(model, _call_inputs(args.peer, x), y),
                                           args.train_repeats, warmup=1)
        records.append(_record(args, cfg, "train_step", TRAIN_SHAPE, median, times, compile_s))
    for r in records:
        r.update(backend=keras.backend.backend(), jit_compile=args.jit_compile)
    return _with_memory(records, rss_import, rss_built)


# ----------------------------------------------------------------------------------------------- torch peer
def run_torch(args, cfg: dict, rss_import: float) -> list[dict]:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"], intermediate_size=cfg["intermediate_size"],
        max_position_embeddings=cfg["max_position_embeddings"], type_vocab_size=cfg["type_vocab_size"],
        hidden_dropout_prob=args.dropout, attention_probs_dropout_prob=args.dropout, num_labels=common.NUM_CLASSES,
    )
    model = BertForSequenceClassification(config)
    rss_built = _rss_mib()

    def tensors(data):
        return dict(input_ids=torch.from_numpy(data["token_ids"]).long(),
                    token_type_ids=torch.from_numpy(data["segment_ids"]).long(),
                    attention_mask=torch.from_numpy(data["padding_mask"]).long())

    records = []
    if args.mode == "forward":
        model.eval()
        for shape in args.shapes.split(","):
            batch, seq = common.parse_shape(shape)
            batch_tensors = tensors(common.random_batches(cfg, batch, seq, 1, seed=2, full_rows=args.full_rows))

            def forward():
                with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=args.dtype == "bfloat16"):
                    model(**batch_tensors)

            first = time.perf_counter()
            forward()
            compile_s = time.perf_counter() - first
            median, times = common.median_time(forward, args.repeats, warmup=1)
            records.append(_record(args, cfg, "forward", shape, median, times, compile_s))
    else:
        model.train()
        batch, seq = common.parse_shape(TRAIN_SHAPE)
        data = common.random_batches(cfg, batch, seq, 1, seed=3, full_rows=args.full_rows)
        batch_tensors, labels = tensors(data), torch.from_numpy(data["labels"]).long()
        optimizer = torch.optim.AdamW(model.parameters(), lr=common.LEARNING_RATE, weight_decay=common.WEIGHT_DECAY)

        def step():
            loss = model(**batch_tensors, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        first = time.perf_counter()
        step()
        compile_s = time.perf_counter() - first
        median, times = common.median_time(step, args.train_repeats, warmup=1)
        records.append(_record(args, cfg, "train_step", TRAIN_SHAPE, median, times, compile_s))
    for r in records:
        r.update(backend="torch", torch_threads=torch.get_num_threads(),
                 attn_implementation=getattr(model.config, "_attn_implementation", None))
    return _with_memory(records, rss_import, rss_built)


# ----------------------------------------------------------------------------------------------- shared
def _record(args, cfg, op: str, shape: str, median: float, times: list[float], first_call_s: float) -> dict:
    batch, seq = common.parse_shape(shape)
    return dict(op=op, shape=shape, dtype=args.dtype, dropout=args.dropout, full_rows=args.full_rows,
                median_s=round(median, 4),
                times_s=[round(t, 4) for t in times], first_call_s=round(first_call_s, 2),
                tokens_per_s=round(batch * seq / median, 1))


def _with_memory(records: list[dict], rss_import: float, rss_built: float) -> list[dict]:
    for r in records:
        r.update(rss_after_import_mib=round(rss_import), rss_after_build_mib=round(rss_built),
                 peak_rss_mib=round(_peak_rss_mib()))
    return records


def worker(args) -> None:
    cfg = common.config(args.config)
    if args.peer.startswith("hf_"):
        import torch  # noqa: F401 - imported first so that the import's memory is counted as such
        import transformers  # noqa: F401
    else:
        import keras  # noqa: F401

        if args.peer.startswith("keras_hub"):
            import keras_hub  # noqa: F401
        else:
            import bert4x.models  # noqa: F401
    rss_import = _rss_mib()
    run = run_torch if args.peer.startswith("hf_") else run_keras
    base = dict(bench="cpu", peer=args.peer, mode=args.mode, config=args.config, versions=common.versions(),
                hardware=common.hardware(), commit=common.git_commit(),
                fused_attention=os.environ.get("BERT4X_FUSED_ATTENTION", "auto"))
    for r in run(args, cfg, rss_import):
        common.emit(dict(base, **r))


def summary_table(records: list[dict]) -> str:
    ok = [r for r in records if "median_s" in r]
    lines = [f"{'op':>10} {'shape':>6} {'peer':>14} {'median s':>9} {'vs best peer':>12}   "
             f"{'peak RSS MiB':>12} {'vs best peer':>12}"]
    for op, shape in dict.fromkeys((r["op"], r["shape"]) for r in ok):
        rows = [r for r in ok if (r["op"], r["shape"]) == (op, shape)]
        peers = [r for r in rows if not r["peer"].startswith("bert4x")]
        best_time = min((r["median_s"] for r in peers), default=None)
        best_mem = min((r["peak_rss_mib"] for r in peers), default=None)
        for r in sorted(rows, key=lambda r: r["median_s"]):
            t = f"{r['median_s'] / best_time:.2f}x" if best_time else "-"
            m = f"{r['peak_rss_mib'] / best_mem:.2f}x" if best_mem else "-"
            lines.append(f"{op:>10} {shape:>6} {r['peer']:>14} {r['median_s']:>9.4f} {t:>12}   "
                         f"{r['peak_rss_mib']:>12} {m:>12}")
    lines.append("(time ratios: lower is better; peak RSS is per process: forward rows share one inference process)")
    for r in records:
        if "error" in r:
            lines.append(f"ERROR {r.get('argv')}: {r['error']}\n{r.get('tail', '')[-1500:]}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, from {PEERS + OPTIONAL_PEERS}")
    parser.add_argument("--shapes", default=",".join(FORWARD_SHAPES), help="forward shapes, BATCHxSEQ")
    parser.add_argument("--no-train", action="store_true", help="skip the training step at 8x128")
    parser.add_argument("--config", default="base", choices=sorted(common.CONFIGS))
    parser.add_argument("--repeats", type=int, default=10, help="timed forward calls per shape")
    parser.add_argument("--train-repeats", type=int, default=5, help="timed training steps")
    parser.add_argument("--jit-compile", default="auto", choices=("auto", "true", "false"),
                        help="Keras compile(jit_compile=...) for the keras peers")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="compute dtype: bfloat16 = Keras mixed_bfloat16 / torch.autocast(bfloat16); "
                             "weights stay float32")
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="dropout rate of every peer in training (hidden, attention probabilities, classifier)")
    parser.add_argument("--full-rows", action="store_true",
                        help="every row as long as the shape (no padding); by default lengths are random in [L/2, L]")
    parser.add_argument("--out", default=None, help="append the JSON lines to this file")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--peer", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("forward", "train"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    peers = [p for p in args.peers.split(",") if p]
    unknown = sorted(set(peers) - set(PEERS + OPTIONAL_PEERS))
    if unknown:
        parser.error(f"unknown peers {unknown}; choose from {PEERS + OPTIONAL_PEERS}")
    modes = ["forward"] + ([] if args.no_train else ["train"])
    records = []
    for mode in modes:
        for peer in peers:
            argv_ = [os.path.abspath(__file__), "--worker", "--peer", peer, "--mode", mode, "--config", args.config,
                     "--shapes", args.shapes, "--repeats", str(args.repeats),
                     "--train-repeats", str(args.train_repeats), "--jit-compile", args.jit_compile,
                     "--dtype", args.dtype, "--dropout", str(args.dropout)] + (["--full-rows"] * args.full_rows)
            env = {"CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu"}
            if not peer.startswith("hf_"):
                env["KERAS_BACKEND"] = _backend_of(peer)
            found, _ = common.run_worker(argv_, env=env, timeout=args.timeout)
            for r in found:
                print(json.dumps(r, sort_keys=True), flush=True)
            records += found
            if args.out:
                with open(args.out, "a") as f:
                    for r in found:
                        f.write(json.dumps(r, sort_keys=True) + "\n")
    print(summary_table(records), flush=True)


if __name__ == "__main__":
    main()
