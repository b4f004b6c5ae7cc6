"""seqfast: fused RNN / LSTM / GRU kernels behind drop-in replacements for torch.nn's recurrent modules.

`import seqfast` loads no kernel backend; each loads on first use (see `seqfast.backends()`).
"""

import torch

from .dispatch import backends
from .nn import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell
from .patch import patch, unpatch

__version__ = "0.1.0"

# a checkpoint holding modules built as seqfast classes loads with `torch.load(..., weights_only=True)`
torch.serialization.add_safe_globals([RNN, LSTM, GRU, RNNCell, LSTMCell, GRUCell])

__all__ = ["RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell", "patch", "unpatch", "backends", "__version__"]
