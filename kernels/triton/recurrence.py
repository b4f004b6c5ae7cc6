"""Fused recurrence kernels: the whole time loop of one layer-direction in one launch, forward and backward.

Grid `(batch blocks, NH)`: program `(i_b, i_h)` owns batch rows `i_b * BB + [0, BB)` and hidden units
`i_h * BH + [0, BH)` (and the same range of the state width `P`, which is `<= H`). Gate pre-activations, cell
state, gradients of its units live in fp32 registers for the whole loop; the state every program needs as a
matmul input (`h`, or `h_raw` before the projection, or `dgh` in backward) is exchanged through small global
buffers in the matmul operand dtype, loaded with `.cg` (L2) where the load stays a plain load.

Synchronisation, correct by construction:
- `_sync` is a barrier of the `NH` programs of one batch block. `tl.debug_barrier` makes every thread of the
  program finish its stores; one `acq_rel` atomic add at gpu scope publishes them; acquire reads of the counter
  spin until it reaches `n * NH` for barrier `n`; a second CTA barrier orders every thread's later loads after
  that acquire (the PTX memory model then makes other SMs' stores visible even to L1-cached and async-copy loads,
  the guarantee cooperative-groups grid sync relies on). Batch blocks never communicate. The launcher starts at
  most one program per SM per launch, so all programs of a launch can be resident together and a spinning
  program never waits on one that cannot be scheduled.
- Forward, per step `s`: programs read `h` from `hbuf[s % 2]` and write their part of the new `h` to
  `hbuf[(s + 1) % 2]`, then `_sync`. A reader of `hbuf[s % 2]` at step `s` has finished before anyone passes the
  barrier of step `s`, and the next write of that half happens at step `s + 1`, after it. With a projection, the
  unprojected `h_raw` goes through `rbuf` with one more barrier between the two halves of the step.
- Backward, per step: each program writes its units' `dgh` to `dbuf[s % 2]`, `_sync`, then reduces `dbuf @ w_hh`
  for its range of `dh`; the half is written again two steps later, after the next barrier, which everyone passes
  only once done reading. With a projection, `dh` goes through `pbuf` (one more barrier) so that every program can
  form `dh @ w_hr` for its units.
- Options (constexpr, so a call without them runs the plain code): `RESETS` reads each row's reset flag at the
  step's time and masks that row's `h` out of the recurrent product (zeros), and starts the cell from zero `h`, `c`;
  backward zeroes the `dh`, `dc` it passes back across it. `ZONEOUT` mixes the state the step started from into the
  new one, `h_t = k h_in + (1 - k) h~_t` (likewise `c`), with `k` per-step masks (`KEEP_T`) or a constant; backward
  passes `k dh` straight back and `(1 - k) dh` into the cell. LSTM with zoneout saves the carried `c_t` as a sixth
  slot after `c~_t`.
- With `NH == 1` (`SPLIT` false: one program owns all hidden units, the only mode the interpreter can run, since
  it runs programs one after another) `_sync` is just the CTA barrier and the code path is otherwise the same.
"""

import triton
import triton.language as tl

# `seqfast.kernels.common.CELL_IDS` (a test checks the copy; this file also compiles standalone, without seqfast)
CELLS = {"rnn_tanh": 0, "rnn_relu": 1, "lstm": 2, "gru": 3}
RNN_TANH = tl.constexpr(CELLS["rnn_tanh"])
RNN_RELU = tl.constexpr(CELLS["rnn_relu"])
LSTM = tl.constexpr(CELLS["lstm"])
GRU = tl.constexpr(CELLS["gru"])


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # (1 - e) / (1 + e) with e = exp(-2|x|) never overflows
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _sync(p_sync, n, NH: tl.constexpr, SPLIT: tl.constexpr):
    """Barrier number `n` (from 1) of the `NH` programs of a batch block; see the module docstring."""
    tl.debug_barrier()
    if SPLIT:
        cnt = tl.atomic_add(p_sync, 1, sem="acq_rel") + 1
        while cnt < n * NH:
            cnt = tl.atomic_add(p_sync, 0, sem="acquire")
        tl.debug_barrier()


@triton.jit
def _round_tf32(x):
    """fp32 `x` rounded to nearest even at TF32's 10 mantissa bits (Inf and NaN kept)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & 0xFFFFE000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _mma(acc, b_x, p_w, o_n, m_n, o_k, m_k, LD_N, LD_K, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """`acc + b_x @ W` for `W[k, n]` at `p_w + o_n * LD_N + o_k * LD_K`, operands in W's dtype, fp32 accumulation.

    `b_x [BB, BK]`, `acc [BB, BN]`; `PRECISION` is `tl.dot`'s input precision for fp32 operands (`ieee` or `tf32`).
    `UPCAST` multiplies the (already rounded) operands in fp32, the same products, rounding them to TF32 first when
    asked: the interpreter's numpy has no bfloat16 matmul and ignores the input precision.
    """
    p = p_w + o_n[None, :].to(tl.int64) * LD_N + o_k[:, None].to(tl.int64) * LD_K
    b_w = tl.load(p, mask=m_k[:, None] & m_n[None, :], other=0.0)  # [BK, BN]
    b_x = b_x.to(b_w.dtype)
    if UPCAST:
        b_x = b_x.to(tl.float32)
        b_w = b_w.to(tl.float32)
        if PRECISION == "tf32":
            b_x = _round_tf32(b_x)
            b_w = _round_tf32(b_w)
        return tl.dot(b_x, b_w, acc, input_precision="ieee")
    return tl.dot(b_x, b_w, acc, input_precision=PRECISION)


@triton.jit
def _rows_mma(
    acc, p_rows, r_x, m_b, K, p_w, o_n, m_n, LD_N, LD_K, BK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr
):
    """`acc + X @ W` over `K` for `X [BB, K]` the exchange-buffer rows at `p_rows + r_x` (read through L2), `W` as
    in `_mma`."""
    for k in range(0, K, BK):
        o_k = k + tl.arange(0, BK)  # [BK]
        m_k = o_k < K
        p_x = p_rows + r_x[:, None] + o_k[None, :]
        b_x = tl.load(p_x, mask=m_b[:, None] & m_k[None, :], other=0.0, cache_modifier=".cg")  # [BB, BK]
        acc = _mma(acc, b_x, p_w, o_n, m_n, o_k, m_k, LD_N, LD_K, UPCAST, PRECISION)
    return acc


@triton.jit
def _bias(p_bhh, o, m, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        return tl.load(p_bhh + o, mask=m, other=0.0).to(tl.float32)  # [BH]
    return tl.zeros(o.shape, tl.float32)


@triton.jit
def _lengths(p_len, o_b, m_b, T, BB: tl.constexpr, HAS_LEN: tl.constexpr):
    """Per-row sequence length `[BB]` int64 (0 for rows past `B`)."""
    if HAS_LEN:
        return tl.load(p_len + o_b, mask=m_b, other=0).to(tl.int64)
    return tl.where(m_b, tl.zeros([BB], tl.int64) + T, 0)


@triton.jit
def _block(p_len, i_b0, T, B, H, P, BB: tl.constexpr, BH: tl.constexpr, HAS_LEN: tl.constexpr):
    """This program's batch block `i_b`, rows `o_b [BB]`, hidden units `o_h [BH]` (also that range of `P`), their
    masks `m_b`, `m_h`, `m_p`, each row's length `[BB]` and the longest."""
    i_b = tl.program_id(0) + i_b0
    o_b = i_b.to(tl.int64) * BB + tl.arange(0, BB)
    o_h = tl.program_id(1) * BH + tl.arange(0, BH)
    m_b = o_b < B
    b_len = _lengths(p_len, o_b, m_b, T, BB, HAS_LEN)
    return i_b, o_b, o_h, m_b, o_h < H, o_h < P, b_len, tl.max(b_len, axis=0)


@triton.jit
def _time(s, b_len, REVERSE: tl.constexpr):
    """Time index `[BB]` processed at step `s`: each reversed sequence starts at its own last step."""
    if REVERSE:
        return tl.where(s < b_len, b_len - 1 - s, s)
    return b_len * 0 + s


@triton.jit
def _keep(p_k, k, r, o, m, KEEP_T: tl.constexpr):
    """Zoneout's keep weights `[BB, BH]`: the masks at row offsets `r [BB]` and units `o [BH]`, or the constant `k`."""
    if KEEP_T:
        return tl.load(p_k + r[:, None] + o[None, :], mask=m, other=0.0).to(tl.float32)
    return tl.zeros(m.shape, tl.float32) + k


@triton.jit
def _resets(p_zero, o_t, o_b, m_b, m_a, B):
    """`[BB]` rows whose step at time `o_t` starts from a zero state (none among rows past `B` or inactive)."""
    return tl.load(p_zero + o_t * B + o_b, mask=m_b & m_a, other=0) != 0


@triton.heuristics(
    {
        "HAS_LEN": lambda a: a["p_len"] is not None,
        "HAS_BIAS": lambda a: a["p_bhh"] is not None,
        "PROJ": lambda a: a["p_whr"] is not None,
        "RESETS": lambda a: a["p_zero"] is not None,
        "ZONEOUT": lambda a: a["p_kh"] is not None or a["kh"] != 0.0,
        "KEEP_T": lambda a: a["p_kh"] is not None,
    }
)
@triton.jit(do_not_specialize=["T"])
def fwd_kernel(
    p_gx,
    p_whh,
    p_bhh,
    p_h0,
    p_c0,
    p_len,
    p_whr,
    p_zero,
    p_kh,
    p_kc,
    p_y,
    p_hT,
    p_cT,
    p_saved,
    p_hbuf,
    p_rbuf,
    p_sync,
    T,
    B,
    H,
    P,
    kh,
    kc,
    i_b0,
    CELL: tl.constexpr,
    G: tl.constexpr,
    SW: tl.constexpr,
    NS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    REVERSE: tl.constexpr,
    SAVE: tl.constexpr,
    BB: tl.constexpr,
    BH: tl.constexpr,
    BK: tl.constexpr,
    NH: tl.constexpr,
    SPLIT: tl.constexpr,
    HAS_LEN: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PROJ: tl.constexpr,
    RESETS: tl.constexpr,
    ZONEOUT: tl.constexpr,
    KEEP_T: tl.constexpr,
):
    """Forward time loop; see the module docstring. `saved` row layout per step as in `reference.saved_shape`, with
    the carried `c` after it for LSTM with zoneout. At time order: `p_zero [T, B]` uint8 (resets), `p_kh [T, B, P]`,
    `p_kc [T, B, H]` zoneout's masks; or `kh`, `kc` its constant weights (0: off)."""
    i_b, o_b, o_h, m_b, m_h, m_p, b_len, T_blk = _block(p_len, i_b0, T, B, H, P, BB, BH, HAS_LEN)  # [BB], [BH]
    m_bh = m_b[:, None] & m_h[None, :]  # [BB, BH]
    m_bp = m_b[:, None] & m_p[None, :]
    GH = G * H
    p_sync = p_sync + i_b

    b_bias0 = _bias(p_bhh, o_h, m_h, HAS_BIAS)  # [BH]
    b_bias1 = b_bias0 * 0.0
    b_bias2 = b_bias0 * 0.0
    b_bias3 = b_bias0 * 0.0
    if G > 1:
        b_bias1 = _bias(p_bhh, H + o_h, m_h, HAS_BIAS)
        b_bias2 = _bias(p_bhh, 2 * H + o_h, m_h, HAS_BIAS)
    if G > 3:
        b_bias3 = _bias(p_bhh, 3 * H + o_h, m_h, HAS_BIAS)
    b_h = tl.load(p_h0 + o_b[:, None] * P + o_h[None, :], mask=m_bp, other=0.0).to(tl.float32)  # [BB, BH]
    b_c = tl.zeros([BB, BH], tl.float32)
    if CELL == LSTM:
        b_c = tl.load(p_c0 + o_b[:, None] * H + o_h[None, :], mask=m_bh, other=0.0).to(tl.float32)
    tl.store(p_hbuf + o_b[:, None] * P + o_h[None, :], b_h.to(p_hbuf.dtype.element_ty), mask=m_bp)
    _sync(p_sync, 1, NH, SPLIT)

    for s in range(0, T_blk):
        o_t = _time(s, b_len, REVERSE)  # [BB]
        m_a = s < b_len  # [BB] rows active at this step
        m_ah = m_a[:, None] & m_h[None, :]
        m_x = m_b  # [BB] rows whose h enters the recurrent product
        if RESETS:
            m_z = _resets(p_zero, o_t, o_b, m_b, m_a, B)
            m_x = m_b & ~m_z
            b_h = tl.where(m_z[:, None], 0.0, b_h)  # the state the step starts from
            if CELL == LSTM:
                b_c = tl.where(m_z[:, None], 0.0, b_c)
        r_x = (o_t * B + o_b) * GH  # [BB]
        r_cur = ((s % 2) * B + o_b) * P
        r_nxt = (((s + 1) % 2) * B + o_b) * P
        a0 = tl.zeros([BB, BH], tl.float32) + b_bias0[None, :]  # [BB, BH] gh of gate 0
        a1 = tl.zeros([BB, BH], tl.float32) + b_bias1[None, :]
        a2 = tl.zeros([BB, BH], tl.float32) + b_bias2[None, :]
        a3 = tl.zeros([BB, BH], tl.float32) + b_bias3[None, :]
        for k in range(0, P, BK):
            o_k = k + tl.arange(0, BK)  # [BK]
            m_k = o_k < P
            p_x = p_hbuf + r_cur[:, None] + o_k[None, :]
            b_x = tl.load(p_x, mask=m_x[:, None] & m_k[None, :], other=0.0, cache_modifier=".cg")  # [BB, BK]
            a0 = _mma(a0, b_x, p_whh, o_h, m_h, o_k, m_k, P, 1, UPCAST, PRECISION)
            if G > 1:
                a1 = _mma(a1, b_x, p_whh, H + o_h, m_h, o_k, m_k, P, 1, UPCAST, PRECISION)
                a2 = _mma(a2, b_x, p_whh, 2 * H + o_h, m_h, o_k, m_k, P, 1, UPCAST, PRECISION)
            if G > 3:
                a3 = _mma(a3, b_x, p_whh, 3 * H + o_h, m_h, o_k, m_k, P, 1, UPCAST, PRECISION)
        p_g = p_gx + r_x[:, None] + o_h[None, :]
        x0 = tl.load(p_g, mask=m_ah, other=0.0).to(tl.float32)  # [BB, BH]
        p_s = p_saved + (s * B + o_b)[:, None] * (SW * H) + o_h[None, :]
        if CELL == RNN_TANH:
            h_new = _tanh(x0 + a0)
            if SAVE:
                tl.store(p_s, h_new, mask=m_bh)
        elif CELL == RNN_RELU:
            h_new = tl.maximum(x0 + a0, 0.0)
            if SAVE:
                tl.store(p_s, h_new, mask=m_bh)
        elif CELL == LSTM:
            i = _sigmoid(x0 + a0)
            f = _sigmoid(tl.load(p_g + H, mask=m_ah, other=0.0).to(tl.float32) + a1)
            g = _tanh(tl.load(p_g + 2 * H, mask=m_ah, other=0.0).to(tl.float32) + a2)
            o = _sigmoid(tl.load(p_g + 3 * H, mask=m_ah, other=0.0).to(tl.float32) + a3)
            c_new = f * b_c + i * g
            h_new = o * _tanh(c_new)
            c_t = c_new
            if ZONEOUT:
                k_c = _keep(p_kc, kc, (o_t * B + o_b) * H, o_h, m_ah, KEEP_T)
                c_t = k_c * b_c + (1.0 - k_c) * c_new
            b_c = tl.where(m_a[:, None], c_t, b_c)
            if SAVE:
                tl.store(p_s, i, mask=m_bh)
                tl.store(p_s + H, f, mask=m_bh)
                tl.store(p_s + 2 * H, g, mask=m_bh)
                tl.store(p_s + 3 * H, o, mask=m_bh)
                tl.store(p_s + 4 * H, c_new, mask=m_bh)
                if ZONEOUT:
                    tl.store(p_s + 5 * H, c_t, mask=m_bh)
        else:
            r = _sigmoid(x0 + a0)
            z = _sigmoid(tl.load(p_g + H, mask=m_ah, other=0.0).to(tl.float32) + a1)
            n = _tanh(tl.load(p_g + 2 * H, mask=m_ah, other=0.0).to(tl.float32) + r * a2)
            h_new = (1.0 - z) * n + z * b_h
            if SAVE:
                tl.store(p_s, r, mask=m_bh)
                tl.store(p_s + H, z, mask=m_bh)
                tl.store(p_s + 2 * H, n, mask=m_bh)
                tl.store(p_s + 3 * H, a2, mask=m_bh)
                tl.store(p_s + 4 * H, b_h, mask=m_bh)
        if PROJ:
            tl.store(p_rbuf + o_b[:, None] * H + o_h[None, :], h_new.to(p_rbuf.dtype.element_ty), mask=m_bh)
            _sync(p_sync, 2 + NS * s, NH, SPLIT)
            h_new = tl.zeros([BB, BH], tl.float32)
            h_new = _rows_mma(h_new, p_rbuf, o_b * H, m_b, H, p_whr, o_h, m_p, H, 1, BK, UPCAST, PRECISION)
        if ZONEOUT:
            k_h = _keep(p_kh, kh, (o_t * B + o_b) * P, o_h, m_a[:, None] & m_p[None, :], KEEP_T)
            h_new = k_h * b_h + (1.0 - k_h) * h_new
        b_h = tl.where(m_a[:, None], h_new, b_h)
        p_o = p_y + (o_t * B + o_b)[:, None] * P + o_h[None, :]
        tl.store(p_o, tl.where(m_a[:, None], h_new, 0.0).to(p_y.dtype.element_ty), mask=m_bp)
        tl.store(p_hbuf + r_nxt[:, None] + o_h[None, :], b_h.to(p_hbuf.dtype.element_ty), mask=m_bp)
        _sync(p_sync, 1 + NS * (s + 1), NH, SPLIT)

    for s in range(T_blk, T):
        p_o = p_y + (s * B + o_b)[:, None] * P + o_h[None, :]
        tl.store(p_o, tl.zeros([BB, BH], p_y.dtype.element_ty), mask=m_bp)
    tl.store(p_hT + o_b[:, None] * P + o_h[None, :], b_h.to(p_hT.dtype.element_ty), mask=m_bp)
    if CELL == LSTM:
        tl.store(p_cT + o_b[:, None] * H + o_h[None, :], b_c.to(p_cT.dtype.element_ty), mask=m_bh)


@triton.heuristics(
    {
        "HAS_LEN": lambda a: a["p_len"] is not None,
        "PROJ": lambda a: a["p_whr"] is not None,
        "RESETS": lambda a: a["p_zero"] is not None,
        "ZONEOUT": lambda a: a["p_kh"] is not None or a["kh"] != 0.0,
        "KEEP_T": lambda a: a["p_kh"] is not None,
    }
)
@triton.jit(do_not_specialize=["T"])
def bwd_kernel(
    p_dy,
    p_dhT,
    p_dcT,
    p_whh,
    p_whr,
    p_c0,
    p_len,
    p_zero,
    p_kh,
    p_kc,
    p_saved,
    p_dgx,
    p_dgh,
    p_dh0,
    p_dc0,
    p_dhs,
    p_dbuf,
    p_pbuf,
    p_sync,
    T,
    B,
    H,
    P,
    kh,
    kc,
    i_b0,
    CELL: tl.constexpr,
    G: tl.constexpr,
    SW: tl.constexpr,
    NS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    REVERSE: tl.constexpr,
    BB: tl.constexpr,
    BH: tl.constexpr,
    BK: tl.constexpr,
    NH: tl.constexpr,
    SPLIT: tl.constexpr,
    HAS_LEN: tl.constexpr,
    PROJ: tl.constexpr,
    RESETS: tl.constexpr,
    ZONEOUT: tl.constexpr,
    KEEP_T: tl.constexpr,
):
    """Reverse-time loop of `fwd_kernel`: `dgx`, `dgh` (GRU only) at time order, `dh0`, `dc0`, and (projection)
    every step's `dh` of the projected `h~` into `p_dhs [T, B, P]` fp32 at processing order for the caller's `dw_hr`
    GEMM. The options' arguments as `fwd_kernel`'s."""
    i_b, o_b, o_h, m_b, m_h, m_p, b_len, T_blk = _block(p_len, i_b0, T, B, H, P, BB, BH, HAS_LEN)  # [BB], [BH]
    m_bh = m_b[:, None] & m_h[None, :]  # [BB, BH]
    m_bp = m_b[:, None] & m_p[None, :]
    GH = G * H
    p_sync = p_sync + i_b

    b_dh = tl.load(p_dhT + o_b[:, None] * P + o_h[None, :], mask=m_bp, other=0.0).to(tl.float32)  # [BB, BH]
    b_dc = tl.zeros([BB, BH], tl.float32)
    b_c0 = tl.zeros([BB, BH], tl.float32)
    if CELL == LSTM:
        b_dc = tl.load(p_dcT + o_b[:, None] * H + o_h[None, :], mask=m_bh, other=0.0).to(tl.float32)
        b_c0 = tl.load(p_c0 + o_b[:, None] * H + o_h[None, :], mask=m_bh, other=0.0).to(tl.float32)

    for j in range(0, T_blk):
        s = T_blk - 1 - j
        o_t = _time(s, b_len, REVERSE)  # [BB]
        m_a = s < b_len  # [BB]
        m_a2 = m_a[:, None]
        r_x = (o_t * B + o_b) * GH  # [BB]
        r_d = ((s % 2) * B + o_b) * GH
        p_o = p_dy + (o_t * B + o_b)[:, None] * P + o_h[None, :]
        b_dhs = b_dh + tl.load(p_o, mask=m_a2 & m_p[None, :], other=0.0).to(tl.float32)  # [BB, BH] dh of step s
        b_dcell = b_dhs  # the share of the cell's h~
        if ZONEOUT:
            k_h = _keep(p_kh, kh, (o_t * B + o_b) * P, o_h, m_a2 & m_p[None, :], KEEP_T)
            b_dcell = (1.0 - k_h) * b_dhs
        if RESETS:
            m_z = _resets(p_zero, o_t, o_b, m_b, m_a, B)[:, None]  # [BB, 1]
        b_dr = b_dcell
        if PROJ:
            tl.store(p_pbuf + o_b[:, None] * P + o_h[None, :], b_dcell.to(p_pbuf.dtype.element_ty), mask=m_bp)
            p_d = p_dhs + (s * B + o_b)[:, None] * P + o_h[None, :]
            tl.store(p_d, tl.where(m_a2, b_dcell, 0.0), mask=m_bp)
            _sync(p_sync, 1 + NS * j, NH, SPLIT)
            b_dr = _rows_mma(
                tl.zeros([BB, BH], tl.float32), p_pbuf, o_b * P, m_b, P, p_whr, o_h, m_h, 1, H, BK, UPCAST, PRECISION
            )
        p_s = p_saved + (s * B + o_b)[:, None] * (SW * H) + o_h[None, :]
        m_sv = m_a2 & m_h[None, :]
        d1 = tl.zeros([BB, BH], tl.float32)
        d2 = tl.zeros([BB, BH], tl.float32)
        d3 = tl.zeros([BB, BH], tl.float32)
        if CELL == RNN_TANH:
            h = tl.load(p_s, mask=m_sv, other=0.0)
            d0 = b_dr * (1.0 - h * h)
            x2 = d2
        elif CELL == RNN_RELU:
            h = tl.load(p_s, mask=m_sv, other=0.0)
            d0 = tl.where(h <= 0, 0.0, b_dr)
            x2 = d2
        elif CELL == LSTM:
            i = tl.load(p_s, mask=m_sv, other=0.0)
            f = tl.load(p_s + H, mask=m_sv, other=0.0)
            g = tl.load(p_s + 2 * H, mask=m_sv, other=0.0)
            o = tl.load(p_s + 3 * H, mask=m_sv, other=0.0)
            c = tl.load(p_s + 4 * H, mask=m_sv, other=0.0)
            p_cp = p_s + (SW - 1) * H - B * (SW * H)  # the carried c, the last slot, of the step before
            m_0 = (b_len * 0 + s == 0)[:, None]  # [BB, 1] first step: c_prev is c0
            c_prev = tl.where(m_0, b_c0, tl.load(p_cp, mask=m_sv & ~m_0, other=0.0))
            if RESETS:
                c_prev = tl.where(m_z, 0.0, c_prev)
            tanh_c = _tanh(c)
            b_dct = b_dc
            if ZONEOUT:
                k_c = _keep(p_kc, kc, (o_t * B + o_b) * H, o_h, m_sv, KEEP_T)
                b_dct = (1.0 - k_c) * b_dc
            dc = b_dct + b_dr * o * (1.0 - tanh_c * tanh_c)
            d0 = dc * g * i * (1.0 - i)
            d1 = dc * c_prev * f * (1.0 - f)
            d2 = dc * i * (1.0 - g * g)
            d3 = b_dr * tanh_c * o * (1.0 - o)
            x2 = d2
            dc_prev = dc * f
            if ZONEOUT:
                dc_prev += k_c * b_dc
            if RESETS:
                dc_prev = tl.where(m_z, 0.0, dc_prev)
            b_dc = tl.where(m_a2, dc_prev, b_dc)
        else:
            r = tl.load(p_s, mask=m_sv, other=0.0)
            z = tl.load(p_s + H, mask=m_sv, other=0.0)
            n = tl.load(p_s + 2 * H, mask=m_sv, other=0.0)
            hn = tl.load(p_s + 3 * H, mask=m_sv, other=0.0)
            h_prev = tl.load(p_s + 4 * H, mask=m_sv, other=0.0)
            x2 = b_dr * (1.0 - z) * (1.0 - n * n)
            d0 = x2 * hn * r * (1.0 - r)
            d1 = b_dr * (h_prev - n) * z * (1.0 - z)
            d2 = x2 * r
        d0 = tl.where(m_a2, d0, 0.0)
        d1 = tl.where(m_a2, d1, 0.0)
        d2 = tl.where(m_a2, d2, 0.0)
        d3 = tl.where(m_a2, d3, 0.0)
        x2 = tl.where(m_a2, x2, 0.0)
        p_gx = p_dgx + r_x[:, None] + o_h[None, :]
        p_db = p_dbuf + r_d[:, None] + o_h[None, :]
        tl.store(p_gx, d0.to(p_dgx.dtype.element_ty), mask=m_bh)
        tl.store(p_db, d0.to(p_dbuf.dtype.element_ty), mask=m_bh)
        if G > 1:
            tl.store(p_gx + H, d1.to(p_dgx.dtype.element_ty), mask=m_bh)
            tl.store(p_db + H, d1.to(p_dbuf.dtype.element_ty), mask=m_bh)
            tl.store(p_gx + 2 * H, x2.to(p_dgx.dtype.element_ty), mask=m_bh)
            tl.store(p_db + 2 * H, d2.to(p_dbuf.dtype.element_ty), mask=m_bh)
        if G > 3:
            tl.store(p_gx + 3 * H, d3.to(p_dgx.dtype.element_ty), mask=m_bh)
            tl.store(p_db + 3 * H, d3.to(p_dbuf.dtype.element_ty), mask=m_bh)
        if CELL == GRU:
            # GRU's dgh differs from dgx in the n gate; the other cells have no dgh (it is dgx)
            p_gh = p_dgh + r_x[:, None] + o_h[None, :]
            tl.store(p_gh, d0.to(p_dgh.dtype.element_ty), mask=m_bh)
            tl.store(p_gh + H, d1.to(p_dgh.dtype.element_ty), mask=m_bh)
            tl.store(p_gh + 2 * H, d2.to(p_dgh.dtype.element_ty), mask=m_bh)
        _sync(p_sync, NS * (j + 1), NH, SPLIT)
        b_acc = tl.zeros([BB, BH], tl.float32)  # [BB, BH] dgh @ w_hh for this program's range of P
        if CELL == GRU:
            b_acc = b_dcell * z
        b_acc = _rows_mma(b_acc, p_dbuf, r_d, m_b, GH, p_whh, o_h, m_p, 1, P, BK, UPCAST, PRECISION)
        if ZONEOUT:
            b_acc += k_h * b_dhs  # h_t = k h_in + (1 - k) h~_t: k dh straight back
        if RESETS:
            b_acc = tl.where(m_z, 0.0, b_acc)
        b_dh = tl.where(m_a2, b_acc, b_dhs)

    for s in range(T_blk, T):
        p_gx = p_dgx + (s * B + o_b)[:, None] * GH + o_h[None, :]
        for q in range(G):
            tl.store(p_gx + q * H, tl.zeros([BB, BH], p_dgx.dtype.element_ty), mask=m_bh)
            if CELL == GRU:
                p_gh = p_dgh + (s * B + o_b)[:, None] * GH + o_h[None, :]
                tl.store(p_gh + q * H, tl.zeros([BB, BH], p_dgh.dtype.element_ty), mask=m_bh)
        if PROJ:
            tl.store(p_dhs + (s * B + o_b)[:, None] * P + o_h[None, :], tl.zeros([BB, BH], tl.float32), mask=m_bp)
    tl.store(p_dh0 + o_b[:, None] * P + o_h[None, :], b_dh.to(p_dh0.dtype.element_ty), mask=m_bp)
    if CELL == LSTM:
        tl.store(p_dc0 + o_b[:, None] * H + o_h[None, :], b_dc.to(p_dc0.dtype.element_ty), mask=m_bh)
