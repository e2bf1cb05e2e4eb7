"""Text helpers with bert4keras's semantics: a file `open` with line indexing and JSON lines, long-text
segmentation, full-width to half-width conversion and longest common substring / subsequence."""

from __future__ import annotations

import builtins
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = ["open", "text_segmentate", "strQ2B", "longest_common_substring", "longest_common_subsequence"]


class open:  # noqa: N801 (bert4keras's name, shadowing the builtin on purpose)
    """bert4keras's `open`: the builtin file with line indexing and a JSON-lines mode.

    Iterating yields lines (with their newline) or, with `jsonl=True`, one parsed JSON value per non-empty line;
    `write` of a non-string in `jsonl` mode writes it as one JSON line. With `indexable`, `f[i]` reads line i by
    seeking to it and `len(f)` is the number of lines.

    Args:
        name: the file path.
        mode: as the builtin's (`"r"`, `"w"`, `"a"`, ...).
        encoding: as the builtin's (e.g. "utf-8").
        errors: how decoding errors are handled ("strict", "ignore", "replace").
        indexable: True to build the line index on opening (text read modes only), or a path where the index is
            cached as JSON (read when it exists, written otherwise).
        jsonl: read and write JSON lines.

    Example:
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "a.jsonl")
    >>> with open(path, "w", encoding="utf-8", jsonl=True) as f:
    ...     f.write({"text": "你好"}); f.write({"text": "再见"})
    >>> with open(path, encoding="utf-8", jsonl=True, indexable=True) as f:
    ...     len(f), f[1]["text"], [d["text"] for d in f]
    (2, '再见', ['你好', '再见'])
    """

    def __init__(self, name: str, mode: str = "r", encoding: str | None = None, errors: str = "strict",
                 indexable: bool | str = False, jsonl: bool = False):
        self.name = name
        self.mode = mode
        self.jsonl = jsonl
        self.file = builtins.open(name, mode, encoding=encoding, errors=errors)  # noqa: SIM115 (closed by close)
        self.offsets: list[int] | None = None
        if indexable:
            if "b" in mode or not any(c in mode for c in "r+"):
                raise ValueError(f"open: indexable needs a text mode that reads, got mode={mode!r}.")
            if isinstance(indexable, str) and os.path.exists(indexable):
                with builtins.open(indexable, encoding="utf-8") as f:
                    self.offsets = json.load(f)
            else:
                self.offsets = self._line_offsets()
                if isinstance(indexable, str):
                    with builtins.open(indexable, "w", encoding="utf-8") as f:
                        json.dump(self.offsets, f)

    def _line_offsets(self) -> list[int]:
        offsets = []
        self.file.seek(0)
        while True:
            position = self.file.tell()
            if not self.file.readline():
                break
            offsets.append(position)
        self.file.seek(0)
        return offsets

    def _decode(self, line: str) -> Any:
        return json.loads(line) if self.jsonl else line

    def __len__(self) -> int:
        if self.offsets is None:
            raise TypeError("open: len() needs indexable=True.")
        return len(self.offsets)

    def __getitem__(self, index: int) -> Any:
        if self.offsets is None:
            raise TypeError("open: indexing needs indexable=True.")
        self.file.seek(self.offsets[index])
        return self._decode(self.file.readline())

    def __iter__(self) -> Iterator[Any]:
        if self.offsets is not None:  # indexing moved the position: iterate the whole file
            self.file.seek(0)
        for line in iter(self.file.readline, ""):
            if self.jsonl and not line.strip():
                continue
            yield self._decode(line)

    def write(self, data: Any) -> None:
        if self.jsonl and not isinstance(data, (str, bytes)):
            data = json.dumps(data, ensure_ascii=False) + "\n"
        self.file.write(data)

    def read(self, *args):
        return self.file.read(*args)

    def readline(self, *args):
        return self.file.readline(*args)

    def readlines(self, *args):
        return self.file.readlines(*args)

    def flush(self) -> None:
        self.file.flush()

    def tell(self) -> int:
        return self.file.tell()

    def seek(self, *args) -> int:
        return self.file.seek(*args)

    def close(self) -> None:
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def text_segmentate(text: str, maxlen: int, seps: str | Sequence[str] = "\n", strips: str | None = None) -> list[str]:
    """Splits `text` into pieces of at most `maxlen` characters where possible, at separators in order of priority.

    The text (stripped of whitespace and then of `strips`) is split at `seps[0]`, each separator kept at the end
    of its piece; consecutive pieces are joined while the result stays shorter than `maxlen`, and any group still
    too long is split again with the remaining `seps`. A piece with no separator left stays whole, even if long.

    Args:
        text: the text.
        maxlen: the largest length wanted.
        seps: separators, most preferred first (a string is a sequence of one-character separators).
        strips: characters stripped from both ends of every piece.

    Example:
    >>> text_segmentate("今天天气很好。我们去公园吧！好的。", 8, "。！")
    ['今天天气很好。', '我们去公园吧！', '好的。']
    """
    text = text.strip().strip(strips)
    if not seps or len(text) <= maxlen:
        return [text]
    sep, rest = seps[0], seps[1:]
    pieces = text.split(sep)
    results, current = [], ""
    for i, piece in enumerate(pieces):
        if current and piece and len(current) + len(piece) > maxlen - 1:
            results.extend(text_segmentate(current, maxlen, rest, strips))
            current = ""
        current += piece if i == len(pieces) - 1 else piece + sep
    if current:
        results.extend(text_segmentate(current, maxlen, rest, strips))
    return results


def strQ2B(text: str) -> str:  # noqa: N802 (bert4keras's name)
    """Full-width (quanjiao) characters to their half-width (banjiao) forms: the ideographic space to a space,
    U+FF01..U+FF5E to ASCII 0x21..0x7E.

    Example:
    >>> strQ2B("ＡＢＣ，１２３　ｘ")
    'ABC,123 x'
    """
    out = []
    for char in text:
        code = ord(char)
        if code == 0x3000:
            code = 0x20
        elif 0xFF01 <= code <= 0xFF5E:
            code -= 0xFEE0
        out.append(chr(code))
    return "".join(out)


def longest_common_substring(source: Sequence, target: Sequence) -> tuple[int, tuple[int, int, int, int]]:
    """The longest common contiguous run of `source` and `target`: `(length, (i0, i1, j0, j1))` with
    `source[i0:i1] == target[j0:j1]` (the first such run found, scanning `source` then `target`).

    Example:
    >>> longest_common_substring("abcde", "xbcdy")
    (3, (1, 4, 1, 4))
    """
    best, span = 0, (0, 0, 0, 0)
    previous = [0] * (len(target) + 1)
    for i, s in enumerate(source, 1):
        row = [0] * (len(target) + 1)
        for j, t in enumerate(target, 1):
            if s == t:
                row[j] = previous[j - 1] + 1
                if row[j] > best:
                    best, span = row[j], (i - row[j], i, j - row[j], j)
        previous = row
    return best, span


def longest_common_subsequence(source: Sequence, target: Sequence) -> tuple[int, list[tuple[int, int]]]:
    """The longest common subsequence: `(length, [(i, j), ...])`, the aligned positions in increasing order.

    Example:
    >>> longest_common_subsequence("abcbdab", "bdcaba")
    (4, [(1, 0), (2, 2), (3, 4), (5, 5)])
    """
    n, m = len(source), len(target)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            if source[i - 1] == target[j - 1]:
                table[i][j] = table[i - 1][j - 1] + 1
            else:
                table[i][j] = max(table[i - 1][j], table[i][j - 1])
    pairs, i, j = [], n, m
    while i and j:
        if source[i - 1] == target[j - 1]:
            pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif table[i][j - 1] > table[i - 1][j]:
            j -= 1
        else:
            i -= 1
    return table[n][m], pairs[::-1]
