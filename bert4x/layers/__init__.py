"""bert4x layers. `from bert4x.layers import X` works for every layer, as `from bert4keras.layers import X` did."""

from bert4x.layers.core import *  # noqa: F401,F403
from bert4x.layers.heads import *  # noqa: F401,F403
from bert4x.layers.t5 import *  # noqa: F401,F403
