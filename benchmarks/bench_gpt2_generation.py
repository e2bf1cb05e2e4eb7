"""GPT-2 generation speed: bert4x's `Generator` (jax backend, KV cache, one compiled loop) against transformers'
`GPT2LMHeadModel.generate` (torch, KV cache) on the same weights.

Work: greedy decoding of exactly `--new-tokens` tokens (no end token, so both do the same work) after prompts of
`--prompt-len` random tokens, at each `--batch` size. The weights are a random GPT-2 of the chosen size, written once
as a Hugging Face folder that both implementations load, so the greedy tokens can be compared too
(`same_tokens_as_transformers`: the fraction of rows whose tokens agree; float32 rounding may make long random-weight
continuations diverge). Times are medians of `--repeats` calls after one warm-up call (bert4x's compile time is
reported apart). Each implementation runs in its own subprocess; one JSON line per measurement goes to stdout and
is appended to `--out`.

    python benchmarks/bench_gpt2_generation.py                       # GPT-2 small, batch 1 and 32, on the GPU
    python benchmarks/bench_gpt2_generation.py --smoke --out ''      # a tiny config on CPU, nothing written
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    # GPT-2 small: the shape of transformers' `gpt2` (CPM-LM is the same architecture, larger).
    "small": dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024),
    "tiny": dict(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64),
}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for package in ("keras", "jax", "jaxlib", "torch", "transformers"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[package] = importlib.metadata.version(package)
    return out


def make_prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(1, vocab, size=(batch, length)).tolist()


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def run_bert4x(folder: str, prompts, new_tokens: int, repeats: int) -> dict:
    import jax
    import keras

    from bert4x.generation import Generator
    from bert4x.models import build_transformer_model

    model = build_transformer_model(os.path.join(folder, "config.json"), folder, model="gpt2")
    generator = Generator(model)
    start = time.perf_counter()
    outputs = generator.generate(prompts, max_len=new_tokens)  # compiles
    compile_s = time.perf_counter() - start
    generator.generate(prompts, max_len=new_tokens)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        outputs = generator.generate(prompts, max_len=new_tokens)  # returns host numpy: the device work is done
        times.append(time.perf_counter() - start)
    assert all(len(o) == new_tokens for o in outputs), "bert4x produced fewer tokens than asked"
    return dict(impl="bert4x Generator (greedy, KV cache, jax.jit loop)", backend=keras.backend.backend(),
                device=str(jax.devices()[0].device_kind), seconds=statistics.median(times),
                compile_s=round(compile_s, 2), tokens=outputs)


def run_transformers(folder: str, prompts, new_tokens: int, repeats: int) -> dict:
    import torch
    import transformers

    model = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model = model.to(device)
    ids = torch.tensor(prompts, dtype=torch.long, device=device)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False, num_beams=1, use_cache=True, pad_token_id=0, eos_token_id=None)

    def call():
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(ids, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, out

    with torch.inference_mode():
        call()  # warm-up
        times, out = [], None
        for _ in range(repeats):
            seconds, out = call()
            times.append(seconds)
    return dict(impl="transformers GPT2LMHeadModel.generate (greedy, KV cache, torch eager)", backend="torch",
                device=torch.cuda.get_device_name(0) if cuda else "cpu", seconds=statistics.median(times),
                tokens=out[:, ids.shape[1]:].tolist())


def child(args) -> None:
    """One implementation at one batch size, in this process: prints one JSON object with its tokens."""
    prompts = make_prompts(args.batch_one, args.prompt_len, CONFIGS[args.size]["vocab_size"])
    fn = run_bert4x if args.only == "bert4x" else run_transformers
    print("RESULT " + json.dumps(fn(args.folder, prompts, args.new_tokens, args.repeats)), flush=True)


def save_checkpoint(size: str, folder: str) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(**CONFIGS[size], resid_pdrop=0.0, attn_pdrop=0.0, embd_pdrop=0.0)
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(folder)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "generation_gpt2_gpu.jsonl"),
                        help="JSON lines are appended here ('' writes nothing)")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny config, few tokens, batch 1 and 2 (CPU check of the script)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per measurement")
    parser.add_argument("--only", choices=["bert4x", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--batch-one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.batch, args.prompt_len, args.new_tokens, args.repeats = "tiny", [1, 2], 8, 8, 1
    if args.only:
        child(args)
        return []
    records = []
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(args.size, folder)
        env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=os.pathsep.join(
            [str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        base = dict(model=f"gpt2 {args.size}", config=CONFIGS[args.size], prompt_len=args.prompt_len,
                    new_tokens=args.new_tokens, repeats=args.repeats, versions=versions())
        for batch in args.batch:
            results = {}
            for part in ("bert4x", "transformers"):
                command = [sys.executable, __file__, "--only", part, "--folder", folder, "--batch-one", str(batch),
                           "--size", args.size, "--prompt-len", str(args.prompt_len), "--new-tokens",
                           str(args.new_tokens), "--repeats", str(args.repeats)]
                try:
                    proc = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=env)
                except subprocess.TimeoutExpired:
                    records.append(dict(base, impl=part, batch=batch, timed_out_after_s=args.timeout))
                    continue
                lines = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                if proc.returncode != 0 or not lines:
                    records.append(dict(base, impl=part, batch=batch, failed=(proc.stdout + proc.stderr)[-2000:]))
                    continue
                results[part] = json.loads(lines[-1])
            for part, result in results.items():
                tokens = result.pop("tokens")
                record = dict(base, **result)
                record.update(batch=batch, seconds=round(result["seconds"], 4),
                              tokens_per_s=round(batch * args.new_tokens / result["seconds"], 1))
                if part == "bert4x" and "transformers" in results:
                    theirs = results["transformers"]["tokens"]
                    record["same_tokens_as_transformers"] = float(np.mean([a == b for a, b in zip(tokens, theirs)]))
                    record["speedup_vs_transformers"] = round(results["transformers"]["seconds"] / result["seconds"],
                                                              2)
                records.append(record)
    for record in records:
        emit(record)
    if args.out:
        with open(args.out, "a") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
    return records


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
