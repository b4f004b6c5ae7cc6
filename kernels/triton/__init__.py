"""Triton backend: the whole recurrence of one layer-direction in one fused launch (see `recurrence`).

Same contract as `seqfast.kernels.reference`. Runs on CUDA; under `TRITON_INTERPRET=1` (set before this module is
imported) also on CPU tensors, one program per batch block owning every hidden unit. Without either, importing it
raises ImportError, so that `seqfast.backends()` reports it unavailable with the reason. Inputs may be float32,
bfloat16 or float16; state and accumulation are float32, recurrent matmuls run in the weights' dtype; float64 is
declined. float32 products follow torch's rule for cuDNN's RNNs (`_precision`): TF32 on CUDA unless
`torch.backends.cudnn.rnn.fp32_precision` (before torch 2.9, `torch.backends.cudnn.allow_tf32`) turns it off.
The `resets` and `zoneout` options run fused in the same kernels (`EXTENSIONS`).
"""

import torch
import triton

from ..common import GATES, active_mask, empty, hidden_size, refusal
from ..reference import SAVED_WIDTH
from .recurrence import CELLS, bwd_kernel, fwd_kernel

INTERPRET = bool(triton.knobs.runtime.interpret)
DEVICES = ("cuda", "cpu") if INTERPRET else ("cuda",)
if not INTERPRET and not torch.cuda.is_available():
    raise ImportError(
        "no CUDA device here for triton's kernels (set TRITON_INTERPRET=1 before triton is imported to run them on "
        "CPU tensors through triton's interpreter)"
    )

EXTENSIONS = ("resets", "zoneout")

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BH = (16, 32, 64, 128)
_SINGLE_MAX_H = 128


def _precision(dtype, device):
    """`tl.dot`'s input precision for operands of `dtype` on `device`, as torch.nn's cuDNN RNNs choose theirs.

    Returns:
        `"tf32"` for float32 on CUDA while torch allows TF32 in cuDNN's RNNs (its default), else `"ieee"`: exact
        products for float32 on CPU tensors (torch.nn runs no TF32 there) and 16-bit operands.
    """
    if dtype != torch.float32 or device.type != "cuda":
        return "ieee"
    rnn = getattr(torch.backends.cudnn, "rnn", None)
    if hasattr(rnn, "fp32_precision"):
        return "tf32" if rnn.fp32_precision == "tf32" else "ieee"
    return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"


def _sm_count(device):
    return torch.cuda.get_device_properties(device).multi_processor_count


def _config(B, H, device, dtype):
    """Block sizes and split for `B` rows and `H` hidden units in `dtype` on `device`.

    Returns:
        `dict(BB, BH, BK, NH, SPLIT, per_launch, num_warps, num_stages)`: `NH` programs share a batch block; at
        most `per_launch` batch blocks go in one launch, so that every program of a launch is resident at once.
    """
    BB = min(64, max(16, triton.next_power_of_2(B)))
    NB = triton.cdiv(B, BB)
    single = dict(BB=BB, BH=max(16, triton.next_power_of_2(H)), NH=1, SPLIT=False, per_launch=max(NB, 1))
    if INTERPRET:
        return dict(single, BK=64, num_warps=4, num_stages=1)
    if H <= _SINGLE_MAX_H:
        BK = 32 if dtype == torch.float32 else 64
        return dict(single, BK=BK, num_warps=4 if BB * single["BH"] <= 2048 else 8, num_stages=3)
    # BK 128 with 3 stages: fastest of the configurations benchmarks/tools/triton_sweep.py tried on an H200.
    n_sm = _sm_count(device)
    BH = next(bh for bh in _BH if triton.cdiv(H, bh) <= n_sm)
    NH = triton.cdiv(H, BH)
    return dict(BB=BB, BH=BH, BK=128, NH=NH, SPLIT=NH > 1, per_launch=max(1, n_sm // NH), num_warps=4, num_stages=3)


def unsupported(cell, gx, w_hh, h0, c0=None, lengths=None, w_hr=None):
    """Why this backend cannot run the call, or None.

    Args:
        cell, gx, w_hh, h0, c0, lengths, w_hr: as in `seqfast.kernels.reference.fwd`.

    Returns:
        `str` reason, or None when the call can run here.
    """
    reason = refusal("triton", DEVICES, _DTYPES, cell, gx, w_hh, h0, c0, lengths, w_hr)
    if reason is not None:
        return reason
    H = hidden_size(cell, w_hh)
    if w_hr is not None and w_hr.shape[0] > H:
        return f"proj_size {w_hr.shape[0]} exceeds hidden size {H}"
    if gx.device.type == "cuda" and H > _SINGLE_MAX_H and triton.cdiv(H, _BH[-1]) > _sm_count(gx.device):
        return f"hidden size {H} needs more than one resident program of {_BH[-1]} units per SM"
    return None


def _saved_width(cell, zoneout):
    return SAVED_WIDTH[cell] + int(zoneout and cell == "lstm")


def saved_shape(cell, T, B, H, P, zoneout=False):
    """Shape of `saved`: `reference.saved_shape`'s layout, and for LSTM with `zoneout` (default False) a sixth slot
    per unit, the carried `c` (`c~` mixed with the state the step started from)."""
    return (T, B, _saved_width(cell, zoneout) * H)


def _options(ext):
    """`ext` (`common.Extensions` of resets and zoneout, or None) as the kernels take it.

    Returns:
        `(p_zero, p_kh, p_kc)`: `zero [T, B]` as uint8 and zoneout's masks, contiguous, or None; `(kh, kc)`: zoneout's
        constant weights (0.0 unless given as floats); whether zoneout is on.
    """
    if ext is None:
        return (None, None, None), (0.0, 0.0), False
    zero = None if ext.zero is None else ext.zero.contiguous().view(torch.uint8)
    masks = tuple(k.contiguous() if torch.is_tensor(k) else None for k in (ext.keep_h, ext.keep_c))
    weights = tuple(0.0 if k is None or torch.is_tensor(k) else float(k) for k in (ext.keep_h, ext.keep_c))
    return (zero, *masks), weights, masks[0] is not None or weights[0] != 0.0


def _meta(cell, cfg, precision, zoneout):
    return dict(
        CELL=CELLS[cell],
        PRECISION=precision,
        G=GATES[cell],
        SW=_saved_width(cell, zoneout),
        UPCAST=INTERPRET,
        BB=cfg["BB"],
        BH=cfg["BH"],
        BK=cfg["BK"],
        NH=cfg["NH"],
        SPLIT=cfg["SPLIT"],
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )


def _launch(kernel, cfg, B, args, meta):
    NB = triton.cdiv(B, cfg["BB"])
    for i_b0 in range(0, NB, cfg["per_launch"]):
        grid = (min(cfg["per_launch"], NB - i_b0), cfg["NH"])
        kernel[grid](*args, i_b0, **meta)


def fwd(cell, gx, w_hh, b_hh, h0, c0=None, lengths=None, w_hr=None, reverse=False, need_saved=True, ext=None):
    """Run the recurrence forward in one launch per group of batch blocks.

    Args:
        cell, gx, w_hh, b_hh, h0, c0, lengths, w_hr, reverse, need_saved: as in `seqfast.kernels.reference.fwd`.
        ext: `common.Extensions` of resets and zoneout, or None (default).

    Returns:
        `y [T, B, P]` (dtype of `gx`), `hT [B, P]`, `cT [B, H]` or None, `saved` (float32
        `saved_shape(..., zoneout)`, or `[0]` when not needed).
    """
    T, B, _ = gx.shape
    H = hidden_size(cell, w_hh)
    P = w_hh.shape[1]
    dev = gx.device
    lstm = cell == "lstm"
    gx, w_hh, h0 = gx.contiguous(), w_hh.contiguous(), h0.contiguous()
    b_hh = None if b_hh is None else b_hh.contiguous()
    c0 = c0.contiguous() if lstm else None
    w_hr = None if w_hr is None else w_hr.contiguous()
    lengths = None if lengths is None else lengths.to(device=dev, dtype=torch.int64).contiguous()
    y = empty((T, B, P), gx.dtype, dev)
    hT = empty((B, P), h0.dtype, dev)
    cT = empty((B, H), c0.dtype, dev) if lstm else None
    pointers, weights, zoneout = _options(ext)
    saved = empty(saved_shape(cell, T, B, H, P, zoneout) if need_saved else (0,), torch.float32, dev)
    cfg = _config(B, H, dev, w_hh.dtype)
    hbuf = torch.empty((2, B, P), dtype=w_hh.dtype, device=dev)
    rbuf = None if w_hr is None else torch.empty((B, H), dtype=w_hr.dtype, device=dev)
    sync = torch.zeros(triton.cdiv(B, cfg["BB"]), dtype=torch.int32, device=dev)
    meta = _meta(cell, cfg, _precision(w_hh.dtype, dev), zoneout)
    args = (gx, w_hh, b_hh, h0, c0, lengths, w_hr, *pointers, y, hT, cT, saved, hbuf, rbuf, sync, T, B, H, P, *weights)
    _launch(fwd_kernel, cfg, B, args, dict(meta, REVERSE=reverse, SAVE=need_saved, NS=1 if w_hr is None else 2))
    return y, hT, cT, saved


def bwd(cell, dy, dhT, dcT, w_hh, b_hh, w_hr, h0, c0, lengths, y, saved, reverse=False, ext=None):
    """Backward of `fwd` from its `saved`, one launch per group of batch blocks, then `dw_hr` as one GEMM.

    Args:
        cell, dy, dhT, dcT, w_hh, b_hh, w_hr, h0, c0, lengths, y, saved, reverse: as in
            `seqfast.kernels.reference.bwd` (`dhT`/`dcT` may be None for zero).
        ext: the forward's `common.Extensions`, or None (default).

    Returns:
        `dgx`, `dgh` (`[T, B, G*H]`, dtype of `dy`; `dgh` None unless GRU), `dh0 [B, P]`, `dc0 [B, H]` or None,
        `dw_hr [P, H]` or None.
    """
    T, B, P = dy.shape
    H = hidden_size(cell, w_hh)
    G = GATES[cell]
    dev = dy.device
    lstm = cell == "lstm"
    dy, w_hh = dy.contiguous(), w_hh.contiguous()
    dhT = torch.zeros((B, P), dtype=h0.dtype, device=dev) if dhT is None else dhT.contiguous()
    if lstm:
        dcT = torch.zeros((B, H), dtype=c0.dtype, device=dev) if dcT is None else dcT.contiguous()
        c0 = c0.contiguous()
    w_hr = None if w_hr is None else w_hr.contiguous()
    lengths = None if lengths is None else lengths.to(device=dev, dtype=torch.int64).contiguous()
    dgx = empty((T, B, G * H), dy.dtype, dev)
    dgh = empty((T, B, G * H), dy.dtype, dev) if cell == "gru" else None
    dh0 = empty((B, P), h0.dtype, dev)
    dc0 = empty((B, H), c0.dtype, dev) if lstm else None
    dhs = None if w_hr is None else torch.empty((T, B, P), dtype=torch.float32, device=dev)
    cfg = _config(B, H, dev, w_hh.dtype)
    dbuf = torch.empty((2, B, G * H), dtype=w_hh.dtype, device=dev)
    pbuf = None if w_hr is None else torch.empty((B, P), dtype=w_hr.dtype, device=dev)
    sync = torch.zeros(triton.cdiv(B, cfg["BB"]), dtype=torch.int32, device=dev)
    pointers, weights, zoneout = _options(ext)
    meta = _meta(cell, cfg, _precision(w_hh.dtype, dev), zoneout)
    args = (dy, dhT, dcT if lstm else None, w_hh, w_hr, c0 if lstm else None, lengths, *pointers, saved)
    args += (dgx, dgh, dh0, dc0, dhs, dbuf, pbuf, sync, T, B, H, P, *weights)
    _launch(bwd_kernel, cfg, B, args, dict(meta, REVERSE=reverse, NS=1 if w_hr is None else 2))
    dw_hr = None
    if w_hr is not None:
        o, c = saved.view(T, B, -1, H)[:, :, 3:5].unbind(2)
        h_raw = o * torch.tanh(c)
        active = active_mask(T, lengths, dev)
        if active is not None:
            h_raw = torch.where(active, h_raw, 0)
        dw_hr = (dhs.reshape(-1, P).T @ h_raw.reshape(-1, H)).to(w_hr.dtype)
    return dgx, dgh, dh0, dc0, dw_hr
