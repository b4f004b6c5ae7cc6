"""The C++ CPU backend: a thin adapter over `seqfast._C` on the contract of `seqfast.kernels.reference`.

The extension converts the inputs, allocates the outputs (NaN-poisoned while `common.poisoning()`, as
`common.empty` does) and fills them. The loops compute in the contract's compute dtype: float64 for float64 inputs,
float32 for float32, float16 and bfloat16 ones (16-bit `gx`, `dy` and the states are converted on the way in, `y`,
`dgx`, `dgh` and the final states back to their dtypes on the way out). `saved` holds, per step and hidden unit,
LSTM `i, f, g, o, c` or GRU `r, z, n, W_hn h + b_hn` (RNN saves nothing: `h` is `y`, read in `y`'s dtype), rows in
the extension's length-sorted order; with `layer_norm` each row then holds the normalised product `[G*H]` and its
1 / std (LSTM also the mean and 1 / std of the new cell state).
"""

import time

import torch

from seqfast import dispatch, native

from .common import CELL_IDS, GATES, Projection, compute_dtype, hidden_size, poisoning, refusal

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


# The extension's plans (csrc/scheduler.h `Plan`) by name: its recurrent products on packed panels of its own GEMM or on
# BLAS, its steps split into blocks of rows or chunks of hidden units.
PLANS = {"packed-rows": 0, "blas-rows": 1, "packed-units": 2, "blas-units": 3}
# A call of fewer steps than this reads `w_hh` once a step, with nothing kept in L2 from one step to the next (as
# csrc/hidden_product.h's `kPackMinSteps`): there wider chunks than `_chunk`'s (of `_SHORT_CHUNK` units, or a half or
# a quarter of the hidden units) may stream the weights faster (Xeon model 167, 2 threads, T = 1, B = 16: LSTM(1024)
# 1.47 -> 0.92 ms at 256 units, GRU(512) 201 -> 139 us; alike below `_SHORT_MIN_HIDDEN` units), which the first call
# of a shape class times (`_short_chunk`).
_SHORT_STEPS = 4
_SHORT_CHUNK = 256
_SHORT_MIN_HIDDEN = 384
# A plan's calibration runs at most this many steps of the call, enough for packing to be repaid as in a long call (at
# 8, the plans picked for `LSTM(200)` B20 ran its 35 steps 10-50% slower than the fastest), in `_PLAN_TURNS` turns of
# a block of runs of each plan (about `_PLAN_BLOCK_S`) after one untimed run, each turn starting one plan further on
# (for `LSTM(200)` B20 on a shared VM, whose speed drifts, three turns in one order picked a forward plan 17-22% slower
# than the fastest in 2 of 30 calibrations, and a slower backward plan in 3; five rotated turns neither in 30).
_PLAN_STEPS = 32
_PLAN_TURNS = 5
_PLAN_BLOCK_S = 5e-4
# (cell, dtype, T, B, w_hh's shape, unprojected, SEQFAST_CPP_PLAN) -> (chunk, fwd plan, bwd plan)
_tunings = {}


def _tuning(cell, dtype, T, w_hh, B, w_hr):
    """`(chunk, fwd plan, bwd plan)` of a call: see `_chunk` and `_plans`."""
    setting = dispatch.env("SEQFAST_CPP_PLAN")
    key = (cell, dtype, T, B, w_hh.shape, w_hr is None, setting)
    tuning = _tunings.get(key)
    if tuning is None:
        P = w_hh.shape[1]
        chunk = _chunk(cell, w_hh, B)
        if T < _SHORT_STEPS and w_hr is None and not setting:
            chunk = _short_chunk(cell, compute_dtype(dtype), T, B, hidden_size(cell, w_hh), chunk)
        plans = _plans(cell, compute_dtype(dtype), T, B, w_hh.shape[0], P, w_hr is not None, setting, chunk)
        tuning = _tunings[key] = (chunk, *plans)
    return tuning


def _short_chunk(cell, dtype, T, B, H, chunk):
    """The chunk of a call of fewer than `_SHORT_STEPS` steps: `chunk` (`_chunk`'s), or a wider one (a half or a
    quarter of the hidden units, or 256) where the first call of the shape class timed it faster (`_time_chunks`;
    kept with the other calibrations, see `seqfast.native.calibrated`). A function of the shape and this machine only,
    never of the thread count."""
    if B < 2 or H < _SHORT_MIN_HIDDEN:
        return chunk
    wider = {-(-H // (16 * parts)) * 16 for parts in (2, 4)} | {_SHORT_CHUNK}
    chunks = [chunk, *sorted(c for c in wider if chunk < c < H)]
    key = f"cpp-chunk-{cell}-{str(dtype).removeprefix('torch.')}-H{H}-B{native.bucket(B)}-T{T}"
    return native.calibrated(key, lambda: _time_chunks(cell, dtype, T, B, H, chunks))


def _time_chunks(cell, dtype, T, B, H, chunks):
    """The fastest of `chunks` for a forward and its backward of `T` steps of `B` rows split by hidden units, on
    made-up tensors (see `_short_chunk`)."""
    forward, backward = _made_up(cell, dtype, T, B, H, H, False)
    units = PLANS["packed-units"]

    def run(chunk):
        y, _, _, saved = forward(chunk, units)
        backward(chunk, units, y, saved)

    return _fastest(run, chunks)


def _plans(cell, dtype, T, B, GH, P, proj, setting, chunk):
    """The plans of a call's forward and backward loops (`PLANS`' values): both `setting`'s (`SEQFAST_CPP_PLAN`, one
    of `PLANS`' names) when given; else this machine's fastest for the shape class, which the first call of the
    class times on made-up tensors of its sizes (at most `_PLAN_STEPS` steps; with the call's `chunk` of hidden
    units; kept with the other calibrations, see `seqfast.native.calibrated`), unless every plan runs it alike. The
    plans do not depend on the thread count (the first call times them with its own), so that neither do the
    results."""
    if setting:
        if setting not in PLANS:
            raise ValueError(f"SEQFAST_CPP_PLAN must be one of {', '.join(PLANS)}, got {setting!r}")
        return PLANS[setting], PLANS[setting]
    steps = min(T, _PLAN_STEPS)
    bits = [_C.plan_bits(steps, B, GH, P, dtype == torch.float32, proj, backward) for backward in (False, True)]
    choices = [[plan for plan in PLANS.values() if not plan & ~b] for b in bits]
    if all(len(c) == 1 for c in choices):
        return 0, 0
    H = GH // GATES[cell]
    key = f"cpp-plans-{cell}-{str(dtype).removeprefix('torch.')}-H{H}-P{P if proj else 0}-B{native.bucket(B)}"
    key += f"-T{native.bucket(steps)}" + (f"-C{chunk}" if steps < _SHORT_STEPS else "")
    return tuple(native.calibrated(key, lambda: _time_plans(cell, dtype, steps, B, H, P, proj, chunk, *choices)))


def _time_plans(cell, dtype, T, B, H, P, proj, chunk, fwd_choices, bwd_choices):
    """`[fwd plan, bwd plan]`: the fastest of each list on made-up tensors of a call's sizes and `chunk`, by each
    plan's best turn (see `_plans`)."""
    forward, backward = _made_up(cell, dtype, T, B, H, P, proj)
    y, _, _, saved = forward(chunk, 0)
    runs = (lambda plan: forward(chunk, plan), lambda plan: backward(chunk, plan, y, saved))
    return [_fastest(run, plans) for run, plans in zip(runs, (fwd_choices, bwd_choices), strict=True)]


def _made_up(cell, dtype, T, B, H, P, proj):
    """`forward(chunk, plan)` and `backward(chunk, plan, y, saved)`: the extension's loops of `T` steps of `B` rows on
    made-up tensors of a call's sizes (projected to `P` when `proj`), for the calibrations to time."""
    G, lstm = GATES[cell], cell == "lstm"
    make = torch.Generator().manual_seed(0)

    def tensor(*shape, scale=1.0):
        return torch.randn(shape, generator=make, dtype=dtype).mul_(scale)

    gx, dy = tensor(T, B, G * H), tensor(T, B, P)
    w_hh, b_hh, h0, dh = tensor(G * H, P, scale=P**-0.5), tensor(G * H), tensor(B, P), tensor(B, P)
    c0, dc = (tensor(B, H), tensor(B, H)) if lstm else (None, None)
    w_hr = tensor(P, H, scale=H**-0.5) if proj else None
    cell_id, options = CELL_IDS[cell], (None,) * 3 + (0.0,) + (None,) * 3

    def forward(chunk, plan):
        return _C.fwd(
            cell_id, gx, *(None,) * 3, w_hh, b_hh, h0, c0, None, w_hr, False, True, chunk, plan, False, *options
        )

    def backward(chunk, plan, y, saved):
        _C.bwd(cell_id, dy, dh, dc, w_hh, w_hr, h0, c0, None, y, saved, False, chunk, plan, False, True, *options)

    return forward, backward


def _fastest(run, plans):
    """The plan of `plans` whose best turn of `run(plan)` took the least time (the first of equals; see
    `_PLAN_TURNS`)."""
    if len(plans) == 1:
        return plans[0]

    def timed(plan, block):
        start = time.perf_counter()
        for _ in range(block):
            run(plan)
        return (time.perf_counter() - start) / block

    block = max(1, int(_PLAN_BLOCK_S / max(min(timed(plan, 1) for plan in plans), 1e-9)))
    best = {plan: float("inf") for plan in plans}
    for turn in range(_PLAN_TURNS):
        for i in range(len(plans)):
            plan = plans[(turn + i) % len(plans)]
            best[plan] = min(best[plan], timed(plan, block))
    return min(plans, key=best.__getitem__)


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
    projection = (None,) * 3
    steps = gx.x if isinstance(gx, Projection) else gx
    chunk, plan, _ = _tuning(cell, steps.dtype, steps.shape[0], w_hh, h0.shape[0], w_hr)
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
        chunk,
        plan,
        poisoning(),
        *_fused(ext),
    )


def _fused(ext):
    """`(zero, keep_h, keep_c, keep, ln_hh, ln_c_weight, ln_c_bias)` of `ext` (None: no options)."""
    if ext is None:
        return None, None, None, 0.0, None, None, None
    return *ext.fused(), *ext.gains()


def stack(cell, x, h0, c0, weights, bidirectional, lengths=None):
    """A stack's forward without grad in one call: what `fwd` gives layer by layer from `Projection`s of each layer's
    input; `x`, `h0`, `c0`, `weights` (`(w_ih, w_hh, b_ih, b_hh, w_hr)` per layer-direction) and `lengths` (`[B]` int64
    on the CPU, or None, default) as in `seqfast.functional.rnn`.

    Returns:
        `y [T, B, D*P]`, `hn [L*D, B, P]`, `cn [L*D, B, H]` or None.
    """
    chunk, plan, _ = _tuning(cell, x.dtype, x.shape[0], weights[0][1], h0.shape[1], weights[0][4])
    flat = [t for w in weights for t in w]
    return _C.stack(
        CELL_IDS[cell], x, h0, c0 if cell == "lstm" else None, flat, bidirectional, lengths, chunk, plan, poisoning()
    )


def step(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh):
    """`stack` of one layer over one step: `x [B, I]`, `h0 [B, H]`, `c0 [B, H]` or None.

    Returns:
        `(h [B, H], c [B, H] or None)`.
    """
    chunk, plan, _ = _tuning(cell, x.dtype, 1, w_hh, h0.shape[0], None)
    c0 = c0 if cell == "lstm" else None
    return _C.step(CELL_IDS[cell], x, h0, c0, w_ih, w_hh, b_ih, b_hh, chunk, plan, poisoning())


def layer(cell, reverse, x, w_ih, b_ih, w_hh, b_hh, h0, c0, w_hr, copy_y=False, zero=None, lengths=None):
    """One layer-direction with grad, input projection included, as one autograd node of the extension: bitwise the
    outputs and gradients of `seqfast.autograd.Layer` on this backend, for a call whose products are all plain GEMMs
    (`seqfast.linear.plain`). Arguments as `seqfast.functional.layer`'s; `x` may also be a cell's step, `[B, I]`, taken
    as `T = 1`; `copy_y`: return a copy of `y`, which the node keeps for its backward, so that the caller may change it
    in place (default False); `zero`: resets' `[T, B]` as `common.Extensions` has them, or None (default); `lengths`:
    `[B]` int64 on the CPU, or None (default), not with `zero`.

    Returns:
        `y [T, B, P]`, `hT [B, P]`, `cT [B, H]` or None.
    """
    T, c0 = x.shape[0] if x.dim() == 3 else 1, c0 if cell == "lstm" else None
    chunk, fwd_plan, bwd_plan = _tuning(cell, x.dtype, T, w_hh, h0.shape[0], w_hr)
    settings = (chunk, fwd_plan, bwd_plan, poisoning(), copy_y)
    return _C.layer(CELL_IDS[cell], reverse, x, w_ih, b_ih, w_hh, b_hh, h0, c0, w_hr, zero, lengths, *settings)


def bwd(cell, dy, dhT, dcT, w_hh, b_hh, w_hr, h0, c0, lengths, y, saved, reverse=False, ext=None):
    """Backward of `fwd` from its `saved`; see `seqfast.kernels.reference` for shapes.

    Returns:
        `dgx`, `dgh` (`[T, B, G*H]`, dtype of `dy`; `dgh` None unless GRU or `layer_norm`), `dh0 [B, P]`,
        `dc0 [B, H]` or None, `dw_hr [P, H]` or None; with `layer_norm` a sixth, `(db_hh, d_ln_hh, d_ln_c_weight,
        d_ln_c_bias)` in `saved`'s dtype (`db_hh` None without `b_hh`, the last two None unless LSTM).
    """
    lstm = cell == "lstm"
    chunk, _, plan = _tuning(cell, saved.dtype, dy.shape[0], w_hh, dy.shape[1], w_hr)
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
        chunk,
        plan,
        poisoning(),
        True,  # need_dh0: the contract's bwd always returns dh0 (only the extension's own node skips it)
        *_fused(ext),
    )
    if not out[5]:
        return out[:5]
    db_hh, d_ln_hh, *d_ln_c = out[5] if lstm else (*out[5], None, None)
    return *out[:5], (None if b_hh is None else db_hh, d_ln_hh, *d_ln_c)
