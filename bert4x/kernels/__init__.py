"""How bert4x computes: attention implementations, fused LayerNorm and hashed dropout engines.

`bert4x.layers` says *what* a layer computes; this package holds *how*. Every attention layer calls
`bert4x.kernels.attention`, which takes the first entry of `IMPLEMENTATIONS` that accepts its inputs;
`bert4x.kernels.explain(model)` reports that choice for every attention layer of a model.

Modules:
- `dispatch`: the table, `attention(...)`, `choose(spec)`, `AttentionSpec`.
- `flash_attention`, `flash_varlen`: the Pallas (Triton) attention kernels with dropout inside, padded and token
  layouts, and the recomputing XLA version.
- `layer_norm`: the Pallas LayerNorm kernels and the LayerNorm whose backward pass keeps only its input.
- `dropout`: the counter-based dropout hash.
- `variants`: linear, Performer and KeyNorm attention.
- `layout`: moving hidden states between the padded and token layouts.

Example:
>>> import bert4x
>>> from bert4x.models import build_transformer_model
>>> model = build_transformer_model({"vocab_size": 50, "hidden_size": 8, "num_hidden_layers": 1,
...     "num_attention_heads": 2, "intermediate_size": 16}, with_pool=True)
>>> report = bert4x.kernels.explain(model, print_report=False)
>>> [row.layer for row in report.rows]
['Transformer-0-MultiHeadSelfAttention']
"""

from __future__ import annotations

from bert4x.kernels.dispatch import (
    IMPLEMENTATIONS,
    AttentionSpec,
    Choice,
    Implementation,
    attention,
    choose,
    implementation_names,
    make_spec,
)
from bert4x.kernels.explain import Explanation, explain

__all__ = ["attention", "explain", "choose", "make_spec", "implementation_names", "IMPLEMENTATIONS",
           "AttentionSpec", "Implementation", "Choice", "Explanation"]
