"""Print the fused HLO computation behind each of the top ops of a profile.

`bench_finetune.py --profile-dir DIR` writes, for each profiled peer, the optimized HLO of the train step under
`DIR/<peer>_<shape>/hlo` and a JSON line whose `profile.top_ops` names one HLO instruction per op. This looks each up
and prints the instruction and (for a fusion) the first lines of the computation it calls, which is where a slow
kernel's cause shows: an erfc expansion, a pad fused into a reduction, a transposed layout.

    python benchmarks/profile_fusions.py DIR/bert4x_32x512/hlo results.jsonl --top 45 > fusions.txt
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hlo_dir", help="the `hlo` folder of one profiled peer")
    parser.add_argument("jsonl", help="the bench_finetune output holding its profile line (the last one is used)")
    parser.add_argument("--top", type=int, default=30, help="how many ops, largest first")
    parser.add_argument("--lines", type=int, default=60, help="lines of each fused computation to print")
    args = parser.parse_args(argv)

    profiles = [json.loads(line) for line in open(args.jsonl) if '"profile"' in line]
    if not profiles:
        parser.error(f"{args.jsonl} has no line with a profile")
    ops = profiles[-1]["profile"].get("top_ops")
    if not ops:
        parser.error(f"the last profile in {args.jsonl} has no top_ops (written by an older bench_finetune.py)")
    dumps = [p for p in sorted(glob.glob(os.path.join(args.hlo_dir, "*after_optimizations.txt"))) if "train" in p]
    if not dumps:
        parser.error(f"no optimized HLO of a train step under {args.hlo_dir}")
    text = open(dumps[-1]).read()  # the last compilation is the one the profiled steps ran
    computations = {}
    for block in text.split("\n\n"):
        m = re.match(r"(?:ENTRY\s+)?%?([\w.\-]+) ", block.strip())
        if m:
            computations[m.group(1)] = block
    lines = text.splitlines()
    for op in ops[: args.top]:
        name = op.get("example_hlo_op", "")
        pattern = re.compile(r"^\s*(ROOT\s+)?%?" + re.escape(name) + " = ")
        instruction = next((line for line in lines if name and pattern.match(line)), "")
        print("=" * 100)
        print(f'{op["ms_per_step"]:.3f} ms/step, {op["calls_per_step"]} calls, {op["category"]}: {op["op_name"]}')
        print(instruction[:600] or f"(instruction {name!r} not found in {os.path.basename(dumps[-1])})")
        called = re.search(r"calls=%?([\w.\-]+)", instruction)
        if called and called.group(1) in computations:
            print("\n".join(line[:300] for line in computations[called.group(1)].splitlines()[: args.lines]))


if __name__ == "__main__":
    main()
