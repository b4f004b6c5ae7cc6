"""The numba backend: @njit forward and backward time loops on CPU, on the contract of `seqfast.kernels.reference`.

Importing it imports numba, so a missing or broken numba raises ImportError here and the dispatcher reports the
backend unavailable with that reason. The loops compile on first use per cell and dtype and are cached on disk. The
`resets`, `zoneout` and `layer_norm` options run fused in the same loops (`EXTENSIONS`), each combination compiled on
first use; `layer_norm`, which normalises whole rows, in two phases a step: the product by chunks of hidden units,
then its rows' normalisation and cell math by groups of rows.
"""

import numba
import numpy as np
import torch

from seqfast.kernels.common import GATES, check_lengths, compute_dtype, empty, hidden_size, refusal

from . import loops

DEVICES = ("cpu",)
EXTENSIONS = ("layer_norm", "resets", "zoneout")

_DTYPES = (torch.float32, torch.float64)


def saved_shape(cell, T, B, H, P, zoneout=False, layer_norm=False):
    """Shape of `saved`: `[T, B, W]` per step and row: `i, f, g, o, c` (LSTM), `r, z, n, W_hn h + b_hn` (GRU) or
    nothing (RNN: `bwd` reads RNN's `h` and GRU's `h_prev` from `y` and `h0`); with `zoneout` (default False) LSTM's
    carried `c` or RNN's `h~` (`y` holds the mixed `h`) after them, each `[H]`; with `layer_norm` (default False)
    then the normalised recurrent product `[G*H]`, LSTM's normalised `c~` `[H]`, the product's `1 / std` and LSTM's
    `c~`'s."""
    G, lstm = GATES[cell], cell == "lstm"
    width = loops.saved_slots(G, zoneout) * H
    if layer_norm:
        width += (G + lstm) * H + 1 + lstm
    return (T, B, width)


def unsupported(cell, gx, w_hh, h0, c0=None, lengths=None, w_hr=None):
    """Why this backend cannot run the call, or None.

    Args:
        cell: `rnn_tanh`, `rnn_relu`, `lstm` or `gru`.
        gx, w_hh, h0, c0, lengths, w_hr: the call's tensors (see `seqfast.kernels.reference`); `c0`, `lengths`,
            `w_hr` default to None.

    Returns:
        None, or the reason as a string (`common.refusal`'s checks: CPU tensors of float32 or float64; and one
        dtype for all of them).
    """
    reason = refusal("numba", DEVICES, _DTYPES, cell, gx, w_hh, h0, c0, lengths, w_hr)
    if reason is not None:
        return reason
    for name, t in (("w_hh", w_hh), ("h0", h0), ("c0", c0), ("w_hr", w_hr)):
        if t is not None and t.dtype != gx.dtype:
            return f"needs one dtype for all tensors; gx is {gx.dtype} but {name} is {t.dtype}"
    return None


def _np(t, dtype):
    """The numpy view the loops read and write: zero-copy for a contiguous tensor of `dtype`, else a converted copy.

    Outputs always come from `common.empty` (contiguous, compute dtype), so the loops write into them directly.
    """
    if t.requires_grad:
        t = t.detach()
    if t.dtype != dtype:
        t = t.to(dtype)
    if not t.is_contiguous():
        t = t.contiguous()
    return t.numpy()


def _lens(lengths, T, B):
    """`lengths` as `[B]` int64 numpy (all `T` when None), checked to lie in `[0, T]`."""
    if lengths is None:
        return np.full(B, T, dtype=np.int64)
    lens = _np(lengths, torch.int64)
    if lens.shape != (B,):
        raise ValueError(f"lengths must have shape ({B},), got {tuple(lens.shape)}")
    check_lengths(lengths, T)
    return lens


# layer_norm's chunks: one per this many hidden units, at most LN_MAX_CHUNKS
LN_CHUNK, LN_MAX_CHUNKS = 64, 16
# the most `w_hh` that each of more than two threads streams every step when the batch splits into blocks of rows
ROWS_MAX_WEIGHT_BYTES = 1 << 19


def _numba_threads():
    """torch's thread count, at most numba's pool, made numba's; torch's is left as it was: starting numba's OpenMP
    pool (on its first use in the process) sets the OpenMP thread count, which torch reads as its own, to the pool's
    size."""
    threads = torch.get_num_threads()
    ours = max(1, min(threads, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(ours)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return ours


def _chunks(H, B, weight_bytes, layer_norm=False, proj=False):
    """`(nc, by_rows)`: the chunks of each phase and whether they are blocks of rows instead of hidden units.

    One chunk per thread of numba's pool that torch's thread count allows: blocks of batch rows, each at least a tile of
    rows (`loops.TILE_ROWS`), below 64 units or where each thread can keep the whole `w_hh`, of `weight_bytes` (at most
    `ROWS_MAX_WEIGHT_BYTES`, or two threads): a block's rows need nothing of the others' (the threads still meet once a
    step). Else chunks of hidden units, or below 64 units (where chunks of fewer than 32 units cost more in waits per
    step than they share) one chunk, run on the calling thread. With a projection `proj` (default False) no blocks of
    rows. With `layer_norm` (default False) blocks of rows wherever the batch holds two tiles of rows, on one thread too
    (a block's product spans every unit, as one block's on one thread does), else one chunk per `LN_CHUNK` units, at
    most `LN_MAX_CHUNKS`: fixed by the shape, so that its results do not depend on the thread count (its product's sums
    follow the chunks' bounds)."""
    threads = _numba_threads()
    blocks = min(threads, B // loops.TILE_ROWS)
    if layer_norm:
        if B // loops.TILE_ROWS > 1:
            return blocks, True
        return max(1, min(H // LN_CHUNK, LN_MAX_CHUNKS)), False
    if blocks > 1 and not proj and (H < 64 or threads <= 2 or weight_bytes <= ROWS_MAX_WEIGHT_BYTES):
        return blocks, True
    return (threads, False) if H >= 64 else (1, False)


# compiled entry point of each float32 loop: its arguments' numba types follow from the loop (contiguous float32
# arrays of fixed rank, Python bools and ints), and looking the address up costs ~85 us a call
_entry = {}


def _run(loop, args, work, nc):
    """Run `loop(*args, work, sync, tid, nc)` on `nc` chunks per phase: float32 through `loops.launch` (on numba's
    threads, or on the calling thread for one chunk), float64 (checks, gradcheck) on the calling thread alone, which
    then claims every chunk."""
    sync = np.zeros(loops.LINE * (nc + 1), dtype=np.int64)
    if args[0].dtype != np.float32:
        loop(*args, work, sync, 0, nc)
        return
    if loop not in _entry:
        _entry[loop] = loops.entry_point(loop, (*args, work, sync, 0, nc))
    loops.launch(_entry[loop], args, work, sync, nc)


# the loops' `ext` without options, per compute dtype: no steps, no weights
_NO_OPTIONS = {
    dt: (np.empty((0, 0), dtype=np.bool_), np.empty((0, 0, 0), dtype=dt), np.empty((0, 0, 0), dtype=dt))
    + (np.empty(0, dtype=dt),) * 3
    for dt in (np.float32, np.float64)
}


def _options(cell, ext, T, B, H, P, ct, w_hr):
    """`ext` (a `common.Extensions`, or None) as the loops take it.

    Returns:
        `(zero [T, B] bool, keep_h [T, B, P], keep_c [T, B, H], ln_hh [G*H], ln_c_weight [H], ln_c_bias [H])` in the
        compute dtype `ct` (empty where off; a constant weight as one row `[1, 1, N]`, see `loops.keep_row`), whether
        resets are on, whether zoneout is, whether layer_norm is.
    """
    zero, keep_h, keep_c, ln_hh, ln_cw, ln_cb = _NO_OPTIONS[np.float64 if ct == torch.float64 else np.float32]
    if ext is None:
        return (zero, keep_h, keep_c, ln_hh, ln_cw, ln_cb), False, False, False
    if ext.zero is not None:
        zero = _np(ext.zero, torch.bool)
        if zero.shape != (T, B):
            raise ValueError(f"zero must have shape ({T}, {B}), got {tuple(zero.shape)}")
    zoneout = ext.keep_h is not None
    if zoneout:
        keep_h, keep_c = _keep(ext.keep_h, P, ct), _keep(ext.keep_c, H, ct)
    layer_norm = ext.ln_hh is not None
    if layer_norm:
        if w_hr is not None:
            raise ValueError("layer_norm does not run with a projection (w_hr)")
        ln_hh = _gain(ext.ln_hh, "ln_hh", GATES[cell] * H, ct)
        if cell == "lstm":
            ln_cw, ln_cb = _gain(ext.ln_c_weight, "ln_c_weight", H, ct), _gain(ext.ln_c_bias, "ln_c_bias", H, ct)
    return (zero, keep_h, keep_c, ln_hh, ln_cw, ln_cb), ext.zero is not None, zoneout, layer_norm


def _gain(t, name, n, ct):
    """A LayerNorm weight `[n]` of `layer_norm` as numpy of `ct`."""
    if t is None or tuple(t.shape) != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {None if t is None else tuple(t.shape)}")
    return _np(t, ct)


def _keep(keep, n, ct):
    """Zoneout's weights `keep [T, B, n]` as numpy of `ct`; a float as one row `[1, 1, n]`; None (LSTM's `c` without
    zoneout) as zeros."""
    if not torch.is_tensor(keep):
        keep = torch.full((1, 1, n), 0.0 if keep is None else keep, dtype=ct)
    return _np(keep, ct)


def fwd(cell, gx, w_hh, b_hh, h0, c0=None, lengths=None, w_hr=None, reverse=False, need_saved=True, ext=None):
    """Run the recurrence forward; see `seqfast.kernels.reference` for shapes.

    Args:
        cell, gx, w_hh, b_hh, h0, c0, lengths, w_hr: as in the reference (`b_hh`, `c0`, `lengths`, `w_hr` may
            be None).
        reverse: walk each sequence from its own last step (default False).
        need_saved: keep what `bwd` needs (default True).
        ext: `common.Extensions` of resets, zoneout and layer_norm, or None (default).

    Returns:
        `y [T, B, P]`, `hT [B, P]`, `cT [B, H]` or None, `saved` (`saved_shape(..., zoneout, layer_norm)`, or `[0]`
        when not needed).
    """
    T, B, G = gx.shape
    H = hidden_size(cell, w_hh)
    P = w_hh.shape[1]
    ct = compute_dtype(gx.dtype)
    options, resets, zoneout, layer_norm = _options(cell, ext, T, B, H, P, ct, w_hr)
    nc, by_rows = _chunks(H, B, w_hh.numel() * w_hh.element_size(), layer_norm, w_hr is not None)
    lens, reverse, relu = _lens(lengths, T, B), bool(reverse), cell == "rnn_relu"
    x, w = _np(gx, ct), _np(w_hh, ct)
    bias = _np(b_hh, ct) if b_hh is not None else np.zeros(G, dtype=x.dtype)
    y = empty((T, B, P), ct, gx.device)
    hT = empty((B, P), ct, gx.device)
    hT.copy_(h0)
    saved = empty(saved_shape(cell, T, B, H, P, zoneout, layer_norm) if need_saved else (0,), ct, gx.device)
    shape = saved_shape(cell, 1, B, H, P, zoneout, layer_norm)
    scratch = saved.numpy() if need_saved else np.empty(shape, dtype=x.dtype)
    cT, c = None, np.empty((B, 0), dtype=x.dtype)
    if cell == "lstm":
        cT = empty((B, H), ct, gx.device)
        cT.copy_(c0)
        c = cT.numpy()
    proj = _np(w_hr, ct) if w_hr is not None else np.empty((0, H), dtype=x.dtype)
    args = (x, w, bias, proj, lens, reverse, relu, hT.numpy(), c, y.numpy(), scratch, options, by_rows)
    loop = loops.cell_loops(cell, w_hr is not None, resets, zoneout, layer_norm)[0]
    _run(loop, args, loops.fwd_work(cell, w, proj, B, T, 1 if by_rows else nc), nc)
    return y, hT, cT, saved


def bwd(cell, dy, dhT, dcT, w_hh, b_hh, w_hr, h0, c0, lengths, y, saved, reverse=False, ext=None):
    """Backward of `fwd` from its `saved`; see `seqfast.kernels.reference` for shapes.

    Args:
        cell, dy, dhT, dcT, w_hh, b_hh, w_hr, h0, c0, lengths, y, saved: as in the reference (`dcT`, `w_hr`,
            `c0`, `lengths`, `b_hh` may be None; `b_hh` only tells layer_norm whether to give its gradient).
        reverse: as passed to `fwd` (default False).
        ext: the forward's `common.Extensions`, or None (default).

    Returns:
        `dgx`, `dgh` (`[T, B, G*H]`; `dgh` None unless GRU or layer_norm, then the gradient of the product before its
        LayerNorm), `dh0 [B, P]`, `dc0 [B, H]` or None, `dw_hr [P, H]` or None; with layer_norm also
        `(db_hh [G*H] or None, d_ln_hh [G*H], d_ln_c_weight [H], d_ln_c_bias [H])`, LSTM's pair None for the other
        cells.
    """
    T, B, P = dy.shape
    G = w_hh.shape[0]
    H = hidden_size(cell, w_hh)
    ct = saved.dtype
    options, resets, zoneout, layer_norm = _options(cell, ext, T, B, H, P, ct, w_hr)
    nc, by_rows = _chunks(H, B, w_hh.numel() * w_hh.element_size(), layer_norm, w_hr is not None)
    lens, reverse, relu = _lens(lengths, T, B), bool(reverse), cell == "rnn_relu"
    d_out, w = _np(dy, ct), _np(w_hh, ct)
    # layer_norm's gradients of `ln_hh`, `b_hh` (and LSTM's `ln_c_weight`, `ln_c_bias`), per row
    sums = torch.zeros((B, 2 * G + 2 * H * (cell == "lstm")) if layer_norm else (0, 0), dtype=ct)
    dgx = empty((T, B, G), ct, dy.device)
    dgh = empty((T, B, G), ct, dy.device) if cell == "gru" or layer_norm else None
    dh0 = empty((B, P), ct, dy.device)
    dh0.copy_(dhT)
    dc0 = dw_hr = None
    # what the cell does not use: no state columns, no steps
    c0_np = dc = h0_np = np.empty((B, 0), dtype=d_out.dtype)
    dgh_np = hraw_np = dh_out_np = y_np = np.empty((0, 0, 0), dtype=d_out.dtype)
    if cell != "lstm":
        y_np = _np(y, ct)
    if cell == "gru":
        h0_np = _np(h0, ct)
    if cell == "lstm":
        dc0 = empty((B, H), ct, dy.device)
        dc0.copy_(dcT)
        c0_np, dc = _np(c0, ct), dc0.numpy()
    if dgh is not None:
        dgh_np = dgh.numpy()
    proj = np.empty((0, H), dtype=d_out.dtype)
    if w_hr is not None:
        hraw = empty((T, B, H), ct, dy.device)
        dh_out = empty((T, B, P), ct, dy.device)
        proj, hraw_np, dh_out_np = _np(w_hr, ct), hraw.numpy(), dh_out.numpy()
    args = (d_out, y_np, h0_np, w, proj, lens, reverse, relu, c0_np, saved.numpy(), dh0.numpy(), dc)
    args += (dgx.numpy(), dgh_np, hraw_np, dh_out_np, (*options, sums.numpy()), by_rows)
    loop = loops.cell_loops(cell, w_hr is not None, resets, zoneout, layer_norm)[1]
    _run(loop, args, loops.bwd_work(cell, w, proj, B, T, 1 if by_rows else nc, resets, zoneout), nc)
    if w_hr is not None:
        dw_hr = (dh_out.reshape(-1, P).t() @ hraw.reshape(-1, H)).to(w_hr.dtype)
    if not layer_norm:
        return dgx, dgh, dh0, dc0, dw_hr
    # one tensor each: the custom op's outputs may not alias one another
    d_ln_hh, db_hh, *d_ln_c = (part.sum(0) for part in sums.split([G, G] + [H, H] * (cell == "lstm"), dim=1))
    d_ln_cw, d_ln_cb = d_ln_c or (None, None)
    return dgx, dgh, dh0, dc0, dw_hr, (db_hh if b_hh is not None else None, d_ln_hh, d_ln_cw, d_ln_cb)
