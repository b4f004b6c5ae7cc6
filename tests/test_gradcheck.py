"""`torch.autograd.gradcheck` in float64 through one layer-direction (input GEMM + recurrence op) per backend."""

import pytest
import torch
from conftest import CPU_BACKENDS

from seqfast import functional


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("lengths", [None, [3, 1, 0]], ids=["full", "mixed"])
@pytest.mark.parametrize("cell", ["rnn_tanh", "rnn_relu", "lstm", "lstm-proj", "gru"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_layer_gradcheck(backend, cell, lengths, reverse):
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

    assert torch.autograd.gradcheck(fn, inputs)
