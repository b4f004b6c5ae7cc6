"""Swap torch.nn's recurrent modules inside a model for their seqfast twins, in place, and back."""

from torch.nn.utils import parametrize

from . import nn

_TWINS = {twin._torch_class: twin for twin in (nn.RNN, nn.LSTM, nn.GRU, nn.RNNCell, nn.LSTMCell, nn.GRUCell)}
_ORIGINALS = {twin: original for original, twin in _TWINS.items()}


def _swap_class(module, classes):
    """Give `module` the class `classes` maps its class to; a parametrized module keeps its parametrizations.

    Returns:
        True when the class was swapped.
    """
    cls = type(module)
    if cls in classes:
        module.__class__ = classes[cls]
        return True
    base = cls.__bases__[0]
    if parametrize.is_parametrized(module) and base in classes:
        # torch puts a parametrized module in a generated subclass holding the parametrized properties
        namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
        module.__class__ = type(cls.__name__, (classes[base],), namespace)
        return True
    return False


def patch(model, backend=None):
    """Make every `torch.nn` RNN/LSTM/GRU module (and cell) in `model` run on seqfast.

    Only the class of each module changes: the same Parameter objects, buffers, hooks, parametrizations and
    attributes stay, so optimizer state and registered hooks survive. Subclasses of the torch.nn classes are left
    alone, since they may override `forward`. A patched module pickles (`torch.save`) as the torch.nn module it was;
    copies (`copy.deepcopy`) stay patched.

    Args:
        model: `torch.nn.Module`; patched in place (the model itself too, if it is one of those modules).
        backend: seqfast backend name for every seqfast module in `model` afterwards, or None (default) to leave
            the selection automatic (or as a seqfast module already had it).

    Returns:
        `model`.
    """
    for module in model.modules():
        swapped = _swap_class(module, _TWINS)
        if swapped:
            setattr(module, nn.PATCHED, True)
        if backend is not None and (swapped or isinstance(module, (nn._Recurrent, nn._Cell))):
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
        if _swap_class(module, _ORIGINALS):
            for name in nn.PATCH_ATTRIBUTES:
                module.__dict__.pop(name, None)
    return model
