"""@njit time loops of the numba backend: one forward and one backward loop for every cell, made per cell
(`cell_loops`), with the cell math in small @njit functions (`_lstm_gates`, `_gru_grads`, ...).

Shapes as in `seqfast.kernels.reference`; `s` is the processing step, `t` the time step it reads and writes (`lens[b] -
1 - s` when reversed). Steps at or past `lens[b]` keep the state and write zeros. `saved` is kept in processing order
(zeros past a sequence's length) with what `y` cannot give: nothing for RNN, whose `h` is `y`; GRU's `h_prev` is `y` at
the step before, or `h0`. State buffers (`h`, `c`, `dh`, `dc`) come in holding the initial value and leave holding the
final one. Each phase splits hidden units (or state columns) into `nc` contiguous chunks; a chunk does both the
recurrent product for its rows of the weights and the pointwise math for its units. With `by_rows` (a runtime argument)
a chunk is instead a block of batch rows, every unit: its rows' product, on weights packed as one run of panels over all
the gates' rows (each chunk packing a share; one chunk's product likewise), and their pointwise math (`row_block`). A
loop is a serial function that every thread runs whole with its own `tid`: each phase of a step (one per step, two with
a projection or layer_norm) is `nc` chunks that threads claim with a compare-and-swap, own chunk first, and a claimed
chunk starts once every chunk of the earlier phases is done (`sync`); `tid` 0 returns once the last is. A thread that
never runs only leaves its chunks to the others, so the loop cannot deadlock however many threads run it. `launch` runs
a loop on numba's threads through its compiled entry point and one parallel function compiled once, so neither the loop
nor a parallel region compiles per loop. A loop compiles on its cell's first call per dtype, with the cell's gate count
(and LSTM's projection, and which of the `resets`, `zoneout` and `layer_norm` options run) a constant of its closure, so
it holds only that cell's math and those options' code (`layer_norm`, which normalises whole rows of the recurrent
product, splits each step in two phases: the product by chunks of units (or by blocks of rows), then the rows'
normalisation and cell math by groups of rows, one per chunk index; its backward likewise, the rows' cell math first,
then the product by chunks of columns); `rev`, RNN's `relu` (both RNN cells share a loop) and `nc` are runtime
arguments. Every cell's loop takes the same arguments (empty arrays for what the cell does not use); `work` holds its
scratch (`fwd_work`, `bwd_work`).
"""

import functools
import math
import platform

import numba
import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from seqfast.kernels.common import GATES, LN_EPS

# error_model="numpy": no ZeroDivisionError branch around each division, which would keep the cell math scalar
_OPTS = {"cache": True, "nogil": True, "fastmath": {"reassoc", "contract"}, "error_model": "numpy"}
# the cell math and row helpers, inlined into the loops before typing: a call of its own took ~200 ns a row (its row
# views' reference counts), as much as the math of 32 LSTM units
_INLINE = {**_OPTS, "inline": "always"}


def _parallel():
    """Options for `njit(parallel=...)`: explicit `prange` loops only, array expressions stay serial. A fresh dict each
    time, as numba consumes it."""
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
_ONE32, _SATURATED = np.float32(1.0), np.float32(9.0)
# `sync [LINE * (nc + 1)]` int64: chunks done at 0, phases claimed of chunk `q` at `LINE * (q + 1)`, a cache line apart
LINE = 8
# rows of the batch between the one the pointwise math is on and the one whose lines it prefetches
AHEAD = 2
# pause-spins before a waiting thread starts yielding its core (another process may hold the thread it waits on)
_SPINS = 1 << 12
_PAUSE = "llvm.x86.sse2.pause" if platform.machine().lower() in ("x86_64", "amd64") else None


def tanh(x):
    """`tanh(x)` in the precision of `x`."""
    return math.tanh(x)


def sigmoid(x):
    """`1 / (1 + exp(-x))` in the precision of `x`."""
    return 1.0 / (1.0 + math.exp(-x))


# Cephes' expf and tanhf, about 2 ulp as the cpp backend's, and vectorising: float32's sigmoid, and its tanh where the
# cell math asks for `precise` (not None), as layer_norm's division by each row's spread magnifies the Eigen fit's few
# ulp. No reassociation here: it would fold the two-part reduction by ln 2 into one.
_EXACT_OPTS = {**_OPTS, "fastmath": {"contract"}}
_LOG2E = np.float32(1.44269504088896341)
_LN2_HI, _LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)
# exp's argument range whose `2**n` stays a normal float32 (n in [-126, 127]); 0 below it and +inf above, as IEEE's
_EXP_LO, _EXP_HI = np.float32(-87.3365448), np.float32(88.0296919)
_E5, _E4, _E3, _E2, _E1, _E0 = (
    np.float32(e) for e in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 0.5)
)
_T4, _T3, _T2, _T1, _T0 = (
    np.float32(t) for t in (-5.70498872745e-3, 2.06390887954e-2, -5.37397155531e-2, 1.33314422036e-1, -3.33332819422e-1)
)
_TANH_SMALL = np.float32(0.625)
_ZERO32, _INF32 = np.float32(0.0), np.float32(np.inf)


@intrinsic
def _pow2(typingctx, n):
    # `2**n` as float32 for an int32 `n` in [-126, 127], from its exponent bits
    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        bits = builder.shl(builder.add(args[0], ir.Constant(i32, 127)), ir.Constant(i32, 23))
        return builder.bitcast(bits, ir.FloatType())

    return types.float32(types.int32), codegen


@njit(**_EXACT_OPTS)
def _exp32(x0):
    x = max(_EXP_LO, min(_EXP_HI, x0))
    v = x * _LOG2E
    n = np.int32(v + _HALF32 if v >= 0 else v - _HALF32)
    fn = np.float32(n)
    r = (x - fn * _LN2_HI) - fn * _LN2_LO
    p = ((((_E5 * r + _E4) * r + _E3) * r + _E2) * r + _E1) * r + _E0
    e = (p * (r * r) + r + _ONE32) * _pow2(n)
    return _ZERO32 if x0 < _EXP_LO else (_INF32 if x0 > _EXP_HI else e)


@njit(**_EXACT_OPTS)
def _sigmoid32(x):
    s = _ONE32 / (_ONE32 + _exp32(-x))
    return s if x == x else x


@njit(**_EXACT_OPTS)
def _tanh32_precise(x):
    ax = abs(x)
    z = x * x
    small = x + x * z * ((((_T4 * z + _T3) * z + _T2) * z + _T1) * z + _T0)
    big = _ONE32 - np.float32(2.0) / (_exp32(ax + ax) + _ONE32)
    t = math.copysign(small if ax < _TANH_SMALL else big, x)
    return t if x == x else x


def tanh_precise(x):
    """`tanh(x)` within about 2 ulp of the precision of `x`."""
    return math.tanh(x)


@njit(**_OPTS)
def _tanh32(x0):
    x = max(-_CLAMP, min(_CLAMP, x0))
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
    # float32 tanh rounds to +-1 from |x| = 8.7 on, where the clamped fit stops 4 ulp short; NaN stays NaN
    return x * p / q if abs(x0) < _SATURATED else (math.copysign(_ONE32, x0) if x0 == x0 else x0)


@overload(tanh, jit_options=_OPTS)
def _tanh_impl(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        return lambda x: _tanh32(x)
    return lambda x: math.tanh(x)


@overload(sigmoid, jit_options=_OPTS)
def _sigmoid_impl(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        return lambda x: _sigmoid32(x)
    return lambda x: 1.0 / (1.0 + math.exp(-x))


@overload(tanh_precise, jit_options=_OPTS)
def _tanh_precise_impl(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        return lambda x: _tanh32_precise(x)
    return lambda x: math.tanh(x)


def _item(context, builder, aryty, ary, idx):
    # pointer to element `idx` of a 1-D array, for the atomics below
    return cgutils.get_item_pointer(context, builder, aryty, context.make_array(aryty)(context, builder, ary), [idx])


@intrinsic
def _fetch_add(typingctx, a, i, v):
    def codegen(context, builder, sig, args):
        return builder.atomic_rmw("add", _item(context, builder, sig.args[0], args[0], args[1]), args[2], "seq_cst")

    return types.int64(a, types.intp, types.int64), codegen


@intrinsic
def _load_acquire(typingctx, a, i):
    def codegen(context, builder, sig, args):
        return builder.load_atomic(_item(context, builder, sig.args[0], args[0], args[1]), "acquire", 8)

    return types.int64(a, types.intp), codegen


@intrinsic
def _cas(typingctx, a, i, old, new):
    def codegen(context, builder, sig, args):
        ptr = _item(context, builder, sig.args[0], args[0], args[1])
        return builder.extract_value(builder.cmpxchg(ptr, args[2], args[3], "seq_cst", "seq_cst"), 1)

    return types.boolean(a, types.intp, types.int64, types.int64), codegen


def _call_no_args(builder, name, ret):
    # an external function or LLVM intrinsic, resolved at load time, so the cached object code stays valid
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, []), name)
    builder.call(fn, [])


@intrinsic
def _pause(typingctx):
    def codegen(context, builder, sig, args):
        if _PAUSE:
            _call_no_args(builder, _PAUSE, ir.VoidType())
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def _yield(typingctx):
    def codegen(context, builder, sig, args):
        _call_no_args(builder, "sched_yield", ir.IntType(32))
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def _prefetch(typingctx, a, i):
    # hint that element `i` of the 1-D array `a` is used soon: fetch its line into every cache level
    def codegen(context, builder, sig, args):
        i8p = ir.IntType(8).as_pointer()
        fn_ty = ir.FunctionType(ir.VoidType(), [i8p] + [ir.IntType(32)] * 3)
        fn = cgutils.get_or_insert_function(builder.module, fn_ty, "llvm.prefetch")
        ptr = builder.bitcast(_item(context, builder, sig.args[0], args[0], args[1]), i8p)
        builder.call(fn, [ptr] + [ir.Constant(ir.IntType(32), v) for v in (0, 3, 1)])
        return context.get_dummy_value()

    return types.none(a, types.intp), codegen


@njit(**_OPTS)
def _prefetch_units(row, H, j0, j1):
    # every cache line of units `j0 <= j < j1` in each `H`-wide segment of `row`; the rows of a chunk's units are
    # runs too short for the hardware prefetcher to pick up in time
    step = 64 // row.itemsize
    for g in range(row.shape[0] // H if j1 > j0 else 0):
        for j in range(g * H + j0, g * H + j1, step):
            _prefetch(row, j)
        _prefetch(row, g * H + j1 - 1)


@njit(**_OPTS)
def _begin(sync, q, ph, nc):
    # claim chunk `q` of phase `ph`; once claimed, wait until all `ph * nc` chunks of the earlier phases are done
    if not _cas(sync, LINE * (q + 1), ph, ph + 1):
        return False
    _wait(sync, ph * nc)
    return True


@njit(**_OPTS)
def _wait(sync, done):
    # until `done` chunks are done
    n = 0
    while _load_acquire(sync, 0) < done:
        n += 1
        if n < _SPINS:
            _pause()
        else:
            _yield()


@njit(**_OPTS)
def _end(sync):
    _fetch_add(sync, 0, 1)


def _vector_bytes():
    # widest SIMD register of the machine numba compiles for: NUMBA_CPU_FEATURES, else the host's unless NUMBA_CPU_NAME
    # names another CPU (`generic` for a portable cache), whose features it leaves unknown
    features = numba.config.CPU_FEATURES
    if not features and numba.config.CPU_NAME in (None, "host"):
        try:
            features = llvm.get_host_cpu_features().flatten()
        except RuntimeError:
            features = ""
    features = features or ""
    return 64 if "+avx512f" in features else 32 if "+avx" in features else 16


# The GEMM's register tile: TILE_ROWS rows of `a` by three vectors of columns, 24 (or 12) accumulators
VECTOR_BYTES = _vector_bytes()
TILE_ROWS = 8 if VECTOR_BYTES == 64 else 4
TILE_VECTORS = 3
# rows of `a` over a call's steps below which packing the weights costs more than the tiles save (LSTM H=512, B=32:
# packed 10% slower at T=1, 15% faster at T=2)
PACK_MIN_ROWS = 64


def _at(builder, ary, offset, ty):
    # pointer to `ty` at `offset` bytes into the data of the array struct `ary`; accesses through it give `align`, as
    # a vector's own alignment is more than its elements'
    i8p = ir.IntType(8).as_pointer()
    return builder.bitcast(builder.gep(builder.bitcast(ary.data, i8p), [offset]), ty.as_pointer())


def _splat(builder, x, vec):
    # `x` in every lane of `vec`
    lane0 = builder.insert_element(ir.Constant(vec, ir.Undefined), x, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(lane0, lane0, ir.Constant(ir.VectorType(ir.IntType(32), vec.count), None))


def _keep_loop(builder, latch):
    # loop metadata on the back edge `latch`: neither unrolled nor interleaved, which would spill the accumulators
    module = builder.module
    hints = [
        module.add_metadata([ir.MetaDataString(module, "llvm.loop.unroll.disable")]),
        module.add_metadata([ir.MetaDataString(module, "llvm.loop.vectorize.enable"), ir.IntType(1)(0)]),
    ]
    loop_id = ir.values.MDValue(module, [], name=str(len(module.metadata)))
    loop_id.operands = (loop_id, *hints)
    latch.set_metadata("llvm.loop", loop_id)


@intrinsic
def _tile(typingctx, a, wp, out, b, panel, j, n, rows, vecs):
    """`out[b : b + rows, j : j + n] = a[b : b + rows] @ wp[panel][:, :n]` for `a [B, K]` and a packed panel
    `wp [*, K, W]`, with `rows` x `vecs` vectors of sums held in registers over `k`: per `k`, `vecs` loads of the
    panel and `rows` broadcasts of `a` feed `rows * vecs` fused multiply-adds. `n <= vecs * lanes`."""
    if not isinstance(rows, types.IntegerLiteral) or not isinstance(vecs, types.IntegerLiteral):
        return None
    R, V = rows.literal_value, vecs.literal_value

    def codegen(context, builder, sig, args):
        a_ary, wp_ary, out_ary = (context.make_array(sig.args[i])(context, builder, args[i]) for i in range(3))
        b, panel, j, n = args[3:7]
        el = context.get_data_type(sig.args[0].dtype)
        size = context.get_abi_sizeof(el)
        vec = ir.VectorType(el, VECTOR_BYTES // size)
        intp = b.type

        def const(v):
            return ir.Constant(intp, v)

        K = cgutils.unpack_tuple(builder, a_ary.shape)[1]
        sa = cgutils.unpack_tuple(builder, a_ary.strides)[0]
        swp = cgutils.unpack_tuple(builder, wp_ary.strides)[:2]
        sout = cgutils.unpack_tuple(builder, out_ary.strides)[0]
        o_a = [builder.mul(builder.add(b, const(r)), sa) for r in range(R)]
        o_wp = builder.mul(panel, swp[0])
        o_j = builder.mul(j, const(size))
        o_out = [builder.add(builder.mul(builder.add(b, const(r)), sout), o_j) for r in range(R)]
        fma_ty = ir.FunctionType(vec, [vec] * 3)
        fma = cgutils.get_or_insert_function(builder.module, fma_ty, f"llvm.fmuladd.v{vec.count}f{8 * size}")
        # for k in range(K): acc[r][v] += a[b + r, k] * wp[panel, k, v * lanes : (v + 1) * lanes]
        entry = builder.block
        head, body, done = (builder.append_basic_block(f"tile.{x}") for x in ("head", "body", "done"))
        builder.branch(head)
        builder.position_at_end(head)
        k = builder.phi(intp)
        acc = [[builder.phi(vec) for _ in range(V)] for _ in range(R)]
        builder.cbranch(builder.icmp_signed("<", k, K), body, done)
        builder.position_at_end(body)
        o_k = builder.add(o_wp, builder.mul(k, swp[1]))
        w_k = [
            builder.load(_at(builder, wp_ary, builder.add(o_k, const(v * VECTOR_BYTES)), vec), align=size)
            for v in range(V)
        ]
        summed = []
        for r in range(R):
            x = builder.load(_at(builder, a_ary, builder.add(o_a[r], builder.mul(k, const(size))), el))
            summed.append([builder.call(fma, [_splat(builder, x, vec), w_k[v], acc[r][v]]) for v in range(V)])
        k.add_incoming(const(0), entry)
        k.add_incoming(builder.add(k, const(1)), body)
        for r in range(R):
            for v in range(V):
                acc[r][v].add_incoming(ir.Constant(vec, None), entry)
                acc[r][v].add_incoming(summed[r][v], body)
        _keep_loop(builder, builder.branch(head))
        builder.position_at_end(done)
        # the last vector may hold fewer than `lanes` of the `n` columns: then it goes out lane by lane
        tail = builder.sub(n, const((V - 1) * vec.count))
        last = cgutils.alloca_once(builder, vec)
        for r in range(R):
            for v in range(V - 1):
                p_v = _at(builder, out_ary, builder.add(o_out[r], const(v * VECTOR_BYTES)), vec)
                builder.store(acc[r][v], p_v, align=size)
        with builder.if_else(builder.icmp_signed("==", tail, const(vec.count))) as (whole, part):
            with whole:
                for r in range(R):
                    p_v = _at(builder, out_ary, builder.add(o_out[r], const((V - 1) * VECTOR_BYTES)), vec)
                    builder.store(acc[r][V - 1], p_v, align=size)
            with part:
                for r in range(R):
                    builder.store(acc[r][V - 1], last)
                    o_tail = builder.add(o_out[r], const((V - 1) * VECTOR_BYTES))
                    with cgutils.for_range(builder, tail) as lane:
                        x = builder.load(builder.gep(builder.bitcast(last, el.as_pointer()), [lane.index]))
                        at = _at(builder, out_ary, builder.add(o_tail, builder.mul(lane.index, const(size))), el)
                        builder.store(x, at)
        return context.get_dummy_value()

    return types.none(a, wp, out, types.intp, types.intp, types.intp, types.intp, rows, vecs), codegen


@njit(**_OPTS)
def panel_count(n, W):
    """Panels of `W` rows that hold `n` rows of a weight."""
    return (n + W - 1) // W


@njit(**_OPTS)
def pack(w, wp, panel, j0, j1, transposed=False):
    """Rows `j0 <= j < j1` of `w [N, K]` (with `transposed`, of `w.T` for `w [K, N]`) into the panels `wp[panel:]
    [*, K, W]`, transposed so that each `k` reads `W` consecutive values; columns past `j1` are zero. Nothing when
    `wp` has no panels."""
    K, W = wp.shape[1], wp.shape[2]
    zero = wp.dtype.type(0)
    for p in range(panel_count(j1 - j0, W) if wp.shape[0] else 0):
        dst = wp[panel + p]
        jp = j0 + p * W
        if transposed:
            m = min(W, j1 - jp)
            for k in range(K):
                for c in range(m):
                    dst[k, c] = w[k, jp + c]
                for c in range(m, W):
                    dst[k, c] = zero
            continue
        for c in range(W):
            if jp + c < j1:
                src = w[jp + c]
                for k in range(K):
                    dst[k, c] = src[k]
            else:
                for k in range(K):
                    dst[k, c] = zero


@njit(**_OPTS)
def mm_rows(a, w, wp, out, j0, j1, panel, transposed=False):
    """`out[:, j] = a [B, K] @ w[j]` for rows `j0 <= j < j1` of `w [N, K]` (with `transposed`, of `w.T` for `w [K,
    N]`, which `panels` always packs): on the panels `wp[panel:]` that `pack` made of those rows, by tiles of
    `TILE_ROWS` rows of `a` and the rows left over by tiles of 4, 2 and 1; when `wp` has no panels, by dot products
    with the rows of `w`."""
    if transposed and not wp.shape[0]:
        raise ValueError("mm_rows: the rows of w.T are read only from packed panels")
    B = a.shape[0]
    W = wp.shape[2]
    for p in range(panel_count(j1 - j0, W) if wp.shape[0] else 0):
        j = j0 + p * W
        n = min(W, j1 - j)
        b = 0
        while b + TILE_ROWS <= B:
            _tiles(a, wp, out, b, panel + p, j, n, TILE_ROWS)
            b += TILE_ROWS
        if TILE_ROWS > 4 and b + 4 <= B:
            _tiles(a, wp, out, b, panel + p, j, n, 4)
            b += 4
        if b + 2 <= B:
            _tiles(a, wp, out, b, panel + p, j, n, 2)
            b += 2
        if b < B:
            _tiles(a, wp, out, b, panel + p, j, n, 1)
    if not wp.shape[0]:
        _dot_rows(a, w, out, j0, j1)


@njit(**_INLINE)
def _tiles(a, wp, out, b, panel, j, n, rows):
    # `_tile` of `rows` rows on the `n` columns of one panel, in the fewest vectors that hold them
    nv = panel_count(n, wp.shape[2] // TILE_VECTORS)
    if nv == 3:
        _tile(a, wp, out, b, panel, j, n, rows, 3)
    elif nv == 2:
        _tile(a, wp, out, b, panel, j, n, rows, 2)
    else:
        _tile(a, wp, out, b, panel, j, n, rows, 1)


@njit(**_OPTS)
def _dot_rows(a, w, out, j0, j1):
    # `out[b, j] = a[b] . w[j]` for every row of `a`, six rows of `w` at a time; the last six end at `j1`, rerunning
    # up to 5 rows, so that every row of `w` sums in a group of six alike, however the rows split into chunks
    B, K = a.shape
    zero = out.dtype.type(0)
    z6 = (zero, zero, zero, zero, zero, zero)
    j = j0
    while j < j1 and j1 - j0 >= 6:
        j = min(j, j1 - 6)
        b = 0
        while 4 <= B and b < B:
            # a 6 x 4 tile of sums vectorised along k: each load of `w` feeds four rows of `a`, each of `a` six of `w`;
            # the last tile ends at the last row, rerunning up to 3 rows, so that every row sums in a tile alike
            b = min(b, B - 4)
            s0, s1, s2, s3 = z6, z6, z6, z6
            for k in range(K):
                wk = (w[j, k], w[j + 1, k], w[j + 2, k], w[j + 3, k], w[j + 4, k], w[j + 5, k])
                s0, s1 = _fma6(s0, a[b, k], wk), _fma6(s1, a[b + 1, k], wk)
                s2, s3 = _fma6(s2, a[b + 2, k], wk), _fma6(s3, a[b + 3, k], wk)
            _store6(out, b, j, s0)
            _store6(out, b + 1, j, s1)
            _store6(out, b + 2, j, s2)
            _store6(out, b + 3, j, s3)
            b += 4
        if B < 4:
            for r in range(B):
                s0 = z6
                for k in range(K):
                    s0 = _fma6(s0, a[r, k], (w[j, k], w[j + 1, k], w[j + 2, k], w[j + 3, k], w[j + 4, k], w[j + 5, k]))
                _store6(out, r, j, s0)
        j += 6
    # fewer than six rows in all
    for b in range(B):
        for jj in range(j, j1):
            s = zero
            for k in range(K):
                s += a[b, k] * w[jj, k]
            out[b, jj] = s


@njit(**_OPTS)
def _fma6(s, x, w):
    return s[0] + x * w[0], s[1] + x * w[1], s[2] + x * w[2], s[3] + x * w[3], s[4] + x * w[4], s[5] + x * w[5]


@njit(**_OPTS)
def _store6(out, b, j, s):
    out[b, j], out[b, j + 1], out[b, j + 2], out[b, j + 3], out[b, j + 4], out[b, j + 5] = s


@njit(**_OPTS)
def _gate_rows(a, w, wp, out, G, H, j0, j1, panel, last_first):
    # rows `g * H + j` of the product for every gate `g` and unit `j0 <= j < j1`; gate `g`'s panels from
    # `panel + g * panel_count(j1 - j0, W)` on; `last_first` walks the gates from the last, so that alternate steps
    # start on the rows the one before read last, still in cache
    step = panel_count(j1 - j0, wp.shape[2])
    for i in range(G):
        g = G - 1 - i if last_first else i
        mm_rows(a, w, wp, out, g * H + j0, g * H + j1, panel + g * step)


@njit(**_OPTS)
def _pack_gates(w, wp, G, H, j0, j1, panel):
    # `pack` of the rows `_gate_rows` reads
    step = panel_count(j1 - j0, wp.shape[2])
    for g in range(G):
        pack(w, wp, panel + g * step, g * H + j0, g * H + j1)


@njit(**_OPTS)
def _pack_share(w, wp, n, q, nc, transposed=False):
    # chunk `q`'s share, whole panels, of `pack(w, wp, 0, 0, n, transposed)`: the same panels, packed by `nc` chunks
    W = wp.shape[2]
    step = panel_count(n, W)
    p0, p1 = q * step // nc, (q + 1) * step // nc
    pack(w, wp, p0, p0 * W, min(n, p1 * W), transposed)


def panels(w, B, T, G, n, nc, transposed=False):
    """Room for `pack` to hold, per chunk, `G` segments of up to `ceil(n / nc)` rows of `w [N, K]`; none when the
    `B` rows of `a` make no whole tile, or when `T` steps of them are too few to repay the packing. With `transposed`
    (default False), rows of `w.T`, always: packing them costs what a transposed copy for the dot products would.

    Returns:
        the panels `[*, K, W]` and the number of them per chunk.
    """
    W = TILE_VECTORS * VECTOR_BYTES // w.itemsize
    span = G * panel_count(-(-n // nc), W)
    use = transposed or (B >= TILE_ROWS and B * T >= PACK_MIN_ROWS)
    return np.empty((nc * span if use else 0, w.shape[0 if transposed else 1], W), w.dtype), span


@njit(**_INLINE)
def _step_time(s, n, rev):
    # time step of processing step `s` for a sequence of length `n` (only called while `s < n`)
    return n - 1 - s if rev else s


@njit(**_OPTS)
def _resets(zero, lens, rev, s, b):
    # whether row `b`'s processing step `s` is one of its own and starts from zeros (`zero [T, B]` in time order)
    return s < lens[b] and zero[_step_time(s, lens[b], rev), b]


@njit(**_OPTS)
def keep_row(keep, t, b):
    """Zoneout's weights of row `b` at time `t` from `keep [T, B, N]`, or from `[1, 1, N]`: one row for every step
    and row (the evaluation constant)."""
    return keep[min(t, keep.shape[0] - 1), min(b, keep.shape[1] - 1)]


@njit(**_OPTS)
def _mix(prev, new, keep, j0, j1):
    # zoneout: `new = k prev + (1 - k) new` on `j0 <= j < j1`
    a, n, k = prev[j0:j1], new[j0:j1], keep[j0:j1]
    one = n.dtype.type(1)
    for j in range(j1 - j0):
        n[j] = k[j] * a[j] + (one - k[j]) * n[j]


@njit(**_INLINE)
def _split(d, keep, direct, j0, j1):
    # zoneout's backward on `j0 <= j < j1`: `direct = k d` goes straight to the state before, `d = (1 - k) d` into
    # the cell
    x, k, o = d[j0:j1], keep[j0:j1], direct[j0:j1]
    one = x.dtype.type(1)
    for j in range(j1 - j0):
        o[j] = k[j] * x[j]
        x[j] = (one - k[j]) * x[j]


@njit(**_INLINE)
def row_block(by_rows, q, nc, B):
    """Rows `[b0, b1)` of chunk `q` of `nc`: its block of the `B` rows when `by_rows` (sizes within one row of each
    other), else every row. A row's product sums alike in any block of at least 4 rows (`mm_rows`)."""
    if not by_rows:
        return 0, B
    return q * B // nc, (q + 1) * B // nc


@njit(**_INLINE)
def _proj_cols(q, nc, P):
    # columns `[p0, p1)` of the projection's `P` that chunk `q` of `nc` multiplies: an even share, or all in chunk 0
    # where a share would hold fewer than the six rows of `w_hr` that `_dot_rows` sums alike, so that every column sums
    # alike on any number of chunks
    if P < 6 * nc:
        return (0, P) if q == 0 else (P, P)
    return q * P // nc, (q + 1) * P // nc


@njit(**_INLINE)
def _cell_span(by_rows, q, nc, B, H, j0, j1):
    # rows [b0, b1) and units [u0, u1) of chunk q's cell math: its block of rows, every unit, when `by_rows`
    # (layer_norm's, or a loop's split into blocks of rows), else every row, its units [j0, j1)
    if by_rows:
        b0, b1 = row_block(True, q, nc, B)
        return b0, b1, 0, H
    return 0, B, j0, j1


@njit(**_INLINE)
def _copy_state(src, dst, y_row, b, j0, j1):
    # an ended sequence keeps its state and writes zeros to `y`
    zero = dst.dtype.type(0)
    for j in range(j0, j1):
        dst[b, j] = src[b, j]
        y_row[j] = zero


@njit(**_INLINE)
def _fill(row, j0, j1):
    zero = row.dtype.type(0)
    for j in range(j0, j1):
        row[j] = zero


@njit(**_INLINE)
def _fill_units(row, H, j0, j1):
    # units `j0 <= j < j1` of every `H`-wide segment of a saved row: zeros at a step past the sequence's length
    for g in range(row.shape[0] // H):
        _fill(row, g * H + j0, g * H + j1)


# The row helpers loop from 0 over slices: a loop over `range(j0, j1)` keeps numba's negative-index wraparound, with
# which LLVM vectorises through gathers, if at all.
@njit(**_INLINE)
def _copy(src, dst, j0, j1):
    s, d = src[j0:j1], dst[j0:j1]
    for j in range(j1 - j0):
        d[j] = s[j]


@njit(**_OPTS)
def _copy_rows(src, dst):
    # `dst[:] = src` for `[B, P]`, row by row: the slice assignment compiles numba's shape error message (~4 s cold)
    for b in range(src.shape[0]):
        for p in range(src.shape[1]):
            dst[b, p] = src[b, p]


@njit(**_INLINE)
def _add(x, z, out, j0, j1):
    # `out = x + z` on `j0 <= j < j1`
    a, b, o = x[j0:j1], z[j0:j1], out[j0:j1]
    for j in range(j1 - j0):
        o[j] = a[j] + b[j]


@njit(**_INLINE)
def _seg(row, g, H, j0, j1):
    # units `j0 <= j < j1` of the `g`-th `H`-wide segment of `row` (gates side by side, or a saved row)
    return row[g * H + j0 : g * H + j1]


@njit(**_INLINE)
def _segs(row, H, j0, j1):
    # `_seg` of segments 0 to 4: a saved row's five; segments past a shorter row's end come back empty
    return (
        _seg(row, 0, H, j0, j1),
        _seg(row, 1, H, j0, j1),
        _seg(row, 2, H, j0, j1),
        _seg(row, 3, H, j0, j1),
        _seg(row, 4, H, j0, j1),
    )


@njit(**_INLINE)
def _lstm_gates(gxr, a, bias, cr, svr, H, j0, j1, precise=None):
    """Units `j0 <= j < j1`: the activated gates `i, f, g, o` of the recurrent product `a [4H]` plus `gxr [4H]` and
    `bias [4H]` into `svr [5H]`, then the new cell state into `cr [H]` and `svr`; the precise `tanh` for `precise`
    (not None). Activations go out of place: an in-place one stays scalar."""
    n = j1 - j0
    for g in range(4):
        ag, xg, bg, sg = (
            _seg(a, g, H, j0, j1),
            _seg(gxr, g, H, j0, j1),
            _seg(bias, g, H, j0, j1),
            _seg(svr, g, H, j0, j1),
        )
        for j in range(n):
            ag[j] += xg[j] + bg[j]
        if g == 2:
            for j in range(n):
                sg[j] = tanh(ag[j]) if precise is None else tanh_precise(ag[j])
        else:
            for j in range(n):
                sg[j] = sigmoid(ag[j])
    si, sf, sg, _, sc = _segs(svr, H, j0, j1)
    c = cr[j0:j1]
    for j in range(n):
        cn = sf[j] * c[j] + si[j] * sg[j]
        c[j] = cn
        sc[j] = cn


@njit(**_INLINE)
def _lstm_out(svr, hr, H, j0, j1):
    # `h = o * tanh(c)` from the saved row `svr [5H]` into `hr [H]`
    so, sc, h = _seg(svr, 3, H, j0, j1), _seg(svr, 4, H, j0, j1), hr[j0:j1]
    for j in range(j1 - j0):
        h[j] = so[j] * tanh(sc[j])


@njit(**_INLINE)
def _lstm_grads(svr, cpr, dhr, dcr, dcs, dar, H, j0, j1):
    """Units `j0 <= j < j1` of one step's backward from the saved row `svr [5H]`, the previous cell state `cpr [H]`
    and the state gradient `dhr [H]`: the gate gradients into `dar [4H]`, `dcr [H]` back one step (`dcs [H]`:
    scratch)."""
    one = dcr.dtype.type(1)
    _, _, _, o, c = _segs(svr, H, j0, j1)
    dao = _seg(dar, 3, H, j0, j1)
    dh, dc, d = dhr[j0:j1], dcr[j0:j1], dcs[j0:j1]
    # d sigmoid = s (1 - s); d tanh = 1 - t^2
    for j in range(j1 - j0):
        tc = tanh(c[j])
        d[j] = dc[j] + dh[j] * o[j] * (one - tc * tc)
        dao[j] = dh[j] * tc * o[j] * (one - o[j])
    _lstm_cell_grads(svr, cpr, dcs, dcr, dar, H, j0, j1)


@njit(**_INLINE)
def _lstm_cell_grads(svr, cpr, dcs, dcr, dar, H, j0, j1):
    # units `j0 <= j < j1`: the gradients of `i, f, g` into `dar [4H]` and `dcr [H]` back one step from the new cell
    # state's `dcs [H]`
    one = dcr.dtype.type(1)
    i, f, g, _, _ = _segs(svr, H, j0, j1)
    dai, daf, dag, _, _ = _segs(dar, H, j0, j1)
    cp, dc, d = cpr[j0:j1], dcr[j0:j1], dcs[j0:j1]
    for j in range(j1 - j0):
        dai[j] = d[j] * g[j] * i[j] * (one - i[j])
        daf[j] = d[j] * cp[j] * f[j] * (one - f[j])
        dag[j] = d[j] * i[j] * (one - g[j] * g[j])
        dc[j] = d[j] * f[j]


@njit(**_OPTS)
def _ln(v, xhat):
    """LayerNorm of the row `v [N]` over its `N` features: `(v - mean) * rstd` into `xhat [N]`; returns `rstd =
    1 / sqrt(var + LN_EPS)` (biased variance, two passes)."""
    n, one = v.shape[0], v.dtype.type(1)
    mean = var = v.dtype.type(0)
    for j in range(n):
        mean += v[j]
    mean /= v.dtype.type(n)
    for j in range(n):
        e = v[j] - mean
        var += e * e
    rstd = one / math.sqrt(var / v.dtype.type(n) + v.dtype.type(LN_EPS))
    for j in range(n):
        xhat[j] = (v[j] - mean) * rstd
    return rstd


@njit(**_OPTS)
def _ln_gain(a, xhat, gain):
    # `a = LN(a) * gain` for the recurrent product `a [G*H]`, keeping `xhat`; returns the row's `rstd`
    rstd = _ln(a, xhat)
    for j in range(a.shape[0]):
        a[j] = xhat[j] * gain[j]
    return rstd


@njit(**_OPTS)
def _ln_grads(d, xhat, gain, rstd, d_gain, d_bias):
    """Backward of `LN(v) * gain + bias` for one row: `d [N]` comes in as the gradient of the output and leaves as
    that of `v`, `rstd (u - mean(u) - xhat mean(u xhat))` with `u = d gain`; `d_gain += d xhat`, `d_bias += d`."""
    n = d.shape[0]
    su = sux = d.dtype.type(0)
    for j in range(n):
        d_gain[j] += d[j] * xhat[j]
        d_bias[j] += d[j]
        u = d[j] * gain[j]
        d[j] = u
        su += u
        sux += u * xhat[j]
    su /= d.dtype.type(n)
    sux /= d.dtype.type(n)
    for j in range(n):
        d[j] = rstd * (d[j] - su - xhat[j] * sux)


@njit(**_OPTS)
def _lstm_ln_out(svr, chat, w, bias, hr, H):
    # `h = o * tanh(LN(c) * w + bias)` from the saved row `svr [5H]` into `hr [H]`, keeping `LN(c)` in `chat [H]`;
    # returns the row's `rstd` of `c`
    rstd = _ln(_seg(svr, 4, H, 0, H), chat)
    o = _seg(svr, 3, H, 0, H)
    for j in range(H):
        hr[j] = o[j] * tanh_precise(chat[j] * w[j] + bias[j])
    return rstd


@njit(**_OPTS)
def _lstm_ln_grads(svr, cpr, dhr, dcr, dcs, dar, chat, rstd, w, bias, sums):
    """`_lstm_grads` of the whole row with `h = o * tanh(LN(c) * w + bias)`: `chat [H]` and `rstd` are the forward's
    `LN(c)` and its `rstd`; `sums [2H]` gains the row's gradients of `w` and of `bias`."""
    one, H = dcr.dtype.type(1), chat.shape[0]
    o, dao, dh, d = _seg(svr, 3, H, 0, H), _seg(dar, 3, H, 0, H), dhr[:H], dcs[:H]
    for j in range(H):
        tn = tanh_precise(chat[j] * w[j] + bias[j])
        d[j] = dh[j] * o[j] * (one - tn * tn)
        dao[j] = dh[j] * tn * o[j] * (one - o[j])
    _ln_grads(d, chat, w, rstd, sums[:H], sums[H:])
    for j in range(H):
        d[j] += dcr[j]
    _lstm_cell_grads(svr, cpr, dcs, dcr, dar, H, 0, H)


@njit(**_INLINE)
def _rnn_act(gxr, a, bias, relu, hr, j0, j1, precise=None):
    # units `j0 <= j < j1` of `h = act(gx + W_hh h + b_hh)` from the recurrent product `a [H]` into `hr [H]`
    # (the precise `tanh` for `precise`, not None)
    x, p, bb, h = gxr[j0:j1], a[j0:j1], bias[j0:j1], hr[j0:j1]
    zero = h.dtype.type(0)
    for j in range(j1 - j0):
        v = x[j] + p[j] + bb[j]
        h[j] = max(v, zero) if relu else (tanh(v) if precise is None else tanh_precise(v))


@njit(**_INLINE)
def _rnn_grad(hsr, dhr, dyr, relu, dar, j0, j1):
    # units `j0 <= j < j1` of the pre-activation gradient `act'(h) (dh + dy)` into `dar [H]`; relu' = [h > 0]
    # selecting as torch's threshold_backward does (0 where h <= 0, else passed, NaN h too), tanh' = 1 - h^2
    hs, dh, dy, da = hsr[j0:j1], dhr[j0:j1], dyr[j0:j1], dar[j0:j1]
    zero, one = da.dtype.type(0), da.dtype.type(1)
    for j in range(j1 - j0):
        d = dh[j] + dy[j]
        da[j] = (zero if hs[j] <= zero else d) if relu else d * (one - hs[j] * hs[j])


@njit(**_INLINE)
def _gru_gates(gxr, a, bias, hpr, svr, hr, H, j0, j1, precise=None):
    """Units `j0 <= j < j1`: from the recurrent product `a [3H]`, `gxr`, `bias [3H]` and the previous state `hpr [H]`,
    `r, z, n, W_hn h + b_hn` into `svr [4H]` and the new state into `hr [H]`; the precise `tanh` for `precise` (not
    None)."""
    n = j1 - j0
    for g in range(3):
        ag, bg = _seg(a, g, H, j0, j1), _seg(bias, g, H, j0, j1)
        for j in range(n):
            ag[j] += bg[j]
    for g in range(2):
        ag, xg, sg = _seg(a, g, H, j0, j1), _seg(gxr, g, H, j0, j1), _seg(svr, g, H, j0, j1)
        for j in range(n):
            sg[j] = sigmoid(ag[j] + xg[j])
    r, z, sn, shn, _ = _segs(svr, H, j0, j1)
    ahn, xn, hp, h = _seg(a, 2, H, j0, j1), _seg(gxr, 2, H, j0, j1), hpr[j0:j1], hr[j0:j1]
    one = h.dtype.type(1)
    for j in range(n):
        v = xn[j] + r[j] * ahn[j]
        nj = tanh(v) if precise is None else tanh_precise(v)
        sn[j], shn[j] = nj, ahn[j]
        h[j] = (one - z[j]) * nj + z[j] * hp[j]


@njit(**_INLINE)
def _gru_grads(svr, hpr, d, dar, dgxr, dhz, H, j0, j1):
    """Units `j0 <= j < j1` of one step's backward from the saved row `svr [4H]`, the state before the step `hpr [H]`
    and the state gradient `d [H]`: `dar [3H]` (the gradient of the recurrent pre-activations), the n gate of
    `dgxr [3H]`, and `dhz = d * z`."""
    one = dhz.dtype.type(1)
    n = j1 - j0
    r, z, ng, hn, _ = _segs(svr, H, j0, j1)
    hp = hpr[j0:j1]
    dar_, daz, dahn, _, _ = _segs(dar, H, j0, j1)
    dan, dd, dz = _seg(dgxr, 2, H, j0, j1), d[j0:j1], dhz[j0:j1]
    for j in range(n):
        an = dd[j] * (one - z[j]) * (one - ng[j] * ng[j])
        dan[j], dahn[j] = an, an * r[j]
        dar_[j] = an * hn[j] * r[j] * (one - r[j])
        daz[j] = dd[j] * (hp[j] - ng[j]) * z[j] * (one - z[j])
        dz[j] = dd[j] * z[j]


@njit(**_OPTS)
def _dh_prev(da, w_hh, wp, dhp, carried, lens, s, dh, p0, p1, panel):
    """Columns `p0 <= p < p1` of the state gradient that step `s` passes back, `dh = da @ w_hh` (plus GRU's `dh z`,
    `carried [B, P]`; `[0, P]` for the other cells), for the rows active at step `s`, from the step's gate gradients
    `da [B, G*H]`."""
    mm_rows(da, w_hh, wp, dhp, p0, p1, panel, True)
    for b in range(da.shape[0]):
        if s < lens[b]:
            for p in range(p0, p1):
                dh[b, p] = carried[b, p] + dhp[b, p] if carried.shape[0] else dhp[b, p]


def fwd_work(cell, w_hh, w_hr, B, T, nc):
    """The forward loop's `work` for `w_hh [G*H, P]` and `w_hr [P, H]` (`[0, H]` without a projection): the recurrent
    product `[B, G*H]`, LSTM's `o * tanh(c)` before the projection `[B, H]` (`[B, 0]` without one), the other state
    buffer `[B, P]`, and `panels` of `w_hh` and of `w_hr`."""
    G = GATES[cell]
    (GH, P), dt = w_hh.shape, w_hh.dtype
    H, PR = GH // G, w_hr.shape[0]
    bufs = np.empty((B, GH), dt), np.empty((B, H if PR else 0), dt), np.empty((B, P), dt)
    return (*bufs, *panels(w_hh, B, T, G, H, nc), *panels(w_hr, B, T, 1, PR, nc))


def bwd_work(cell, w_hh, w_hr, B, T, nc, resets=False, zoneout=False):
    """The backward loop's `work` for `w_hh [G*H, P]` and `w_hr [P, H]` (`[0, H]` without a projection): the gate
    gradients of two steps `[2, B, G*H]` (step s's in `[s % 2]`: the product of the step after reads the other
    meanwhile), the state gradient at the cell's output `[B, H]` (`dh + dy`, or projected back; `[B, 0]` for RNN,
    which adds them in place), GRU's `dh z` `[B, H]` (`[0, P]` for the others: `_dh_prev` then carries nothing),
    LSTM's scratch for `dc` `[B, H]` (`[B, 0]` for the others), the product `[B, P]`; with `zoneout` (default False)
    the gradients it passes straight back, `h`'s `[B, P]` and LSTM's `c`'s `[B, H]` (`[0, P]`, `[0, H]` without); a
    row of zeros `[H]` for `resets` or `zoneout` (`[0]` without); and `panels` of `w_hh.T` and of `w_hr.T`."""
    G = GATES[cell]
    (GH, P), dt = w_hh.shape, w_hh.dtype
    H, gru, lstm = GH // G, cell == "gru", cell == "lstm"
    da, dhc = np.zeros((2, B, GH), dt), np.empty((B, H if G > 1 else 0), dt)
    dhz, dcs = np.zeros((B if gru else 0, P), dt), np.empty((B, H if lstm else 0), dt)
    dzo, dcz = np.empty((B if zoneout else 0, P), dt), np.empty((B if zoneout and lstm else 0, H), dt)
    zrow = np.zeros(H if resets or zoneout else 0, dt)
    bufs = da, dhc, dhz, dcs, np.empty((B, P), dt), dzo, dcz, zrow
    projected = H if w_hr.shape[0] else 0
    return (*bufs, *panels(w_hh, B, T, 1, P, nc, True), *panels(w_hr, B, T, 1, projected, nc, True))


def cell_loops(cell, proj, resets=False, zoneout=False, layer_norm=False):
    """The forward and backward loops of `cell` (LSTM's with the projection `w_hr` when `proj`; with the `resets`,
    `zoneout` and `layer_norm` options when set, default False), made on first use; each compiles on its first call
    per dtype. RNN's activation is their `relu` argument: both RNN cells share them."""
    return _loops(GATES[cell], proj, resets, zoneout, layer_norm)


def saved_slots(G, zoneout):
    """`H`-wide slots of a `saved` row before `layer_norm`'s: `i, f, g, o, c` (LSTM), `r, z, n, W_hn h + b_hn` (GRU),
    none (RNN); with `zoneout` LSTM's carried `c` or RNN's `h~` after them."""
    return {1: 0, 3: 4, 4: 5}[G] + (zoneout and G != 3)


@functools.cache
def _loops(G, PROJ, RESETS, ZONEOUT, LAYER_NORM):
    """The loops of the cell with `G` gates: RNN (1), GRU (3) or LSTM (4), with the `resets`, `zoneout` and
    `layer_norm` options when `RESETS`, `ZONEOUT`, `LAYER_NORM`. These are constants of the closures, so numba drops
    the other cells' and the unused options' branches before typing them: a cell compiles and caches only its own
    math. `LAYER_NORM` normalises whole rows: its cell math runs in a phase of its own, by groups of rows."""
    LSTM, GRU, RNN = G == 4, G == 3, G == 1
    # slot of LSTM's carried `c` in `saved`: the cell's `c~` with zoneout mixed in, else `c~` itself
    CP = 5 if ZONEOUT else 4
    # layer_norm's slots of a saved row: the normalised product `[G*H]` from slot `LN`, LSTM's normalised `c~` `[H]`
    # after it, then the product's `rstd` and LSTM's `c~`'s
    LN = saved_slots(G, ZONEOUT)
    # the backward writes `dgh`: GRU's, or the product's before its LayerNorm
    DGH = GRU or LAYER_NORM
    # the precise `tanh` with layer_norm (`tanh_precise`)
    PRECISE = True if LAYER_NORM else None
    # RNN's backward reads the cell's `h~` from `y`, unless zoneout mixed it there (then from `saved`)
    RNN_Y = RNN and not ZONEOUT
    # the backward forms the state gradient at a step's output, `dh + dy`, before the cell math (else the cell math
    # adds `dy`)
    DY_FIRST = PROJ or ZONEOUT
    # the projection's product needs the whole state (backward: state gradient) of a step first, layer_norm's cell
    # math the whole product (backward: state gradient): a phase of its own
    NPH = 2 if PROJ or LAYER_NORM else 1
    # the phase of a step that runs its cell math: layer_norm's needs the step's whole product (backward: the whole
    # state gradient), so it runs after that by groups of rows
    CELL_PH = 1 if LAYER_NORM else 0

    @njit(**_OPTS)
    def fwd(gx, w_hh, b_hh, w_hr, lens, rev, relu, h, c, y, saved, ext, by_rows, work, sync, tid, nc):
        """`gx [T, B, G*H]`, `w_hh [G*H, P]`, `b_hh [G*H]`, `w_hr [P, H]` (`[0, H]` without `PROJ`), `lens [B]`;
        `h [B, P]`, LSTM's `c [B, H]` (`[B, 0]` for the others); `y [T, B, P]`; `saved [T or 1, B, SW]`: nothing
        (RNN: `h` is `y`), `i, f, g, o, c` (LSTM) or `r, z, n, W_hn h + b_hn` (GRU: `h_prev` is `y` or `h0`); with
        `ZONEOUT`, RNN's `h~` and LSTM's carried `c` after them; with `LAYER_NORM`, from slot `LN`, the normalised
        product `[G*H]`, LSTM's normalised `c~` `[H]`, the product's `rstd` and LSTM's `c~`'s. `ext`: the options,
        `(zero [T, B], keep_h [T, B, P], keep_c [T, B, H], ln_hh [G*H], ln_c_weight [H], ln_c_bias [H])` (see
        `keep_row`), read only where `RESETS` / `ZONEOUT` / `LAYER_NORM`. `by_rows`: the chunks are blocks of rows
        (not with `PROJ` or `LAYER_NORM`)."""
        zero, keep_h, keep_c, ln_hh, ln_cw, ln_cb = ext
        T, B, GH = gx.shape
        H = GH // G
        # layer_norm's offsets in a saved row: normalised product, LSTM's normalised `c~`, the `rstd`s
        o_xh, o_ch = LN * H, (LN + G) * H
        o_rs = o_ch + H if LSTM else o_ch
        P = h.shape[1]
        # the gate count as a runtime value: as a literal it would compile `_gate_rows` and `_pack_gates` per cell
        gates = GH // H
        # a chunk's product spans every unit (blocks of rows, or one chunk): one run of panels over all `G*H` rows
        # of `w_hh`, with one partly filled panel at its end instead of one at each gate's end (H = 64: 6 panels, not 8)
        whole = by_rows or nc == 1
        gh, hraw, h2, wp, span, wr, span_r = work
        for k in range(nc):
            q = (tid + k) % nc
            if _begin(sync, q, 0, nc):
                if whole:  # one run of panels over every gate's rows, packed by every chunk
                    _pack_share(w_hh, wp, GH, q, nc)
                else:
                    _pack_gates(w_hh, wp, gates, H, q * H // nc, (q + 1) * H // nc, q * span)
                if PROJ:
                    pack(w_hr, wr, q * span_r, *_proj_cols(q, nc, P))
                if RESETS:
                    for b in range(B):
                        if _resets(zero, lens, rev, 0, b):
                            _fill(h[b], q * P // nc, (q + 1) * P // nc)
                            if LSTM:
                                _fill(c[b], q * H // nc, (q + 1) * H // nc)
                _end(sync)
        # phases 1 + NPH * s + ph: a chunk's units of step s's product (with their cell math unless `LAYER_NORM`);
        # then `PROJ`'s chunk of columns of the projection, or `LAYER_NORM`'s group of rows, their cell math whole
        for s in range(T):
            cur, nxt = (h, h2) if s % 2 == 0 else (h2, h)
            sv = saved[min(s, saved.shape[0] - 1)]
            for ph in range(NPH):
                for k in range(nc):
                    q = (tid + k) % nc
                    if not _begin(sync, q, 1 + NPH * s + ph, nc):
                        continue
                    j0, j1 = (0, H) if by_rows else (q * H // nc, (q + 1) * H // nc)
                    if ph == 0:
                        r0, r1 = row_block(by_rows, q, nc, B)
                        if whole:
                            mm_rows(cur[r0:r1], w_hh, wp, gh[r0:r1], 0, GH, 0)
                        else:
                            _gate_rows(cur[r0:r1], w_hh, wp, gh[r0:r1], gates, H, j0, j1, q * span, s % 2 == 1)
                    if ph == CELL_PH:
                        b0, b1, u0, u1 = _cell_span(LAYER_NORM or by_rows, q, nc, B, H, j0, j1)
                        for b in range(b0, b1):
                            if not by_rows and b + AHEAD < b1 and s < lens[b + AHEAD]:
                                _prefetch_units(gx[_step_time(s, lens[b + AHEAD], rev), b + AHEAD], H, u0, u1)
                                if not RNN:
                                    _prefetch_units(sv[b + AHEAD], H, u0, u1)
                            if s >= lens[b]:
                                if not PROJ:
                                    _copy_state(cur, nxt, y[s, b], b, u0, u1)
                                _fill_units(sv[b], H, u0, u1)
                                if LAYER_NORM:
                                    _fill(sv[b], o_rs, sv.shape[1])
                                continue
                            t = _step_time(s, lens[b], rev)
                            if LAYER_NORM:
                                sv[b, o_rs] = _ln_gain(gh[b], sv[b, o_xh : o_xh + GH], ln_hh)
                            if LSTM:
                                if ZONEOUT:
                                    _copy(c[b], sv[b, 5 * H :], u0, u1)
                                _lstm_gates(gx[t, b], gh[b], b_hh, c[b], sv[b], H, u0, u1, PRECISE)
                                if LAYER_NORM:
                                    sv[b, o_rs + 1] = _lstm_ln_out(sv[b], sv[b, o_ch:o_rs], ln_cw, ln_cb, nxt[b], H)
                                else:
                                    _lstm_out(sv[b], hraw[b] if PROJ else nxt[b], H, u0, u1)
                                if ZONEOUT:
                                    _mix(sv[b, 5 * H :], c[b], keep_row(keep_c, t, b), u0, u1)
                                    _copy(c[b], sv[b, 5 * H :], u0, u1)
                            elif GRU:
                                _gru_gates(gx[t, b], gh[b], b_hh, cur[b], sv[b], nxt[b], H, u0, u1, PRECISE)
                            else:
                                _rnn_act(gx[t, b], gh[b], b_hh, relu, nxt[b], u0, u1, PRECISE)
                                if ZONEOUT:
                                    _copy(nxt[b], sv[b], u0, u1)
                            if not PROJ:
                                if ZONEOUT:
                                    _mix(cur[b], nxt[b], keep_row(keep_h, t, b), u0, u1)
                                _copy(nxt[b], y[t, b], u0, u1)
                            # the state the next step starts from: zeros where it resets (`y` keeps this step's)
                            if RESETS:
                                if _resets(zero, lens, rev, s + 1, b):
                                    if not PROJ:
                                        _fill(nxt[b], u0, u1)
                                    if LSTM:
                                        _fill(c[b], u0, u1)
                    if PROJ and ph == 1:
                        p0, p1 = _proj_cols(q, nc, P)
                        mm_rows(hraw, w_hr, wr, nxt, p0, p1, q * span_r)
                        for b in range(B):
                            if s >= lens[b]:
                                _copy_state(cur, nxt, y[s, b], b, p0, p1)
                                continue
                            t = _step_time(s, lens[b], rev)
                            if ZONEOUT:
                                _mix(cur[b], nxt[b], keep_row(keep_h, t, b), p0, p1)
                            for p in range(p0, p1):
                                y[t, b, p] = nxt[b, p]
                            if RESETS:
                                if _resets(zero, lens, rev, s + 1, b):
                                    _fill(nxt[b], p0, p1)
                    _end(sync)
        if tid == 0:
            _wait(sync, (1 + NPH * T) * nc)
            if T % 2 == 1:
                _copy_rows(h2, h)

    @njit(**_OPTS)
    def bwd(
        dy,
        y,
        h0,
        w_hh,
        w_hr,
        lens,
        rev,
        relu,
        c0,
        saved,
        dh,
        dc,
        dgx,
        dgh,
        hraw,
        dh_out,
        ext,
        by_rows,
        work,
        sync,
        tid,
        nc,
    ):
        """Backward of `fwd`: `dy [T, B, P]`, the forward's `y [T, B, P]` and `h0 [B, P]` (RNN reads `h` from `y`,
        GRU `h_prev` from both; `[0, 0, 0]` and `[B, 0]` where unread), `w_hh [G*H, P]`, `w_hr [P, H]` (`[0, H]`
        without `PROJ`), LSTM's `c0 [B, H]` (`[B, 0]` for the others), `saved [T, B, SW]`; `dh [B, P]`,
        LSTM's `dc [B, H]` (`[B, 0]`); `dgx [T, B, G*H]` (also dgh unless GRU), GRU's `dgh [T, B, 3H]` (`[0, 0, 0]`
        for the others; with `LAYER_NORM` every cell's, the gradient of the product before its LayerNorm); with
        `PROJ`, `hraw [T, B, H]` and `dh_out [T, B, P]` receive `o * tanh(c)` and the state gradient per step (zero
        when inactive; `[0, 0, 0]` without); `ext` as the forward's and, with `LAYER_NORM`, `sums [B, 2 G*H (+ 2H)]`
        (`[0, 0]` without) to which each row adds its gradients of `ln_hh`, `b_hh` (and LSTM's `ln_c_weight`,
        `ln_c_bias`) over its steps. Zoneout's `h = k h_in +
        (1 - k) h~` passes `k dh` straight back (`dzo`) and `(1 - k) dh` into the cell; likewise `c`. A reset step
        reads zeros (`zrow`) for `c_prev` and GRU's `h_prev` and passes zero `dh` and `dc` back. `by_rows` as the
        forward's."""
        zero, keep_h, keep_c, ln_hh, ln_cw, ln_cb, sums = ext
        T, B, P = dy.shape
        GH = w_hh.shape[0]
        H = GH // G
        o_xh, o_ch = LN * H, (LN + G) * H
        o_rs = o_ch + H if LSTM else o_ch
        da, dhc, dhz, dcs, dhp, dzo, dcz, zrow, wp, span, wr, span_r = work
        for k in range(nc):
            q = (tid + k) % nc
            if _begin(sync, q, 0, nc):
                if by_rows:
                    _pack_share(w_hh, wp, P, q, nc, True)
                else:
                    pack(w_hh, wp, q * span, q * P // nc, (q + 1) * P // nc, True)
                if PROJ:
                    pack(w_hr, wr, q * span_r, q * H // nc, (q + 1) * H // nc, True)
                _end(sync)
        # phases 1 + NPH * i + ph: a chunk's columns of the state gradient from step s + 1 (none for i = 0), then
        # its units of step s (with `LAYER_NORM`, in a phase of their own: its group of rows, every unit)
        for i in range(T + 1):
            s = T - 1 - i
            for ph in range(NPH if s >= 0 else 1):
                for k in range(nc):
                    q = (tid + k) % nc
                    if not _begin(sync, q, 1 + NPH * i + ph, nc):
                        continue
                    j0, j1 = (0, H) if by_rows else (q * H // nc, (q + 1) * H // nc)
                    p0, p1 = (0, P) if by_rows else (q * P // nc, (q + 1) * P // nc)
                    r0, r1 = row_block(by_rows, q, nc, B)
                    if ph == 0 and i > 0:
                        dap, panel = da[(s + 1) % 2], 0 if by_rows else q * span
                        _dh_prev(
                            dap[r0:r1], w_hh, wp, dhp[r0:r1], dhz[r0:r1], lens[r0:r1], s + 1, dh[r0:r1], p0, p1, panel
                        )
                        if ZONEOUT:
                            for b in range(r0, r1):
                                if s + 1 < lens[b]:
                                    _add(dh[b], dzo[b], dh[b], p0, p1)
                        if RESETS:
                            for b in range(r0, r1):
                                if _resets(zero, lens, rev, s + 1, b):
                                    _fill(dh[b], p0, p1)
                    if DY_FIRST:
                        if ph == 0 and s >= 0:
                            for b in range(r0, r1):
                                if s < lens[b]:
                                    t = _step_time(s, lens[b], rev)
                                    if ZONEOUT:
                                        _add(dh[b], dy[t, b], dh[b], p0, p1)
                                        _split(dh[b], keep_row(keep_h, t, b), dzo[b], p0, p1)
                                    if PROJ:
                                        for p in range(p0, p1):
                                            if not ZONEOUT:
                                                dh[b, p] += dy[t, b, p]
                                            dh_out[s, b, p] = dh[b, p]
                                elif PROJ:
                                    _fill(dh_out[s, b], p0, p1)
                                    _fill(hraw[s, b], j0, j1)
                    if ph == NPH - 1 and s >= 0:
                        if PROJ:
                            mm_rows(dh, w_hr, wr, dhc, j0, j1, q * span_r, True)
                        das = da[s % 2]
                        b0, b1, u0, u1 = _cell_span(LAYER_NORM or by_rows, q, nc, B, H, j0, j1)
                        for b in range(b0, b1):
                            if not by_rows and b + AHEAD < b1 and s < lens[b + AHEAD]:
                                t2 = _step_time(s, lens[b + AHEAD], rev)
                                if RNN_Y:
                                    _prefetch_units(y[t2, b + AHEAD], H, u0, u1)
                                else:
                                    _prefetch_units(saved[s, b + AHEAD], H, u0, u1)
                                _prefetch_units(dgx[t2, b + AHEAD], H, u0, u1)
                                if not PROJ:
                                    _prefetch_units(dy[t2, b + AHEAD], H, u0, u1)
                                if DGH:
                                    _prefetch_units(dgh[t2, b + AHEAD], H, u0, u1)
                                if LSTM and s > 0:
                                    _prefetch_units(saved[s - 1, b + AHEAD, CP * H :], H, u0, u1)
                            if s >= lens[b]:
                                for g in range(G):
                                    _fill(dgx[s, b], g * H + u0, g * H + u1)
                                    if DGH:
                                        _fill(dgh[s, b], g * H + u0, g * H + u1)
                                continue
                            t = _step_time(s, lens[b], rev)
                            if LSTM:
                                if PROJ:
                                    _lstm_out(saved[s, b], hraw[s, b], H, u0, u1)
                                elif ZONEOUT:
                                    _copy(dh[b], dhc[b], u0, u1)
                                else:
                                    _add(dh[b], dy[t, b], dhc[b], u0, u1)
                                cp = saved[s - 1, b, CP * H :] if s > 0 else c0[b]
                                if RESETS:
                                    if zero[t, b]:
                                        cp = zrow
                                if ZONEOUT:
                                    _split(dc[b], keep_row(keep_c, t, b), dcz[b], u0, u1)
                                if LAYER_NORM:
                                    sv, chat, sm = saved[s, b], saved[s, b, o_ch:o_rs], sums[b, 2 * GH :]
                                    _lstm_ln_grads(
                                        sv, cp, dhc[b], dc[b], dcs[b], das[b], chat, sv[o_rs + 1], ln_cw, ln_cb, sm
                                    )
                                else:
                                    _lstm_grads(saved[s, b], cp, dhc[b], dc[b], dcs[b], das[b], H, u0, u1)
                                if ZONEOUT:
                                    _add(dc[b], dcz[b], dc[b], u0, u1)
                                if RESETS:
                                    if zero[t, b]:
                                        _fill(dc[b], u0, u1)
                            elif GRU:
                                if ZONEOUT:
                                    _copy(dh[b], dhc[b], u0, u1)
                                else:
                                    _add(dh[b], dy[t, b], dhc[b], u0, u1)
                                # the state before the step: `y` at the sequence's step before, or `h0` at its first
                                hp = y[_step_time(s - 1, lens[b], rev), b] if s > 0 else h0[b]
                                if RESETS:
                                    if zero[t, b]:
                                        hp = zrow
                                _gru_grads(saved[s, b], hp, dhc[b], das[b], dgx[t, b], dhz[b], H, u0, u1)
                                if not LAYER_NORM:
                                    for g in range(3):
                                        _copy(das[b], dgh[t, b], g * H + u0, g * H + u1)
                            elif RNN_Y:
                                _rnn_grad(y[t, b], dh[b], dy[t, b], relu, das[b], u0, u1)
                            else:
                                _rnn_grad(saved[s, b], dh[b], zrow, relu, das[b], u0, u1)
                            # GRU's n gate of dgx is `_gru_grads`'s own
                            for g in range(G - 1 if GRU else G):
                                _copy(das[b], dgx[t, b], g * H + u0, g * H + u1)
                            if LAYER_NORM:
                                sv = saved[s, b]
                                _ln_grads(das[b], sv[o_xh:o_ch], ln_hh, sv[o_rs], sums[b, :GH], sums[b, GH : 2 * GH])
                                _copy(das[b], dgh[t, b], 0, GH)
                    _end(sync)
        if tid == 0:
            _wait(sync, (2 + NPH * T) * nc)

    return fwd, bwd


def _unowned(context, builder, ty, v):
    # `v` of numba type `ty` with its arrays' meminfo and parent cleared: the loop's views of them then skip NRT's
    # atomic reference counts (the caller holds the arrays meanwhile)
    if isinstance(ty, types.Array):
        ary = context.make_array(ty)(context, builder, v)
        ary.meminfo = cgutils.get_null_value(ary.meminfo.type)
        ary.parent = cgutils.get_null_value(ary.parent.type)
        return ary._getvalue()
    if isinstance(ty, types.BaseTuple):
        items = [_unowned(context, builder, t, builder.extract_value(v, i)) for i, t in enumerate(ty.types)]
        return context.make_tuple(builder, ty, items)
    return v


@intrinsic
def _bind(typingctx, addr, args, work, sync, nc):
    # `(tramp, frame)`: the address of a C function `tramp(frame, tid)` that runs `loop(*args, work, sync, tid, nc)`
    # through the entry point at `addr` of a loop compiled for exactly these argument types (`entry_point`; loops
    # return nothing), and the address of `frame`, `addr` and those arguments but `tid` on this function's stack
    argtys = (*args.types, work, sync, types.int64, nc)
    kept = (*args.types, work, sync, nc)

    def codegen(context, builder, sig, llargs):
        i8p, i64 = ir.IntType(8).as_pointer(), ir.IntType(64)
        values = [*cgutils.unpack_tuple(builder, llargs[1]), *llargs[2:]]
        saved = [llargs[0], *(_unowned(context, builder, t, v) for t, v in zip(kept, values, strict=True))]
        frame_ty = ir.LiteralStructType([v.type for v in saved])
        frame = cgutils.alloca_once(builder, frame_ty)
        for i, v in enumerate(saved):
            builder.store(v, cgutils.gep_inbounds(builder, frame, 0, i))
        tramp = ir.Function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i64]), builder.module.get_unique_name("tramp")
        )
        tramp.linkage = "internal"
        tb = ir.IRBuilder(tramp.append_basic_block())
        p_frame = tb.bitcast(tramp.args[0], frame_ty.as_pointer())
        a_addr, *a, a_nc = (tb.load(cgutils.gep_inbounds(tb, p_frame, 0, i)) for i in range(len(saved)))
        fn = tb.inttoptr(a_addr, context.call_conv.get_function_type(types.none, argtys).as_pointer())
        context.call_conv.call_function(tb, fn, types.none, argtys, [*a, tramp.args[1], a_nc])
        tb.ret_void()
        addrs = builder.ptrtoint(tramp, i64), builder.ptrtoint(frame, i64)
        return context.make_tuple(builder, sig.return_type, addrs)

    return types.UniTuple(types.int64, 2)(types.int64, args, work, sync, nc), codegen


@intrinsic
def _call_c(typingctx, fn, frame, tid):
    # the C function `fn(frame, tid)` of `_bind`
    def codegen(context, builder, sig, llargs):
        i8p = ir.IntType(8).as_pointer()
        ptr = builder.inttoptr(llargs[0], ir.FunctionType(ir.VoidType(), [i8p, llargs[2].type]).as_pointer())
        builder.call(ptr, [builder.inttoptr(llargs[1], i8p), llargs[2]])
        return context.get_dummy_value()

    return types.none(types.int64, types.int64, types.int64), codegen


@njit(parallel=_parallel(), **_OPTS)
def _launch_bound(tramp, frame, nc):
    # `tramp(frame, tid)` for every `tid < nc` on numba's threads: the only function compiled parallel, once
    for tid in prange(nc):
        _call_c(tramp, frame, np.int64(tid))


@njit(**_OPTS)
def launch(addr, args, work, sync, nc):
    """`loop(*args, work, sync, tid, nc)` for every `tid < nc` on numba's threads (one chunk: on the calling thread,
    without waking them), through the loop's compiled entry point `addr` (`entry_point`). Compiled serially per
    loop's argument types: neither the loop nor the parallel part compiles again."""
    # a parallel launcher per loop instead (prange over the loop) made the cold compile of all cells three times longer
    tramp, frame = _bind(addr, args, work, sync, nc)
    if nc == 1:
        _call_c(tramp, frame, np.int64(0))
    else:
        _launch_bound(tramp, frame, nc)


def entry_point(loop, args):
    """Address of `loop`'s native entry point for the argument values `args`, compiled first if need be."""
    sig = tuple(numba.typeof(v) for v in args)
    if sig not in loop.overloads:
        loop.compile(sig)
    cres = loop.overloads[sig]
    return cres.library.get_pointer_to_function(cres.fndesc.llvm_func_name)
