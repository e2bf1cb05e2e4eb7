"""Character and token classes shared by the tokenizers and vocabulary tools: CJK ideographs, punctuation,
whitespace and control characters exactly as Hugging Face's Rust `tokenizers` (BertNormalizer, BertPreTokenizer)
classifies them, the per-character clean-up and lower-casing, and bracketed special tokens / '##' stems."""

from __future__ import annotations

import functools
import unicodedata

# "Chinese characters": the CJK ideograph blocks, exactly the ranges tokenizers
# uses (note 0x2B920, where bert4keras and HF's old Python code use 0x2B820).
_CJK_RANGES = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
)


def _code_points(*ranges: tuple[int, int] | int) -> frozenset[int]:
    points = set()
    for r in ranges:
        first, last = (r, r) if isinstance(r, int) else r
        points.update(range(first, last + 1))
    return frozenset(points)


# tokenizers classifies characters with Unicode 8.0 tables, Python's
# unicodedata with newer ones (14.0 in Python 3.11). These are the code points
# whose class changed in between, measured against tokenizers 0.22. Chars added
# after Unicode 14 (Python >= 3.12) may still differ; they are very rare.
_NOT_PUNCTUATION_IN_HF = _code_points(  # P* in Unicode 14, unassigned in 8.0
    0x61D, 0x9FD, 0xA76, 0xC77, 0xC84, (0x1B7D, 0x1B7E), (0x2E43, 0x2E4F),
    (0x2E52, 0x2E5D), 0x10EAD, (0x10F55, 0x10F59), (0x10F86, 0x10F89),
    (0x1144B, 0x1144F), (0x1145A, 0x1145B), 0x1145D, (0x11660, 0x1166C),
    0x116B9, 0x1183B, (0x11944, 0x11946), 0x119E2, (0x11A3F, 0x11A46),
    (0x11A9A, 0x11A9C), (0x11A9E, 0x11AA2), (0x11C41, 0x11C45),
    (0x11C70, 0x11C71), (0x11EF7, 0x11EF8), 0x11FFF, (0x12FF1, 0x12FF2),
    (0x16E97, 0x16E9A), 0x16FE2, (0x1E95E, 0x1E95F),
)
_PUNCTUATION_IN_HF = _code_points(0x166D, 0x111C9)  # were Po in Unicode 8.0
_KEPT_FORMAT_CHARS = _code_points(  # Cf in Unicode 14, unassigned in 8.0
    (0x890, 0x891), 0x8E2, 0x110CD, (0x13430, 0x13438),
)
_KEPT_NONSPACING_MARKS = _code_points(  # Mn in Unicode 14, unassigned in 8.0
    0x7FD, (0x898, 0x89F), (0x8CA, 0x8E1), 0x9FE, (0xAFA, 0xAFF), 0xB55, 0xC04,
    0xC3C, 0xD00, (0xD3B, 0xD3C), 0xD81, 0xEBA, 0x180F, (0x1885, 0x1886),
    (0x1ABF, 0x1ACE), (0x1DF6, 0x1DFB), 0xA82C, 0xA8C5, 0xA8FF, 0xA9BD,
    (0x10D24, 0x10D27), (0x10EAB, 0x10EAC), (0x10F46, 0x10F50),
    (0x10F82, 0x10F85), 0x11070, (0x11073, 0x11074), 0x110C2, 0x111C9, 0x111CF,
    0x1123E, 0x1133B, (0x11438, 0x1143F), (0x11442, 0x11444), 0x11446, 0x1145E,
    (0x1182F, 0x11837), (0x11839, 0x1183A), (0x1193B, 0x1193C), 0x1193E,
    0x11943, (0x119D4, 0x119D7), (0x119DA, 0x119DB), 0x119E0,
    (0x11A01, 0x11A0A), (0x11A33, 0x11A38), (0x11A3B, 0x11A3E), 0x11A47,
    (0x11A51, 0x11A56), (0x11A59, 0x11A5B), (0x11A8A, 0x11A96),
    (0x11A98, 0x11A99), (0x11C30, 0x11C36), (0x11C38, 0x11C3D), 0x11C3F,
    (0x11C92, 0x11CA7), (0x11CAA, 0x11CB0), (0x11CB2, 0x11CB3),
    (0x11CB5, 0x11CB6), (0x11D31, 0x11D36), 0x11D3A, (0x11D3C, 0x11D3D),
    (0x11D3F, 0x11D45), 0x11D47, (0x11D90, 0x11D91), 0x11D95, 0x11D97,
    (0x11EF3, 0x11EF4), 0x16F4F, 0x16FE4, (0x1CF00, 0x1CF2D), (0x1CF30, 0x1CF46),
    (0x1E000, 0x1E006), (0x1E008, 0x1E018), (0x1E01B, 0x1E021),
    (0x1E023, 0x1E024), (0x1E026, 0x1E02A), (0x1E130, 0x1E136), 0x1E2AE,
    (0x1E2EC, 0x1E2EF), (0x1E944, 0x1E94A),
)
_STRIPPED_SPACING_MARKS = _code_points(0x1734)  # was Mn in Unicode 8.0


def _is_cjk_character(ch: str) -> bool:
    code = ord(ch)
    return any(first <= code <= last for first, last in _CJK_RANGES)


def _is_punctuation(ch: str) -> bool:
    """ASCII symbols (``!`` .. ``~`` minus letters/digits) and Unicode P* chars."""
    code = ord(ch)
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return True
    if code in _PUNCTUATION_IN_HF:
        return True
    return unicodedata.category(ch).startswith("P") and code not in _NOT_PUNCTUATION_IN_HF


def _is_space(ch: str) -> bool:
    return ch in " \t\n\r\u2028\u2029" or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
    """Characters that BERT's text cleaning deletes (\\t \\n \\r are spaces instead)."""
    if ch in "\t\n\r":
        return False
    category = unicodedata.category(ch)
    if category == "Cf":
        return ord(ch) not in _KEPT_FORMAT_CHARS
    return category in ("Cc", "Co", "Cs")


@functools.cache
def _clean_char(ch: str) -> str:
    """'' for deleted chars, ' ' for any whitespace, else the char itself."""
    if ch in "\x00\ufffd" or _is_control(ch):
        return ""
    return " " if _is_space(ch) else ch


def _is_stripped_mark(ch: str) -> bool:
    code = ord(ch)
    if code in _STRIPPED_SPACING_MARKS:
        return True
    return unicodedata.category(ch) == "Mn" and code not in _KEPT_NONSPACING_MARKS


@functools.cache
def _fold_char(ch: str) -> str:
    """Lower-casing as BERT does it: NFD, drop accents (Mn), then lower-case."""
    decomposed = unicodedata.normalize("NFD", ch)
    return "".join(c.lower() for c in decomposed if not _is_stripped_mark(c))


def _is_special(token: str) -> bool:
    """Bracketed tokens such as [CLS], [SEP], [UNK], [unused1]."""
    return len(token) > 2 and token[0] == "[" and token[-1] == "]"


def _stem(token: str) -> str:
    """The token without its WordPiece continuation prefix '##'."""
    return token[2:] if token[:2] == "##" else token
