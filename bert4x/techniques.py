"""Seed techniques as library functions: BERT-whitening, PET patterns, P-tuning and BERT-of-Theseus.

- Whitening: `compute_kernel_bias(vectors, n_components)` then `transform_and_normalize(vectors, kernel, bias)`.
- PET: `PromptPattern(tokenizer, "{mask}满意。{text}", ["很", "不"])` encodes cloze inputs and MLM targets and turns
  MLM probabilities into class scores. Train it with `keras.losses.SparseCategoricalCrossentropy(ignore_class=0)`
  on the targets (Keras's own masked CE: only the [MASK] positions count).
- P-tuning: `prompt_tuning_model(model, prompt_ids)` swaps the token embedding for a `PromptEmbedding` in which only
  the prompt rows (e.g. `[unused*]` ids) train.
- BERT-of-Theseus: `init_successor_from_predecessor`, `theseus_encoder` and the `BinaryRandomChoice` layer.
"""

from __future__ import annotations

import random as _random
import re
from collections.abc import Sequence

import keras
import numpy as np
from keras import ops

from bert4x.layers.embeddings import Embedding
from bert4x.layers.heads import PromptEmbedding

__all__ = [
    "compute_kernel_bias",
    "whiten",
    "transform_and_normalize",
    "PromptPattern",
    "prompt_tuning_model",
    "BinaryRandomChoice",
    "init_successor_from_predecessor",
    "theseus_encoder",
]


# ------------------------------------------------------------------------------------------ whitening
def compute_kernel_bias(vectors, n_components: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """BERT-whitening: `kernel = U diag(1/sqrt(lambda))[:, :k]`, `bias = -mean` from sentence vectors `[n, d]`.

    `Sigma = U diag(lambda) U^T` is the sample covariance (`np.cov`, ddof=1); whitened vectors
    `(x + bias) @ kernel` have zero mean and identity covariance on the k kept (largest-variance) directions.
    Raises if a kept direction has no variance: note that pooled post-LayerNorm states have rank <= dim - 1.

    Example:
    >>> v = np.random.default_rng(0).normal(size=(100, 8))
    >>> kernel, bias = compute_kernel_bias(v, 4)
    >>> kernel.shape, bias.shape
    ((8, 4), (1, 8))
    """
    vectors = np.asarray(vectors, dtype="float64")
    if vectors.ndim != 2 or len(vectors) < 2:
        raise ValueError(f"compute_kernel_bias needs vectors of shape [n >= 2, dim], got {vectors.shape}.")
    dim = vectors.shape[1]
    k = dim if n_components is None else n_components
    if not 0 < k <= dim:
        raise ValueError(f"n_components must be in [1, {dim}], got {n_components}.")
    mean = vectors.mean(axis=0, keepdims=True)
    u, s, _ = np.linalg.svd(np.cov(vectors.T))
    if s[k - 1] <= 1e-12 * max(s[0], 1e-300):
        raise ValueError(
            f"The covariance of these {len(vectors)} vectors has rank < n_components={k} (eigenvalue {s[k - 1]:.3g}); "
            "use more sentences or a smaller n_components."
        )
    kernel = u[:, :k] / np.sqrt(s[:k])
    return kernel, -mean


def whiten(vectors, kernel: np.ndarray | None = None, bias: np.ndarray | None = None) -> np.ndarray:
    """`(vectors + bias) @ kernel` (identity where kernel/bias are None)."""
    vectors = np.asarray(vectors, dtype="float64")
    if bias is not None:
        vectors = vectors + bias
    if kernel is not None:
        vectors = vectors @ kernel
    return vectors


def transform_and_normalize(vectors, kernel: np.ndarray | None = None, bias: np.ndarray | None = None) -> np.ndarray:
    """Whitens then L2-normalises each row, so that dot products are cosines.

    Example:
    >>> v = np.random.default_rng(0).normal(size=(50, 6))
    >>> out = transform_and_normalize(v, *compute_kernel_bias(v, 3))
    >>> out.shape, bool(np.allclose(np.linalg.norm(out, axis=1), 1))
    ((50, 3), True)
    """
    vectors = whiten(vectors, kernel, bias)
    return vectors / np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)


# ------------------------------------------------------------------------------------------ PET
class PromptPattern:
    """A PET cloze pattern: a template with `{mask}` (the label word's slot) and `{text}`, plus label words.

    Every label word must tokenize to the same number of tokens L; `{mask}` becomes L [MASK] tokens. In the template
    (not in texts), a bracketed vocabulary token such as `[unused1]` stays one token: P-tuning's prompt tokens.

    - `encode(text, label=None, maxlen=None)` -> `(token_ids, segment_ids, target_ids)`: `target_ids` holds the label
      word's ids at the [MASK] slots when `label` is given, 0 elsewhere (0 = ignored by
      `SparseCategoricalCrossentropy(ignore_class=0)`). Only the text is truncated to fit `maxlen`.
    - `random_mask(token_ids, rate)` -> (masked ids, targets): MLM on unlabelled text, masking text tokens only.
    - `scores(mlm_probs, token_ids)` -> `[batch, num_labels]` log-probabilities of each label word at the slots.

    Example:
    >>> from bert4x.tokenizers import Tokenizer
    >>> tok = Tokenizer({"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, "很": 5, "不": 6, "好": 7})
    >>> pattern = PromptPattern(tok, "{mask}好{text}", ["很", "不"])
    >>> pattern.encode("好好", label=1)
    ([2, 4, 7, 7, 7, 3], [0, 0, 0, 0, 0, 0], [0, 6, 0, 0, 0, 0])
    """

    def __init__(self, tokenizer, template: str, label_words: Sequence[str]):
        if template.count("{mask}") != 1 or template.count("{text}") != 1:
            raise ValueError(
                f"PromptPattern: template must contain '{{mask}}' and '{{text}}' once each, got {template!r}."
            )
        if tokenizer.mask_id is None:
            raise ValueError("PromptPattern: the tokenizer's vocabulary has no [MASK] token.")
        self.tokenizer = tokenizer
        self.template = template
        self.label_words = list(label_words)
        self.label_ids = [tokenizer.tokens_to_ids(self._pieces(w)) for w in self.label_words]
        lengths = {len(ids) for ids in self.label_ids}
        if len(lengths) != 1 or 0 in lengths:
            raise ValueError(f"PromptPattern: label words must tokenize to the same non-zero length, got "
                             f"{dict(zip(self.label_words, (len(i) for i in self.label_ids)))}.")
        self.slots = lengths.pop()
        unknown = [w for w, ids in zip(self.label_words, self.label_ids) if tokenizer.unk_id in ids]
        if unknown:
            raise ValueError(f"PromptPattern: label words {unknown} contain tokens missing from the vocabulary.")

    def _pieces(self, text: str, keep_vocab_brackets: bool = False) -> list[str]:
        if keep_vocab_brackets:
            pieces = []
            for part in re.split(r"(\[[^\[\]\s]+\])", text):
                if re.fullmatch(r"\[[^\[\]\s]+\]", part) and self.tokenizer.token_to_id(part) != self.tokenizer.unk_id:
                    pieces.append(part)
                elif part:
                    pieces += self._pieces(part)
            return pieces
        tokens = self.tokenizer.tokenize(text)
        start = int(self.tokenizer._token_start is not None)
        end = len(tokens) - int(self.tokenizer._token_end is not None)
        return tokens[start:end]

    def _parts(self):
        """The template as ordered parts: ('tokens', [...]), ('mask', None) and ('text', None)."""
        parts, rest = [], self.template
        while rest:
            positions = {k: rest.find(k) for k in ("{mask}", "{text}") if k in rest}
            if not positions:
                parts.append(("tokens", self._pieces(rest, keep_vocab_brackets=True)))
                break
            key = min(positions, key=positions.get)
            if positions[key]:
                parts.append(("tokens", self._pieces(rest[: positions[key]], keep_vocab_brackets=True)))
            parts.append((key[1:-1], None))
            rest = rest[positions[key] + len(key):]
        return parts

    def encode(self, text: str, label: int | None = None, maxlen: int | None = None):
        tok = self.tokenizer
        text_tokens = self._pieces(text)
        fixed = sum(len(p) for kind, p in self._parts() if kind == "tokens") + self.slots
        fixed += int(tok._token_start is not None) + int(tok._token_end is not None)
        if maxlen is not None:
            if maxlen <= fixed:
                raise ValueError(
                    f"PromptPattern.encode: maxlen={maxlen} leaves no room for text (pattern takes {fixed})."
                )
            text_tokens = text_tokens[: maxlen - fixed]
        tokens = [tok._token_start] if tok._token_start is not None else []
        slot_positions = []
        for kind, pieces in self._parts():
            if kind == "tokens":
                tokens += pieces
            elif kind == "mask":
                slot_positions = list(range(len(tokens), len(tokens) + self.slots))
                tokens += [tok._token_mask] * self.slots
            else:
                tokens += text_tokens
        if tok._token_end is not None:
            tokens.append(tok._token_end)
        token_ids = tok.tokens_to_ids(tokens)
        target_ids = [0] * len(token_ids)
        if label is not None:
            if not 0 <= label < len(self.label_ids):
                raise ValueError(f"PromptPattern.encode: label {label} is not in [0, {len(self.label_ids)}).")
            for position, word_id in zip(slot_positions, self.label_ids[label]):
                target_ids[position] = word_id
        return token_ids, [0] * len(token_ids), target_ids

    def slot_positions(self, token_ids: Sequence[int]) -> list[int]:
        """Positions of the label-word slots in an encoded sequence (the first `slots` [MASK] tokens)."""
        positions = [i for i, t in enumerate(token_ids) if t == self.tokenizer.mask_id][: self.slots]
        if len(positions) != self.slots:
            raise ValueError("PromptPattern: this sequence does not hold the pattern's [MASK] slots.")
        return positions

    def random_mask(self, token_ids: Sequence[int], rate: float = 0.15, rng: _random.Random | None = None):
        """MLM on unlabelled text: masks each non-special, non-slot token with probability `rate`.

        Returns `(masked_ids, target_ids)` with the original ids as targets at masked positions (80% [MASK],
        10% random token, 10% unchanged, as BERT). The label slots keep their [MASK] and target 0.
        """
        rng = rng or _random.Random()
        tok = self.tokenizer
        specials = {tok.start_id, tok.end_id, tok.pad_id, tok.mask_id}
        masked, targets = list(token_ids), [0] * len(token_ids)
        for i, t in enumerate(token_ids):
            if t in specials or rng.random() >= rate:
                continue
            targets[i] = t
            r = rng.random()
            masked[i] = tok.mask_id if r < 0.8 else rng.randrange(tok.vocab_size) if r < 0.9 else t
        return masked, targets

    def scores(self, mlm_probs, token_ids) -> np.ndarray:
        """`[batch, num_labels]`: sum over slots of log P(label word token | slot), from MLM probs
        `[batch, len, vocab]`."""
        probs = np.asarray(mlm_probs)
        out = np.zeros((len(probs), len(self.label_ids)))
        for b, ids in enumerate(np.asarray(token_ids)):
            positions = self.slot_positions(ids)
            for c, word in enumerate(self.label_ids):
                out[b, c] = np.sum(np.log(np.clip(probs[b, positions, word], 1e-12, None)))
        return out


# ------------------------------------------------------------------------------------------ P-tuning
def prompt_tuning_model(
    model: keras.Model, prompt_ids: Sequence[int], layer_name: str = "Embedding-Token", train_model: bool = False
) -> keras.Model:
    """P-tuning: a copy of `model` whose token embedding is a `PromptEmbedding` training only `prompt_ids` rows.

    Every other layer is shared with `model` (same weights). With `train_model=False` (the P-tuning setting) those
    layers are frozen, so only the prompt rows train; `True` fine-tunes the whole model as well. The embedding's
    other uses (the MLM head's tied output projection) use the new layer too.

    Example:
    >>> ptuned = prompt_tuning_model(mlm_model, prompt_ids=range(1, 9))  # doctest: +SKIP
    """
    original = model.get_layer(layer_name)
    if not isinstance(original, Embedding):
        raise ValueError(f"prompt_tuning_model: {layer_name!r} is a {type(original).__name__}, not a bert4x Embedding.")
    config = original.get_config()
    config["prompt_ids"] = list(prompt_ids)
    replacement = PromptEmbedding.from_config(config)

    def clone(layer):
        return replacement if layer is original else layer

    tuned = keras.models.clone_model(model, clone_function=clone)
    replacement.set_weights(original.get_weights())
    if not train_model:
        for layer in tuned.layers:
            if layer is not replacement:
                layer.trainable = False
    return tuned


# ------------------------------------------------------------------------------------------ Theseus
@keras.saving.register_keras_serializable(package="bert4x")
class BinaryRandomChoice(keras.layers.Layer):
    """BERT-of-Theseus's switch: `[predecessor, successor]` -> successor with probability `rate` in training (one coin
    per batch), the successor at inference.

    Example:
    >>> BinaryRandomChoice(0.5)([keras.ops.zeros((2, 3)), keras.ops.ones((2, 3))]).shape
    (2, 3)
    """

    def __init__(self, rate: float = 0.5, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if not 0 <= rate <= 1:
            raise ValueError(f"BinaryRandomChoice: rate must be in [0, 1], got {rate}.")
        self.rate = rate
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=None):
        predecessor, successor = inputs
        if not training:
            return successor
        use_successor = keras.random.uniform((), seed=self.seed_generator) < self.rate
        return ops.where(use_successor, successor, predecessor)

    def compute_output_shape(self, input_shape):
        return input_shape[1]

    def get_config(self):
        config = super().get_config()
        config.update(rate=self.rate, seed=self.seed)
        return config


def _num_layers(model: keras.Model) -> int:
    count = 0
    while any(layer.name == f"Transformer-{count}-FeedForward-Norm" for layer in model.layers):
        count += 1
    if not count:
        raise ValueError(f"{model.name}: no 'Transformer-<i>-FeedForward-Norm' layers; is this a bert4x BERT encoder?")
    return count


def _blocks(model: keras.Model, layers_per_block: int) -> list[keras.Model]:
    """Sub-models `[hidden, attention_mask] -> hidden`, each spanning `layers_per_block` consecutive layers."""
    if any(layer.name == "Remove-Padding" for layer in model.layers):
        raise ValueError(f"{model.name}: built with remove_padding (its layers see non-padding tokens only); "
                         "build the models for theseus_encoder with remove_padding=False.")
    mask = model.get_layer("Attention-Mask").output
    blocks = []
    for first in range(0, _num_layers(model), layers_per_block):
        block_in = model.get_layer(f"Transformer-{first}-MultiHeadSelfAttention-Add").input[0]
        block_out = model.get_layer(f"Transformer-{first + layers_per_block - 1}-FeedForward-Norm").output
        try:
            blocks.append(keras.Model([block_in, mask], block_out, name=f"{model.name}-block-{first}"))
        except ValueError as e:
            raise ValueError(
                f"{model.name}: layers {first}..{first + layers_per_block - 1} depend on more than the hidden states "
                "and the attention mask; theseus_encoder supports BERT-family encoders."
            ) from e
    return blocks


def init_successor_from_predecessor(predecessor: keras.Model, successor: keras.Model) -> list[str]:
    """Copies every weight of a layer with the same name and shapes (embeddings and the first n Transformer layers)
    from predecessor to successor, as BERT-of-Theseus initialises its successor. Returns the copied layer names."""
    copied = []
    for layer in successor.layers:
        try:
            source = predecessor.get_layer(layer.name)
        except ValueError:
            continue
        weights = source.get_weights()
        if weights and [w.shape for w in weights] == [tuple(w.shape) for w in layer.weights]:
            layer.set_weights(weights)
            copied.append(layer.name)
    return copied


def theseus_encoder(
    predecessor: keras.Model, successor: keras.Model, replace_rate: float = 0.5, seed: int | None = None
) -> keras.Model:
    """BERT-of-Theseus: the predecessor's layers grouped into n modules, each switched with the successor's layer.

    The predecessor (2n layers, or any multiple of the successor's n) is frozen; its embeddings and attention mask
    feed the modules. In training each module independently runs its successor layer with probability
    `replace_rate` (`BinaryRandomChoice`), at inference always. Returns a model from the predecessor's inputs to the
    last hidden states; put the (frozen) task head on it, train, then fine-tune `successor` with the head alone.

    Example:
    >>> encoder = theseus_encoder(predecessor, successor, replace_rate=0.5)  # doctest: +SKIP
    """
    n_pred, n_succ = _num_layers(predecessor), _num_layers(successor)
    if n_pred % n_succ:
        raise ValueError(f"theseus_encoder: the predecessor's {n_pred} layers do not split into {n_succ} modules.")
    for layer in predecessor.layers:
        layer.trainable = False
    predecessor_blocks = _blocks(predecessor, n_pred // n_succ)
    successor_blocks = _blocks(successor, 1)
    x = predecessor.get_layer("Transformer-0-MultiHeadSelfAttention-Add").input[0]
    mask = predecessor.get_layer("Attention-Mask").output
    for k, (old, new) in enumerate(zip(predecessor_blocks, successor_blocks)):
        seed_k = None if seed is None else seed + k
        x = BinaryRandomChoice(replace_rate, seed=seed_k, name=f"Theseus-Choice-{k}")([old([x, mask]), new([x, mask])])
    return keras.Model(predecessor.inputs, x, name="theseus")
