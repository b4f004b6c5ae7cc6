"""The C++ CPU backend (`seqfast.kernels.cpp` over `seqfast._C`): kernel contract against the float64 reference and
float64 saturation against torch.nn on every instruction-set path, bitwise repeatability across runs and thread
counts, and an install without the extension."""

import itertools
import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    assert_outputs_close,
    cast,
    check_layer_norm,
    contract_problem,
    layer_norm_problem,
    mixed_lengths,
    run_contract,
    twins,
)
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from seqfast import linear
from seqfast.autograd import folded_biases
from seqfast.kernels import common, reference
from seqfast.kernels.common import Projection

ROOT = Path(__file__).resolve().parent.parent
CELLS = ["rnn_tanh", "rnn_relu", "lstm", "gru"]

# float32 vs the float64 reference: the loops carry float32 state (u = 6e-8) and use a ~2-ulp polynomial exp and a
# rational tanh of a few ulp; measured relative RMS <= 5e-7 at T = 40 to 100, the bound 1e-5 is the float32 tolerance
# of the module parity tests (tests/helpers.py). float64 uses Cephes' ~2-ulp exp and tanh; its bound is
# tests/test_contract.py's.
F32_RTOL = 1e-5
F64_RTOL = 1e-12

inf, nan = float("inf"), float("nan")


@pytest.fixture(scope="module")
def cpp():
    return pytest.importorskip("seqfast.kernels.cpp", reason="seqfast._C is not built")


def run_reference(cell, args, cot, reverse):
    """`run_contract` on the reference, single-threaded: its many tiny ops only pay for thread hand-offs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_contract(reference, cell, args, cot, reverse)
    finally:
        torch.set_num_threads(threads)


def isas(cpp):
    """Instruction-set paths this CPU can run, best last."""
    order = ["generic", "avx2", "avx512"]
    return order[: order.index(cpp._C.isa()) + 1]


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, F32_RTOL), (torch.float64, F64_RTOL)], ids=["f32", "f64"])
@pytest.mark.parametrize("cell", CELLS)
def test_accuracy_per_isa(cpp, cell, dtype, rtol):
    """Every instruction-set path against the reference, the one-row products (B = 1) included: 37 and 150 units give
    partial and full vectors and row blocks of the matrix-vector kernel; B = 53 splits the batch into blocks of rows
    that run their steps apart (two, of 27 and 26 rows; four of 14 with lengths), B = 6 splits 70 units into chunks."""
    previous = cpp._C.isa()
    try:
        for isa in isas(cpp):
            cpp._C.set_isa(isa)
            assert_matches_reference(cpp, cell, 40, [(6, 70), (1, 37), (1, 150), (53, 37)], dtype, rtol)
    finally:
        cpp._C.set_isa(previous)


def _layer_norm_grads(z, weight, bias, dy, norm):
    """`norm(z, weight, bias)` and its gradients of `z`, `weight` and `bias` (where given) from `dy`."""
    leaves = [t.detach().clone().requires_grad_() for t in (z, weight, bias) if t is not None]
    z, weight, bias = leaves[0], leaves[1], leaves[2] if bias is not None else None
    y = norm(z, weight, bias)
    return [y, *torch.autograd.grad(y, leaves, dy)]


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.float64, 1e-12)], ids=["f32", "f64"])
@pytest.mark.parametrize(
    "shape", [(3, 5, 37), (130, 1), (1, 1024), (70, 16), (0, 8)], ids=["N37", "N1", "one-row", "N16", "no-rows"]
)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_input_layer_norm_per_isa(cpp, dtype, rtol, shape, bias):
    """The layer_norm option's input LayerNorm on every instruction-set path against torch's in float64: output and
    the gradients of the input, weight and bias, for partial and whole vectors, rows past a block of 64 and none;
    elementwise within `rtol` of the largest value (float32's rounding over sums of up to 130 rows)."""
    gen = torch.Generator().manual_seed(sum(shape))
    z = torch.randn(shape, generator=gen, dtype=dtype) * 3 + 1.5
    weight = torch.rand(shape[-1], generator=gen, dtype=dtype) + 0.5
    b = torch.randn(shape[-1], generator=gen, dtype=dtype) if bias else None
    dy = torch.randn(shape, generator=gen, dtype=dtype)

    def torch_norm(z, weight, bias):
        return F.layer_norm(z, weight.shape, weight, bias, common.LN_EPS)

    double = [t.double() if t is not None else None for t in (z, weight, b, dy)]
    expected = _layer_norm_grads(*double, torch_norm)
    # the input gradient's rounding scales with rstd |dy weight| (N = 1: rstd = eps^-1/2, the exact gradient 0)
    rstd = (z.double().var(-1, unbiased=False) + common.LN_EPS).rsqrt().max().item() if z.numel() else 1.0
    scales = [1.0, rstd * (dy.abs().max().item() if dy.numel() else 1.0) * weight.max().item(), 1.0, 1.0]
    previous = cpp._C.isa()
    try:
        for isa in isas(cpp):
            cpp._C.set_isa(isa)
            actual = _layer_norm_grads(z, weight, b, dy, linear.input_layer_norm)
            assert actual[0].grad_fn.name().endswith("InputLayerNormBackward"), "torch's LayerNorm ran"
            for name, a, e, scale in zip(("y", "dz", "dweight", "dbias"), actual, expected, scales, strict=False):
                assert a.dtype == dtype, name
                atol = rtol * max(scale, e.abs().max().item() if e.numel() else 1.0)
                torch.testing.assert_close(a.detach().double(), e, rtol=rtol, atol=atol, msg=f"{isa} {name}")
    finally:
        cpp._C.set_isa(previous)


def test_input_layer_norm_thread_count_independent(cpp):
    """The weight and bias gradients of the input LayerNorm sum fixed blocks of rows in order: bitwise the same on one
    thread and two."""
    gen = torch.Generator().manual_seed(0)
    z, dy = (torch.randn(333, 200, generator=gen) for _ in range(2))
    weight, b = torch.rand(200, generator=gen), torch.randn(200, generator=gen)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(_layer_norm_grads(z, weight, b, dy, linear.input_layer_norm))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results, strict=True):
        assert torch.equal(one, two)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_input_layer_norm_custom_op(cpp, bias):
    """The input LayerNorm as the custom ops that `torch.compile` traces: `opcheck` of both, and bitwise the eager
    call's output and gradients."""
    gen = torch.Generator().manual_seed(1)
    z, dy = (torch.randn(70, 19, generator=gen) for _ in range(2))
    weight = torch.rand(19, generator=gen) + 0.5
    b = torch.randn(19, generator=gen) if bias else None
    leaves = [t.clone().requires_grad_() for t in (z, weight, *([b] if bias else []))]
    torch.library.opcheck(torch.ops.seqfast.input_layer_norm.default, (*leaves[:2], leaves[2] if bias else None))
    torch.library.opcheck(torch.ops.seqfast.input_layer_norm_backward.default, (dy, z, weight, True, True, bias))
    eager, op = (
        _layer_norm_grads(z, weight, b, dy, lambda *a, e=e: linear.input_layer_norm(*a, eager=e)) for e in (True, False)
    )
    assert eager[0].grad_fn.name().endswith("InputLayerNormBackward")
    assert "input_layer_norm" in op[0].grad_fn.name()
    for a, e in zip(op, eager, strict=True):
        assert torch.equal(a, e)


def test_input_layer_norm_differentiates_twice(cpp):
    """A backward with `create_graph=True` through the input LayerNorm gives gradients that differentiate again."""
    gen = torch.Generator().manual_seed(0)
    args = [
        torch.randn(4, 7, generator=gen, dtype=torch.float64, requires_grad=True),
        (torch.rand(7, generator=gen, dtype=torch.float64) + 0.5).requires_grad_(),
        torch.randn(7, generator=gen, dtype=torch.float64, requires_grad=True),
    ]
    assert torch.autograd.gradcheck(linear.input_layer_norm, args)
    assert torch.autograd.gradgradcheck(linear.input_layer_norm, args)


def assert_matches_reference(cpp, cell, T, sizes, dtype, rtol):
    """The contract's outputs and gradients in `dtype` within `rtol` of the float64 reference at each `(B, H)` of
    `sizes`, forward without lengths and reversed with mixed ones; LSTM also projected."""
    for (B, H), projected in itertools.product(sizes, [False, True]):
        if projected and cell != "lstm":
            continue
        P = 9 if projected else None
        for reverse, lengths in [(False, None), (True, mixed_lengths(T, B))]:
            args, cot = contract_problem(cell, T, B, H, P, lengths=lengths)
            ref = run_reference(cell, args, cot, reverse)
            ours = run_contract(cpp, cell, *cast(args, cot, dtype), reverse)
            assert_outputs_close(ours, ref, rtol, dtype)


def module_outputs(module, x):
    """`y` and the final states of `module(x)`."""
    y, state = module(x)
    return [y, *state] if isinstance(state, tuple) else [y, state]


# Per dtype: pre-activations that saturate, overflow exp or are not finite; ordinary, tiny and subnormal ones; and the
# tolerance (relative, absolute) away from saturation. float32's is 8 ulp of the outputs' scale, 1: GRU's `1 - z`
# cancels there, and both sides lose the same digits.
_EXTREMES = {
    torch.float64: (
        [40.0, -40.0, 25.0, -25.0, 710.0, -710.0, -745.5, 800.0, -800.0, 1e300, -1e20, inf, -inf, nan],
        [0.5, -0.3, 0.0, -0.0, 1e-310, 3.0],
        (1e-14, torch.finfo(torch.float64).tiny),
    ),
    torch.float32: (
        [40.0, -40.0, 25.0, -25.0, 88.5, -88.5, 89.0, -89.0, 104.0, -104.0, 1e30, -1e20, inf, -inf, nan],
        [0.5, -0.3, 0.0, -0.0, 1e-40, 3.0, 0.625, -0.625, 9.0, -17.0],
        (8 * 2**-24, 8 * 2**-24),
    ),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cell", CELLS)
def test_saturation_and_non_finite_match_torch(cpp, cell, dtype):
    """Activations of huge, infinite and NaN pre-activations on every instruction-set path against torch.nn in
    float64 (rounded to `dtype`): exactly where it saturates (tanh +-1, sigmoid 0 or 1 once exp overflows or vanishes;
    float32's sigmoid and tanh divide by a reciprocal estimate refined by Newton steps, which must give 0 at +inf),
    NaN where it is NaN, and within `_EXTREMES`' tolerance elsewhere. Every one of the 9 hidden units sees the same
    pre-activation, in full and partial vectors."""
    ref, ours = twins(cell, 1, 9, "cpp", dtype, bias=False)
    ref = ref.double()
    with torch.no_grad():
        for module in (ref, ours):
            module.weight_ih_l0.fill_(1.0)
            module.weight_hh_l0.fill_(0.0)
    large, moderate, (rtol, atol) = _EXTREMES[dtype]
    x = torch.tensor(large + moderate, dtype=torch.float64).view(1, -1, 1)
    expected = torch.cat([t.flatten() for t in module_outputs(ref, x)]).to(dtype)
    previous = cpp._C.isa()
    try:
        for isa in isas(cpp):
            cpp._C.set_isa(isa)
            actual = torch.cat([t.flatten() for t in module_outputs(ours, x.to(dtype))])
            assert torch.equal(actual.isnan(), expected.isnan()), isa
            saturated = (expected.abs() == 1) | (expected == 0) | expected.isinf()
            assert torch.equal(actual[saturated], expected[saturated]), isa
            finite = expected.isfinite()
            torch.testing.assert_close(actual[finite], expected[finite], rtol=rtol, atol=atol, msg=isa)
    finally:
        cpp._C.set_isa(previous)


def outputs_f32(cpp, cell, P=None, B=20, T=9, H=200):
    """A float32 problem spanning several chunks and panels, with lengths (B = 20, mixed ones at other B >= 12) and
    reverse."""
    lengths = torch.tensor([9, 3, 0, 7, 9] * 4) if B == 20 else mixed_lengths(T, B) if B >= 12 else None
    args, cot = contract_problem(cell, T, B, H, P, lengths=lengths, dtype=torch.float32, seed=1)
    return [t for t in run_contract(cpp, cell, args, cot, True) if t is not None]


# B = 2 takes the k-split GEMM tiles of the packed weights, B = 20 the full ones; B = 1 (one row a step, at any T) is
# never packed and runs the matrix-vector kernel, as does the input projection at T = 1; H = 48 is split in two chunks
# of a smaller width. From B = 12 the rows run in blocks (B = 20, 53), unless the weights are large for a block's
# rows (B = 12 at H = 400, split by hidden units).
@pytest.mark.parametrize(
    "B, T, H",
    [(1, 16, 200), (2, 9, 200), (20, 9, 200), (1, 9, 200), (1, 1, 200), (20, 9, 48), (53, 9, 37), (12, 9, 400)],
)
@pytest.mark.parametrize("cell", CELLS + ["lstm_proj"])
def test_thread_count_independent(cpp, cell, B, T, H):
    P = 40 if cell == "lstm_proj" else None
    assert_thread_count_independent(lambda: outputs_f32(cpp, cell.removesuffix("_proj"), P, B, T, H))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_one_row_projection_in_halves_is_thread_count_independent(cpp, dtype):
    """A one-row input projection of large weights (from 384 KB) runs as two halves of its outputs, and a float64
    step's chunks on two threads from half the float32 multiply-adds: both bitwise the same with 1, 2 and 3 threads,
    the projection as F.linear (float64 tightly), and a 2-layer GRU(200) step at B = 1 through `stack`."""
    g = torch.Generator().manual_seed(5)
    w_ih, b_ih = torch.randn(600, 200, generator=g, dtype=dtype), torch.randn(600, generator=g, dtype=dtype)
    x = torch.randn(1, 1, 200, generator=g, dtype=dtype)
    tol = dict(rtol=1e-13, atol=1e-13) if dtype == torch.float64 else dict(rtol=F32_RTOL, atol=1e-5)
    for b in (None, b_ih):
        torch.testing.assert_close(linear.project(x, w_ih, b), F.linear(x, w_ih, b), **tol)
        assert_thread_count_independent(lambda b=b: [linear.project(x, w_ih, b)])
    weights = [
        tuple(torch.randn(shape, generator=g, dtype=dtype) / 8 for shape in ((600, 200), (600, 200), 600, 600))
        + (None,)
        for _ in range(2)
    ]
    h0 = torch.randn(2, 1, 200, generator=g, dtype=dtype)
    assert_thread_count_independent(lambda: list(cpp.stack("gru", x, h0, None, weights, False)[:2]))


def assert_thread_count_independent(outputs):
    """`outputs()` (a list of tensors) bitwise the same with 1, 2 and 3 threads."""
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(outputs())
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for i, (a, b) in enumerate(zip(results[0], other, strict=True)):
            assert torch.equal(a, b), f"output {i} differs between thread counts"


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, F32_RTOL), (torch.float64, F64_RTOL)], ids=["f32", "f64"])
@pytest.mark.parametrize("plan", ["blas-rows", "packed-units", "blas-units"])
@pytest.mark.parametrize("cell", CELLS)
def test_accuracy_per_plan(cpp, monkeypatch, cell, plan, dtype, rtol):
    """The plans the conftest does not pin against the reference: B = 20 and 53 run in row blocks or by hidden units,
    on packed panels (float32, T >= 4) or BLAS; with lengths and reversed, and LSTM also projected."""
    monkeypatch.setenv("SEQFAST_CPP_PLAN", plan)
    assert_matches_reference(cpp, cell, 12, [(20, 200), (53, 37), (1, 70)], dtype, rtol)


@pytest.mark.parametrize("plan", ["blas-rows", "packed-units", "blas-units"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "lstm_proj"])
def test_thread_count_independent_per_plan(cpp, monkeypatch, cell, plan):
    monkeypatch.setenv("SEQFAST_CPP_PLAN", plan)
    P = 40 if cell == "lstm_proj" else None
    cell = cell.removesuffix("_proj")
    assert_thread_count_independent(
        lambda: outputs_f32(cpp, cell, P, 20, 9, 200) + outputs_f32(cpp, cell, P, 53, 9, 37)
    )


def test_plans_calibrated_once_per_machine(cpp, monkeypatch, empty_calibration_cache):
    """Unpinned, the first call of a shape class times the plans that differ for it and keeps the fastest of the
    forward and of the backward with this machine's calibrations; a later process reads them back without timing, a
    call every plan runs alike times nothing, and an unknown plan's name is a ValueError."""
    from seqfast import native

    monkeypatch.delenv("SEQFAST_CPP_PLAN")
    monkeypatch.setattr(cpp, "_tunings", {})
    args, cot = contract_problem("lstm", 9, 20, 200, lengths=torch.tensor([9, 3, 0, 7, 9] * 4), dtype=torch.float32)
    ref = run_reference("lstm", args, cot, False)
    assert_outputs_close(run_contract(cpp, "lstm", args, cot, False), ref, F32_RTOL, torch.float32)
    (machine,) = json.loads(native.cache_path().read_text()).values()
    assert [key for key in machine if key.startswith("cpp-plans-")] == ["cpp-plans-lstm-float32-H200-P0-B32-T16"]
    assert all(plan in cpp.PLANS.values() for plan in machine["cpp-plans-lstm-float32-H200-P0-B32-T16"])

    def untimed(*args):
        raise AssertionError("timed again")

    monkeypatch.setattr(cpp, "_time_plans", untimed)
    monkeypatch.setattr(cpp, "_tunings", {})
    monkeypatch.setattr(native, "_machine_choices", None)
    assert_outputs_close(run_contract(cpp, "lstm", args, cot, False), ref, F32_RTOL, torch.float32)
    run_contract(cpp, "gru", *contract_problem("gru", 9, 1, 30, dtype=torch.float64), False)
    monkeypatch.setenv("SEQFAST_CPP_PLAN", "fastest")
    with pytest.raises(ValueError, match="SEQFAST_CPP_PLAN must be one of packed-rows"):
        run_contract(cpp, "lstm", args, cot, False)


def test_short_calls_calibrate_wider_chunks_once_per_machine(cpp, monkeypatch, empty_calibration_cache):
    """Unpinned, the first call of fewer than 4 steps of a shape class from 384 hidden units and two rows times the
    wider chunks against `_chunk`'s and keeps the fastest with this machine's calibrations, which a later process reads
    back; longer calls, one row, fewer units and pinned plans keep `_chunk`'s."""
    from seqfast import native

    timed = []

    def last(cell, dtype, T, B, H, chunks):
        timed.append((cell, T, B, H, chunks))
        return chunks[-1]

    monkeypatch.delenv("SEQFAST_CPP_PLAN")
    monkeypatch.setattr(cpp, "_tunings", {})
    monkeypatch.setattr(cpp, "_time_chunks", last)
    plans_timed_at = []

    def plans(cell, dtype, T, B, H, P, proj, chunk, *choices):
        plans_timed_at.append(chunk)
        return [2, 0]

    monkeypatch.setattr(cpp, "_time_plans", plans)
    w_hh = torch.zeros(3 * 512, 512)
    assert cpp._tuning("gru", torch.float32, 1, w_hh, 16, None)[0] == 256
    assert cpp._tuning("gru", torch.float32, 2, w_hh, 9, None)[0] == 256
    assert timed == [("gru", 1, 16, 512, [64, 128, 256]), ("gru", 2, 9, 512, [64, 128, 256])]
    # rows in blocks or hidden units: the plans are timed with the chunk the call keeps
    assert cpp._tuning("lstm", torch.float32, 3, torch.zeros(4 * 1024, 1024), 128, None) == (512, 2, 0)
    assert plans_timed_at == [512] and timed[2] == ("lstm", 3, 128, 1024, [64, 256, 512])
    (machine,) = json.loads(native.cache_path().read_text()).values()
    assert machine["cpp-chunk-gru-float32-H512-B16-T1"] == 256
    for T, B, H in [(4, 16, 512), (1, 1, 512), (1, 16, 256)]:
        w = torch.zeros(3 * H, H)
        assert cpp._tuning("gru", torch.float32, T, w, B, None)[0] == cpp._chunk("gru", w, B)
    monkeypatch.setenv("SEQFAST_CPP_PLAN", "packed-rows")
    assert cpp._tuning("gru", torch.float32, 1, w_hh, 16, None)[0] == 64
    assert len(timed) == 3

    def untimed(*args):
        raise AssertionError("timed again")

    monkeypatch.delenv("SEQFAST_CPP_PLAN")
    monkeypatch.setattr(cpp, "_time_chunks", untimed)
    monkeypatch.setattr(cpp, "_tunings", {})
    monkeypatch.setattr(native, "_machine_choices", None)
    assert cpp._tuning("gru", torch.float32, 1, w_hh, 16, None)[0] == 256


@pytest.mark.parametrize("chunk", [96, 192, 256])
@pytest.mark.parametrize("cell", CELLS)
def test_short_call_chunks_match_reference_for_any_thread_count(cpp, monkeypatch, cell, chunk):
    """Each wider chunk a short call may calibrate (at H = 384: a quarter, half, 256 units) within float32's and
    float64's tolerances of the reference, forward and reversed with lengths, and bitwise the same with 1, 2 and 3
    threads."""
    monkeypatch.delenv("SEQFAST_CPP_PLAN")
    monkeypatch.setattr(cpp, "_tunings", {})
    monkeypatch.setattr(cpp, "_short_chunk", lambda *args: chunk)
    for dtype, rtol in [(torch.float32, F32_RTOL), (torch.float64, F64_RTOL)]:
        assert_matches_reference(cpp, cell, 3, [(16, 384), (4, 384)], dtype, rtol)
    assert_thread_count_independent(
        lambda: outputs_f32(cpp, cell, None, 16, 1, 384) + outputs_f32(cpp, cell, None, 5, 3, 384)
    )
    assert cpp._tuning(cell, torch.float32, 1, torch.zeros(common.GATES[cell] * 384, 384), 16, None)[0] == chunk


def test_plans_timed_in_rotated_turns_by_their_best(cpp, monkeypatch):
    """A calibration runs each plan once untimed, then `_PLAN_TURNS` turns of a block of runs of each, each turn
    starting one plan further on, and picks the plan whose best turn was fastest: plan 3, slow in its first turn, over
    plan 1, steadily a little slower than 3's other turns."""
    clock, order = [0.0], []
    turns = {0: iter([2.0] * 5), 1: iter([1.8] * 5), 3: iter([5.0] + [1.5] * 4)}

    def run(plan):
        clock[0] += next(turns[plan]) if len(order) >= 3 else 1.0
        order.append(plan)

    monkeypatch.setattr(cpp.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(cpp, "_PLAN_BLOCK_S", 0.0)
    assert cpp._fastest(run, [0, 1, 3]) == 3
    assert order[3:] == [0, 1, 3, 1, 3, 0, 3, 0, 1, 0, 1, 3, 1, 3, 0]


def test_packed_weights_across_calls(cpp):
    """Each thread keeps its packed weights' memory for the next call: calls that grow, shrink and change cells in
    turn still match the reference."""
    for cell, H in [("lstm", 48), ("gru", 200), ("rnn_tanh", 24), ("lstm", 200), ("gru", 40)]:
        args, cot = contract_problem(cell, 8, 5, H, lengths=mixed_lengths(8, 5), seed=H)
        ref = run_reference(cell, args, cot, False)
        ours = run_contract(cpp, cell, *cast(args, cot, torch.float32), False)
        assert_outputs_close(ours, ref, F32_RTOL, torch.float32)


def test_large_outputs_reuse_freed_memory_and_resize(cpp):
    """Outputs of 1 MB or more take the memory freed ones of the same size held: a second call faults in almost none
    of its outputs' pages (the first call's freed memory would go back to the system, 31 MB here); the values stay
    the reference's, and such an output resizes as any tensor."""
    import resource

    args, cot = contract_problem("gru", 100, 64, 256, dtype=torch.float32, seed=4)
    expected = run_reference("gru", args, cot, False)
    cpp.fwd("gru", **args)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y, _, _, saved = cpp.fwd("gru", **args)
    faulted = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) * 4096
    assert faulted < (y.nbytes + saved.nbytes) / 8, f"{faulted} bytes of pages faulted in"
    del y, saved
    outputs = run_contract(cpp, "gru", *cast(args, cot, torch.float32), False)
    assert_outputs_close(outputs, expected, F32_RTOL, torch.float32)
    y = outputs[0]
    y.resize_(2 * y.numel()).fill_(1.0)
    assert y.sum().item() == y.numel()


@pytest.mark.parametrize(
    "dtype, lengths, feature",
    [
        (torch.float32, [5, 3, 3, 1], (7,)),
        (torch.float64, [4, 4], (2, 3)),
        (torch.bfloat16, [1], (5,)),
        (torch.int64, [2, 1], ()),
        (torch.float32, [1, 1, 1], (4,)),
    ],
    ids=["f32", "f64-2d-features", "bf16-B1-T1", "int64-scalars", "T1"],
)
def test_pad_packed_and_back(cpp, dtype, lengths, feature):
    """`pad_packed` gives `pad_packed_sequence`'s padded batch (zeros past each length) and lengths; `unpad_packed`
    gives the packed data back from it; batch_sizes that do not fit the data raise."""
    T = lengths[0]
    x = torch.randn(T, len(lengths), *feature).mul(100).to(dtype)
    packed = pack_padded_sequence(x, lengths)
    padded, expected_lengths = pad_packed_sequence(packed)
    out, out_lengths = cpp._C.pad_packed(packed.data, packed.batch_sizes, True)
    assert out.dtype == dtype and torch.equal(out, padded) and torch.equal(out_lengths, expected_lengths)
    assert torch.equal(cpp._C.unpad_packed(out, packed.batch_sizes, True), packed.data)
    with pytest.raises(RuntimeError, match="batch_sizes sum to"):
        cpp._C.pad_packed(packed.data[1:], packed.batch_sizes, False)
    for wrong in ([1, 2], [2, 0]):
        with pytest.raises(RuntimeError, match="positive and non-increasing"):
            cpp._C.pad_packed(torch.zeros(3, 2), torch.tensor(wrong), False)


@pytest.mark.parametrize("cell", CELLS)
def test_repeatable(cpp, cell):
    first = outputs_f32(cpp, cell)
    second = outputs_f32(cpp, cell)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_need_saved_false(cpp):
    args, _ = contract_problem("lstm", 4, 2, 8, dtype=torch.float32)
    y, hT, cT, saved = cpp.fwd("lstm", **args, need_saved=False)
    y_ref, hT_ref, cT_ref, _ = cpp.fwd("lstm", **args)
    assert saved.shape == (0,)
    assert torch.equal(y, y_ref) and torch.equal(hT, hT_ref) and torch.equal(cT, cT_ref)


def test_saved_shape(cpp):
    assert cpp.saved_shape("lstm", 3, 2, 5, 4) == (3, 2, 25)
    assert cpp.saved_shape("gru", 3, 2, 5, 5) == (3, 2, 20)
    assert cpp.saved_shape("rnn_tanh", 3, 2, 5, 5) == (3, 2, 0)
    assert cpp.saved_shape("lstm", 3, 2, 5, 5, zoneout=True, layer_norm=True) == (3, 2, 30 + 20 + 3)
    assert cpp.saved_shape("gru", 3, 2, 5, 5, layer_norm=True) == (3, 2, 20 + 15 + 1)
    assert cpp.saved_shape("rnn_relu", 3, 2, 5, 5, layer_norm=True) == (3, 2, 5 + 1)


@pytest.mark.parametrize("cell", CELLS)
def test_layer_norm_per_isa(cpp, cell):
    """`layer_norm` on every instruction-set path against the float64 oracle, with resets and zoneout: 37 units give
    partial vectors and the whole batch one block, B = 1 the matrix-vector kernel, B = 30 two blocks of rows."""
    previous = cpp._C.isa()
    try:
        for isa, (B, T, H), (dtype, tol) in itertools.product(
            isas(cpp), [(5, 6, 37), (1, 4, 16), (30, 4, 24)], [(torch.float64, F64_RTOL), (torch.float32, 2e-5)]
        ):
            cpp._C.set_isa(isa)
            args, cot = layer_norm_problem(
                cell, T, B, H, lengths=mixed_lengths(T, B), resets=True, zoneout="train", dtype=dtype, seed=B
            )
            check_layer_norm(cpp, cell, args, cot, True, tol)
    finally:
        cpp._C.set_isa(previous)


def run_layer_norm(cpp, cell, args, cot):
    """`fwd` then `bwd` of a `layer_norm_problem` (forward direction): `(y, hT, cT, saved)` and `bwd`'s six values."""
    call = {k: v for k, v in args.items() if k != "ext"}
    a, ext = args, args["ext"]
    y, hT, cT, saved = cpp.fwd(cell, **call, ext=ext)
    grads = cpp.bwd(cell, *cot, a["w_hh"], a["b_hh"], None, a["h0"], a["c0"], a["lengths"], y, saved, False, ext)
    return (y, hT, cT, saved), grads


@pytest.mark.parametrize("B", [1, 5, 40])
@pytest.mark.parametrize("cell", CELLS)
def test_layer_norm_thread_count_independent(cpp, cell, B):
    """`layer_norm`'s outputs and gradients, its parameters' sums over blocks of rows (B = 40) included, are bitwise
    the same for any thread count."""
    T, H = 7, 48
    args, cot = layer_norm_problem(
        cell, T, B, H, lengths=mixed_lengths(T, B), resets=True, zoneout="train", dtype=torch.float32, seed=2
    )

    def outputs():
        outputs, (*grads, ln_grads) = run_layer_norm(cpp, cell, args, cot)
        return [t for t in (*outputs, *grads, *ln_grads) if t is not None]

    assert_thread_count_independent(outputs)


@pytest.mark.parametrize("cell", CELLS)
def test_layer_norm_empty_calls(cpp, cell):
    """`layer_norm` over no steps or no rows: empty outputs, and zero gradients of its parameters."""
    for T, B in [(0, 3), (3, 0)]:
        args, cot = layer_norm_problem(cell, max(T, 1), max(B, 1), 5, dtype=torch.float32)
        for name in ("gx", "h0", "c0"):
            if args[name] is not None:
                args[name] = args[name][:T, :B] if name == "gx" else args[name][:B]
        cot = tuple(None if c is None else c[:T, :B] if c.dim() == 3 else c[:B] for c in cot)
        (y, *_), (dgx, dgh, *_, ln_grads) = run_layer_norm(cpp, cell, args, cot)
        assert y.shape == (T, B, 5) and dgx.shape == dgh.shape == (T, B, args["w_hh"].shape[0])
        assert all(g is None or (g == 0).all() for g in ln_grads)


def test_layer_norm_need_saved_false_and_refusals(cpp):
    """A forward with `layer_norm` that saves nothing gives the same outputs; a projection with it, or gains of the
    wrong shape, are refused."""
    args, _ = layer_norm_problem("lstm", 4, 3, 8, dtype=torch.float32)
    ext = args.pop("ext")
    lean = cpp.fwd("lstm", **args, need_saved=False, ext=ext)
    full = cpp.fwd("lstm", **args, ext=ext)
    assert lean[3].shape == (0,)
    assert all(torch.equal(a, b) for a, b in zip(lean[:3], full[:3], strict=True))
    with pytest.raises(ValueError, match="projection"):
        cpp.fwd(
            "lstm", **{**args, "w_hh": torch.randn(32, 5), "h0": torch.randn(3, 5), "w_hr": torch.randn(5, 8)}, ext=ext
        )
    with pytest.raises(RuntimeError, match="ln_hh"):
        cpp.fwd("lstm", **args, ext=ext._replace(ln_hh=ext.ln_hh[:-1]))


def test_cell_table_is_the_contracts(cpp):
    """The extension numbers the cells as `common.CELL_IDS` does, with `common.GATES`' gate counts."""
    ids = sorted(common.CELL_IDS, key=common.CELL_IDS.get)
    assert [common.CELL_IDS[c] for c in ids] == list(range(len(ids)))
    assert [gates for gates, *_ in cpp._C.cells()] == [common.GATES[c] for c in ids]


def _copy_source(dst):
    ignore = shutil.ignore_patterns(".git", "build", "dist", "*.so", "__pycache__", "*.egg-info", ".pytest_cache")
    for name in ["setup.py", "pyproject.toml", "README.md", "seqfast", "kernels", "csrc"]:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=ignore)
        elif src.exists():
            shutil.copy2(src, dst / name)
    if not (dst / "README.md").exists():
        (dst / "README.md").write_text("seqfast\n")


@pytest.mark.slow
def test_install_without_extension(tmp_path):
    src, target = tmp_path / "src", tmp_path / "target"
    src.mkdir()
    _copy_source(src)
    env = {**os.environ, "SEQFAST_NO_EXTENSION": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--target", str(target), "."]
    done = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not list(target.glob("seqfast/_C*")), "the extension was installed"
    probe = (
        "import seqfast, seqfast.kernels.reference\n"
        f"assert seqfast.__file__.startswith({str(target)!r}), seqfast.__file__\n"
        "try:\n"
        "    import seqfast.kernels.cpp\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
        "else:\n"
        "    raise SystemExit('seqfast.kernels.cpp imported without _C')\n"
        "from seqfast import dispatch\n"
        "print([(b.name, b.available) for b in dispatch.backends()])\n"
    )
    # `-S` skips .pth files, so a development (editable) install of seqfast cannot supply `_C`.
    env = {k: v for k, v in os.environ.items() if k != "SEQFAST_NO_EXTENSION"}
    env["PYTHONPATH"] = os.pathsep.join([str(target), *site.getsitepackages()])
    done = subprocess.run([sys.executable, "-S", "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ImportError:" in done.stdout and "_C" in done.stdout, done.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("cell", CELLS)
def test_stack_and_step_equal_layer_by_layer(cpp, cell, dtype):
    """The one-call forwards without grad give bitwise what `fwd` gives layer-direction by layer-direction, with
    lengths drawn from [0, T] too."""
    g = torch.Generator().manual_seed(3)
    G = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}[cell]
    for T, B, I, H, layers, bidirectional, P, bias in [
        (1, 1, 1, 1, 1, False, None, True),
        (3, 4, 10, 20, 1, False, None, False),
        (7, 3, 5, 17, 2, True, None, True),
        (4, 2, 6, 9, 3, False, 4, False),
        (2, 5, 33, 70, 2, True, 7, True),
    ]:
        if P is not None and cell != "lstm":
            continue
        D = 2 if bidirectional else 1
        width = P or H

        def randn(*shape):
            return torch.randn(*shape, generator=g, dtype=dtype)

        weights = []
        for k in range(layers * D):
            fan_in = I if k < D else D * width
            b_ih, b_hh = (randn(G * H), randn(G * H)) if bias else (None, None)
            weights.append((randn(G * H, fan_in), randn(G * H, width), b_ih, b_hh, None if P is None else randn(P, H)))
        x, h0 = randn(T, B, I), randn(layers * D, B, width)
        c0 = randn(layers * D, B, H) if cell == "lstm" else None
        for lengths in (None, torch.randint(0, T + 1, (B,), generator=g)):
            check_stack(cpp, cell, x, h0, c0, weights, layers, bidirectional, lengths)
        if layers == 1 and not bidirectional and P is None:
            w_ih, w_hh, b_ih, b_hh, _ = weights[0]
            h, c = cpp.step(cell, x[0], h0[0], None if c0 is None else c0[0], w_ih, w_hh, b_ih, b_hh)
            expected = cpp.stack(cell, x[:1], h0, c0, weights, False)
            assert torch.equal(h, expected[1][0])
            assert c is None if c0 is None else torch.equal(c, expected[2][0])


def check_stack(cpp, cell, x, h0, c0, weights, layers, bidirectional, lengths):
    """`cpp.stack` against `cpp.fwd` layer-direction by layer-direction, bitwise."""
    D = 2 if bidirectional else 1
    inputs, hn, cn = x, [], []
    for layer in range(layers):
        ys = []
        for k in range(layer * D, layer * D + D):
            w_ih, w_hh, b_ih, b_hh, w_hr = weights[k]
            b_x, b_h = folded_biases(cell, b_ih, b_hh)
            gx = Projection(inputs, w_ih, b_x)
            state = None if c0 is None else c0[k]
            y, hT, cT, _ = cpp.fwd(cell, gx, w_hh, b_h, h0[k], state, lengths, w_hr, k % D == 1, False)
            ys.append(y)
            hn.append(hT)
            cn.append(cT)
        inputs = torch.cat(ys, 2)
    y, hT, cT = cpp.stack(cell, x, h0, c0, weights, bidirectional, lengths)
    assert torch.equal(y, inputs) and torch.equal(hT, torch.stack(hn))
    assert cT is None if c0 is None else torch.equal(cT, torch.stack(cn))


@pytest.mark.parametrize("plan", ["packed-rows", "packed-units"])
@pytest.mark.parametrize("K", [1, 7, 16, 17])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_small_input_projection_formed_in_the_loop_is_bitwise_projects(cpp, monkeypatch, cell, K, plan):
    """An input projection of small K, formed by the loop a step at a time (rows in blocks) or whole before it (chunks
    of units), gives bitwise the forward from `linear.project`'s `gx`, with and without its bias, lengths and reversed,
    float32 and float64; K = 17 is past the small range (one GEMM). `project` itself matches F.linear in float64."""
    monkeypatch.setenv("SEQFAST_CPP_PLAN", plan)
    G, T, B, H = common.GATES[cell], 6, 40, 24
    for dtype in (torch.float32, torch.float64):
        g = torch.Generator().manual_seed(K)
        x, w_ih = (torch.randn(shape, generator=g, dtype=dtype) for shape in ((T, B, K), (G * H, K)))
        w_hh, b_ih, b_hh = (torch.randn(shape, generator=g, dtype=dtype) / 4 for shape in ((G * H, H), G * H, G * H))
        h0, c0 = (torch.randn(B, H, generator=g, dtype=dtype) for _ in range(2))
        lengths = torch.randint(0, T + 1, (B,), generator=g)
        for b_x in (None, b_ih):
            gx = linear.project(x, w_ih, b_x)
            if dtype == torch.float64:
                torch.testing.assert_close(gx, F.linear(x, w_ih, b_x), rtol=1e-13, atol=1e-13)
            for lens, reverse in ((None, False), (lengths, False), (lengths, True)):
                args = (w_hh, b_hh, h0, c0 if cell == "lstm" else None, lens, None, reverse)
                formed = cpp.fwd(cell, Projection(x, w_ih, b_x), *args)
                given = cpp.fwd(cell, gx, *args)
                for i, (a, b) in enumerate(zip(formed, given, strict=True)):
                    assert (a is None and b is None) or torch.equal(a, b), f"output {i} differs"
