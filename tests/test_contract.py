"""Kernel contract: every backend's fwd/bwd against the float64 reference, and the reference against autograd."""

import pytest
import torch
from conftest import CPU_BACKENDS
from helpers import assert_close
from seqfast.kernels import common, reference

from seqfast import dispatch
from seqfast.autograd import h_prev

# (B, T, H): H33 runs without b_hh; H70 spans two 64-unit chunks of the cpp backend, the last ragged; B17 covers
# the numba backend's 4-row tiles and a remainder row
SHAPES = [(3, 7, 9), (1, 1, 1), (2, 5, 17), (4, 3, 33), (4, 5, 70), (17, 9, 20)]
SHAPE_IDS = [f"B{b}-T{t}-H{h}" for b, t, h in SHAPES]
CELLS = ["rnn_tanh", "rnn_relu", "lstm", "lstm-proj", "gru"]
LENGTHS = ["full", "mixed"]


def make_args(cell, B, T, H, lengths, dtype=torch.float64, requires_grad=False):
    """Random contract inputs: `gx, w_hh, b_hh, h0, c0, lengths, w_hr` for one layer-direction."""
    proj = cell == "lstm-proj" and H > 1
    cell = "lstm" if cell == "lstm-proj" else cell
    G = common.GATES[cell] * H
    P = H // 2 if proj else H

    def rand(*shape):
        return torch.randn(*shape, dtype=dtype).requires_grad_(requires_grad)

    args = dict(
        gx=rand(T, B, G),
        w_hh=(torch.randn(G, P, dtype=dtype) / P**0.5).requires_grad_(requires_grad),
        b_hh=rand(G) if H != 33 else None,
        h0=rand(B, P),
        c0=rand(B, H) if cell == "lstm" else None,
        lengths=None,
        w_hr=(torch.randn(P, H, dtype=dtype) / H**0.5).requires_grad_(requires_grad) if proj else None,
    )
    if lengths == "mixed":
        args["lengths"] = torch.tensor([(T - b) % (T + 1) for b in range(B)], dtype=torch.int64)
    return cell, args


def run_backend(module, cell, args, reverse, seed=3):
    """fwd then bwd of `module` with random cotangents; every contract output, float64, in a fixed order."""
    a = {k: (v.detach() if v is not None else None) for k, v in args.items()}
    y, hT, cT, saved = module.fwd(
        cell, a["gx"], a["w_hh"], a["b_hh"], a["h0"], a["c0"], a["lengths"], a["w_hr"], reverse
    )
    gen = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)
    dhT = torch.randn(hT.shape, generator=gen, dtype=torch.float64).to(hT.dtype)
    dcT = None if cT is None else torch.randn(cT.shape, generator=gen, dtype=torch.float64).to(cT.dtype)
    grads = module.bwd(cell, dy, dhT, dcT, a["w_hh"], a["b_hh"], a["w_hr"], a["h0"], a["c0"], a["lengths"], y, saved,
                       reverse)
    return [y, hT, cT, *grads]


NAMES = ["y", "hT", "cT", "dgx", "dgh", "dh0", "dc0", "dw_hr"]


def _compare(actual, expected, tol):
    for a, e, name in zip(actual, expected, NAMES, strict=True):
        assert (a is None) == (e is None), f"{name}: {a is None=} {e is None=}"
        if e is not None:
            assert_close(a.double(), e.double(), tol, name)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backend_matches_float64_reference(backend, cell, shape, lengths, reverse):
    module = dispatch.load(backend)
    cell, args = make_args(cell, *shape, lengths)
    expected = run_backend(reference, cell, args, reverse)
    if module is not reference:  # the reference's own float64 check is against autograd, below
        _compare(run_backend(module, cell, args, reverse), expected, 1e-12)
    if module.unsupported(cell, args["gx"].float(), args["w_hh"].float(), args["h0"].float()) is None:
        single = {k: (v.float() if v is not None and v.is_floating_point() else v) for k, v in args.items()}
        # float32 over <= 7 steps of length <= 33 dot products: a few hundred ulps of 6e-8
        _compare(run_backend(module, cell, single, reverse), expected, 1e-5)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("cell", CELLS)
def test_reference_backward_matches_autograd(cell, shape, lengths, reverse):
    """The hand-written backward equals autograd through the reference forward, `w_hh`/`b_hh` via `h_prev`."""
    cell, args = make_args(cell, *shape, lengths, requires_grad=True)
    y, hT, cT, _ = reference.fwd(cell, **args, reverse=reverse)
    outputs = [y, hT] + ([cT] if cT is not None else [])
    cotangents = [torch.randn_like(o) for o in outputs]
    wrt = {k: v for k, v in args.items() if v is not None and v.requires_grad}
    expected = dict(zip(wrt, torch.autograd.grad(outputs, list(wrt.values()), cotangents), strict=True))

    a = {k: (v.detach() if v is not None else None) for k, v in args.items()}
    _, _, _, saved = reference.fwd(cell, **a, reverse=reverse)
    dcT = cotangents[2] if cT is not None else None
    dgx, dgh, dh0, dc0, dw_hr = reference.bwd(cell, cotangents[0], cotangents[1], dcT, a["w_hh"], a["b_hh"], a["w_hr"],
                                              a["h0"], a["c0"], a["lengths"], y.detach(), saved, reverse)
    assert (dgh is None) == (cell != "gru"), "dgh is returned exactly where it differs from dgx (GRU)"
    dgh = dgx if dgh is None else dgh
    G, P = a["w_hh"].shape
    actual = dict(gx=dgx, w_hh=dgh.reshape(-1, G).T @ h_prev(y.detach(), a["h0"], a["lengths"], reverse).reshape(-1, P),
                  b_hh=dgh.sum((0, 1)), h0=dh0, c0=dc0, w_hr=dw_hr)
    for name, grad in expected.items():
        assert_close(actual[name], grad, 1e-12, f"d_{name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_padded_steps_write_zeros_and_keep_state(backend):
    """Past its length a sequence writes zeros to y and its final state is the one at its own last step."""
    module = dispatch.load(backend)
    cell, args = make_args("gru", 3, 6, 5, "mixed")
    y, hT, _, _ = module.fwd(cell, args["gx"], args["w_hh"], args["b_hh"], args["h0"], None, args["lengths"], None)
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
