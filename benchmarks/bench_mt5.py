"""mT5-small generation speed: bert4x (`bert4x.generation`: encoder once, KV cache, one compiled loop) against
transformers' `generate` on the same random weights, in the same run.

    KERAS_BACKEND=jax python benchmarks/bench_mt5.py                        # mt5-small, batch 1 and 16, 64 new tokens
    KERAS_BACKEND=jax python benchmarks/bench_mt5.py --size tiny --repeats 1   # smoke test

Greedy search from prompts of `--prompt-len` random tokens; both sides generate exactly `--new-tokens` tokens (no end
id: transformers' eos is switched off too). It runs without tensorflow (KERAS_BACKEND=jax). On a machine with a GPU,
jax and torch both use it. Compilation (bert4x) and warm-up (transformers) are excluded from the timed runs and
reported separately. The greedy tokens of the two are compared as a check that they ran the same model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import emit, hardware, median_time, versions  # noqa: E402

SIZES = {
    # google/mt5-small: 8 + 8 layers, 6 heads of 64 in a 512-wide model, gated-GELU 1024, 250112-row vocabulary.
    "small": dict(vocab_size=250112, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_decoder_layers=8, num_heads=6),
    "tiny": dict(vocab_size=1000, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4),
}


def make_models(size: str, dtype: str, folder: str, seed: int = 0):
    """A random transformers MT5ForConditionalGeneration (untied head) and the bert4x mT5 loaded from its weights."""
    import torch
    import transformers

    from bert4x.checkpoints import write_safetensors
    from bert4x.models import build_transformer_model

    cfg = dict(SIZES[size], dropout_rate=0.0, feed_forward_proj="gated-gelu")
    torch.manual_seed(seed)
    hf = transformers.MT5ForConditionalGeneration(transformers.MT5Config(**cfg)).eval()
    # transformers 5 ties mT5's head to the embedding when built from a config: untie it, as mT5 is.
    hf.lm_head.weight = torch.nn.Parameter(torch.randn(cfg["vocab_size"], cfg["d_model"]) * cfg["d_model"] ** -0.5)
    hf.config.tie_word_embeddings = False
    hf.generation_config.eos_token_id = None  # generate exactly --new-tokens tokens, like bert4x without end_id
    write_safetensors({k: v.detach().numpy() for k, v in hf.state_dict().items() if "embed_tokens" not in k},
                      os.path.join(folder, "model.safetensors"))
    config = dict(cfg, model_type="mt5", tie_word_embeddings=False)
    if dtype == "bfloat16":
        import keras

        keras.config.set_dtype_policy("bfloat16")
        hf = hf.to(torch.bfloat16)
    t5 = build_transformer_model(config, folder, model="mt5.1.1", with_lm="linear", return_keras_model=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return hf.to(device), t5, device


def bench(args) -> list[dict]:
    import keras
    import torch

    from bert4x.generation import Generator

    with tempfile.TemporaryDirectory() as folder:
        hf, t5, device = make_models(args.size, args.dtype, folder)
    generator = Generator(t5)
    vocab = SIZES[args.size]["vocab_size"]
    records = []
    for batch in args.batch_sizes:
        prompts = np.random.default_rng(batch).integers(2, vocab, size=(batch, args.prompt_len)).astype("int32")
        start = time.perf_counter()
        ours = generator.generate(prompts.tolist(), max_len=args.new_tokens)
        compile_s = time.perf_counter() - start
        ours_s, _ = median_time(lambda: generator.generate(prompts.tolist(), max_len=args.new_tokens),
                                args.repeats, warmup=0)

        input_ids = torch.tensor(prompts, dtype=torch.long, device=device)

        def hf_generate():
            with torch.inference_mode():
                out = hf.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                  num_beams=1, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
            if device == "cuda":
                torch.cuda.synchronize()
            return out

        start = time.perf_counter()
        theirs = hf_generate()[:, 1:].cpu().numpy()  # drop the decoder start id
        warmup_s = time.perf_counter() - start
        hf_s, _ = median_time(hf_generate, args.repeats, warmup=0)
        agree = float(np.mean(np.array(ours) == theirs)) if theirs.shape == (batch, args.new_tokens) else 0.0
        common = dict(size=args.size, batch=batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                      dtype=args.dtype, device=device)
        for impl, seconds, first in (("bert4x", ours_s, compile_s), ("transformers", hf_s, warmup_s)):
            record = dict(common, impl=impl, seconds=round(seconds, 4), first_call_s=round(first, 2),
                          tokens_per_s=round(batch * args.new_tokens / seconds, 1))
            if impl == "bert4x":
                record.update(backend=keras.backend.backend(), speedup_vs_transformers=round(hf_s / seconds, 2),
                              greedy_tokens_agree=round(agree, 4))
            emit(record)
            records.append(record)
    return records


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args(argv)
    records = bench(args)
    print("| batch | bert4x tok/s | transformers tok/s | speedup | bert4x first call (s) | tokens agree |")
    print("|---|---|---|---|---|---|")
    for ours, theirs in zip(records[::2], records[1::2]):
        print(f"| {ours['batch']} | {ours['tokens_per_s']} | {theirs['tokens_per_s']} | "
              f"{ours['speedup_vs_transformers']}x | {ours['first_call_s']} | {ours['greedy_tokens_agree']} |")
    print(json.dumps({"versions": versions(), "hardware": hardware(), "backend": records[0]["backend"]}))


if __name__ == "__main__":
    main()
