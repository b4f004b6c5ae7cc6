"""The C++ CPU backend: a thin adapter over `seqfast._C` on the contract of `seqfast.kernels.reference`.

Outputs are allocated here with `common.empty` (NaN-poisoned under `SEQFAST_POISON=1`) and filled in place by
the extension. The loops compute in the input dtype (float32 or float64); `saved` holds, per step and hidden unit,
LSTM `i, f, g, o, c` or GRU `r, z, n, W_hn h + b_hn` (RNN saves nothing: `h` is `y`), rows in the extension's
length-sorted order.
"""

import torch

from .common import GATES, empty, hidden_size

try:
    from seqfast import _C
except ImportError as e:
    raise ImportError(
        f"the C++ extension seqfast._C is not built ({e}); reinstall seqfast with a C++ compiler and torch present"
    ) from e

DEVICES = ("cpu",)

_CELL = {"rnn_tanh": 0, "rnn_relu": 1, "lstm": 2, "gru": 3}
_SAVED_WIDTH = {"rnn_tanh": 0, "rnn_relu": 0, "lstm": 5, "gru": 4}
_DTYPES = (torch.float32, torch.float64)
# Hidden units per parallel task: fixed, so results do not depend on the thread count.
_CHUNK = 64


def unsupported(cell, gx, w_hh, h0, c0=None, lengths=None, w_hr=None):
    """Why this backend cannot run the call, or None.

    Args:
        cell: `rnn_tanh`, `rnn_relu`, `lstm` or `gru`.
        gx, w_hh, h0, c0, lengths, w_hr: the call's tensors (see `seqfast.kernels.reference`).

    Returns:
        None when the call can run, else a reason: unknown cell, a non-CPU tensor, or a dtype other than
        float32/float64.
    """
    if cell not in _CELL:
        return f"unknown cell {cell!r}"
    for name, t in (("gx", gx), ("w_hh", w_hh), ("h0", h0), ("c0", c0), ("lengths", lengths), ("w_hr", w_hr)):
        if t is not None and t.device.type != "cpu":
            return f"{name} is on {t.device}; the cpp backend runs on CPU tensors only"
    if gx.dtype not in _DTYPES:
        return f"gx has dtype {gx.dtype}; the cpp backend runs float32 and float64"
    if w_hr is not None and cell != "lstm":
        return "a projection (w_hr) needs the lstm cell"
    return None


def saved_shape(cell, T, B, H, P):
    """Shape of `saved`: `[T, B, W*H]` with `W` 5 (LSTM), 4 (GRU) or 0 (RNN)."""
    return (T, B, _SAVED_WIDTH[cell] * H)


def _opt(t, dtype):
    return None if t is None else t.to(dtype).contiguous()


def fwd(cell, gx, w_hh, b_hh, h0, c0=None, lengths=None, w_hr=None, reverse=False, need_saved=True):
    """Run the recurrence forward; see `seqfast.kernels.reference` for shapes.

    Returns:
        `y [T, B, P]`, `hT [B, P]`, `cT [B, H]` or None, `saved` (`saved_shape(...)`, or `[0]` when not needed).
    """
    T, B, _ = gx.shape
    ct = gx.dtype
    H = hidden_size(cell, w_hh)
    P = w_hh.shape[1]
    lstm = cell == "lstm"
    y = empty((T, B, P), ct, gx.device)
    hT = empty((B, P), ct, gx.device)
    cT = empty((B, H), ct, gx.device) if lstm else None
    saved = empty(saved_shape(cell, T, B, H, P) if need_saved else (0,), ct, gx.device)
    _C.fwd(
        _CELL[cell],
        gx.contiguous(),
        w_hh.to(ct).contiguous(),
        _opt(b_hh, ct),
        h0.to(ct).contiguous(),
        _opt(c0, ct) if lstm else None,
        _opt(lengths, torch.int64),
        _opt(w_hr, ct),
        bool(reverse),
        _CHUNK,
        y,
        hT,
        cT,
        saved,
    )
    return y, hT.to(h0.dtype), None if cT is None else cT.to(c0.dtype), saved


def bwd(cell, dy, dhT, dcT, w_hh, b_hh, w_hr, h0, c0, lengths, y, saved, reverse=False):
    """Backward of `fwd` from its `saved`; see `seqfast.kernels.reference` for shapes.

    Returns:
        `dgx`, `dgh` (`[T, B, G*H]`, dtype of `dy`; `dgh` None unless GRU), `dh0 [B, P]`, `dc0 [B, H]` or None,
        `dw_hr [P, H]` or None.
    """
    T, B, P = dy.shape
    ct = saved.dtype
    G = GATES[cell] * hidden_size(cell, w_hh)
    H = hidden_size(cell, w_hh)
    lstm = cell == "lstm"
    dgx = empty((T, B, G), ct, dy.device)
    dgh = empty((T, B, G), ct, dy.device) if cell == "gru" else None
    dh0 = empty((B, P), ct, dy.device)
    dc0 = empty((B, H), ct, dy.device) if lstm else None
    dw_hr = empty((P, H), ct, dy.device) if w_hr is not None else None
    _C.bwd(
        _CELL[cell],
        dy.to(ct).contiguous(),
        dhT.to(ct).contiguous(),
        _opt(dcT, ct) if lstm else None,
        w_hh.to(ct).contiguous(),
        _opt(w_hr, ct),
        h0.to(ct).contiguous(),
        _opt(c0, ct) if lstm else None,
        _opt(lengths, torch.int64),
        y.to(ct).contiguous(),
        saved,
        bool(reverse),
        _CHUNK,
        dgx,
        dgh,
        dh0,
        dc0,
        dw_hr,
    )
    return (
        dgx.to(dy.dtype),
        None if dgh is None else dgh.to(dy.dtype),
        dh0.to(h0.dtype),
        None if dc0 is None else dc0.to(c0.dtype),
        None if dw_hr is None else dw_hr.to(w_hr.dtype),
    )
