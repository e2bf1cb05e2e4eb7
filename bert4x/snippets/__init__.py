"""Everyday helpers, as in bert4keras.snippets: padding, data generators, decoders."""

from bert4x.snippets.data import *  # noqa: F401,F403
from bert4x.snippets.decoding import *  # noqa: F401,F403
from bert4x.snippets.ner import *  # noqa: F401,F403
