"""Vocabulary files: `load_vocab` (with bert4keras's `simplified` trimming of tokens a Chinese model never needs)
and `save_vocab`."""

from __future__ import annotations

import os
from collections.abc import Sequence

from .chars import _is_cjk_character, _is_punctuation, _stem

PathLike = str | os.PathLike


def _read_vocab_lines(dict_path: PathLike, encoding: str) -> list[str]:
    if not os.path.isfile(dict_path):
        raise FileNotFoundError(f"vocab file not found: {os.fspath(dict_path)!r}")
    try:
        with open(dict_path, encoding=encoding) as reader:
            lines = reader.read().split("\n")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"vocab file {os.fspath(dict_path)!r} is not valid {encoding} (byte {error.start}: {error.reason}); "
            "read it with load_vocab(path, encoding=...) and pass the dict"
        ) from None
    if lines and lines[-1] == "":
        lines.pop()  # the file's final newline
    return [line.rstrip("\r") for line in lines]


def load_vocab(
    dict_path: PathLike,
    encoding: str = "utf-8",
    simplified: bool = False,
    startswith: Sequence[str] | None = None,
) -> dict[str, int] | tuple[dict[str, int], list[int]]:
    """Read a one-token-per-line vocab file into ``{token: id}`` (id = line number).

    Lines are kept verbatim (only the line break is removed), as Hugging Face
    does, so ids always equal embedding rows; if a token occurs twice the later
    line wins.

    With ``simplified=True`` the vocab is shrunk for Chinese use, by bert4keras's
    rule: the ``startswith`` tokens come first (in that order), then every other
    token in id order except those longer than one char whose stem (the token
    without a leading '##') contains a CJK char or a punctuation char (this also
    drops '[unusedN]' and '##中'-style tokens). Returns ``(token_dict,
    keep_tokens)`` where ``keep_tokens[new_id]`` is the original id, so a model's
    embedding can be sliced with ``keep_tokens``.

    Args:
        dict_path: the vocab file.
        encoding: its text encoding (a file in another one raises ``ValueError`` naming it).
        simplified: shrink the vocab as described above and also return ``keep_tokens``.
        startswith: with ``simplified``, tokens placed first, in this order.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "vocab.txt")
        >>> _ = open(path, "w", encoding="utf-8").write("[PAD]\\n[unused1]\\n[UNK]\\n中\\n##中\\nab\\n")
        >>> load_vocab(path)["中"]
        3
        >>> load_vocab(path, simplified=True, startswith=["[PAD]", "[UNK]"])
        ({'[PAD]': 0, '[UNK]': 1, '中': 2, 'ab': 3}, [0, 2, 3, 5])
    """
    lines = _read_vocab_lines(dict_path, encoding)
    token_dict = {token: i for i, token in enumerate(lines)}
    if not simplified:
        return token_dict

    new_token_dict: dict[str, int] = {}
    keep_tokens: list[int] = []
    for token in startswith or []:
        if token not in token_dict:
            raise ValueError(
                f"load_vocab: startswith token {token!r} is not in {os.fspath(dict_path)!r}"
            )
        if token not in new_token_dict:
            new_token_dict[token] = len(new_token_dict)
            keep_tokens.append(token_dict[token])
    for token, token_id in sorted(token_dict.items(), key=lambda item: item[1]):
        if token in new_token_dict:
            continue
        useless = len(token) > 1 and any(
            _is_cjk_character(c) or _is_punctuation(c) for c in _stem(token)
        )
        if not useless:
            new_token_dict[token] = len(new_token_dict)
            keep_tokens.append(token_id)
    return new_token_dict, keep_tokens


def save_vocab(dict_path: PathLike, token_dict: dict[str, int], encoding: str = "utf-8") -> None:
    """Write ``token_dict`` as a vocab file, one token per line in id order.

    Args:
        dict_path: the file to write.
        token_dict: ``{token: id}`` with ids exactly ``0 .. len(token_dict) - 1``.
        encoding: the file's text encoding.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "vocab.txt")
        >>> save_vocab(path, {"[PAD]": 0, "a": 1})
        >>> load_vocab(path)
        {'[PAD]': 0, 'a': 1}
    """
    ids = sorted(token_dict.values())
    if ids != list(range(len(ids))):
        raise ValueError("save_vocab: token_dict ids must be exactly 0 .. len(token_dict)-1")
    with open(dict_path, "w", encoding=encoding) as writer:
        for token, _ in sorted(token_dict.items(), key=lambda item: item[1]):
            writer.write(token + "\n")
