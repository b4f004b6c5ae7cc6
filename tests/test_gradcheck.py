"""`torch.autograd.gradcheck` and `gradgradcheck` in float64 through one layer-direction (input GEMM + recurrence op)
per backend, and double backward through the modules."""

import pytest
import torch
from conftest import CPU_BACKENDS
from torch.nn.utils.rnn import pack_padded_sequence

import seqfast
from seqfast import functional

CELLS = ["rnn_tanh", "rnn_relu", "lstm", "lstm-proj", "gru"]


def layer_problem(backend, cell, lengths, reverse):
    """`(fn, inputs)`: one layer-direction of `cell` (`lstm-proj`: projected LSTM) as a function of its float64
    inputs, all requiring grad."""
    T, B, I, H = 3, 3, 2, 4
    proj = cell == "lstm-proj"
    cell = "lstm" if proj else cell
    G = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}[cell] * H
    P = 2 if proj else H

    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    x, w_ih, w_hh, b_ih, b_hh, h0 = rand(T, B, I), rand(G, I), rand(G, P), rand(G), rand(G), rand(B, P)
    c0 = rand(B, H) if cell == "lstm" else None
    w_hr = rand(P, H) if proj else None
    if cell == "rnn_relu":
        # keep pre-activations away from relu's kink, where finite differences are meaningless
        with torch.no_grad():
            x.abs_()
            w_ih.abs_()
            b_ih.abs_().add_(0.1)
    lens = None if lengths is None else torch.tensor(lengths)
    inputs = [t for t in (x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr) if t is not None]

    def fn(x, w_ih, w_hh, b_ih, b_hh, h0, *rest):
        c0 = rest[0] if cell == "lstm" else None
        w_hr = rest[-1] if proj else None
        y, hT, cT = functional.layer(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, lens, reverse, backend)
        return (y, hT) if cT is None else (y, hT, cT)

    return fn, inputs


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("lengths", [None, [3, 1, 0]], ids=["full", "mixed"])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_layer_gradcheck(backend, cell, lengths, reverse):
    assert torch.autograd.gradcheck(*layer_problem(backend, cell, lengths, reverse))


@pytest.mark.parametrize(("lengths", "reverse"), [(None, False), ([3, 1, 0], True)], ids=["full-fwd", "mixed-rev"])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_layer_gradgradcheck(backend, cell, lengths, reverse):
    """A backward with `create_graph=True` gives gradients that differentiate again (on the cpp backend's own node,
    with lengths too; `Layer` on the others)."""
    assert torch.autograd.gradgradcheck(*layer_problem(backend, cell, lengths, reverse))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_module_double_backward_matches_torch(backend):
    """A gradient penalty through a packed 2-layer bidirectional LSTM and a GRU cell: the second-order gradients of
    every parameter equal torch.nn's."""
    torch.manual_seed(0)
    D = torch.float64
    pairs = [
        (torch.nn.LSTM(3, 4, 2, bidirectional=True, dtype=D), seqfast.LSTM(3, 4, 2, bidirectional=True, dtype=D)),
        (torch.nn.GRUCell(3, 4, dtype=D), seqfast.GRUCell(3, 4, dtype=D)),
    ]
    for index, (theirs, ours) in enumerate(pairs):
        ours.load_state_dict(theirs.state_dict())
        ours.backend = backend
        x = torch.randn(4, 3, 3, dtype=D) if index == 0 else torch.randn(3, 3, dtype=D)

        def second_order(module, x=x):
            xr = x.clone().requires_grad_()
            if isinstance(module, torch.nn.RNNBase):
                out = module(pack_padded_sequence(xr, [4, 2, 1]))[0].data
            else:
                out = module(xr)
            (dx,) = torch.autograd.grad(out.pow(2).sum(), xr, create_graph=True)
            return torch.autograd.grad(dx.pow(2).sum(), list(module.parameters()))

        for a, e in zip(second_order(ours), second_order(theirs), strict=True):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
