"""Tokenizers with bert4keras's interface.

* ``Tokenizer``: BERT WordPiece. Its output equals Hugging Face's
  ``transformers.BertTokenizer`` (``tokenize_chinese_chars=True``,
  ``strip_accents=None``) for both ``do_lower_case`` settings; optional
  ``pre_tokenize`` gives WoBERT-style word-level tokenization.
* ``SpTokenizer``: a SentencePiece model behind the same interface (T5 / mT5).
* ``load_vocab`` / ``save_vocab``: read and write one-token-per-line vocab files,
  optionally dropping tokens that a Chinese model never needs.

Both tokenizers map tokens back to characters of the original text with
``rematch`` (used for NER / span extraction).

Modules: ``wordpiece`` (``Tokenizer``), ``sp_tokenizer`` (``SpTokenizer``),
``base`` (``TokenizerBase``, what both share), ``vocab`` (vocab files) and
``chars`` (character classes). Import everything from ``bert4x.tokenizers``.
"""

# TokenizerBase and PathLike stay importable from here, as before the split, outside `__all__` as before.
from .base import TokenizerBase as TokenizerBase
from .sp_tokenizer import SpTokenizer
from .vocab import PathLike as PathLike
from .vocab import load_vocab, save_vocab
from .wordpiece import Tokenizer

__all__ = ["load_vocab", "save_vocab", "Tokenizer", "SpTokenizer"]
