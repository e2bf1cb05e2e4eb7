"""Checkpoint tables: `Source`/`src`, the entries of a model's `variable_mapping` (Keras weight path -> checkpoint
variables), the checkpoint variables every load ignores, and what a strict load reports (`LoadReport`) or raises
(`CheckpointError`)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one Keras weight comes from in a checkpoint.

    names: checkpoint variables, concatenated along the last axis when there are several (fused q|k|v kernels).
    transpose: each variable is stored `[out, in]` (PyTorch Linear) and is transposed to Keras' `[in, out]`.
    vocab: one axis indexes the vocabulary, so `keep_tokens` / `compound_tokens` apply to it.
    vocab_axis: which axis that is, in Keras layout (0 for embeddings; -1 for an untied LM head's `[dim, vocab]`
        kernel).
    """

    names: tuple[str, ...]
    transpose: bool = False
    vocab: bool = False
    vocab_axis: int = 0
    # optional: a bert4x-only weight (attention variants, conditional LayerNorm) that keeps its initial value when
    # the checkpoint lacks it (an original checkpoint) and is read back when present (one bert4x saved).
    optional: bool = False
    # widths: the last-axis width of each of `names` when they differ (q|k|v with attention_key_size): checked per part.
    widths: tuple[int, ...] | None = None


def src(*names: str, transpose: bool = False, vocab: bool = False, vocab_axis: int = 0) -> Source:
    return Source(tuple(names), transpose, vocab, vocab_axis)


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: lists every offending variable."""


@dataclasses.dataclass
class LoadReport:
    """What a checkpoint load did: `loaded` Keras weights, and what was `missing`, `mismatched`, `unexpected`,
    `ignored`."""

    checkpoint: str
    loaded: list[str]
    missing: list[str]
    mismatched: list[str]
    unexpected: list[str]
    ignored: list[str]
    initialized: list[str] = dataclasses.field(default_factory=list)  # optional weights absent from the checkpoint
    # weights of layers the user added (condition embeddings, extra inputs' layers): not from the checkpoint
    user: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.mismatched or self.unexpected)

    def describe(self) -> str:
        lines = [f"checkpoint {self.checkpoint}: loaded {len(self.loaded)} weights"]
        for title, items in (
            ("model weights with no source in the checkpoint", self.missing),
            ("shape mismatches", self.mismatched),
            ("checkpoint variables that match no model weight", self.unexpected),
        ):
            if items:
                lines.append(f"{len(items)} {title}:")
                lines.extend(f"  - {item}" for item in items)
        if self.user:
            lines.append(f"{len(self.user)} weights of layers added by the user, not from the checkpoint "
                         "(they keep their initial values):")
            lines.extend(f"  - {item}" for item in self.user)
        return "\n".join(lines)


# Variables that training leaves in checkpoints and that no model weight corresponds to.
_IGNORED_PATTERNS = {
    "google": [r"(^|/)adam_[mv]$", r"^global_step$", r"(^|/)(bad_steps|good_steps|loss_scale)$", r"/Momentum$",
               r"_slot_\w+$"],  # Adafactor slots of T5/mT5 checkpoints: '<name>_slot_vc', '_slot_vr', '_slot_v'
    "huggingface": [r"(^|\.)position_ids$"],
}
