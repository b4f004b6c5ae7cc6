"""The backend table and per-call backend selection.

Selection per call: an explicit `backend=` argument beats the `SEQFAST_BACKEND` environment variable, which
beats automatic selection in the device's priority order. An explicit request that cannot run raises with the
reason. Automatic selection skips backends that cannot be loaded and falls through a backend that declines the
call, logging the reason once per (cell, backend, reason); with `SEQFAST_STRICT=1` such a fall-through raises.
Backends load lazily: `import seqfast` imports none of them.
"""

import importlib
import logging
import os
import sys
from typing import NamedTuple

log = logging.getLogger("seqfast")


class Backend(NamedTuple):
    name: str
    module: str


# What each backend runs on is its module's `DEVICES` (None: any device type); the table says where to find it.
_TABLE = (
    Backend("cpp", "seqfast.kernels.cpp"),
    Backend("numba", "seqfast.kernels.numba"),
    Backend("reference", "seqfast.kernels.reference"),
    Backend("triton", "seqfast.kernels.triton"),
    # torch's own op for whole module calls, never a layer's time loop (see seqfast.native)
    Backend("native", "seqfast.native"),
)

_PRIORITY = {
    "cpu": ("cpp", "numba", "reference"),
    "cuda": ("triton", "reference"),
    # meta tensors (shape inference) run the ops' fake kernels; the reference only names the saved layout
    "meta": ("reference",),
}

_BY_NAME = {b.name: b for b in _TABLE}
_loaded = {}
_logged = set()


class BackendInfo(NamedTuple):
    name: str
    devices: tuple
    available: bool
    why_not: str | None


def _import(module):
    """Import `module`; None on success, else the reason.

    Marked as having a constant result for Dynamo (the flag `torch.compiler.assume_constant_result` sets, without
    importing `torch._dynamo`), so a first load inside `torch.compile(fullgraph=True)` runs the import at trace time
    instead of breaking the graph on `importlib`.
    """
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure makes the backend unavailable, with its reason
        return f"{type(e).__name__}: {e}"
    return None


_import._dynamo_marked_constant = True


def load(name):
    """The backend module for `name`, importing it on first use.

    Raises:
        ValueError: unknown backend name.
        RuntimeError: the backend cannot be loaded here; the message says why.
    """
    if name not in _BY_NAME:
        raise ValueError(f"unknown seqfast backend {name!r}; choose from {', '.join(_BY_NAME)}")
    if name not in _loaded:
        module = _BY_NAME[name].module
        error = _import(module)
        _loaded[name] = error if error is not None else sys.modules[module]
    module = _loaded[name]
    if isinstance(module, str):
        raise RuntimeError(f"seqfast backend {name!r} is not available: {module}")
    return module


def backends():
    """The backend table.

    Returns:
        `list[BackendInfo]`: name, the device types it runs on here, whether it can run here (it loads; triton
        also needs CUDA or `TRITON_INTERPRET=1`), and why not.
    """
    rows = []
    for b in _TABLE:
        try:
            load(b.name)
            rows.append(BackendInfo(b.name, _devices(b.name), True, None))
        except RuntimeError as e:
            rows.append(BackendInfo(b.name, _devices(b.name), False, str(e)))
    return rows


def _devices(name):
    """The device types backend `name` runs on: its module's `DEVICES` (triton adds cpu under `TRITON_INTERPRET=1`),
    every device type with a priority order when that is None; for a backend that cannot load, the device types
    whose priority order names it."""
    module = _loaded.get(name)
    if module is None or isinstance(module, str):
        return tuple(device for device, order in _PRIORITY.items() if name in order)
    return tuple(_PRIORITY) if module.DEVICES is None else module.DEVICES


def names(device_type=None):
    """Backend names in priority order for `device_type` (all backends when None)."""
    if device_type is None:
        return [b.name for b in _TABLE]
    return list(_PRIORITY.get(device_type, ()))


def env(name):
    """`os.environ.get(name)`, read without the `KeyError` that `os.environ` raises and catches for an unset name
    (most of a ~4 us read, paid on every call)."""
    key = _ENCODED_KEYS.get(name)
    value = _environ_data.get(os.environ.encodekey(name) if key is None else key)
    return None if value is None else os.environ.decodevalue(value)


def settings():
    """The raw values of the settings seqfast reads on every call (`_ENCODED_KEYS`), as one tuple that changes when
    any of them does."""
    return tuple(map(_environ_data.get, _ENCODED_NAMES))


_environ_data = os.environ._data
# the names seqfast reads on every call, encoded once (a plain dict: Dynamo warns on `functools.cache`)
_ENCODED_KEYS = {
    name: os.environ.encodekey(name)
    for name in ("SEQFAST_BACKEND", "SEQFAST_NATIVE", "SEQFAST_STRICT", "SEQFAST_ONEDNN_MIN_MACS", "SEQFAST_CPP_PLAN")
}
_ENCODED_NAMES = tuple(_ENCODED_KEYS.values())


def strict():
    """True when `SEQFAST_STRICT=1`: automatic fall-through becomes an error."""
    return env("SEQFAST_STRICT") == "1"


def _why_not(name, device_type, cell, gx, w_hh, h0, c0, lengths, w_hr, options):
    module = load(name)
    if device_type not in _devices(name):
        return f"runs on {', '.join(_devices(name))}, not {device_type}"
    missing = [o for o in options if o not in getattr(module, "EXTENSIONS", ())]
    if missing:
        return f"it does not run the {', '.join(missing)} option{'s' if len(missing) > 1 else ''}"
    return module.unsupported(cell, gx, w_hh, h0, c0, lengths, w_hr)


def select(cell, gx, w_hh, h0, c0=None, lengths=None, w_hr=None, backend=None, options=()):
    """Pick the backend for one recurrence call.

    Args:
        cell: `rnn_tanh`, `rnn_relu`, `lstm` or `gru`.
        gx, w_hh, h0, c0, lengths, w_hr: the call's tensors (see `seqfast.kernels.reference`).
        backend: explicit backend name, or None for `SEQFAST_BACKEND`, then automatic.
        options: the extensions the call uses (`common.Extensions.options()`); a backend runs them when its
            `EXTENSIONS` lists them all.

    Returns:
        The chosen backend's name.

    Raises:
        RuntimeError: an explicit backend cannot run this call, no backend can, or strict mode forbids a fall-through.
    """
    return _select(cell, gx, w_hh, h0, c0, lengths, w_hr, backend or env("SEQFAST_BACKEND") or None, options)[0]


def select_remembered(cell, gx, w_hh, h0, c0=None, lengths=None, w_hr=None, backend=None, options=()):
    """`select` for eager calls, remembered per call signature, with the loaded backend.

    A backend's answer depends only on the cell, dtypes, devices and weight shapes (see `seqfast.kernels.reference`),
    so the signature is those, the request and, after a fall-through, strictness.

    Returns:
        `(name, module)` of the chosen backend.
    """
    requested = backend or env("SEQFAST_BACKEND") or None
    key = (cell, requested, gx.device, gx.dtype, w_hh.dtype, w_hh.shape, h0.device, h0.dtype)
    if c0 is not None or lengths is not None or w_hr is not None or options:
        key += (_signature(c0), _signature(lengths), _signature(w_hr), options)
    chosen = _chosen.get(key) if _chosen_for is _loaded else None
    if chosen is None or (chosen[2] and strict()):
        name, fell_through = _select(cell, gx, w_hh, h0, c0, lengths, w_hr, requested, options)
        chosen = (name, load(name), fell_through)
        _remember(key, chosen)
    return chosen[0], chosen[1]


def _signature(t):
    return None if t is None else (t.device, t.dtype, t.shape)


_chosen = {}
_chosen_for = None


def _remember(key, chosen):
    """Keep `chosen` for `key`, forgetting every choice made under another backend table (tests swap `_loaded`)."""
    global _chosen_for
    if _chosen_for is not _loaded:
        _chosen.clear()
        _chosen_for = _loaded
    _chosen[key] = chosen


def _select(cell, gx, w_hh, h0, c0, lengths, w_hr, requested, options):
    """`select` without the memory: `(name, fell_through)`.

    A call without hidden units (`w_hh` has no rows, a cell of hidden size 0) has no loop to run: once a backend
    accepts it, the reference runs it, whose plain torch ops handle the empty shapes on every device.
    """
    name, fell_through = _first_able(cell, gx, w_hh, h0, c0, lengths, w_hr, requested, options)
    return ("reference" if w_hh.shape[0] == 0 else name), fell_through


def _first_able(cell, gx, w_hh, h0, c0, lengths, w_hr, requested, options):
    """The requested backend, else the first of the device's that accepts the call: `(name, fell_through)`."""
    device_type = gx.device.type
    if requested is not None:
        reason = _why_not(requested, device_type, cell, gx, w_hh, h0, c0, lengths, w_hr, options)
        if reason is not None:
            raise RuntimeError(f"seqfast backend {requested!r} cannot run this {cell} call: {reason}")
        return requested, False
    reasons = []
    for name in names(device_type):
        try:
            reason = _why_not(name, device_type, cell, gx, w_hh, h0, c0, lengths, w_hr, options)
        except RuntimeError as e:
            reason = str(e)
        if reason is None:
            if reasons and strict():
                raise RuntimeError(
                    f"seqfast: strict mode forbids falling back to {name!r} for {cell}: " + "; ".join(reasons)
                )
            return name, bool(reasons)
        reasons.append(f"{name}: {reason}")
        key = (cell, name, reason)
        if key not in _logged:
            _logged.add(key)
            log.warning("seqfast: backend %s declines %s (%s); trying the next one", name, cell, reason)
    raise RuntimeError(f"seqfast: no backend can run this {cell} call on {device_type}: " + "; ".join(reasons))
