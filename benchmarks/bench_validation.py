"""Cost of `bert4x.models.Model`'s host-side input checks on `predict` (issue 28: target under 2%).

One process, one model: `predict` with the checks on and with them switched off (the model's checker set to None,
so that the rest of the call is identical), interleaved, `--repeats` pairs; plus the checks alone on the same batch
(the numpy work they add, which does not depend on the machine's load). Writes one JSON line per measurement.

    KERAS_BACKEND=tensorflow python benchmarks/bench_validation.py --config base --shape 8x128 --repeats 15 \
        --out benchmarks/validation_cpu.jsonl
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import append_jsonl, config, git_commit, hardware, parse_shape, versions  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="base", choices=["base", "tiny"])
    parser.add_argument("--shape", default="8x128")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=None, help="append the JSON lines to this file")
    args = parser.parse_args(argv)

    import keras

    from bert4x.models import build_transformer_model

    batch, length = parse_shape(args.shape)
    cfg = config(args.config)
    model = build_transformer_model(cfg, with_pool=True)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, cfg["vocab_size"], (batch, length)).astype("int32")
    inputs = [ids, np.zeros_like(ids)]
    checker = model.input_checker

    def predict(checks: bool) -> float:
        object.__setattr__(model, "_bert4x_input_checker", checker if checks else None)
        start = time.perf_counter()
        model.predict(inputs, batch_size=batch, verbose=0)
        return time.perf_counter() - start

    for checks in (True, False, True, False):  # compile and warm both paths
        predict(checks)
    on, off = [], []
    for _ in range(args.repeats):
        on.append(predict(True))
        off.append(predict(False))
    check_times = []
    for _ in range(1000):
        start = time.perf_counter()
        checker.check(inputs)
        check_times.append(time.perf_counter() - start)

    common = {"bench": "validation", "backend": keras.backend.backend(), "config": args.config, "shape": args.shape,
              "commit": git_commit(), "hardware": hardware(), "versions": versions()}
    median_on, median_off, check_s = float(np.median(on)), float(np.median(off)), float(np.median(check_times))
    records = [
        {**common, "measure": "predict_with_checks", "median_s": round(median_on, 5),
         "times_s": [round(t, 5) for t in on]},
        {**common, "measure": "predict_without_checks", "median_s": round(median_off, 5),
         "times_s": [round(t, 5) for t in off]},
        {**common, "measure": "overhead", "median_ratio": round(median_on / median_off - 1, 5),
         "paired_median_ratio": round(float(np.median(np.array(on) / np.array(off))) - 1, 5),
         "checks_alone_s": round(check_s, 7), "checks_alone_fraction": round(check_s / median_off, 7)},
    ]
    for record in records:
        print(record)
    if args.out:
        append_jsonl(args.out, records)
    return records


if __name__ == "__main__":
    main()
