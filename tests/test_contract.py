"""Kernel contract: every backend's fwd/bwd against the float64 reference, and the reference against autograd."""

import pytest
import torch
from conftest import CPU_BACKENDS
from helpers import assert_close, assert_outputs_close, cast, kind_problem, run_contract

from seqfast import dispatch
from seqfast.autograd import h_prev
from seqfast.kernels import common, reference
from seqfast.kernels.common import Extensions

# (B, T, H): H33 runs without b_hh; H70 spans two 64-unit chunks of the cpp backend, the last ragged; B17 covers
# the numba backend's 4-row tiles and a remainder row, and with B13 at one unit the cpp backend's blocks of rows
SHAPES = [(3, 7, 9), (1, 1, 1), (2, 5, 17), (4, 3, 33), (4, 5, 70), (17, 9, 20), (13, 5, 1)]
SHAPE_IDS = [f"B{b}-T{t}-H{h}" for b, t, h in SHAPES]
CELLS = ["rnn_tanh", "rnn_relu", "lstm", "lstm-proj", "gru"]
# "mixed-resets": mixed lengths, and resets (`ext.zero`) at step 0 of the first row and at random steps
LENGTHS = ["full", "mixed", "mixed-resets"]


def make_problem(kind, B, T, H, lengths):
    """`kind_problem` of one case: `lstm-proj` projects to `H // 2`, H33 runs without `b_hh`; `args` holds `ext`
    with resets for "mixed-resets"."""
    resets = lengths == "mixed-resets"
    cell, args, cot = kind_problem(kind, T, B, H, H // 2, lengths="mixed" if resets else lengths, bias=H != 33)
    if resets:
        zero = torch.rand(T, B, generator=torch.Generator().manual_seed(T * B)) < 0.3
        zero[0, 0] = True
        args["ext"] = Extensions(zero=zero)
    return cell, args, cot


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backend_matches_float64_reference(backend, cell, shape, lengths, reverse):
    module = dispatch.load(backend)
    cell, args, cot = make_problem(cell, *shape, lengths)
    if "ext" in args and "resets" not in getattr(module, "EXTENSIONS", ()):
        names = ("gx", "w_hh", "h0", "c0", "lengths", "w_hr")
        with pytest.raises(RuntimeError, match="does not run the resets option"):
            dispatch.select(cell, *(args[n] for n in names), backend=backend, options=("resets",))
        return
    expected = run_contract(reference, cell, args, cot, reverse)
    if module is not reference:  # the reference's own float64 check is against autograd, below
        assert_outputs_close(run_contract(module, cell, args, cot, reverse), expected, 1e-12, torch.float64)
    # every CPU backend runs float32: over <= 9 steps of length <= 70 dot products, a few hundred ulps of 6e-8
    args32, cot32 = cast(args, cot, torch.float32)
    names = ("gx", "w_hh", "h0", "c0", "lengths", "w_hr")
    reason = module.unsupported(cell, *(args32[n] for n in names))
    assert reason is None, f"{backend} declines float32 {cell}: {reason}"
    assert_outputs_close(run_contract(module, cell, args32, cot32, reverse), expected, 1e-5, torch.float32)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("cell", CELLS)
def test_reference_backward_matches_autograd(cell, shape, lengths, reverse):
    """The hand-written backward equals autograd through the reference forward, `w_hh`/`b_hh` via `h_prev`."""
    cell, args, cot = make_problem(cell, *shape, lengths)
    leaves = {k: v.requires_grad_() for k, v in args.items() if torch.is_tensor(v) and v.is_floating_point()}
    y, hT, cT, _ = reference.fwd(cell, **args, reverse=reverse)
    outputs = [y, hT] + ([cT] if cT is not None else [])
    grads = torch.autograd.grad(outputs, list(leaves.values()), [c for c in cot if c is not None])
    expected = dict(zip(leaves, grads, strict=True))

    a = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in args.items()}
    _, _, _, saved = reference.fwd(cell, **a, reverse=reverse)
    ext = a.get("ext")
    dgx, dgh, dh0, dc0, dw_hr = reference.bwd(
        cell, *cot, a["w_hh"], a["b_hh"], a["w_hr"], a["h0"], a["c0"], a["lengths"], y.detach(), saved, reverse, ext
    )
    assert (dgh is None) == (cell != "gru"), "dgh is returned exactly where it differs from dgx (GRU)"
    dgh = dgx if dgh is None else dgh
    G, P = a["w_hh"].shape
    actual = dict(
        gx=dgx,
        w_hh=dgh.reshape(-1, G).T @ h_prev(y.detach(), a["h0"], a["lengths"], reverse, ext and ext.zero).reshape(-1, P),
        b_hh=dgh.sum((0, 1)),
        h0=dh0,
        c0=dc0,
        w_hr=dw_hr,
    )
    for name, grad in expected.items():
        assert_close(actual[name], grad, 1e-12, f"d_{name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_padded_steps_write_zeros_and_keep_state(backend):
    """Past its length a sequence writes zeros to y and its final state is the one at its own last step."""
    module = dispatch.load(backend)
    cell, args, _ = make_problem("gru", 3, 6, 5, "mixed")
    y, hT, _, _ = module.fwd(cell, **args)
    for b, length in enumerate(args["lengths"].tolist()):
        assert torch.all(y[length:, b] == 0)
        expected = args["h0"][b] if length == 0 else y[length - 1, b]
        assert torch.equal(hT[b], expected)


def test_empty_poisons_with_nan():
    previous = common.set_poison(True)
    try:
        assert torch.isnan(common.empty((2, 3), torch.float32, "cpu")).all()
    finally:
        common.set_poison(previous)
