"""Fast, batched, KV-cached text generation: greedy, beam search and sampling in one compiled device loop.

This module holds search only. A model takes part through the decoding interface of its `Transformer`
(`bert4x.models.base.Transformer`): `decoding_unsupported()`, `decode_variables()`, `decode_prepare(prompts,
segment_ids, pad_to_multiple, max_len)` on the host, and `decode_start(prompt, max_len)` / `decode_step(token_ids,
cache, index)` on the device, returning float32 logits `[batch, vocab]` and a cache whose tensors keep the batch on
their first axis (beam search reorders it). BERT, RoBERTa, WoBERT, RoFormer, RoFormerV2, ALBERT and
ALBERT-unshared built with `application='lm'` or `'unilm'`, the causal GPT, GPT-2 and GPT2-ML, and T5 (v1.0, v1.1)
and mT5 implement it; a new family gets this generator by implementing it too.

Beam search has three rules (`num_beams > 1`):

- default, bert4keras's: every step keeps the `num_beams` best hypotheses by total log-probability; when the best of
  them ends with `end_id`, it is the output; otherwise finished hypotheses leave the beam, which narrows to the
  unfinished ones. At `max_len` the best hypothesis is returned.
- `length_penalty=x`, transformers' rule: finished hypotheses are kept in a pool of `num_beams`, scored
  `sum of log-probabilities / length ** x`, and the search stops as `early_stopping` says (False: when the best live
  hypothesis, scored at its current length, cannot beat the worst of a full pool; True: once the pool is full;
  'never': with the bound at `max_len` when x > 0).
- `exact=True`: finished hypotheses are kept aside and the search stops only when no live hypothesis can beat the
  best of them; with a beam as wide as the number of prefixes it is the exhaustive-search optimum. On weakly trained
  models this often returns the bare end token.

Compilation: on jax the whole generation (prompt pass plus a `keras.ops.while_loop` over tokens) is one `jax.jit`
function, with the model's variables passed in through a `keras.StatelessScope`; on tensorflow it is one
`tf.function(jit_compile=True)` (XLA). Either way there is no host round trip per token: the loop runs on the device
and stops early once every row has ended. On torch the same code runs eagerly. Compiled functions are cached per
search setting and input shape; prompts are padded to a multiple of `pad_to_multiple` so that nearby lengths share a
compilation.

Modules: `generator` (`Generator`, `generate`, option checks and compilation) and `search` (the search loops).

Example:
>>> from bert4x.models import build_transformer_model
>>> model = build_transformer_model({"vocab_size": 30, "hidden_size": 8, "num_hidden_layers": 1,
...     "num_attention_heads": 2, "intermediate_size": 16}, application="lm")
>>> outputs = generate(model, [[2, 5, 6], [2, 7]], max_len=4, end_id=3)
>>> len(outputs), all(len(o) <= 4 for o in outputs)
(2, True)
"""

from bert4x.generation.generator import Generator, decoding_model, generate  # noqa: F401 (decoding_model re-exported)

__all__ = ["Generator", "generate"]
