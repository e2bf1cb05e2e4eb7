"""GPU fine-tuning throughput: bert4x vs keras-hub vs Hugging Face transformers, on the same work, in one run.

The work (issue 6): BERT-base Chinese config as a 2-class sequence classifier, random weights, dropout 0.1 on hidden
states and attention probabilities, AdamW, bf16 mixed precision, random right-padded batches. Each (peer, shape)
runs in its own subprocess and prints one JSON line (prefixed `BENCH `): tokens/s, MFU, peak device memory,
versions and hardware. A table with each peer's ratio to the best non-bert4x peer ends the run.

Peers:
  bert4x          `model.fit` on the jax backend, attention dropout 0.1 (the issue's config); attention with dropout
                  runs in bert4x's fused Pallas kernels (bert4x.kernels.flash_attention)
  bert4x_xla      the same with those kernels off (BERT4X_FUSED_ATTENTION=off): XLA attention + dropout
  bert4x_fast     the same with attention_probs_dropout_prob=0, so attention can take the fused cuDNN path
  bert4x_packed   bert4x with remove_padding=True: each batch's real tokens listed on the host
                  (`bert4x.snippets.packing_positions`, inside the timed input pipeline), every layer but the last
                  on those tokens only, attention in the token-layout kernels; one compiled step per capacity, all
                  compiled before timing (the record lists them)
  bert4x_full     (optional) bert4x with prune_last_layer=False: the last layer at every position, as the other
                  peers compute it (bert4x computes it at [CLS] alone, the only position the classifier reads)
  keras_hub       keras-hub BertBackbone + BertTextClassifier head, same config and dropout, `model.fit` on jax
  hf_eager        transformers BertForSequenceClassification (sdpa attention), torch bf16 autocast, fused AdamW
  hf_compile      the same model wrapped in torch.compile

Example (the full run on a GPU machine; add `--config tiny --shapes 2x16 --steps 4` for a CPU smoke test):
    KERAS_BACKEND=jax python benchmarks/bench_finetune.py --out results.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402

PEERS = ("bert4x", "bert4x_xla", "bert4x_fast", "bert4x_packed", "keras_hub", "hf_eager", "hf_compile")
OPTIONAL_PEERS = ("bert4x_full",)
SHAPES = ("32x128", "128x128", "32x512")


# ----------------------------------------------------------------------------------------------- keras peers
def build_keras_classifier(peer: str, cfg: dict):
    """The classifier of a keras peer under the current dtype policy: inputs, model."""
    import keras

    if peer.startswith("bert4x"):
        from bert4x.models import Model, build_transformer_model

        hf_config = dict(cfg, hidden_act="gelu", hidden_dropout_prob=common.DROPOUT,
                         attention_probs_dropout_prob=0.0 if peer == "bert4x_fast" else common.DROPOUT)
        bert = build_transformer_model(hf_config, with_pool=True, prune_last_layer=peer != "bert4x_full",
                                       remove_padding=True if peer == "bert4x_packed" else None)
        x = keras.layers.Dropout(common.DROPOUT, name="Classifier-Dropout")(bert.output)
        logits = keras.layers.Dense(common.NUM_CLASSES, name="Classifier")(x)
        return Model(bert.inputs, logits)  # keras.Model whose jax fit runs steps_per_execution steps per dispatch
    if peer == "keras_hub":
        import keras_hub

        backbone = keras_hub.models.BertBackbone(
            vocabulary_size=cfg["vocab_size"], num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"], hidden_dim=cfg["hidden_size"],
            intermediate_dim=cfg["intermediate_size"], dropout=common.DROPOUT,
            max_sequence_length=cfg["max_position_embeddings"], num_segments=cfg["type_vocab_size"],
        )
        return keras_hub.models.BertTextClassifier(
            backbone, num_classes=common.NUM_CLASSES, preprocessor=None, dropout=common.DROPOUT
        )
    raise ValueError(f"{peer!r} is not a keras peer.")


def keras_inputs(peer: str, data: dict):
    if peer == "keras_hub":
        return {k: data[k] for k in ("token_ids", "segment_ids", "padding_mask")}
    return [data["token_ids"], data["segment_ids"]]


def slice_rows(x, start: int, stop: int):
    if isinstance(x, dict):
        return {k: v[start:stop] for k, v in x.items()}
    return [v[start:stop] for v in x]


def packing_width(token_ids) -> int:
    from bert4x.snippets import packing_positions

    return packing_positions(token_ids).shape[1]


def packed_batches(x: list, y, batch: int, indices):
    """((token ids, segment ids, packing positions), labels) of the batches at `indices`."""
    from bert4x.snippets import packing_positions

    for i in indices:
        rows = slice(i * batch, (i + 1) * batch)
        yield (x[0][rows], x[1][rows], packing_positions(x[0][rows])), y[rows]


def run_keras(args) -> dict:
    import keras

    keras.config.set_dtype_policy("mixed_bfloat16")
    cfg = common.config(args.config)
    batch, seq = common.parse_shape(args.shape)
    spe = args.steps_per_execution
    warm = max(args.warmup_steps, spe)
    warm -= warm % spe
    steps = args.steps - args.steps % spe
    profile_steps = 2 * spe if args.profile_dir else 0
    data = common.random_batches(cfg, batch, seq, warm + steps + profile_steps, seed=1)
    x, y = keras_inputs(args.peer, data), data["labels"]

    model = build_keras_classifier(args.peer, cfg)
    compile_kwargs = dict(
        optimizer=keras.optimizers.AdamW(common.LEARNING_RATE, weight_decay=common.WEIGHT_DECAY),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
        steps_per_execution=spe,
    )
    if args.peer == "keras_hub":
        compile_kwargs["metrics"] = None  # keras-hub tasks add accuracy on "auto"; bert4x's run has no metric
    model.compile(**compile_kwargs)

    # keras-hub's Task.fit turns arrays into a grain or tf.data pipeline (neither is on the GPU machine) even without
    # a preprocessor; keras.Model.fit runs the same Keras training loop as bert4x's on the arrays directly.
    fit_method = keras.Model.fit if args.peer == "keras_hub" else type(model).fit

    packed = "Input-Packing" in [t.name for t in model.inputs]

    def fit(start, count, indices=None):
        indices = range(start, start + count) if indices is None else indices
        begin = time.perf_counter()
        if packed:  # per-batch inputs of different shapes: a generator, the host packing timed with the steps
            history = model.fit(packed_batches(x, y, batch, indices), steps_per_epoch=len(indices), epochs=1,
                                verbose=0)
        else:
            history = fit_method(model, slice_rows(x, start * batch, (start + count) * batch),
                                 y[start * batch:(start + count) * batch], batch_size=batch, epochs=1,
                                 shuffle=False, verbose=0)
        loss = float(history.history["loss"][-1])  # forces the device to finish
        return time.perf_counter() - begin, loss

    compile_s, first_loss = fit(0, warm)
    extra = {}
    if packed:  # compile the step of every capacity the timed batches need, on one batch of each
        widths = {i: packing_width(x[0][i * batch:(i + 1) * batch]) for i in range(warm, warm + steps)}
        seen = {packing_width(x[0][i * batch:(i + 1) * batch]) for i in range(warm)}
        first = {w: i for i, w in sorted(widths.items(), reverse=True) if w not in seen}
        if first:
            compile_s += fit(0, 0, sorted(first.values()))[0]
        extra = dict(capacities=sorted(seen | set(widths.values())),
                     mean_capacity_fraction=round(sum(widths.values()) / (steps * seq), 4),
                     real_token_fraction=round(float((x[0][warm * batch:(warm + steps) * batch] != 0).mean()), 4))
    probe_before = common.python_probe_s()
    host = HostTiming(model)
    elapsed, loss = fit(warm, steps)
    record = dict(
        peer=args.peer, backend=keras.backend.backend(), loss_first=first_loss, loss_last=loss,
        warmup_and_compile_s=round(compile_s, 2), **extra,
        **_throughput(cfg, batch, seq, steps, elapsed), **_jax_memory(),
        host=dict(host.summary(steps), python_probe_s_before_after=[probe_before, common.python_probe_s()]),
    )
    if args.profile_dir:
        record["profile"] = profile_keras_steps(fit, warm + steps, profile_steps, args.profile_dir)
    return record


class HostTiming:
    """What the host's training loop spends per step.

    Wraps the compiled ``model.train_function`` (Keras reuses it in later ``fit`` calls): the wall and CPU time of the
    main thread inside each call (taking the next batch, dispatching the step) and the interval between calls. With
    asynchronous dispatch the interval is the step time. A call's wall time above its CPU time means the thread
    waited; the converse does not prove the host is the bottleneck, as jax may spin while it waits for the device
    (on the H200, a call's CPU time was 18.2 of its 18.3 ms wall at 128 x 128): compare with a profile's GPU busy time.
    The record adds `common.python_probe_s()` before and after the timed steps: the host's single-thread speed.
    """

    def __init__(self, model):
        self.starts, self.walls, self.cpus = [], [], []
        self._fit_cpu = (time.thread_time(), time.process_time())
        inner = model.train_function

        def timed(*args, **kwargs):
            start, cpu = time.perf_counter(), time.thread_time()
            out = inner(*args, **kwargs)
            self.walls.append(time.perf_counter() - start)
            self.cpus.append(time.thread_time() - cpu)
            self.starts.append(start)
            return out

        model.train_function = timed

    def summary(self, steps: int) -> dict:
        import numpy as np

        thread_cpu = time.thread_time() - self._fit_cpu[0]
        process_cpu = time.process_time() - self._fit_cpu[1]
        gaps = np.diff(self.starts) * 1000 if len(self.starts) > 1 else np.zeros(1)
        ms = lambda v: round(float(v), 3)  # noqa: E731
        return dict(
            calls=len(self.starts), call_wall_ms=ms(1000 * np.mean(self.walls)),
            call_cpu_ms=ms(1000 * np.mean(self.cpus)),
            interval_ms_p10_p50_p90_max=[ms(np.percentile(gaps, q)) for q in (10, 50, 90, 100)],
            main_thread_cpu_ms_per_step=ms(1000 * thread_cpu / steps),
            process_cpu_ms_per_step=ms(1000 * process_cpu / steps),
        )


def _jax_memory() -> dict:
    try:
        import jax

        stats = jax.local_devices()[0].memory_stats() or {}
        return {"peak_device_mem_gib": round(stats["peak_bytes_in_use"] / 2**30, 2)} if stats else {}
    except Exception as e:  # memory stats are best effort: a CPU device has none
        return {"peak_device_mem_note": f"unavailable: {type(e).__name__}"}


def profile_keras_steps(fit, start: int, count: int, trace_dir: str) -> dict:
    import jax

    jax.profiler.start_trace(trace_dir)
    wall, _ = fit(start, count)
    jax.profiler.stop_trace()
    return summarise_trace(trace_dir, os.environ.get("BENCH_HLO_DUMP"), steps=count, wall_s=wall)


# ----------------------------------------------------------------------------------------------- profile summary
# Where a GPU step's time goes: each kernel of the trace is put in one category from its kernel name and the
# op_name metadata (jax name scope: layer and optimizer names) of the HLO instruction it runs.
_GEMM_KERNELS = ("gemm", "nvjet", "xmma", "cutlass", "cublas", "wgmma", "hgmma", "sm90_xmma", "matmul")
_FUSED_ATTENTION_KERNELS = ("fmha", "flash", "sdpa", "attention", "fprop_kernel", "bprop")


def _hlo_op_names(dump_dir: str | None) -> dict[tuple[str, str], str]:
    """{(HLO module, instruction name): op_name metadata} from the optimized HLO text that XLA dumped.

    A fusion without metadata of its own takes the first op_name found in the computation it calls. Dump files are
    named `module_NNNN.<module>.<...>after_optimizations.txt`; a later dump of a module replaces an earlier one (the
    profiled steps run the last compilation)."""
    import glob
    import re

    names: dict[tuple[str, str], str] = {}
    if not dump_dir:
        return names
    instruction = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = ")
    computation = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+) .*\{\s*$")
    op_name = re.compile(r'op_name="([^"]*)"')
    calls = re.compile(r"calls=%?([\w.\-]+)")
    for path in sorted(glob.glob(os.path.join(dump_dir, "*after_optimizations.txt"))):
        module = os.path.basename(path).split(".")[1]
        if "train" not in module:
            continue
        own, callee, first_in = {}, {}, {}
        current = None
        with open(path, errors="replace") as f:
            for line in f:
                m = computation.match(line)
                if m and " = " not in line:
                    current = m.group(1)
                    continue
                m = instruction.match(line)
                if not m:
                    continue
                name = m.group(1)
                found = op_name.search(line)
                if found:
                    own[name] = found.group(1)
                    if current is not None:
                        first_in.setdefault(current, found.group(1))
                called = calls.search(line)
                if called:
                    callee[name] = called.group(1)
        for name in set(own) | set(callee):
            value = own.get(name) or first_in.get(callee.get(name, ""), "")
            if value:
                names[(module, name)] = value
    return names


def categorise_kernel(kernel: str, op_name: str) -> str:
    """One category for a GPU kernel, from its name and its HLO op_name (layer scopes of bert4x and keras-hub)."""
    k = kernel.lower()
    # 'transpose(jvp(Layer))/sub/op' -> '/transpose/jvp/layer/sub/op': layer scopes always end with '/'
    o = "/" + op_name.lower().replace("(", "/").replace(")", "/")
    if any(s in o for s in ("/adam_w/", "/adamw/", "/adam/", "/optimizer/", "apply_gradients")):
        return "optimizer"
    if any(s in o for s in ("/compile_loss/", "crossentropy")):
        return "loss"
    if any(s in k for s in _FUSED_ATTENTION_KERNELS) or "dot_product_attention" in o:
        return "attention (fused or dot_product_attention)"
    in_attention = "multiheadselfattention/" in o or "self_attention_layer/" in o
    projection = any(s in o for s in ("/qkv/", "/output/", "/query/", "/key/", "/value/", "/attention_output/"))
    if in_attention and not projection:
        if any(s in o for s in ("dropout", "/random", "threefry", "bernoulli")) or "threefry" in k:
            return "attention-probs dropout (RNG + mask)"
        return "attention (QK^T, softmax, PV)"
    if any(s in k for s in _GEMM_KERNELS) or o.rstrip("/").endswith("dot_general"):
        return "matmul (dense projections, FFN)"
    if any(s in o for s in ("dropout", "/random", "threefry", "bernoulli")) or "threefry" in k:
        return "dropout (RNG + mask)"
    if "norm" in o:
        return "layernorm"
    if "embedding" in o:
        return "embedding"
    return "elementwise/other"


def summarise_trace(trace_dir: str, dump_dir: str | None, steps: int, wall_s: float, top: int = 25) -> dict:
    """Per-step GPU time by category, the top kernels and the top ops (layer index folded, so an op of every layer
    is one row), from the jax profiler trace in `trace_dir`."""
    import glob
    import re

    import jax

    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not files:
        return {"error": f"no xplane.pb under {trace_dir}"}
    op_names = _hlo_op_names(dump_dir)
    data = jax.profiler.ProfileData.from_file(sorted(files)[-1])
    by_category: dict[str, float] = {}
    by_kernel: dict[tuple, list] = {}
    by_op: dict[tuple, list] = {}
    lines_seen, stat_keys, kernels = [], set(), 0
    busy_ns, intervals = 0.0, []
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            lines_seen.append(line.name)
            if not line.name.lower().startswith("stream"):
                continue  # derived lines (XLA Ops, Steps, name scopes) repeat the kernels
            for event in line.events:
                stats = dict(event.stats)
                stat_keys.update(stats)
                hlo_op = str(stats.get("hlo_op", ""))
                module = str(stats.get("hlo_module", ""))
                op_name = op_names.get((module, hlo_op), str(stats.get("tf_op", stats.get("name", ""))))
                category = categorise_kernel(event.name, op_name)
                ns = float(event.duration_ns)
                by_category[category] = by_category.get(category, 0.0) + ns
                entry = by_kernel.setdefault((category, event.name[:90], op_name[-90:]), [0.0, 0])
                entry[0] += ns
                entry[1] += 1
                # the same op in every layer, summed: where a category's time goes, whatever the kernel's number
                folded = re.sub(r"-\d+-", "-N-", op_name)[-110:]
                op = by_op.setdefault((category, folded), [0.0, 0, event.name[:40], hlo_op])
                op[0] += ns
                op[1] += 1
                busy_ns += ns
                kernels += 1
                intervals.append((event.start_ns, event.start_ns + ns))
    covered, end = 0.0, None
    for a, b in sorted(intervals):  # union of kernel intervals: time the GPU had at least one kernel running
        if end is None or a > end:
            covered += b - a
            end = b
        elif b > end:
            covered += b - end
            end = b
    per_step = lambda ns: round(ns / 1e6 / steps, 3)  # noqa: E731
    return {
        "steps": steps,
        "wall_ms_per_step": round(1000 * wall_s / steps, 3),
        "gpu_busy_ms_per_step": per_step(covered),
        "kernel_ms_per_step": per_step(busy_ns),
        "kernels_per_step": round(kernels / steps, 1),
        "ms_per_step_by_category": {k: per_step(v) for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
        "top_kernels": [
            {"category": c, "kernel": k, "op_name": o, "ms_per_step": per_step(v[0]), "calls_per_step": v[1] / steps}
            for (c, k, o), v in sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:top]
        ],
        "top_ops": [
            {"category": c, "op_name": o, "example_kernel": v[2], "example_hlo_op": v[3],
             "ms_per_step": per_step(v[0]), "calls_per_step": v[1] / steps}
            for (c, o), v in sorted(by_op.items(), key=lambda kv: -kv[1][0])[:3 * top]
        ],
        "hlo_ops_named": len(op_names),
        "gpu_lines": lines_seen[:20],
        "stat_keys": sorted(stat_keys)[:30],
    }


# ----------------------------------------------------------------------------------------------- torch peers
def run_torch(args) -> dict:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    cfg = common.config(args.config)
    batch, seq = common.parse_shape(args.shape)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"], intermediate_size=cfg["intermediate_size"],
        max_position_embeddings=cfg["max_position_embeddings"], type_vocab_size=cfg["type_vocab_size"],
        hidden_dropout_prob=common.DROPOUT, attention_probs_dropout_prob=common.DROPOUT,
        num_labels=common.NUM_CLASSES,
    )
    model = BertForSequenceClassification(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=common.LEARNING_RATE, weight_decay=common.WEIGHT_DECAY,
                                  fused=device == "cuda")
    runner = torch.compile(model) if args.peer == "hf_compile" else model
    warm, steps = args.warmup_steps, args.steps
    data = common.random_batches(cfg, batch, seq, warm + steps, seed=1)
    host = {k: torch.from_numpy(v) for k, v in data.items()}
    if device == "cuda":
        host = {k: v.pin_memory() for k, v in host.items()}

    def step(i):
        rows = slice(i * batch, (i + 1) * batch)
        b = {k: v[rows].to(device, non_blocking=True) for k, v in host.items()}
        with torch.autocast(device, dtype=torch.bfloat16):
            out = runner(input_ids=b["token_ids"], token_type_ids=b["segment_ids"],
                         attention_mask=b["padding_mask"].long(), labels=b["labels"].long())
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    begin = time.perf_counter()
    for i in range(warm):
        loss = step(i)
    first_loss = float(loss)
    sync()
    compile_s = time.perf_counter() - begin
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    begin = time.perf_counter()
    for i in range(warm, warm + steps):
        loss = step(i)
    last_loss = float(loss)
    sync()
    elapsed = time.perf_counter() - begin
    record = dict(
        peer=args.peer, backend="torch", attn_implementation=getattr(model.config, "_attn_implementation", None),
        loss_first=first_loss, loss_last=last_loss, warmup_and_compile_s=round(compile_s, 2),
        **_throughput(cfg, batch, seq, steps, elapsed),
    )
    if device == "cuda":
        record["peak_device_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return record


# ----------------------------------------------------------------------------------------------- shared
def _throughput(cfg: dict, batch: int, seq: int, steps: int, elapsed: float) -> dict:
    tokens_per_s = steps * batch * seq / elapsed
    return dict(
        steps=steps, seconds=round(elapsed, 3), step_ms=round(1000 * elapsed / steps, 2),
        tokens_per_s=round(tokens_per_s), mfu=round(tokens_per_s * common.train_flops_per_token(cfg, seq)
                                                    / common.PEAK_BF16_FLOPS, 4),
    )


def worker(args) -> None:
    base = dict(bench="finetune", config=args.config, shape=args.shape, steps_per_execution=args.steps_per_execution,
                xla_flags=os.environ.get("XLA_FLAGS", ""),
                fused_attention=os.environ.get("BERT4X_FUSED_ATTENTION", "auto"),
                versions=common.versions(), hardware=common.hardware(), commit=common.git_commit())
    run = run_torch if args.peer.startswith("hf_") else run_keras
    common.emit(dict(base, **run(args)))


def summary_table(records: list[dict]) -> str:
    ok = [r for r in records if "tokens_per_s" in r and not r.get("profile_run")]
    lines = [f"{'shape':>8} {'peer':>26} {'spe':>4} {'tokens/s':>10} {'MFU':>6} {'peak GiB':>8} {'vs best peer':>12}"]
    for shape in dict.fromkeys(r["shape"] for r in ok):
        rows = [r for r in ok if r["shape"] == shape]
        peers = [r["tokens_per_s"] for r in rows if not r["peer"].startswith("bert4x")]
        best = max(peers) if peers else None
        for r in rows:
            ratio = f"{r['tokens_per_s'] / best:.2f}x" if best else "-"
            name = r["peer"] + ("+xla_flags" if r.get("xla_flags") else "")
            lines.append(f"{shape:>8} {name:>26} {r.get('steps_per_execution', 1):>4} {r['tokens_per_s']:>10} "
                         f"{100 * r['mfu']:>5.1f}% {r.get('peak_device_mem_gib', '-'):>8} {ratio:>12}")
    for r in records:
        p = r.get("profile")
        if p and "ms_per_step_by_category" in p:
            lines.append(f"profile {r['peer']} {r['shape']}: wall {p['wall_ms_per_step']} ms/step, GPU busy "
                         f"{p['gpu_busy_ms_per_step']} ms, {p['kernels_per_step']} kernels/step")
            lines += [f"    {ms:8.3f} ms  {name}" for name, ms in p["ms_per_step_by_category"].items()]
    for r in records:
        if "error" in r:
            lines.append(f"ERROR {r.get('argv')}: {r['error']}\n{r.get('tail', '')[-1500:]}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, from {PEERS + OPTIONAL_PEERS}")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated BATCHxSEQ")
    parser.add_argument("--config", default="base", choices=sorted(common.CONFIGS))
    parser.add_argument("--steps", type=int, default=40, help="timed steps per measurement")
    parser.add_argument("--warmup-steps", type=int, default=5, help="steps before timing (compilation included)")
    parser.add_argument("--steps-per-execution", type=int, default=1, help="keras peers' compile(steps_per_execution)")
    parser.add_argument("--profile-dir", default=None,
                        help="also run --profile-peers at --profile-shape under the jax profiler and summarise them")
    parser.add_argument("--profile-peers", default="bert4x,bert4x_fast,keras_hub")
    parser.add_argument("--profile-shape", default="32x128")
    parser.add_argument("--xla-flags", default="", help="XLA_FLAGS for the jax workers (e.g. to compare settings)")
    parser.add_argument("--out", default=None, help="append the JSON lines to this file")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per measurement")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--peer", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    peers = [p for p in args.peers.split(",") if p]
    unknown = sorted(set(peers) - set(PEERS + OPTIONAL_PEERS))
    if unknown:
        parser.error(f"unknown peers {unknown}; choose from {PEERS + OPTIONAL_PEERS}")
    records = []
    jobs = [(peer, shape, None) for shape in args.shapes.split(",") for peer in peers]
    if args.profile_dir:
        jobs += [(peer, args.profile_shape, args.profile_dir) for peer in args.profile_peers.split(",") if peer]
    for peer, shape, profile_dir in jobs:
        common.parse_shape(shape)
        argv_ = [os.path.abspath(__file__), "--worker", "--peer", peer, "--shape", shape, "--config", args.config,
                 "--steps", str(args.steps if profile_dir is None else min(args.steps, 10)),
                 "--warmup-steps", str(args.warmup_steps), "--steps-per-execution", str(args.steps_per_execution)]
        env = {"KERAS_BACKEND": "jax", "BERT4X_FUSED_ATTENTION": "off" if peer == "bert4x_xla" else "auto"}
        if args.xla_flags and not peer.startswith("hf_"):
            env["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
        if profile_dir is not None:
            if peer.startswith("hf_"):
                parser.error("--profile-peers takes keras peers only (the summariser reads jax traces)")
            trace_dir = os.path.join(profile_dir, f"{peer}_{shape}")
            argv_ += ["--profile-dir", trace_dir]
            env["BENCH_HLO_DUMP"] = os.path.join(trace_dir, "hlo")
            # A separate run: dump the optimized HLO (to name each kernel's op) and launch kernels one by one rather
            # than as CUDA graphs, so that the trace attributes every kernel. Its own timing is labelled profile_run.
            flags = env.get("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
            env["XLA_FLAGS"] = (flags + f" --xla_dump_to={env['BENCH_HLO_DUMP']}"
                                " --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*(train|run_steps).*"
                                " --xla_gpu_enable_command_buffer=").strip()
        found, tail = common.run_worker(argv_, env=env, timeout=args.timeout)
        for r in found:
            r["profile_run"] = profile_dir is not None
            print(json.dumps(r, sort_keys=True), flush=True)
        records += found
        if args.out:
            with open(args.out, "a") as f:
                for r in found:
                    f.write(json.dumps(r, sort_keys=True) + "\n")
    print(summary_table(records), flush=True)


if __name__ == "__main__":
    main()
