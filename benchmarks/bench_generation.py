"""Generation speed: bert4x.generation vs the bert4keras-style AutoRegressiveDecoder loop on the same model, and vs
transformers' `generate` on a comparable causal model (BertLMHeadModel, same size, random weights, KV cache).

Work: greedy decoding of exactly `--new-tokens` tokens (no end token, so every implementation does the same work)
after prompts of random lengths in [prompt_len/2, prompt_len], for each `--batch` size. One JSON line per
measurement on stdout: implementation, backend, device, batch, seconds, tokens/s (new tokens of all rows / seconds),
and for bert4x the one-off compile time (measured apart, on a first call).

    KERAS_BACKEND=tensorflow python benchmarks/bench_generation.py                 # CPU figures in RESULTS.md
    KERAS_BACKEND=jax python benchmarks/bench_generation.py --skip-transformers   # a GPU machine without tensorflow

Each measurement runs in its own subprocess (TensorFlow's idle thread pools would otherwise slow torch down in the
same process). Nothing here imports tensorflow unless the Keras backend is tensorflow; transformers/torch are
optional.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402

from bert4x.generation import Generator  # noqa: E402
from bert4x.models import build_transformer_model  # noqa: E402
from bert4x.snippets import AutoRegressiveDecoder  # noqa: E402

CONFIGS = {  # BERT-base Chinese, and a small one for quick runs
    "base": dict(vocab_size=21128, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2),
    "small": dict(vocab_size=21128, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                  intermediate_size=1024, max_position_embeddings=512, type_vocab_size=2),
}


def versions() -> dict:
    out = {"python": platform.python_version(), "keras": keras.__version__, "backend": keras.backend.backend()}
    for package in ("tensorflow", "jax", "torch", "transformers"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def device() -> str:
    name = keras.backend.backend()
    if name == "jax":
        import jax

        return str(jax.devices()[0].device_kind)
    if name == "torch":
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    if name == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        return gpus[0].name if gpus else "cpu"
    return "cpu"


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def make_prompts(batch: int, prompt_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(1, prompt_len // 2), prompt_len + 1, size=batch)
    return [[101] + rng.integers(1000, vocab, size=n - 1).tolist() for n in lengths]


class ModelDecoder(AutoRegressiveDecoder):
    """bert4keras's recipe: the whole model re-runs on prompt + output for every new token (no cache)."""

    def __init__(self, model, call: str, **kwargs):
        super().__init__(**kwargs)
        self.model, self.call = model, call

    @AutoRegressiveDecoder.wraps(default_rtype="probas")
    def predict(self, inputs, output_ids, states):
        token_ids, segment_ids = inputs
        token_ids = np.concatenate([token_ids, output_ids], 1)
        segment_ids = np.concatenate([segment_ids, np.zeros_like(output_ids)], 1)
        last = self.last_token(self.model)
        if self.call == "predict":
            return last.predict([token_ids, segment_ids], verbose=0)
        return last.predict_on_batch([token_ids, segment_ids])


def bench_bert4x(model, prompts, new_tokens, repeats, base):
    generator = Generator(model)
    start = time.perf_counter()
    outputs = generator.generate(prompts, max_len=new_tokens)  # compiles
    compile_s = time.perf_counter() - start
    if base is None:  # only the tokens are wanted, to check another implementation against
        return outputs
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        outputs = generator.generate(prompts, max_len=new_tokens)
        times.append(time.perf_counter() - start)
    assert all(len(o) == new_tokens for o in outputs)
    seconds = statistics.median(times)
    emit(dict(base, impl="bert4x.generation (greedy, KV cache, compiled loop)", batch=len(prompts),
              seconds=round(seconds, 4), tokens_per_s=round(len(prompts) * new_tokens / seconds, 1),
              compile_s=round(compile_s, 2), repeats=repeats))
    return outputs


def bench_decoder(model, prompts, new_tokens, call, base, expected=None):
    decoder = ModelDecoder(model, call, start_id=None, end_id=None, maxlen=new_tokens)
    warm = ModelDecoder(model, call, start_id=None, end_id=None, maxlen=2)
    warm.random_sample([np.array(prompts[0]), np.zeros(len(prompts[0]), int)], 1, topk=1)
    # The first pass pays for whatever the backend compiles per sequence length (as a user's first call does); the
    # second pass shows the loop's steady state, with every length already compiled.
    for run in ("first pass", "second pass (every length already compiled)"):
        start = time.perf_counter()
        outputs = [decoder.random_sample([np.array(p), np.zeros(len(p), int)], 1, topk=1)[0].tolist()
                   for p in prompts]
        seconds = time.perf_counter() - start
        record = dict(base, impl=f"AutoRegressiveDecoder loop (model.{call}, no cache, one prompt at a time)",
                      run=run, batch=len(prompts), seconds=round(seconds, 4),
                      tokens_per_s=round(len(prompts) * new_tokens / seconds, 1), repeats=1)
        if expected is not None:
            record["same_tokens_as_bert4x"] = outputs == expected
        emit(record)


def bench_transformers(cfg, prompts, new_tokens, repeats, base, threads=None):
    try:
        import torch
        import transformers
    except ImportError as e:
        emit(dict(base, impl="transformers generate", skipped=f"not installed: {e}"))
        return
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = transformers.BertConfig(**cfg, is_decoder=True, pad_token_id=0)
    model = transformers.BertLMHeadModel(config).eval()
    cuda = torch.cuda.is_available()
    if cuda:
        model = model.cuda()
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):  # left padding, as decoder-only generation needs
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    if cuda:
        ids, mask = ids.cuda(), mask.cuda()
    kwargs = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  use_cache=True, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, **dict(kwargs, max_new_tokens=2, min_new_tokens=2))
        times = []
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = model.generate(ids, **kwargs)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    assert out.shape[1] == width + new_tokens
    seconds = statistics.median(times)
    emit(dict(base, impl="transformers BertLMHeadModel.generate (greedy, KV cache, torch eager)",
              backend="torch", device=torch.cuda.get_device_name(0) if cuda else "cpu", batch=len(prompts),
              seconds=round(seconds, 4), tokens_per_s=round(len(prompts) * new_tokens / seconds, 1),
              repeats=repeats, torch_threads=torch.get_num_threads()))


def measure(args, part: str, batch: int) -> None:
    """One measurement (this process): part is 'bert4x', 'decoder-predict', 'decoder-predict_on_batch' or
    'transformers'."""
    cfg = CONFIGS[args.size]
    base = dict(model=f"{args.model} {args.size} ({args.application})", backend=keras.backend.backend(),
                device=device(), new_tokens=args.new_tokens, prompt_len=args.prompt_len, versions=versions())
    prompts = make_prompts(batch, args.prompt_len, cfg["vocab_size"])
    if part == "transformers":
        bench_transformers(cfg, prompts, args.new_tokens, args.repeats, base, args.torch_threads)
        return
    keras.utils.set_random_seed(0)
    model = build_transformer_model(dict(cfg), model=args.model, application=args.application)
    outputs = bench_bert4x(model, prompts, args.new_tokens, args.repeats, base if part == "bert4x" else None)
    if part.startswith("decoder-"):
        bench_decoder(model, prompts, args.new_tokens, part.split("-", 1)[1], base, expected=outputs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(CONFIGS), default="base")
    parser.add_argument("--model", default="bert", help="bert4x model name (bert, roformer, ...)")
    parser.add_argument("--application", default="lm", choices=["lm", "unilm"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decoder-batches", type=int, nargs="*", default=[1],
                        help="batch sizes at which to time the uncached AutoRegressiveDecoder loop")
    parser.add_argument("--decoder-calls", nargs="*", default=["predict", "predict_on_batch"],
                        choices=["predict", "predict_on_batch"])
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--torch-threads", type=int, help="torch.set_num_threads for transformers (default: torch's)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per measurement; one that runs longer is reported as timed out")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # internal: "part:batch", one measurement in this process
    args = parser.parse_args(argv)
    if args.only:
        part, batch = args.only.rsplit(":", 1)
        measure(args, part, int(batch))
        return
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
    for batch in args.batch:
        parts = ["bert4x"]
        if batch in args.decoder_batches:
            parts += [f"decoder-{call}" for call in args.decoder_calls]
        if not args.skip_transformers:
            parts.append("transformers")
        for part in parts:
            command = [sys.executable, __file__, *forwarded, "--only", f"{part}:{batch}"]
            try:
                result = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                emit(dict(impl=part, batch=batch, timed_out_after_s=args.timeout))
                continue
            lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
            for line in lines:
                print(line, flush=True)
            if result.returncode != 0:
                emit(dict(impl=part, batch=batch, failed=result.stderr[-2000:]))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
