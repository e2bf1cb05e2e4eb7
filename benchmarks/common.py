"""Shared pieces of the bert4x benchmarks: the model config, FLOP counting, random batches, versions, hardware,
one-JSON-line output and running each measurement in its own process.

Every benchmark measures bert4x and its peers on the same work; each measurement runs in a fresh subprocess so
that peak memory (device or host) belongs to that measurement alone.

Example:
>>> cfg = config("tiny")
>>> round(train_flops_per_token(cfg, 128) / 1e6, 3) > 0
True
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from typing import Iterable

import numpy as np

# BERT-base Chinese (google's chinese_L-12_H-768_A-12), the workload, and a tiny one for smoke tests.
CONFIGS = {
    "base": dict(vocab_size=21128, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2),
    "tiny": dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128, max_position_embeddings=512, type_vocab_size=2),
}
NUM_CLASSES = 2
DROPOUT = 0.1
LEARNING_RATE = 2e-5
WEIGHT_DECAY = 0.01
# Dense bf16 peak of an H100/H200 SXM (datasheet); MFU is reported against it, as in the issue.
PEAK_BF16_FLOPS = 989e12


def config(name: str) -> dict:
    if name not in CONFIGS:
        raise ValueError(f"Unknown benchmark config {name!r}; choose one of {sorted(CONFIGS)}.")
    return dict(CONFIGS[name])


def non_embedding_params(cfg: dict, num_classes: int = NUM_CLASSES) -> int:
    """Parameters outside the embedding tables: encoder layers, pooler and classifier."""
    d, f, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    attention = 4 * d * d + 4 * d
    feed_forward = 2 * d * f + f + d
    norms = 2 * 2 * d
    pooler = d * d + d
    classifier = d * num_classes + num_classes
    return layers * (attention + feed_forward + norms) + pooler + classifier


def train_flops_per_token(cfg: dict, seq_len: int) -> float:
    """Training matmul FLOPs per token: 6 x non-embedding params, plus attention's QK^T and PV
    (2 matmuls x 2 FLOPs x seq_len x hidden per token per layer forward, x3 for forward + backward)."""
    attention = 12 * cfg["num_hidden_layers"] * seq_len * cfg["hidden_size"]
    return 6 * non_embedding_params(cfg) + attention


def forward_flops_per_token(cfg: dict, seq_len: int) -> float:
    return train_flops_per_token(cfg, seq_len) / 3


def random_batches(cfg: dict, batch: int, seq_len: int, count: int, seed: int = 0,
                   full_rows: bool = False) -> dict[str, np.ndarray]:
    """`count` batches of random fine-tuning data, stacked on the first axis (count * batch rows).

    Each row starts with [CLS] (id 101), has a random length in [seq_len/2, seq_len] (`full_rows`: seq_len) and is
    right-padded with id 0, as `sequence_padding` makes them; labels are random classes.
    """
    rng = np.random.default_rng(seed)
    rows = count * batch
    token_ids = rng.integers(min(1000, cfg["vocab_size"] // 2), cfg["vocab_size"], size=(rows, seq_len), dtype=np.int32)
    lengths = rng.integers(max(1, seq_len // 2), seq_len + 1, size=rows)
    if full_rows:
        lengths[:] = seq_len
    keep = np.arange(seq_len)[None, :] < lengths[:, None]
    token_ids = np.where(keep, token_ids, 0).astype(np.int32)
    token_ids[:, 0] = 101
    return {
        "token_ids": token_ids,
        "segment_ids": np.zeros((rows, seq_len), np.int32),
        "padding_mask": keep,
        "labels": rng.integers(0, NUM_CLASSES, size=rows).astype(np.int32),
    }


def versions(packages: Iterable[str] = ("bert4x", "keras", "keras-hub", "jax", "jaxlib", "tensorflow", "torch",
                                        "transformers", "numpy")) -> dict[str, str]:
    """Installed versions, read from package metadata (nothing is imported)."""
    found = {"python": platform.python_version()}
    for name in packages:
        if name == "bert4x":
            try:
                import bert4x

                found[name] = bert4x.__version__
            except ImportError:
                pass
            continue
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def hardware() -> dict:
    """CPU model, core counts, memory, and the GPU name when `nvidia-smi` answers."""
    info = {"machine": platform.machine(), "cpus": os.cpu_count()}
    try:
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            info["gpu"] = out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def append_jsonl(path: str, records: list[dict]) -> None:
    """Appends one JSON line per record to `path` (the `--out` file of the benchmark scripts)."""
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")


def jax_call_seconds(fn, args, repeats: int) -> float:
    """Mean seconds of `fn(*args)` (a jitted jax function) over `repeats` calls, after two untimed ones."""
    import jax

    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats


def emit(record: dict) -> None:
    """Prints one measurement as one JSON line (prefixed so the parent can find it among library logs)."""
    print("BENCH " + json.dumps(record, sort_keys=True), flush=True)


def run_worker(argv: list[str], env: dict | None = None, timeout: float = 900) -> tuple[list[dict], str]:
    """Runs `python argv...` in a fresh process; returns its BENCH records and the tail of its output."""
    merged = dict(os.environ, **(env or {}))
    merged.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    merged["PYTHONUNBUFFERED"] = "1"
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=merged, timeout=timeout)
        output, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        code = "timeout"
    records = [json.loads(line[6:]) for line in output.splitlines() if line.startswith("BENCH ")]
    if code != 0 and not records:
        records = [{"error": f"worker exited with {code}", "argv": argv, "tail": output[-3000:]}]
    for r in records:
        r.setdefault("worker_wall_s", round(time.perf_counter() - start, 1))
    return records, output[-3000:]


def python_probe_s(additions: int = 3_000_000) -> float:
    """Seconds the calling thread takes for a fixed pure-Python loop: the host's single-thread speed right now (on
    the shared H200 host it was ≈0.1 s or ≈0.2 s from moment to moment)."""
    start, total = time.perf_counter(), 0
    for i in range(additions):
        total += i
    return round(time.perf_counter() - start, 4)


def parse_shape(text: str) -> tuple[int, int]:
    """'32x128' -> (32, 128)."""
    try:
        batch, seq = (int(p) for p in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"Shape {text!r} must look like BATCHxSEQ, e.g. 32x128.") from None
    return batch, seq


def median_time(fn, repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time of `fn()` over `repeats` calls after `warmup` calls (fn must block until done)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), times
