"""Which model family a checkpoint looks like, from its variable names: the hint a failed load adds to its error
("this looks like an ALBERT checkpoint; use model='albert'").

Each family is recognised by variable names only its releases carry (Google TF names and Hugging Face names).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# (family, the model names that load it, patterns of which any one identifies it), most specific first.
FAMILIES: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("ALBERT", ("albert", "albert_unshared"),
     (r"^bert/encoder/transformer/group_\d+/", r"(^|\.)albert_layer_groups\.")),
    ("ELECTRA", ("electra",), (r"^electra/", r"^electra\.", r"^discriminator_predictions[/.]")),
    ("GPT2-ML", ("gpt2_ml",), (r"^newslm/",)),
    ("GPT-2", ("gpt2",), (r"^gpt/output/LayerNorm/", r"(^|\.)wte\.weight$")),
    ("GPT", ("gpt",), (r"^gpt/transformer/", r"(^|\.)tokens_embed\.weight$")),
    ("NEZHA", ("nezha",), (r"^nezha\.",)),
    ("T5 v1.0", ("t5", "t5.1.0", "t5_encoder", "t5_decoder", "t5.1.0_encoder", "t5.1.0_decoder"),
     (r"/DenseReluDense/wi/kernel$", r"\.DenseReluDense\.wi\.weight$")),
    ("T5.1.1 / mT5", ("t5.1.1", "mt5.1.1", "t5.1.1_encoder", "t5.1.1_decoder", "mt5.1.1_encoder", "mt5.1.1_decoder"),
     (r"/DenseReluDense/wi_0/kernel$", r"\.DenseReluDense\.wi_0\.weight$")),
    ("RoFormer", ("roformer", "roformer_v2"), (r"^roformer[/.]",)),
    ("GAU-α", ("gau_alpha",), (r"^GAU_alpha/encoder/layer_\d+/gau/",)),
    ("BERT", ("bert", "roberta", "wobert"),
     (r"^bert/encoder/layer_\d+/", r"(^|\.)encoder\.layer\.\d+\.attention\.self\.")),
)


def guess_family(names: Iterable[str]) -> tuple[str, tuple[str, ...]] | None:
    """(family, model names that load it) for checkpoint variable `names`, or None when no family is recognised.

    Example:
    >>> guess_family(["bert/encoder/transformer/group_0/inner_group_0/LayerNorm/gamma"])
    ('ALBERT', ('albert', 'albert_unshared'))
    """
    names = list(names)
    for family, models, patterns in FAMILIES:
        compiled = [re.compile(p) for p in patterns]
        if any(p.search(n) for n in names for p in compiled):
            return family, models
    return None


def family_hint(names: Iterable[str], model_names: Iterable[str]) -> str:
    """A sentence naming the family the checkpoint looks like when it is not one of `model_names` (the names of the
    model being loaded); '' when it is, or when no family is recognised."""
    guess = guess_family(names)
    if guess is None:
        return ""
    family, models = guess
    if set(models) & set(model_names):
        return ""
    return f"This looks like a{'n' if family[0] in 'AEIOU' else ''} {family} checkpoint; use model='{models[0]}'."
