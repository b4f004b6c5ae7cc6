"""The recurrence in plain torch: the executable spec every backend is tested against.

The backend contract (one layer, one direction, time-major; `G` gates, hidden size `H`, state width `P`,
which is `proj_size` for a projected LSTM and `H` otherwise):

    unsupported(cell, gx, w_hh, h0, c0, lengths, w_hr) -> str | None
    saved_shape(cell, T, B, H, P) -> tuple
    fwd(cell, gx, w_hh, b_hh, h0, c0, lengths, w_hr, reverse, need_saved, ext=None) -> y, hT, cT, saved
    bwd(cell, dy, dhT, dcT, w_hh, b_hh, w_hr, h0, c0, lengths, y, saved, reverse, ext=None) -> dgx, dgh, dh0, dc0, dw_hr

- `unsupported` answers from the cell, the tensors' dtypes and devices and the weights' shapes only (the dispatcher
  remembers its answer per such signature).
- A backend with `FUSES_PROJECTION = True` may get `gx` as a `common.Projection` and form it in its own call.
- A backend may also offer `stack(cell, x, h0, c0, weights, bidirectional) -> y, hn, cn` and
  `step(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh) -> h, c`: a whole stack without grad in one call (arguments as in
  `seqfast.functional.rnn`, projections formed from its `Projection`s), and one cell step, for the calls whose
  per-call cost matters; they give what `fwd` gives layer by layer.
- `cell` is one of `rnn_tanh`, `rnn_relu`, `lstm`, `gru`; gate order and math are torch's
  (LSTM `i, f, g, o`; GRU `r, z, n` with `n = tanh(gx_n + r * (W_hn h + b_hn))`).
- `gx [T, B, G*H]` holds `x @ w_ih.T + b_ih` for every step; `w_hh [G*H, P]`, `b_hh [G*H]` or None,
  `h0 [B, P]`, `c0 [B, H]` (LSTM only, else None), `w_hr [P, H]` or None.
- `lengths [B]` int64 on `gx`'s device, or None for all `T`: steps at or past a sequence's length keep its
  state and write zeros to `y`; `hT`/`cT` are the state after the sequence's own last step. With
  `reverse=True` each sequence is walked from its own last step (`L_b - 1`) down to step 0.
- Outputs: `y [T, B, P]` in `gx`'s dtype, `hT [B, P]`, `cT [B, H]` (None unless LSTM) in `h0`/`c0`'s
  dtype, `saved` of `saved_shape(...)` in the compute dtype (an empty tensor when `need_saved` is False).
  State is carried in float32, or float64 for float64 input.
- Backward: `dy [T, B, P]`, `dhT [B, P]`, `dcT [B, H]` (LSTM) in; `dgx` is the gradient of the x-side
  pre-activations `gx`, `dgh` of `h @ w_hh.T + b_hh`, both `[T, B, G*H]` and zero at inactive steps. They
  differ only in GRU's n gate: for the other cells `dgh` is None (it equals `dgx`). `dh0`, `dc0` (None unless
  LSTM); `dw_hr [P, H]` (None without projection). Weight gradients of `w_ih`, `w_hh`, `b_ih`, `b_hh` are
  computed by the caller from `dgx`/`dgh` as one GEMM each.
- `ext` (a `common.Extensions`, or None) adds the options a backend lists in `EXTENSIONS` (dispatch picks only a
  backend that lists every option a call uses):
  - `resets` (`ext.zero`): a step whose `zero` is set starts from zeros (`h`, and `c` for LSTM) instead of the
    state the step before left; no gradient crosses it.
  - `zoneout` (`ext.keep_h`, `ext.keep_c`): `h_t = m h_in + (1 - m) h~_t` where `h_in` is the state the step started
    from, `h~_t` the cell's new state and `m` the step's keep weight (likewise `c`); `y` holds `h_t`.
  - `layer_norm` (`ext.ln_hh [G*H]`; LSTM also `ext.ln_c_weight`, `ext.ln_c_bias [H]`; never with `w_hr`): the
    recurrent product is `LN(h_in @ w_hh.T) * ln_hh + b_hh`, LN normalising each row over all `G*H` features
    (`(v - mean) / sqrt(var + eps)`, biased variance, eps `common.LN_EPS`), and LSTM's
    `h~_t = o * tanh(LN(c~_t) * ln_c_weight + ln_c_bias)` with `c~_t` the cell's new state before zoneout; the
    un-normalised state is carried. (`LN(x @ w_ih.T) * ln_ih + b_ih` is the caller's, around the input GEMM.) A
    backend that runs it takes `saved_shape(..., layer_norm=True)`, and its `bwd` returns a sixth value,
    `(db_hh, d_ln_hh, d_ln_c_weight, d_ln_c_bias)`: the gradients of `b_hh` (None without it), `ln_hh [G*H]` and
    LSTM's `[H]` pair (None for the other cells), each summed over every active step and row, in the compute dtype;
    `dgh` is then the gradient of the product before its LN, `h_in @ w_hh.T`, for every cell.
  `bwd` takes the forward's `ext`, and the caller forms `dW_hh` from `dgh` and `h_prev` zeroed at reset steps. The
  reference's own `bwd` runs resets alone: with the other options its forward (`need_saved=False`) is the spec, and
  autograd differentiates it.
"""

import torch
import torch.nn.functional as F

from .common import LN_EPS, active_mask, check_lengths, compute_dtype, empty, hidden_size, refusal, reorder

DEVICES = None
EXTENSIONS = ("layer_norm", "resets", "zoneout")

# `saved` per step and hidden unit; the triton backend keeps this layout too (its 16-bit `y` cannot give `h`)
SAVED_WIDTH = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 5, "gru": 5}


def unsupported(cell, gx, w_hh, h0, c0=None, lengths=None, w_hr=None):
    """Why this backend cannot run the call, or None: the reference runs any floating dtype on any device."""
    return refusal("reference", DEVICES, None, cell, gx, w_hh, h0, c0, lengths, w_hr)


def saved_shape(cell, T, B, H, P):
    """Shape of `saved`: per step `h` (RNN), `i, f, g, o, c` (LSTM) or `r, z, n, W_hn h + b_hn, h_prev` (GRU)."""
    return (T, B, SAVED_WIDTH[cell] * H)


def _step(cell, gx_t, h, c, w_hh, b_hh, w_hr, ln=None):
    """One step of the cell math. `gx_t [B, G*H]`, `h [B, P]`, `c [B, H]` -> `h_new [B, P]`, `c_new`, `saved_t`;
    `ln`: `(ln_hh, ln_c_weight, ln_c_bias)` of the `layer_norm` option, or None."""
    gh = h @ w_hh.T
    if ln is not None:
        gh = F.layer_norm(gh, gh.shape[1:], ln[0], None, LN_EPS)
    if b_hh is not None:
        gh = gh + b_hh
    if cell == "rnn_tanh":
        h_new = torch.tanh(gx_t + gh)
        return h_new, None, h_new
    if cell == "rnn_relu":
        h_new = torch.relu(gx_t + gh)
        return h_new, None, h_new
    if cell == "lstm":
        i, f, g, o = (gx_t + gh).chunk(4, dim=1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c_new = f * c + i * g
        h_new = o * torch.tanh(c_new if ln is None else F.layer_norm(c_new, c_new.shape[1:], ln[1], ln[2], LN_EPS))
        if w_hr is not None:
            h_new = h_new @ w_hr.T
        return h_new, c_new, torch.cat([i, f, g, o, c_new], dim=1)
    x_r, x_z, x_n = gx_t.chunk(3, dim=1)
    h_r, h_z, h_n = gh.chunk(3, dim=1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    h_new = (1 - z) * n + z * h
    return h_new, None, torch.cat([r, z, n, h_n, h], dim=1)


def _step_bwd(cell, dh, dc, saved_t, c_prev, w_hh, w_hr):
    """Backward of `_step`. `dh [B, P]` -> `dgx_t`, `dgh_t [B, G*H]`, `dh_prev [B, P]`, `dc_prev`, `dh_raw`."""
    if cell in ("rnn_tanh", "rnn_relu"):
        h = saved_t
        # tanh' = 1 - h^2; relu' = [h > 0], selecting as torch's threshold_backward does (0 where h <= 0, NaN h passes)
        da = dh * (1 - h * h) if cell == "rnn_tanh" else torch.where(h <= 0, 0, dh)
        return da, da, da @ w_hh, None
    if cell == "lstm":
        i, f, g, o, c = saved_t.chunk(5, dim=1)
        tanh_c = torch.tanh(c)
        dh_raw = dh @ w_hr if w_hr is not None else dh
        dc = dc + dh_raw * o * (1 - tanh_c * tanh_c)
        # d sigmoid(a) = s (1 - s); d tanh(a) = 1 - t^2
        da = torch.cat(
            [
                dc * g * i * (1 - i),
                dc * c_prev * f * (1 - f),
                dc * i * (1 - g * g),
                dh_raw * tanh_c * o * (1 - o),
            ],
            dim=1,
        )
        return da, da, da @ w_hh, dc * f
    r, z, n, h_n, h_prev = saved_t.chunk(5, dim=1)
    da_n = dh * (1 - z) * (1 - n * n)
    da_r = da_n * h_n * r * (1 - r)
    da_z = dh * (h_prev - n) * z * (1 - z)
    dgx = torch.cat([da_r, da_z, da_n], dim=1)
    dgh = torch.cat([da_r, da_z, da_n * r], dim=1)
    return dgx, dgh, dh * z + dgh @ w_hh, None


def fwd(cell, gx, w_hh, b_hh, h0, c0=None, lengths=None, w_hr=None, reverse=False, need_saved=True, ext=None):
    """Run the recurrence forward; see the module docstring for shapes and `ext`.

    Returns:
        `y [T, B, P]`, `hT [B, P]`, `cT [B, H]` or None, `saved` (`saved_shape(...)`, or `[0]` when not needed).
    """
    if ext is not None and need_saved and ext.options() != ("resets",):
        raise ValueError("the reference's backward runs resets alone: differentiate its forward instead")
    T, B, _ = gx.shape
    check_lengths(lengths, T)
    H = hidden_size(cell, w_hh)
    P = w_hh.shape[1]
    ct = compute_dtype(gx.dtype)
    x = reorder(gx, lengths, reverse).to(ct)
    w_hh, w_hr = w_hh.to(ct), (None if w_hr is None else w_hr.to(ct))
    b_hh = None if b_hh is None else b_hh.to(ct)
    h = h0.to(ct)
    c = c0.to(ct) if cell == "lstm" else None
    active = active_mask(T, lengths, gx.device)
    y = empty((T, B, P), ct, gx.device)
    saved = empty(saved_shape(cell, T, B, H, P) if need_saved else (0,), ct, gx.device)
    zero, keep_h, keep_c, ln = _in_order(ext, lengths, reverse, ct)
    for s in range(T):
        h_in, c_in = h, c
        if zero is not None:
            h_in = torch.where(zero[s], 0, h)
            c_in = None if c is None else torch.where(zero[s], 0, c)
        h_new, c_new, saved_s = _step(cell, x[s], h_in, c_in, w_hh, b_hh, w_hr, ln)
        if keep_h is not None:
            h_new = _zoneout(keep_h, s, h_in, h_new)
            c_new = None if c is None else _zoneout(keep_c, s, c_in, c_new)
        if need_saved:
            saved[s] = saved_s
        if active is None:
            h, c, y[s] = h_new, c_new, h_new
        else:
            m = active[s]
            h = torch.where(m, h_new, h)
            c = None if c is None else torch.where(m, c_new, c)
            y[s] = torch.where(m, h_new, 0)
    y = reorder(y, lengths, reverse).to(gx.dtype)
    cT = None if c is None else c.to(c0.dtype)
    return y, h.to(h0.dtype), cT, saved


def _in_order(ext, lengths, reverse, ct):
    """`ext`'s per-step tensors in processing order (`zero [T, B, 1]`), in the compute dtype: `(zero, keep_h,
    keep_c, ln)` with `ln` as `_step` takes it; all None without `ext`."""
    if ext is None:
        return None, None, None, None
    zero = None if ext.zero is None else reorder(ext.zero.unsqueeze(-1), lengths, reverse)
    keep_h, keep_c = (
        reorder(k.to(ct), lengths, reverse) if torch.is_tensor(k) else k for k in (ext.keep_h, ext.keep_c)
    )
    ln = None
    if ext.ln_hh is not None:
        ln = tuple(None if t is None else t.to(ct) for t in (ext.ln_hh, ext.ln_c_weight, ext.ln_c_bias))
    return zero, keep_h, keep_c, ln


def _zoneout(keep, s, prev, new):
    """Zoneout at processing step `s`: `m prev + (1 - m) new` with `m` the step's keep weights (or a float)."""
    m = keep[s] if torch.is_tensor(keep) else keep
    return m * prev + (1 - m) * new


def bwd(cell, dy, dhT, dcT, w_hh, b_hh, w_hr, h0, c0, lengths, y, saved, reverse=False, ext=None):
    """Backward of `fwd` from its `saved`; see the module docstring for shapes (`ext`: resets alone, or None).

    Returns:
        `dgx`, `dgh` (`[T, B, G*H]`, dtype of `dy`; `dgh` None unless GRU), `dh0 [B, P]`, `dc0 [B, H]` or None,
        `dw_hr [P, H]` or None.
    """
    if ext is not None and ext.options() != ("resets",):
        raise ValueError("the reference's backward runs resets alone: differentiate its forward instead")
    T, B, P = dy.shape
    ct, io_dtype = saved.dtype, dy.dtype
    G = w_hh.shape[0]
    H = hidden_size(cell, w_hh)
    w_hr_dtype = None if w_hr is None else w_hr.dtype
    dy = reorder(dy, lengths, reverse).to(ct)
    w_hh, w_hr = w_hh.to(ct), (None if w_hr is None else w_hr.to(ct))
    active = active_mask(T, lengths, dy.device)
    dh = dhT.to(ct)
    dc = dcT.to(ct) if cell == "lstm" else None
    dgx = empty((T, B, G), ct, dy.device)
    dgh = empty((T, B, G), ct, dy.device)
    dh_out = empty((T, B, P), ct, dy.device) if w_hr is not None else None
    zero = _in_order(ext, lengths, reverse, ct)[0]
    for s in reversed(range(T)):
        m = None if active is None else active[s]
        dh_s = dh + (dy[s] if m is None else torch.where(m, dy[s], 0))
        c_prev = None
        if cell == "lstm":
            c_prev = saved[s - 1, :, 4 * H :] if s > 0 else c0.to(ct)
            c_prev = c_prev if zero is None else torch.where(zero[s], 0, c_prev)
        dgx_s, dgh_s, dh_prev, dc_prev = _step_bwd(cell, dh_s, dc, saved[s], c_prev, w_hh, w_hr)
        if zero is not None:
            dh_prev = torch.where(zero[s], 0, dh_prev)
            dc_prev = None if dc_prev is None else torch.where(zero[s], 0, dc_prev)
        if m is None:
            dgx[s], dgh[s], dh, dc = dgx_s, dgh_s, dh_prev, dc_prev
        else:
            dgx[s] = torch.where(m, dgx_s, 0)
            dgh[s] = torch.where(m, dgh_s, 0)
            dh = torch.where(m, dh_prev, dh_s)
            dc = None if dc is None else torch.where(m, dc_prev, dc)
        if dh_out is not None:
            dh_out[s] = dh_s if m is None else torch.where(m, dh_s, 0)
    dw_hr = None
    if w_hr is not None:
        _, _, _, o, c = saved.chunk(5, dim=2)
        h_raw = o * torch.tanh(c)
        dw_hr = (dh_out.reshape(-1, P).T @ h_raw.reshape(-1, H)).to(w_hr_dtype)
    dgx = reorder(dgx, lengths, reverse).to(io_dtype)
    dgh = reorder(dgh, lengths, reverse).to(io_dtype) if cell == "gru" else None
    dc0 = None if dc is None else dc.to(c0.dtype)
    return dgx, dgh, dh.to(h0.dtype), dc0, dw_hr
