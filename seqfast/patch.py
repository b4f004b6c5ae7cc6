"""Swap torch.nn's recurrent modules inside a model for their seqfast twins, in place, and back."""

import torch

from . import nn

_TWINS = {
    torch.nn.RNN: nn.RNN,
    torch.nn.LSTM: nn.LSTM,
    torch.nn.GRU: nn.GRU,
    torch.nn.RNNCell: nn.RNNCell,
    torch.nn.LSTMCell: nn.LSTMCell,
    torch.nn.GRUCell: nn.GRUCell,
}
_ORIGINALS = {twin: original for original, twin in _TWINS.items()}


def patch(model, backend=None):
    """Make every `torch.nn` RNN/LSTM/GRU module (and cell) in `model` run on seqfast.

    Only the class of each module changes: the same Parameter objects, buffers, hooks and attributes stay, so
    optimizer state and registered hooks survive. Subclasses of the torch.nn classes are left alone, since they
    may override `forward`.

    Args:
        model: `torch.nn.Module`; patched in place (the model itself too, if it is one of those modules).
        backend: seqfast backend name for the patched modules, or None (default) for automatic selection.

    Returns:
        `model`.
    """
    for module in model.modules():
        twin = _TWINS.get(type(module))
        if twin is not None:
            module.__class__ = twin
            if backend is not None:
                module.backend = backend
    return model


def unpatch(model):
    """Undo `patch`: turn every seqfast module (and cell) in `model` back into its torch.nn class, in place.

    Args:
        model: `torch.nn.Module`.

    Returns:
        `model`.
    """
    for module in model.modules():
        original = _ORIGINALS.get(type(module))
        if original is not None:
            module.__dict__.pop("backend", None)
            module.__class__ = original
    return model
