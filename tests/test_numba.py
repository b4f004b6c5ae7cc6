"""What is particular to the numba backend; its float64/float32 contract is tests/test_contract.py's."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import (
    assert_outputs_close,
    cast,
    check_layer_norm,
    contract_problem,
    layer_norm_problem,
    mixed_lengths,
    run_contract,
)

from seqfast.kernels import reference

try:
    import seqfast.kernels.numba as nb
except ImportError as e:
    nb, _why = None, f"seqfast.kernels.numba does not import: {e}"
else:
    _why = None

needs_numba = pytest.mark.skipif(nb is None, reason=_why or "")

CELLS = ["rnn_tanh", "rnn_relu", "lstm", "gru"]
# (T, B, H, P): B17 covers whole register tiles of the recurrent product and a leftover row
SHAPE, PROJ_SHAPE = (9, 17, 20, None), (6, 17, 12, 5)


@needs_numba
@pytest.mark.parametrize("cell", CELLS)
def test_inference_matches_training_forward(cell):
    args, _ = contract_problem(cell, 6, 5, 16, lengths=mixed_lengths(6, 5), dtype=torch.float32)
    train = nb.fwd(cell, **args, reverse=True, need_saved=True)
    infer = nb.fwd(cell, **args, reverse=True, need_saved=False)
    assert infer[3].shape == (0,)
    assert train[3].shape == nb.saved_shape(cell, 6, 5, 16, 16)
    for a, b in zip(train[:3], infer[:3], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


@needs_numba
@pytest.mark.parametrize("cell", CELLS)
def test_layer_norm_inference_matches_training_forward(cell):
    """With layer_norm the forward without `saved` (one step of scratch) gives the training forward's outputs, and
    a projection is refused."""
    args, _ = layer_norm_problem(cell, 6, 5, 16, lengths=mixed_lengths(6, 5), resets=True, dtype=torch.float32)
    train = nb.fwd(cell, **args, reverse=True, need_saved=True)
    infer = nb.fwd(cell, **args, reverse=True, need_saved=False)
    assert infer[3].shape == (0,)
    assert train[3].shape == nb.saved_shape(cell, 6, 5, 16, 16, layer_norm=True)
    for a, b in zip(train[:3], infer[:3], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    if cell == "lstm":
        with pytest.raises(ValueError, match="projection"):
            nb.fwd(cell, **{**args, "w_hr": torch.zeros(16, 16)})


# layer_norm at 200 units: three chunks of the product (of 66 and 67 units), so three groups of rows
LN_CHUNKED_H = 200


@needs_numba
@pytest.mark.parametrize("B", [1, 5, 17])
@pytest.mark.parametrize("cell", CELLS)
def test_layer_norm_by_chunks_and_groups(cell, B):
    """`layer_norm` with its product by several chunks of units and its rows by groups (empty ones at B = 1), or at
    B = 17, two register tiles of rows and one more, by blocks of rows (one on one thread), with resets and zoneout,
    against the float64 oracle at the contract's bounds."""
    T = 5
    nc, by_rows = nb._chunks(LN_CHUNKED_H, B, 0, layer_norm=True)
    assert by_rows if B >= 2 * nb.loops.TILE_ROWS else (nc, by_rows) == (3, False)
    for dtype, tol in [(torch.float64, 1e-12), (torch.float32, 2e-5)]:
        args, cot = layer_norm_problem(
            cell, T, B, LN_CHUNKED_H, lengths=mixed_lengths(T, B), resets=True, zoneout="train", dtype=dtype, seed=B
        )
        check_layer_norm(nb, cell, args, cot, True, tol)


def _results_on_threads(cell, args, cot, threads):
    """float32 `nb.fwd` and `nb.bwd` of a problem with options (`args["ext"]`) on `threads` threads: every output and
    gradient (None left out)."""
    call, ext, a = {k: v for k, v in args.items() if k != "ext"}, args["ext"], args
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        y, hT, cT, saved = nb.fwd(cell, **call, ext=ext)
        out = nb.bwd(cell, *cot, a["w_hh"], a["b_hh"], None, a["h0"], a["c0"], a["lengths"], y, saved, False, ext)
    finally:
        torch.set_num_threads(before)
    grads = [*out[:5], *(out[5] if len(out) > 5 else ())]
    return [t for t in (y, hT, cT, saved, *grads) if t is not None]


def _two_threads():
    numba = pytest.importorskip("numba")
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has one thread here: nothing to compare one thread with")
    return 2


@needs_numba
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("B", [5, 17], ids=["chunks-of-units", "blocks-of-rows"])
def test_layer_norm_thread_count_independent(cell, B):
    """float32 `layer_norm` outputs and gradients are bitwise the same on one thread and on two: its chunks of units
    (B = 5) or blocks of rows (B = 17) and groups of rows follow the shape, not the thread count."""
    T = 6
    assert nb._chunks(LN_CHUNKED_H, B, 0, layer_norm=True)[1] == (B == 17)
    args, cot = layer_norm_problem(
        cell, T, B, LN_CHUNKED_H, lengths=mixed_lengths(T, B), resets=True, zoneout="train", dtype=torch.float32
    )
    one, two = (_results_on_threads(cell, args, cot, n) for n in (1, _two_threads()))
    for i, (a, b) in enumerate(zip(one, two, strict=True)):
        assert torch.equal(a, b), f"output {i} differs between thread counts"


def _same_on_one_and_two_threads(cell, T, B, H, by_rows):
    """float32 outputs and gradients of a call with lengths, resets and zoneout bitwise the same on one thread (one
    chunk) and on two (two blocks of rows when `by_rows`, else two chunks of units)."""
    threads = torch.get_num_threads()
    try:
        for n, plan in ((1, (1, False)), (_two_threads(), (2, by_rows))):
            torch.set_num_threads(n)
            assert nb._chunks(H, B, 0) == plan
    finally:
        torch.set_num_threads(threads)
    args, cot = layer_norm_problem(
        cell, T, B, H, lengths=mixed_lengths(T, B), resets=True, zoneout="train", dtype=torch.float32
    )
    args["ext"] = args["ext"]._replace(ln_hh=None, ln_c_weight=None, ln_c_bias=None)
    one, two = (_results_on_threads(cell, args, cot, n) for n in (1, 2))
    for i, (a, b) in enumerate(zip(one, two, strict=True)):
        assert torch.equal(a, b), f"output {i} differs between thread counts"


@needs_numba
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("T", [7, 2], ids=["panels", "dot-products"])
def test_row_blocks_thread_count_independent(cell, T):
    """Below 64 units two threads split the rows into two blocks, which one thread runs as one chunk: float32 outputs
    and gradients bitwise the same either way, with lengths, resets and zoneout (21 rows: blocks of 10 and 11 rows,
    neither a whole number of tiles; at T = 2 too few rows in all to pack for, so the forward's products are dot
    products)."""
    B, H = 21, 20
    assert (B * T >= nb.loops.PACK_MIN_ROWS) == (T == 7)
    _same_on_one_and_two_threads(cell, T, B, H, by_rows=True)


@needs_numba
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("B", [1, 6])
def test_unit_chunks_thread_count_independent(cell, B):
    """From 64 units a batch too small for blocks of rows splits the units into chunks on two threads, one chunk on
    one: with fewer rows than a register tile the products are dot products, six rows of `w_hh` at a time, and float32
    outputs and gradients are bitwise the same either way, with lengths, resets and zoneout (each chunk's last six rows
    end at its last row, so every row sums in a group of six alike)."""
    _same_on_one_and_two_threads(cell, 3, B, 70, by_rows=False)


@needs_numba
@pytest.mark.parametrize("P", [4, 6, 11, 13])
def test_projection_chunks_thread_count_independent(P):
    """LSTM's projection in chunks of columns on two threads, one chunk on one, at a batch below a register tile (dot
    products): float32 outputs and gradients bitwise the same, with lengths (fewer than twelve columns stay one
    chunk: a share of fewer than six would sum its columns outside `_dot_rows`' groups of six)."""
    T, B, H = 3, 6, 70
    args, cot = contract_problem("lstm", T, B, H, P, lengths=mixed_lengths(T, B), dtype=torch.float32)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, _two_threads()):
            torch.set_num_threads(n)
            assert nb._chunks(H, B, 0, proj=True) == (n, False)
            results.append(run_contract(nb, "lstm", args, cot, False))
    finally:
        torch.set_num_threads(threads)
    for i, (a, b) in enumerate(zip(*results, strict=True)):
        assert (a is None) == (b is None), f"output {i}"
        assert a is None or torch.equal(a, b), f"output {i} differs between thread counts"


@needs_numba
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_declines_half_precision(dtype):
    gx, w_hh, h0 = torch.zeros(2, 1, 12, dtype=dtype), torch.zeros(12, 4, dtype=dtype), torch.zeros(1, 4, dtype=dtype)
    reason = nb.unsupported("gru", gx, w_hh, h0)
    assert reason is not None and str(dtype) in reason


@needs_numba
def test_declines_other_devices_and_mixed_dtypes():
    gx, w_hh, h0 = torch.zeros(2, 1, 12), torch.zeros(12, 4), torch.zeros(1, 4)
    assert nb.unsupported("gru", gx, w_hh, h0) is None
    assert "meta" in nb.unsupported("gru", gx.to("meta"), w_hh, h0)
    assert "h0" in nb.unsupported("gru", gx, w_hh, h0.double())
    assert "cell" in nb.unsupported("lstm2", gx, w_hh, h0)


@needs_numba
def test_rejects_lengths_out_of_range():
    args, _ = contract_problem("rnn_tanh", 4, 2, 8, lengths=[5, 1])
    with pytest.raises(ValueError, match="lengths"):
        nb.fwd("rnn_tanh", **args)


_NO_NUMBA = """
import sys
sys.modules["numba"] = None
from seqfast import dispatch
try:
    import seqfast.kernels.numba
except ImportError as e:
    print("ImportError:", e)
for row in dispatch.backends():
    if row.name == "numba":
        print("table:", row.available, row.why_not)
"""


def test_unavailable_without_numba():
    out = subprocess.run([sys.executable, "-c", _NO_NUMBA], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith("ImportError:") and "numba" in line for line in lines), out.stdout
    for line in lines:
        if line.startswith("table:"):
            assert line.startswith("table: False") and "numba" in line, line
            assert "ImportError" in line or "ModuleNotFoundError" in line, line


_COMPILES = """
import torch
from numba.core import event
import seqfast.kernels.numba as nb

class Compiled(event.Listener):
    def on_start(self, ev):
        pass

    def on_end(self, ev):
        print("compiled:", ev.data["dispatcher"].py_func.__qualname__)

event.register("numba:compile", Compiled())
T, B, H = 2, 1, 4
nb.fwd("rnn_tanh", torch.randn(T, B, H), torch.randn(H, H), torch.randn(H), torch.randn(B, H), need_saved=False)
"""


@needs_numba
@pytest.mark.slow
def test_a_cell_compiles_alone_and_loads_from_cache(tmp_path):
    """A cell's first call compiles its own loop and math alone (here RNN's float32 forward: its `tanh` but not the
    `sigmoid` of GRU's and LSTM's math, which the loops inline with the rest of the cell math; no backward, no
    options' code), and a new process loads all of it from numba's on-disk cache, closures and launcher included."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}

    def compiled():
        out = subprocess.run([sys.executable, "-c", _COMPILES], env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        return {line.split()[1] for line in out.stdout.splitlines() if line.startswith("compiled:")}

    cold = compiled()
    assert {"_loops.<locals>.fwd", "launch", "_tanh32"} <= cold, cold
    others = {"_sigmoid32", "_resets", "keep_row", "_mix", "_ln_gain", "_ln_grads", "_lstm_ln_out", "_tanh32_precise"}
    assert not cold & {*others, "_loops.<locals>.bwd"}, cold
    assert compiled() == set()


@needs_numba
@pytest.mark.parametrize("by_rows", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("cell", CELLS)
def test_more_chunks_than_threads(cell, threads, by_rows, monkeypatch):
    """Five chunks per phase on fewer threads, of hidden units or (`by_rows`, without a projection) blocks of rows,
    some empty: a prange iteration that runs late or after another on the same thread finds its chunks taken, so the
    loops neither deadlock nor change the result."""
    numba = pytest.importorskip("numba")
    T, B, H, P = PROJ_SHAPE if cell == "lstm" else SHAPE
    args, cot = contract_problem(cell, T, B, H, P, lengths=mixed_lengths(T, B))
    expected = run_contract(reference, cell, args, cot, True)

    def chunks(H, B, weight_bytes, layer_norm=False, proj=False):
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        return 5, by_rows and not proj

    monkeypatch.setattr(nb, "_chunks", chunks)
    actual = run_contract(nb, cell, *cast(args, cot, torch.float32), True)
    # float32 with a rational tanh of a few ulp over 6-9 steps: measured <= 2e-5 relative RMS
    assert_outputs_close(actual, expected, 1e-4, torch.float32)


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("extra_rows", [0, 1, 3, 7])
@pytest.mark.parametrize("K", [1, 7, 33])
@pytest.mark.parametrize("cols", ["one", "lanes+1", "panel", "2 panels+1"])
@pytest.mark.parametrize("transposed", [False, True])
def test_mm_rows_tiles_and_remainders(dtype, extra_rows, K, cols, transposed):
    """The recurrent product on whole register tiles of packed panels (full, one vector short, one lane long) and
    leftover rows of `a` (tiles of 4, 2 and 1 rows), and with no panels at all; with `transposed` on the rows of `w.T`
    (the backward's, packed from `w` itself, always; without panels an error). Columns of `out` outside `[j0, j1)` stay
    untouched, panels outside the call's too."""
    loops = nb.loops
    W = loops.TILE_VECTORS * loops.VECTOR_BYTES // np.dtype(dtype).itemsize
    lanes = W // loops.TILE_VECTORS
    n = {"one": 1, "lanes+1": lanes + 1, "panel": W, "2 panels+1": 2 * W + 1}[cols]
    j0, j1 = 3, 3 + n
    B = 2 * loops.TILE_ROWS + extra_rows
    rng = np.random.default_rng(K * 10 + extra_rows)
    a, w_rows = rng.standard_normal((B, K)).astype(dtype), rng.standard_normal((j1 + 2, K)).astype(dtype)
    w = np.ascontiguousarray(w_rows.T) if transposed else w_rows
    wp = np.full((loops.panel_count(n, W) + 2, K, W), np.nan, dtype)
    loops.pack(w, wp, 1, j0, j1, transposed)
    out = np.full((B, j1 + 2), np.nan, dtype)
    loops.mm_rows(a, w, wp, out, j0, j1, 1, transposed)
    tol = 1e-12 if dtype == np.float64 else 1e-5 * np.sqrt(K)
    np.testing.assert_allclose(out[:, j0:j1], a @ w_rows[j0:j1].T, rtol=tol, atol=tol)
    assert np.isnan(np.delete(out, np.s_[j0:j1], axis=1)).all()
    assert np.isnan(wp[0]).all() and np.isnan(wp[-1]).all()
    if transposed:
        with pytest.raises(ValueError, match="packed panels"):
            loops.mm_rows(a, w, wp[:0], out, j0, j1, 0, True)
        return
    # without panels (too few rows or steps to pack) every row takes the dot products
    unpacked = np.full_like(out, np.nan)
    loops.mm_rows(a, w, wp[:0], unpacked, j0, j1, 0)
    np.testing.assert_allclose(unpacked[:, j0:j1], a @ w_rows[j0:j1].T, rtol=tol, atol=tol)
    assert np.isnan(np.delete(unpacked, np.s_[j0:j1], axis=1)).all()


@needs_numba
@pytest.mark.parametrize("cell", CELLS)
def test_loops_on_several_panels_per_chunk(cell):
    """float32 loops at a width where each chunk's rows of a weight fill a panel and spill into the next, and a batch
    of whole tiles plus a leftover row, against the float64 reference."""
    loops = nb.loops
    H = 2 * loops.TILE_VECTORS * loops.VECTOR_BYTES // 4 + 3
    B, P = loops.TILE_ROWS + 1, (H // 2 if cell == "lstm" else None)
    T = -(-loops.PACK_MIN_ROWS // B)
    assert loops.panels(np.empty((H, H), np.float32), B, T, 1, H, 2)[0].shape[0] > 0, "the loops would not pack"
    args, cot = contract_problem(cell, T, B, H, P, lengths=mixed_lengths(T, B))
    expected = run_contract(reference, cell, args, cot, True)
    actual = run_contract(nb, cell, *cast(args, cot, torch.float32), True)
    # float32 sums of up to 4H = 396 terms per product over 8 to 13 steps: measured <= 3e-7 relative RMS
    assert_outputs_close(actual, expected, 1e-4, torch.float32)


_KEEPS_THREADS = """
import torch
import seqfast.kernels.numba as nb

torch.set_num_threads(1)
T, B, H = 3, 16, 8
nb.fwd("gru", torch.randn(T, B, 3 * H), torch.randn(3 * H, H), torch.randn(3 * H), torch.randn(B, H))
print("threads:", torch.get_num_threads())
"""


@needs_numba
def test_first_call_keeps_torchs_thread_count():
    """Starting numba's OpenMP pool, on the backend's first call in a process, leaves torch's thread count as the
    caller set it (the pool's start sets the OpenMP count that torch reads to the pool's size, every core by
    default)."""
    env = {**os.environ, "NUMBA_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", _KEEPS_THREADS], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "threads: 1" in out.stdout.splitlines(), out.stdout
