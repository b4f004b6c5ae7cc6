"""The C++ CPU backend: a thin adapter over `seqfast._C` on the contract of `seqfast.kernels.reference`.

The extension converts the inputs, allocates the outputs (NaN-poisoned while `common.poisoning()`, as
`common.empty` does) and fills them. The loops compute in the contract's compute dtype: float64 for float64 inputs,
float32 for float32, float16 and bfloat16 ones (16-bit `gx`, `dy` and the states are converted on the way in, `y`,
`dgx`, `dgh` and the final states back to their dtypes on the way out). `saved` holds, per step and hidden unit,
LSTM `i, f, g, o, c` or GRU `r, z, n, W_hn h + b_hn` (RNN saves nothing: `h` is `y`, read in `y`'s dtype), rows in
the extension's length-sorted order; with `layer_norm` each row then holds the normalised product `[G*H]` and its
1 / std (LSTM also the mean and 1 / std of the new cell state).
"""

import torch

from .common import CELL_IDS, GATES, Projection, hidden_size, poisoning, refusal

try:
    from seqfast import _C
except ImportError as e:
    raise ImportError(
        f"the C++ extension seqfast._C is not built ({e}); reinstall seqfast with a C++ compiler and torch present"
    ) from e

DEVICES = ("cpu",)
FUSES_PROJECTION = True
EXTENSIONS = ("layer_norm", "resets", "zoneout")

# width of `saved` per hidden unit, by zoneout and cell id, as the extension lays it out; with layer_norm per row the
# `G*H` normalised product and `_LN_SCALARS` more
_SAVED_WIDTH = {zoneout: [widths[1 + zoneout] for widths in _C.cells()] for zoneout in (False, True)}
_LN_SCALARS = [widths[3] for widths in _C.cells()]
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# Multiply-adds of a step's recurrent product from which two threads may share it (the extension's threshold is half
# of this per thread).
_TWO_THREAD_MACS = 1 << 17


def _chunk(cell, w_hh, batch):
    """Hidden units per parallel task of a call the extension splits by hidden units (one that it does not split
    into blocks of rows: see `row_block` in csrc/scheduler.h): 64, or, when a step of `batch` rows has the work for
    two threads, half of a smaller hidden size in multiples of 16, so that they can share it. A function of the shape
    only, never of the thread count, so results do not depend on it."""
    if batch * w_hh.numel() < _TWO_THREAD_MACS:
        return 64
    half = -(-hidden_size(cell, w_hh) // 2)
    return min(64, -(-half // 16) * 16)


def unsupported(cell, gx, w_hh, h0, c0=None, lengths=None, w_hr=None):
    """Why this backend cannot run the call, or None.

    Args:
        cell: `rnn_tanh`, `rnn_relu`, `lstm` or `gru`.
        gx, w_hh, h0, c0, lengths, w_hr: the call's tensors (see `seqfast.kernels.reference`).

    Returns:
        None when the call can run, else the reason (`common.refusal`'s checks: CPU tensors of float32, float64,
        float16 or bfloat16).
    """
    return refusal("cpp", DEVICES, _DTYPES, cell, gx, w_hh, h0, c0, lengths, w_hr)


def saved_shape(cell, T, B, H, P, zoneout=False, layer_norm=False):
    """Shape of `saved`: `[T, B, W*H]` with `W` 5 (LSTM), 4 (GRU) or 0 (RNN), one more for LSTM and RNN with
    `zoneout` (default False); `layer_norm` (default False) adds `G*H + 3` (LSTM) or `G*H + 1` per row."""
    i = CELL_IDS[cell]
    width = _SAVED_WIDTH[zoneout][i] * H
    return (T, B, width + GATES[cell] * H + _LN_SCALARS[i] if layer_norm else width)


def fwd(cell, gx, w_hh, b_hh, h0, c0=None, lengths=None, w_hr=None, reverse=False, need_saved=True, ext=None):
    """Run the recurrence forward; see `seqfast.kernels.reference` for shapes.

    Args:
        gx: `[T, B, G*H]`, or a `Projection` the extension forms.
        ext: `common.Extensions` of resets, zoneout and layer_norm, or None.

    Returns:
        `y [T, B, P]`, `hT [B, P]`, `cT [B, H]` or None, `saved` (`saved_shape(...)`, or `[0]` when not needed).
    """
    projection = (None,) * 4
    if isinstance(gx, Projection):
        projection, gx = gx, None
    return _C.fwd(
        CELL_IDS[cell],
        gx,
        *projection,
        w_hh,
        b_hh,
        h0,
        c0 if cell == "lstm" else None,
        lengths,
        w_hr,
        reverse,
        need_saved,
        _chunk(cell, w_hh, h0.shape[0]),
        poisoning(),
        *_fused(ext),
    )


def _fused(ext):
    """`(zero, keep_h, keep_c, keep, ln_hh, ln_c_weight, ln_c_bias)` of `ext` (None: no options)."""
    if ext is None:
        return None, None, None, 0.0, None, None, None
    return *ext.fused(), *ext.gains()


def stack(cell, x, h0, c0, weights, bidirectional):
    """A stack's forward without grad in one call: what `fwd` gives layer by layer from `Projection`s of each layer's
    input; `x`, `h0`, `c0`, `weights` (`(w_ih, w_hh, b_ih, b_hh, w_hr)` per layer-direction) as in
    `seqfast.functional.rnn`.

    Returns:
        `y [T, B, D*P]`, `hn [L*D, B, P]`, `cn [L*D, B, H]` or None.
    """
    chunk = _chunk(cell, weights[0][1], h0.shape[1])
    flat = [t for w in weights for t in w]
    return _C.stack(CELL_IDS[cell], x, h0, c0 if cell == "lstm" else None, flat, bidirectional, chunk, poisoning())


def step(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh):
    """`stack` of one layer over one step: `x [B, I]`, `h0 [B, H]`, `c0 [B, H]` or None.

    Returns:
        `(h [B, H], c [B, H] or None)`.
    """
    chunk = _chunk(cell, w_hh, h0.shape[0])
    return _C.step(CELL_IDS[cell], x, h0, c0 if cell == "lstm" else None, w_ih, w_hh, b_ih, b_hh, chunk, poisoning())


def layer(cell, reverse, x, w_ih, b_ih, w_hh, b_hh, h0, c0, w_hr, copy_y=False):
    """One layer-direction with grad, input projection included, as one autograd node of the extension: bitwise the
    outputs and gradients of `seqfast.autograd.Layer` on this backend, for a call without `lengths` whose products are
    all plain GEMMs (`seqfast.linear.plain`). Arguments as `seqfast.functional.layer`'s; `x` may also be a cell's
    step, `[B, I]`, taken as `T = 1`; `copy_y`: return a copy of `y`, which the node keeps for its backward, so that
    the caller may change it in place (default False).

    Returns:
        `y [T, B, P]`, `hT [B, P]`, `cT [B, H]` or None.
    """
    chunk, c0 = _chunk(cell, w_hh, h0.shape[0]), c0 if cell == "lstm" else None
    return _C.layer(CELL_IDS[cell], reverse, x, w_ih, b_ih, w_hh, b_hh, h0, c0, w_hr, chunk, poisoning(), copy_y)


def bwd(cell, dy, dhT, dcT, w_hh, b_hh, w_hr, h0, c0, lengths, y, saved, reverse=False, ext=None):
    """Backward of `fwd` from its `saved`; see `seqfast.kernels.reference` for shapes.

    Returns:
        `dgx`, `dgh` (`[T, B, G*H]`, dtype of `dy`; `dgh` None unless GRU or `layer_norm`), `dh0 [B, P]`,
        `dc0 [B, H]` or None, `dw_hr [P, H]` or None; with `layer_norm` a sixth, `(db_hh, d_ln_hh, d_ln_c_weight,
        d_ln_c_bias)` in `saved`'s dtype (`db_hh` None without `b_hh`, the last two None unless LSTM).
    """
    lstm = cell == "lstm"
    out = _C.bwd(
        CELL_IDS[cell],
        dy,
        dhT,
        dcT if lstm else None,
        w_hh,
        w_hr,
        h0,
        c0 if lstm else None,
        lengths,
        y,
        saved,
        reverse,
        _chunk(cell, w_hh, h0.shape[0]),
        poisoning(),
        True,  # need_dh0: the contract's bwd always returns dh0 (only the extension's own node skips it)
        *_fused(ext),
    )
    if not out[5]:
        return out[:5]
    db_hh, d_ln_hh, *d_ln_c = out[5] if lstm else (*out[5], None, None)
    return *out[:5], (None if b_hh is None else db_hh, d_ln_hh, *d_ln_c)
