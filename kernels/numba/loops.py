"""@njit time loops of the numba backend, one forward and one backward per cell family.

Shapes as in `seqfast.kernels.reference`; `s` is the processing step, `t` the time step it reads and writes
(`lens[b] - 1 - s` when reversed). Steps at or past `lens[b]` keep the state and write zeros. `saved` is kept in
processing order with the reference's layout. State buffers (`h`, `c`, `dh`, `dc`) come in holding the initial
value and leave holding the final one. Each parallel region splits hidden units (or state columns) into `nc`
contiguous chunks and does both the recurrent product for its rows of the weights and the pointwise math for its
units, so a forward step is one region (two with a projection) and a backward step two. Each function is
compiled once per dtype; `proj`, `rev`, `relu` and `nc` are runtime arguments, so no flag adds a variant.
"""

import math
from types import SimpleNamespace

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

_OPTS = {"cache": True, "nogil": True, "fastmath": {"reassoc", "contract"}}


def _parallel():
    """Options for `njit(parallel=...)`: explicit `prange` loops only; array expressions stay serial, which halves
    compile time. A fresh dict each time, as numba consumes it."""
    return {k: False for k in ("comprehension", "reduction", "inplace_binop", "setitem", "numpy", "stencil", "fusion")}


# Eigen's rational minimax tanh for float32 (a few ulp); unlike libm's tanhf it vectorises
_CLAMP = np.float32(7.90531110763549805)
_A = [
    np.float32(a)
    for a in (
        -2.76076847742355e-16,
        2.00018790482477e-13,
        -8.60467152213735e-11,
        5.12229709037114e-08,
        1.48572235717979e-05,
        6.37261928875436e-04,
        4.89352455891786e-03,
    )
]
_A13, _A11, _A9, _A7, _A5, _A3, _A1 = _A
_B6, _B4, _B2, _B0 = (
    np.float32(b) for b in (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03)
)
_HALF32 = np.float32(0.5)


def tanh(x):
    """`tanh(x)` in the precision of `x`."""
    return math.tanh(x)


def sigmoid(x):
    """`1 / (1 + exp(-x))` in the precision of `x`."""
    return 1.0 / (1.0 + math.exp(-x))


@njit(**_OPTS)
def _tanh32(x):
    x = max(-_CLAMP, min(_CLAMP, x))
    x2 = x * x
    p = x2 * _A13 + _A11
    p = x2 * p + _A9
    p = x2 * p + _A7
    p = x2 * p + _A5
    p = x2 * p + _A3
    p = x2 * p + _A1
    q = x2 * _B6 + _B4
    q = x2 * q + _B2
    q = x2 * q + _B0
    return x * p / q


@overload(tanh, jit_options=_OPTS)
def _tanh_impl(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        return lambda x: _tanh32(x)
    return lambda x: math.tanh(x)


@overload(sigmoid, jit_options=_OPTS)
def _sigmoid_impl(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        return lambda x: _HALF32 * _tanh32(_HALF32 * x) + _HALF32
    return lambda x: 1.0 / (1.0 + math.exp(-x))


@njit(**_OPTS)
def mm_rows(a, w, out, j0, j1):
    """`out[:, j] = a [B, K] @ w[j]` for rows `j0 <= j < j1` of `w [N, K]`."""
    B, K = a.shape
    zero = out.dtype.type(0)
    j = j0
    while j + 2 <= j1:
        b = 0
        while b + 4 <= B:
            # a 2 x 4 tile: each load of `w` feeds four rows of `a`, each load of `a` two rows of `w`
            s0, s1, s2, s3, r0, r1, r2, r3 = zero, zero, zero, zero, zero, zero, zero, zero
            for k in range(K):
                w0, w1 = w[j, k], w[j + 1, k]
                a0, a1, a2, a3 = a[b, k], a[b + 1, k], a[b + 2, k], a[b + 3, k]
                s0 += a0 * w0
                s1 += a1 * w0
                s2 += a2 * w0
                s3 += a3 * w0
                r0 += a0 * w1
                r1 += a1 * w1
                r2 += a2 * w1
                r3 += a3 * w1
            out[b, j], out[b + 1, j], out[b + 2, j], out[b + 3, j] = s0, s1, s2, s3
            out[b, j + 1], out[b + 1, j + 1], out[b + 2, j + 1], out[b + 3, j + 1] = r0, r1, r2, r3
            b += 4
        while b < B:
            s0, r0 = zero, zero
            for k in range(K):
                s0 += a[b, k] * w[j, k]
                r0 += a[b, k] * w[j + 1, k]
            out[b, j], out[b, j + 1] = s0, r0
            b += 1
        j += 2
    if j < j1:
        for b in range(B):
            s0 = zero
            for k in range(K):
                s0 += a[b, k] * w[j, k]
            out[b, j] = s0


@njit(**_OPTS)
def _gate_rows(a, w, out, G, H, j0, j1):
    # rows `g * H + j` of the product for every gate `g` and unit `j0 <= j < j1`
    for g in range(G):
        mm_rows(a, w, out, g * H + j0, g * H + j1)


@njit(**_OPTS)
def _step_time(s, n, rev):
    # time step of processing step `s` for a sequence of length `n` (only called while `s < n`)
    return n - 1 - s if rev else s


@njit(**_OPTS)
def _copy_state(src, dst, y_row, b, j0, j1):
    # an ended sequence keeps its state and writes zeros to `y`
    zero = dst.dtype.type(0)
    for j in range(j0, j1):
        dst[b, j] = src[b, j]
        y_row[j] = zero


@njit(**_OPTS)
def _fill(row, j0, j1):
    zero = row.dtype.type(0)
    for j in range(j0, j1):
        row[j] = zero


@njit(parallel=_parallel(), **_OPTS)
def rnn_fwd(gx, w_hh, b_hh, lens, rev, relu, h, y, saved, nc):
    """`gx [T, B, H]`, `w_hh [H, H]`, `b_hh [H]`, `lens [B]`; `h [B, H]`; `y [T, B, H]`; `saved [T or 1, B, H]`."""
    T, B, H = gx.shape
    zero = h.dtype.type(0)
    gh = np.empty((B, H), h.dtype)
    h2 = np.empty_like(h)
    for s in range(T):
        cur, nxt = (h, h2) if s % 2 == 0 else (h2, h)
        sv = saved[min(s, saved.shape[0] - 1)]
        for q in prange(nc):
            j0, j1 = q * H // nc, (q + 1) * H // nc
            mm_rows(cur, w_hh, gh, j0, j1)
            for b in range(B):
                if s >= lens[b]:
                    _copy_state(cur, nxt, y[s, b], b, j0, j1)
                    continue
                t = _step_time(s, lens[b], rev)
                for j in range(j0, j1):
                    a = gx[t, b, j] + gh[b, j] + b_hh[j]
                    hn = max(a, zero) if relu else tanh(a)
                    nxt[b, j] = hn
                    y[t, b, j] = hn
                    sv[b, j] = hn
    if T % 2 == 1:
        h[:] = h2


@njit(parallel=_parallel(), **_OPTS)
def rnn_bwd(dy, w_hh_t, lens, rev, relu, saved, dh, dgx, dgh, nc):
    """`dy [T, B, H]`, `w_hh_t [H, H]` (`w_hh^T`), `saved [T, B, H]`; `dh [B, H]`; `dgx`, `dgh [T, B, H]`."""
    T, B, H = dy.shape
    zero, one = dh.dtype.type(0), dh.dtype.type(1)
    da = np.zeros((B, H), dh.dtype)
    dhp = np.empty((B, H), dh.dtype)
    for s in range(T - 1, -1, -1):
        for q in prange(nc):
            j0, j1 = q * H // nc, (q + 1) * H // nc
            for b in range(B):
                if s >= lens[b]:
                    _fill(dgx[s, b], j0, j1)
                    _fill(dgh[s, b], j0, j1)
                    continue
                t = _step_time(s, lens[b], rev)
                for j in range(j0, j1):
                    hs = saved[s, b, j]
                    d = dh[b, j] + dy[t, b, j]
                    # relu' = [h > 0]; tanh' = 1 - h^2
                    g = (d if hs > zero else zero) if relu else d * (one - hs * hs)
                    da[b, j] = g
                    dgx[t, b, j] = g
                    dgh[t, b, j] = g
        for q in prange(nc):
            j0, j1 = q * H // nc, (q + 1) * H // nc
            mm_rows(da, w_hh_t, dhp, j0, j1)
            for b in range(B):
                if s < lens[b]:
                    for j in range(j0, j1):
                        dh[b, j] = dhp[b, j]


@njit(parallel=_parallel(), **_OPTS)
def lstm_fwd(gx, w_hh, b_hh, w_hr, lens, rev, h, c, y, saved, nc):
    """`gx [T, B, 4H]`, `w_hh [4H, P]`, `b_hh [4H]`, `w_hr [P, H]` (`[0, H]`: no projection), `lens [B]`;
    `h [B, P]`, `c [B, H]`; `y [T, B, P]`; `saved [T or 1, B, 5H]` (`i, f, g, o, c`)."""
    T, B, _ = gx.shape
    H = c.shape[1]
    P = h.shape[1]
    proj = w_hr.shape[0] > 0
    gh = np.empty((B, 4 * H), h.dtype)
    hraw = np.empty((B, H), h.dtype)
    h2 = np.empty_like(h)
    ncp = min(nc, P)
    for s in range(T):
        cur, nxt = (h, h2) if s % 2 == 0 else (h2, h)
        sv = saved[min(s, saved.shape[0] - 1)]
        for q in prange(nc):
            j0, j1 = q * H // nc, (q + 1) * H // nc
            _gate_rows(cur, w_hh, gh, 4, H, j0, j1)
            for b in range(B):
                if s >= lens[b]:
                    if not proj:
                        _copy_state(cur, nxt, y[s, b], b, j0, j1)
                    continue
                t = _step_time(s, lens[b], rev)
                for j in range(j0, j1):
                    i = sigmoid(gx[t, b, j] + gh[b, j] + b_hh[j])
                    f = sigmoid(gx[t, b, H + j] + gh[b, H + j] + b_hh[H + j])
                    g = tanh(gx[t, b, 2 * H + j] + gh[b, 2 * H + j] + b_hh[2 * H + j])
                    o = sigmoid(gx[t, b, 3 * H + j] + gh[b, 3 * H + j] + b_hh[3 * H + j])
                    cn = f * c[b, j] + i * g
                    hn = o * tanh(cn)
                    c[b, j] = cn
                    sv[b, j], sv[b, H + j], sv[b, 2 * H + j], sv[b, 3 * H + j], sv[b, 4 * H + j] = i, f, g, o, cn
                    if proj:
                        hraw[b, j] = hn
                    else:
                        nxt[b, j] = hn
                        y[t, b, j] = hn
        if proj:
            for q in prange(ncp):
                p0, p1 = q * P // ncp, (q + 1) * P // ncp
                mm_rows(hraw, w_hr, nxt, p0, p1)
                for b in range(B):
                    if s >= lens[b]:
                        _copy_state(cur, nxt, y[s, b], b, p0, p1)
                        continue
                    t = _step_time(s, lens[b], rev)
                    for p in range(p0, p1):
                        y[t, b, p] = nxt[b, p]
    if T % 2 == 1:
        h[:] = h2


@njit(parallel=_parallel(), **_OPTS)
def lstm_bwd(dy, w_hh_t, w_hr_t, lens, rev, c0, saved, dh, dc, dgx, dgh, hraw, dh_out, nc):
    """`dy [T, B, P]`, `w_hh_t [P, 4H]`, `w_hr_t [H, P]` (`[0, P]`: no projection), `c0 [B, H]`,
    `saved [T, B, 5H]`; `dh [B, P]`, `dc [B, H]`; `dgx`, `dgh [T, B, 4H]`; with projection `hraw [T, B, H]`
    and `dh_out [T, B, P]` receive `o * tanh(c)` and the state gradient per step (zero when inactive)."""
    T, B, P = dy.shape
    H = dc.shape[1]
    proj = w_hr_t.shape[0] > 0
    one = dh.dtype.type(1)
    da = np.zeros((B, 4 * H), dh.dtype)
    dhraw = np.empty((B, H), dh.dtype)
    dhp = np.empty((B, P), dh.dtype)
    ncp = min(nc, P)
    for s in range(T - 1, -1, -1):
        if proj:
            # the projection's product needs the whole state gradient `dh + dy` first
            for b in range(B):
                if s < lens[b]:
                    t = _step_time(s, lens[b], rev)
                    for p in range(P):
                        dh[b, p] += dy[t, b, p]
                        dh_out[s, b, p] = dh[b, p]
                else:
                    _fill(dh_out[s, b], 0, P)
                    _fill(hraw[s, b], 0, H)
        for q in prange(nc):
            j0, j1 = q * H // nc, (q + 1) * H // nc
            if proj:
                mm_rows(dh, w_hr_t, dhraw, j0, j1)
            for b in range(B):
                if s >= lens[b]:
                    for g in range(4):
                        _fill(dgx[s, b], g * H + j0, g * H + j1)
                        _fill(dgh[s, b], g * H + j0, g * H + j1)
                    continue
                t = _step_time(s, lens[b], rev)
                for j in range(j0, j1):
                    i, f, g, o = saved[s, b, j], saved[s, b, H + j], saved[s, b, 2 * H + j], saved[s, b, 3 * H + j]
                    cs = saved[s, b, 4 * H + j]
                    cp = saved[s - 1, b, 4 * H + j] if s > 0 else c0[b, j]
                    tc = tanh(cs)
                    if proj:
                        dhr = dhraw[b, j]
                        hraw[s, b, j] = o * tc
                    else:
                        dhr = dh[b, j] + dy[t, b, j]
                    dcs = dc[b, j] + dhr * o * (one - tc * tc)
                    # d sigmoid = s (1 - s); d tanh = 1 - t^2
                    dai = dcs * g * i * (one - i)
                    daf = dcs * cp * f * (one - f)
                    dag = dcs * i * (one - g * g)
                    dao = dhr * tc * o * (one - o)
                    dc[b, j] = dcs * f
                    da[b, j], da[b, H + j], da[b, 2 * H + j], da[b, 3 * H + j] = dai, daf, dag, dao
                    dgx[t, b, j], dgx[t, b, H + j], dgx[t, b, 2 * H + j], dgx[t, b, 3 * H + j] = dai, daf, dag, dao
                    dgh[t, b, j], dgh[t, b, H + j], dgh[t, b, 2 * H + j], dgh[t, b, 3 * H + j] = dai, daf, dag, dao
        for q in prange(ncp):
            p0, p1 = q * P // ncp, (q + 1) * P // ncp
            mm_rows(da, w_hh_t, dhp, p0, p1)
            for b in range(B):
                if s < lens[b]:
                    for p in range(p0, p1):
                        dh[b, p] = dhp[b, p]


@njit(parallel=_parallel(), **_OPTS)
def gru_fwd(gx, w_hh, b_hh, lens, rev, h, y, saved, nc):
    """`gx [T, B, 3H]`, `w_hh [3H, H]`, `b_hh [3H]`, `lens [B]`; `h [B, H]`; `y [T, B, H]`;
    `saved [T or 1, B, 5H]` (`r, z, n, W_hn h + b_hn, h_prev`)."""
    T, B, _ = gx.shape
    H = h.shape[1]
    one = h.dtype.type(1)
    gh = np.empty((B, 3 * H), h.dtype)
    h2 = np.empty_like(h)
    for s in range(T):
        cur, nxt = (h, h2) if s % 2 == 0 else (h2, h)
        sv = saved[min(s, saved.shape[0] - 1)]
        for q in prange(nc):
            j0, j1 = q * H // nc, (q + 1) * H // nc
            _gate_rows(cur, w_hh, gh, 3, H, j0, j1)
            for b in range(B):
                if s >= lens[b]:
                    _copy_state(cur, nxt, y[s, b], b, j0, j1)
                    continue
                t = _step_time(s, lens[b], rev)
                for j in range(j0, j1):
                    r = sigmoid(gx[t, b, j] + gh[b, j] + b_hh[j])
                    z = sigmoid(gx[t, b, H + j] + gh[b, H + j] + b_hh[H + j])
                    hn = gh[b, 2 * H + j] + b_hh[2 * H + j]
                    n = tanh(gx[t, b, 2 * H + j] + r * hn)
                    hprev = cur[b, j]
                    hnew = (one - z) * n + z * hprev
                    sv[b, j], sv[b, H + j], sv[b, 2 * H + j], sv[b, 3 * H + j], sv[b, 4 * H + j] = r, z, n, hn, hprev
                    nxt[b, j] = hnew
                    y[t, b, j] = hnew
    if T % 2 == 1:
        h[:] = h2


@njit(parallel=_parallel(), **_OPTS)
def gru_bwd(dy, w_hh_t, lens, rev, saved, dh, dgx, dgh, nc):
    """`dy [T, B, H]`, `w_hh_t [H, 3H]`, `saved [T, B, 5H]`; `dh [B, H]`; `dgx`, `dgh [T, B, 3H]`."""
    T, B, H = dy.shape
    one = dh.dtype.type(1)
    da = np.zeros((B, 3 * H), dh.dtype)
    dhz = np.empty((B, H), dh.dtype)
    dhp = np.empty((B, H), dh.dtype)
    for s in range(T - 1, -1, -1):
        for q in prange(nc):
            j0, j1 = q * H // nc, (q + 1) * H // nc
            for b in range(B):
                if s >= lens[b]:
                    for g in range(3):
                        _fill(dgx[s, b], g * H + j0, g * H + j1)
                        _fill(dgh[s, b], g * H + j0, g * H + j1)
                    continue
                t = _step_time(s, lens[b], rev)
                for j in range(j0, j1):
                    r, z, n = saved[s, b, j], saved[s, b, H + j], saved[s, b, 2 * H + j]
                    hn, hprev = saved[s, b, 3 * H + j], saved[s, b, 4 * H + j]
                    d = dh[b, j] + dy[t, b, j]
                    dan = d * (one - z) * (one - n * n)
                    dar = dan * hn * r * (one - r)
                    daz = d * (hprev - n) * z * (one - z)
                    dhz[b, j] = d * z
                    da[b, j], da[b, H + j], da[b, 2 * H + j] = dar, daz, dan * r
                    dgx[t, b, j], dgx[t, b, H + j], dgx[t, b, 2 * H + j] = dar, daz, dan
                    dgh[t, b, j], dgh[t, b, H + j], dgh[t, b, 2 * H + j] = dar, daz, dan * r
        for q in prange(nc):
            j0, j1 = q * H // nc, (q + 1) * H // nc
            mm_rows(da, w_hh_t, dhp, j0, j1)
            for b in range(B):
                if s < lens[b]:
                    for j in range(j0, j1):
                        dh[b, j] = dhz[b, j] + dhp[b, j]


# float64 (checks, gradcheck) runs these single-threaded twins: a serial compile costs a fraction of a parallel one
SERIAL = SimpleNamespace(
    **{f.__name__: njit(**_OPTS)(f.py_func) for f in (rnn_fwd, rnn_bwd, lstm_fwd, lstm_bwd, gru_fwd, gru_bwd)}
)
