"""Everyday helpers, as in bert4keras.snippets: padding, data generators, decoders, text and parallel helpers."""

from bert4x.snippets.arguments import *  # noqa: F401,F403
from bert4x.snippets.arrays import *  # noqa: F401,F403
from bert4x.snippets.data import *  # noqa: F401,F403
from bert4x.snippets.decoding import *  # noqa: F401,F403
from bert4x.snippets.ner import *  # noqa: F401,F403
from bert4x.snippets.parallel import *  # noqa: F401,F403
from bert4x.snippets.text import *  # noqa: F401,F403
