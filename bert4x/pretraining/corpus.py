"""Plain text for pretraining: reading it out of dataset files, and splitting it into sentences.

`iter_corpus_texts(paths)` streams the Chinese texts found in .zip / .tsv / .csv / .txt / .json(l) files (labels,
ids and other non-text fields are left out: a field is text when it holds at least `min_chinese` Chinese
characters); `split_sentences(text)` cuts a text after sentence-final punctuation.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import logging
import os
import re
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

logger = logging.getLogger("bert4x")

__all__ = ["split_sentences", "iter_corpus_texts", "iter_corpus_sentences", "expand_corpus_paths", "count_chinese"]

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CJK_CHAR = re.compile(f"[{_CJK}]")
# A sentence ends at 。！？!?；; or … (runs of them), plus any closing quotes / brackets right after.
_SENTENCE_END = re.compile(r"([。！？!?；;…]+[”’」』）)\"']*)")
# Whitespace between two Chinese characters is an artefact (pre-segmented text such as "王 艳 家"), not content.
_SPACE_IN_CHINESE = re.compile(f"(?<=[{_CJK}，。、：；！？“”（）])\\s+(?=[{_CJK}，。、：；！？“”（）])")
# 'char TAG' per line (People's Daily NER): a single character, spaces, a BIO tag.
_CHAR_TAG_LINE = re.compile(r"^(\S)\s+([BIOES](-\S+)?)$")


def count_chinese(text: str) -> int:
    """Number of CJK ideographs in `text`.

    Args:
        text: any string.
    """
    return len(_CJK_CHAR.findall(text))


def split_sentences(text: str, min_chinese: int = 1) -> list[str]:
    """Splits `text` into sentences after 。！？!?；;… (closing quotes stay with their sentence) and at newlines.
    Sentences with fewer than `min_chinese` Chinese characters are merged into the one before (so nothing is lost).

    Args:
        text: the text to split.
        min_chinese: sentences with fewer Chinese characters join the one before.

    Returns:
        The sentences, stripped of surrounding whitespace.

    Example:
    >>> split_sentences("今天天气很好。我们去公园吧！“好啊。”他说")
    ['今天天气很好。', '我们去公园吧！', '“好啊。”', '他说']
    """
    sentences: list[str] = []
    for line in text.splitlines():
        for piece in _SENTENCE_END.sub(r"\1\n", line).split("\n"):
            piece = piece.strip()
            if not piece:
                continue
            if sentences and count_chinese(piece) < min_chinese:
                sentences[-1] += piece
            else:
                sentences.append(piece)
    return sentences


def _clean(text: str) -> str:
    return _SPACE_IN_CHINESE.sub("", text.strip())


def _strings_in_json(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings_in_json(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings_in_json(v)


def _texts_in_lines(lines: Iterable[str], name: str) -> Iterator[str]:
    """Fields of a delimited text file; 'char TAG' lines (NER corpora) are joined back into sentences."""
    chars: list[str] = []
    for line in lines:
        line = line.rstrip("\r\n")
        match = _CHAR_TAG_LINE.match(line)
        if match:
            chars.append(match.group(1))
            continue
        if chars:
            yield "".join(chars)
            chars = []
        if name.endswith(".csv"):
            yield from next(csv.reader([line]), [])
        else:
            yield from line.split("\t")
    if chars:
        yield "".join(chars)


def _texts_in_file(name: str, data: bytes) -> Iterator[str]:
    lower = name.lower()
    if lower.endswith(".zip"):
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for member in sorted(archive.namelist()):
                if not member.endswith("/"):
                    yield from _texts_in_file(member, archive.read(member))
        return
    if lower.endswith((".md", ".py", ".model", ".bin", ".h5", ".safetensors", ".index")) or ".data-0" in lower:
        return  # documentation, code and weights are not corpus text
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        logger.warning("Skipping %s: not UTF-8 text.", name)
        return
    if lower.endswith((".json", ".jsonl")):
        try:
            documents = [json.loads(text)]
        except json.JSONDecodeError:
            documents = []
            # JSON lines: split on "\n" only (str.splitlines would also cut at U+2028 inside strings).
            for number, line in enumerate(text.split("\n"), 1):
                if line.strip():
                    try:
                        documents.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{name}: line {number} is neither JSON nor JSON lines: {e}") from e
        for document in documents:
            yield from _strings_in_json(document)
    else:
        yield from _texts_in_lines(text.split("\n"), lower)


def expand_corpus_paths(patterns: str | Iterable[str]) -> list[Path]:
    """Files named by glob patterns or directories (walked recursively), sorted; raises if a pattern finds nothing.

    Args:
        patterns: one glob pattern or directory, or several.

    Returns:
        The files, sorted.
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    files: list[Path] = []
    for pattern in patterns:
        pattern = str(pattern)
        if os.path.isdir(pattern):
            found = sorted(p for p in Path(pattern).rglob("*") if p.is_file())
        else:
            found = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not found:
            raise FileNotFoundError(f"Corpus pattern {pattern!r} matches no file.")
        files.extend(found)
    return files


def iter_corpus_texts(
    patterns: str | Iterable[str], min_chinese: int = 4, dedupe: bool = True
) -> Iterator[str]:
    """Streams the Chinese texts of every file under `patterns` (globs or directories), one file at a time.

    Reads .zip archives (their members), tab-separated and .csv files, 'char TAG' NER files and JSON / JSON-lines
    files (every string value). A field is kept when it has at least `min_chinese` Chinese characters, which leaves
    out labels and ids. Whitespace between Chinese characters (pre-segmented copies) is removed. With `dedupe`, a
    text seen before (same characters) is skipped; that keeps a 16-byte digest per distinct text in memory.

    Args:
        patterns: glob patterns or directories, as for `expand_corpus_paths`.
        min_chinese: fields with fewer Chinese characters are skipped.
        dedupe: skip texts seen before.

    Yields:
        One text (a field or a line) at a time.

    Example:
    >>> texts = iter_corpus_texts("../shared/data/datasets/sentiment/*.csv")   # doctest: +SKIP
    >>> next(texts)                                                           # doctest: +SKIP
    '很快，好吃，味道足，量大'
    """
    seen: set[bytes] = set()
    for path in expand_corpus_paths(patterns):
        kept = 0
        for text in _texts_in_file(path.name, path.read_bytes()):
            text = _clean(text)
            if count_chinese(text) < min_chinese:
                continue
            if dedupe:
                digest = hashlib.blake2b(re.sub(r"\s+", "", text).encode("utf-8"), digest_size=16).digest()
                if digest in seen:
                    continue
                seen.add(digest)
            kept += 1
            yield text
        logger.info("corpus: %d texts from %s", kept, path)


def iter_corpus_sentences(patterns: str | Iterable[str], **kwargs) -> Iterator[str]:
    """`iter_corpus_texts` cut into sentences by `split_sentences`.

    Args:
        patterns: as for `iter_corpus_texts`.
        **kwargs: `min_chinese` and `dedupe` of `iter_corpus_texts`.

    Yields:
        One sentence at a time.
    """
    for text in iter_corpus_texts(patterns, **kwargs):
        yield from split_sentences(text)
