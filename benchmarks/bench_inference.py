"""Inference speed of deployed BERT-base classifiers: bert4x's exports and `predict` against their peers.

The work: the BERT-base Chinese config as a 2-class sequence classifier with random weights, forward only, random
right-padded rows (lengths in [L/2, L], `common.random_batches`), the output fetched to the host as a server does.
Each peer runs in its own subprocess and prints one JSON line (median wall time of `--repeats` calls after warm-up).

CPU peers (float32; `--device cpu`):
  bert4x_onnxruntime   `bert4x.export.export_model(format="onnx")` from the tensorflow backend, run by ONNX Runtime
  bert4x_savedmodel    `export_model(format="tf_saved_model")`, its serving signature called from Python
  bert4x_predict       bert4x's own `model.predict_on_batch` (tensorflow backend, the default)
  hf_torch             transformers BertForSequenceClassification (sdpa attention), torch eager, inference_mode

GPU peers (bfloat16 compute; `--device gpu`, the shapes 1x128, 32x128, 128x128); each timed call takes the batch as
host arrays and returns the logits on the host, as a server does:
  bert4x_jax           bert4x on jax through `bert4x.inference.CompiledInference` (what `bert4x.serve` runs)
  bert4x_jax_packed    the same, built with `remove_padding=True`: the layers run on the real tokens only
                       (`Input-Packing` is computed on the device; one compilation per packing width bucket)
  keras_hub_jax        keras-hub BertBackbone + BertTextClassifier, a jitted stateless forward
  hf_compile           transformers BertForSequenceClassification in bfloat16 under torch.compile
The keras peers run under `--dtype-policy` (default `bfloat16`: weights and compute in bfloat16, as transformers'
`.to(torch.bfloat16)`; `mixed_bfloat16` keeps float32 weights and casts them at every call).

Examples:
    python benchmarks/bench_inference.py --device cpu --repeats 5 --out benchmarks/inference_cpu.jsonl
    KERAS_BACKEND=jax python benchmarks/bench_inference.py --device gpu --out benchmarks/inference_gpu.jsonl
    python benchmarks/bench_inference.py --device cpu --config tiny --repeats 2   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402

CPU_PEERS = ("bert4x_onnxruntime", "bert4x_savedmodel", "bert4x_predict", "hf_torch")
GPU_PEERS = ("bert4x_jax", "bert4x_jax_packed", "keras_hub_jax", "hf_compile")
CPU_SHAPES = ("1x128", "8x128")
GPU_SHAPES = ("1x128", "32x128", "128x128")
BACKEND = {"bert4x_onnxruntime": "tensorflow", "bert4x_savedmodel": "tensorflow", "bert4x_predict": "tensorflow",
           "bert4x_jax": "jax", "bert4x_jax_packed": "jax", "keras_hub_jax": "jax"}


def _bert4x_classifier(cfg: dict, remove_padding: bool | None = None):
    import keras

    from bert4x.models import build_transformer_model

    bert = build_transformer_model(dict(cfg, hidden_act="gelu", hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0), with_pool=True,
                                   remove_padding=remove_padding)
    logits = keras.layers.Dense(common.NUM_CLASSES, name="Classifier")(bert.output)
    return keras.Model(bert.inputs, logits)


def _keras_hub_classifier(cfg: dict):
    import keras_hub

    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=cfg["vocab_size"], num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
        hidden_dim=cfg["hidden_size"], intermediate_dim=cfg["intermediate_size"], dropout=0.0,
        max_sequence_length=cfg["max_position_embeddings"], num_segments=cfg["type_vocab_size"],
    )
    return keras_hub.models.BertTextClassifier(backbone, num_classes=common.NUM_CLASSES, preprocessor=None,
                                               dropout=0.0)


def _hf_model(cfg: dict):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"], intermediate_size=cfg["intermediate_size"],
        max_position_embeddings=cfg["max_position_embeddings"], type_vocab_size=cfg["type_vocab_size"],
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=common.NUM_CLASSES,
    )
    return BertForSequenceClassification(config).eval()


def _record(args, shape: str, median: float, times: list, setup_s: float, **extra) -> dict:
    batch, seq = common.parse_shape(shape)
    return dict(
        bench="inference", device=args.device, peer=args.peer, config=args.config, shape=shape,
        median_ms=round(1000 * median, 3), min_ms=round(1000 * min(times), 3), repeats=len(times),
        rows_per_s=round(batch / median, 1), setup_s=round(setup_s, 1), versions=common.versions(),
        hardware=common.hardware(), commit=common.git_commit(), note=args.note, **extra,
    )


# ----------------------------------------------------------------------------------------------- CPU workers
def run_cpu(args, cfg: dict) -> list[dict]:
    import numpy as np

    records = []
    start = time.perf_counter()
    if args.peer == "hf_torch":
        import torch

        torch.manual_seed(0)
        model = _hf_model(cfg)

        def make_call(data):
            tensors = dict(input_ids=torch.from_numpy(data["token_ids"]).long(),
                           token_type_ids=torch.from_numpy(data["segment_ids"]).long(),
                           attention_mask=torch.from_numpy(data["padding_mask"]).long())

            def call():
                with torch.inference_mode():
                    return model(**tensors).logits.numpy()

            return call
        extra = {"torch_threads": torch.get_num_threads()}
    else:
        import keras

        keras.utils.set_random_seed(0)
        model = _bert4x_classifier(cfg)
        extra = {"backend": keras.backend.backend()}
        if args.peer == "bert4x_predict":
            def make_call(data):
                x = [data["token_ids"], data["segment_ids"]]
                return lambda: np.asarray(model.predict_on_batch(x))
        else:
            from bert4x.export import export_model, load_saved_model_signature

            tmp = tempfile.mkdtemp()
            if args.peer == "bert4x_onnxruntime":
                import onnxruntime

                path = export_model(model, os.path.join(tmp, "bert.onnx"), format="onnx")
                session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
                extra["onnxruntime"] = onnxruntime.__version__

                def make_call(data):
                    feeds = {"Input-Token": data["token_ids"], "Input-Segment": data["segment_ids"]}
                    return lambda: session.run(None, feeds)[0]
            else:
                serve = load_saved_model_signature(export_model(model, os.path.join(tmp, "bert")))

                def make_call(data):
                    feeds = {"Input-Token": data["token_ids"], "Input-Segment": data["segment_ids"]}
                    return lambda: serve(**feeds)["Classifier"]
    setup_s = time.perf_counter() - start
    for shape in args.shapes.split(","):
        batch, seq = common.parse_shape(shape)
        call = make_call(common.random_batches(cfg, batch, seq, 1, seed=2))
        median, times = common.median_time(call, args.repeats, warmup=2)
        records.append(_record(args, shape, median, times, setup_s, **extra))
    return records


# ----------------------------------------------------------------------------------------------- GPU workers
def run_gpu(args, cfg: dict) -> list[dict]:
    import numpy as np

    records = []
    start = time.perf_counter()
    if args.peer == "hf_compile":
        import torch

        torch.manual_seed(0)
        model = _hf_model(cfg).to("cuda", torch.bfloat16)
        compiled = torch.compile(model, dynamic=False)  # one specialised graph per shape, as a server with buckets

        def make_call(data):
            names = dict(input_ids="token_ids", token_type_ids="segment_ids", attention_mask="padding_mask")

            def call():
                with torch.inference_mode():
                    tensors = {k: torch.from_numpy(data[v]).long().cuda() for k, v in names.items()}
                    return compiled(**tensors).logits.float().cpu().numpy()

            return call
        extra = {"device_name": torch.cuda.get_device_name()}
    else:
        import jax
        import keras

        keras.config.set_dtype_policy(args.dtype_policy)
        keras.utils.set_random_seed(0)
        if args.peer == "keras_hub_jax":
            model = _keras_hub_classifier(cfg)
            values = ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables])

            @jax.jit
            def forward(values, x):
                logits, _ = model.stateless_call(values[0], values[1], x, training=False)
                return logits

            def make_call(data):
                x = {k: data[k] for k in ("token_ids", "segment_ids", "padding_mask")}
                return lambda: np.asarray(forward(values, x))  # host arrays in, logits fetched, as a server does
        else:
            from bert4x.inference import CompiledInference

            infer = CompiledInference(_bert4x_classifier(cfg, remove_padding=True if args.peer ==
                                                         "bert4x_jax_packed" else None))

            def make_call(data):
                feeds = {"Input-Token": data["token_ids"], "Input-Segment": data["segment_ids"]}
                return lambda: infer(feeds)["Classifier"]
        extra = {"device_name": str(jax.devices()[0].device_kind), "dtype_policy": args.dtype_policy}
    setup_s = time.perf_counter() - start
    for shape in args.shapes.split(","):
        batch, seq = common.parse_shape(shape)
        call = make_call(common.random_batches(cfg, batch, seq, 1, seed=2))
        median, times = common.median_time(call, args.repeats, warmup=3)
        records.append(_record(args, shape, median, times, setup_s, dtype="bfloat16", **extra))
    return records


# ----------------------------------------------------------------------------------------------- driver
def worker(args) -> None:
    cfg = common.config(args.config)
    try:
        records = run_cpu(args, cfg) if args.device == "cpu" else run_gpu(args, cfg)
    except Exception as e:  # one failing peer must not hide the others: it reports its error
        records = [dict(bench="inference", device=args.device, peer=args.peer, error=f"{type(e).__name__}: {e}")]
    for r in records:
        common.emit(r)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--config", default="base")
    parser.add_argument("--peers", help="comma-separated; default: every peer of the device")
    parser.add_argument("--shapes", help="comma-separated BATCHxSEQ; default: the device's shapes")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per shape (cpu 5, gpu 50)")
    parser.add_argument("--dtype-policy", default="bfloat16", choices=("bfloat16", "mixed_bfloat16"),
                        help="the keras GPU peers' dtype policy")
    parser.add_argument("--note", default="", help="a remark stored in every record (e.g. 'shared CPU')")
    parser.add_argument("--out", help="append the records to this .jsonl file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.shapes = args.shapes or ",".join(CPU_SHAPES if args.device == "cpu" else GPU_SHAPES)
    args.repeats = args.repeats or (5 if args.device == "cpu" else 50)
    if args.worker:
        args.peer = args.worker
        worker(args)
        return
    peers = args.peers.split(",") if args.peers else list(CPU_PEERS if args.device == "cpu" else GPU_PEERS)
    unknown = [p for p in peers if p not in CPU_PEERS + GPU_PEERS]
    if unknown:
        raise ValueError(f"Unknown peers {unknown}; choose from {CPU_PEERS + GPU_PEERS}.")
    records = []
    for peer in peers:
        argv = [os.path.abspath(__file__), "--worker", peer, "--device", args.device, "--config", args.config,
                "--shapes", args.shapes, "--repeats", str(args.repeats), "--note", args.note,
                "--dtype-policy", args.dtype_policy]
        env = {"KERAS_BACKEND": BACKEND[peer]} if peer in BACKEND else {}
        found, tail = common.run_worker(argv, env=env, timeout=1800)
        records += found
        for r in found:
            print(json.dumps({k: r.get(k) for k in ("peer", "shape", "median_ms", "min_ms", "error")}), flush=True)
    if args.out:
        common.append_jsonl(args.out, records)
    by_shape = {}
    for r in records:
        if "median_ms" in r:
            by_shape.setdefault(r["shape"], {})[r["peer"]] = r["median_ms"]
    for shape, times in by_shape.items():
        best_peer = min((t, p) for p, t in times.items() if not p.startswith("bert4x"))[1] if any(
            not p.startswith("bert4x") for p in times) else None
        line = ", ".join(f"{p} {t:.2f} ms" for p, t in sorted(times.items(), key=lambda kv: kv[1]))
        ratio = ""
        if best_peer:
            ours = min(t for p, t in times.items() if p.startswith("bert4x"))
            ratio = f"  (fastest bert4x path: {times[best_peer] / ours:.2f}x the best peer, {best_peer})"
        print(f"{shape}: {line}{ratio}")


if __name__ == "__main__":
    main()
