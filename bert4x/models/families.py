"""Which model family a checkpoint looks like, from its variable names: the hint a failed load adds to its error
("this looks like an ALBERT checkpoint; use model='albert'").

Each family is recognised by variable names only its releases carry (Google TF names and Hugging Face names), or, for
Huawei's NEZHA release, which uses BERT's names, by the one BERT variable it lacks.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

# Every variable of one BERT encoder layer and of BERT's embeddings but the position table, in Google names.
_BERT_LAYER = tuple(f"{part}/{leaf}" for part in ("attention/self/query", "attention/self/key", "attention/self/value",
                                                   "attention/output/dense", "intermediate/dense", "output/dense")
                    for leaf in ("kernel", "bias")) + tuple(
    f"{part}/{leaf}" for part in ("attention/output/LayerNorm", "output/LayerNorm") for leaf in ("gamma", "beta"))
_BERT_EMBEDDINGS = ("bert/embeddings/word_embeddings", "bert/embeddings/LayerNorm/gamma",
                    "bert/embeddings/LayerNorm/beta")


def bert_without_position_table(names: Iterable[str]) -> bool:
    """Whether `names` are a complete BERT encoder in Google names (embeddings and every variable of layers 0..n-1)
    with no `bert/embeddings/position_embeddings`: Huawei's NEZHA release, whose positions are functional relative
    ones. A BERT checkpoint that lacks any other variable is not taken for one.

    Example:
    >>> bert_without_position_table(["bert/embeddings/position_embeddings", "bert/embeddings/word_embeddings"])
    False
    """
    names = set(names)
    if "bert/embeddings/position_embeddings" in names or not set(_BERT_EMBEDDINGS) <= names:
        return False
    layers = {int(m.group(1)) for n in names if (m := re.match(r"bert/encoder/layer_(\d+)/", n))}
    if not layers or layers != set(range(len(layers))):
        return False
    return all(f"bert/encoder/layer_{i}/{leaf}" in names for i in layers for leaf in _BERT_LAYER)

# (family, the model names that load it, patterns of which any one identifies it), most specific first. A pattern is a
# regular expression that one variable name matches, or a test of all the names.
FAMILIES: tuple[tuple[str, tuple[str, ...], tuple[str | Callable[[set], bool], ...]], ...] = (
    ("ALBERT", ("albert", "albert_unshared"),
     (r"^bert/encoder/transformer/group_\d+/", r"(^|\.)albert_layer_groups\.")),
    ("ELECTRA", ("electra",), (r"^electra/", r"^electra\.", r"^discriminator_predictions[/.]")),
    ("GPT2-ML", ("gpt2_ml",), (r"^newslm/",)),
    ("GPT-2", ("gpt2",), (r"^gpt/output/LayerNorm/", r"(^|\.)wte\.weight$")),
    ("GPT", ("gpt",), (r"^gpt/transformer/", r"(^|\.)tokens_embed\.weight$")),
    ("NEZHA", ("nezha",), (r"^nezha\.",)),
    # RoFormer's Google checkpoints have no position table either (RoPE), so they are no wrong family here.
    ("NEZHA", ("nezha", "roformer"), (bert_without_position_table,)),
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
        tests = [p for p in patterns if callable(p)]
        compiled = [re.compile(p) for p in patterns if not callable(p)]
        if any(p.search(n) for n in names for p in compiled) or any(test(set(names)) for test in tests):
            return family, models
    return None


def family_hint(names: Iterable[str], model_names: Iterable[str]) -> str:
    """A sentence naming the family the checkpoint looks like when it is not one of `model_names` (the names of the
    model being loaded); '' when it is, or when no family is recognised."""
    names = list(names)
    guess = guess_family(names)
    if guess is None:
        return ""
    family, models = guess
    if set(models) & set(model_names):
        return ""
    hint = f"This looks like a{'n' if family[0] in 'AEIOU' else ''} {family} checkpoint; use model='{models[0]}'."
    if family == "NEZHA" and not any(n.startswith("nezha.") for n in names):
        hint += (" (Its BERT names lack bert/embeddings/position_embeddings: NEZHA's positions are relative. A "
                 "RoFormer checkpoint has no position table either: model='roformer'.)")
    return hint
