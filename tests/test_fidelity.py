"""Fidelity: a backend's float32 module is no further from the float64 truth than torch.nn's own float32 module.

On one problem per cell, each CPU backend's float32 outputs and gradients (input, initial state and every parameter,
random cotangents on every output) are compared with torch.nn's in float64 from the same `state_dict`; so are
torch.nn's own in float32. Per tensor, the backend's relative RMS error may be at most `RATIO` times torch.nn's: the
two differ only in summation order and in the order of elementwise ops, so neither should lose more than a few
roundings per operation to the other. The shapes are long enough (T = 64, H = 96 over two cpp chunks, B = 24) to
run the packed float32 GEMM and the threaded steps. (Weight gradients formed by oneDNN's GEMM, which reduces all
T * B rows in one chain, measured 2.2-5.6x torch.nn's error here; they are torch's `mm` and `sum` since.)
"""

import pytest
import torch
from conftest import CPU_BACKENDS
from helpers import rel_rms, run_with_grads, twins

RATIO = 2.0
T, B, I, H = 64, 24, 40, 96


def _outputs_and_grads(module, x, hx):
    x = x.clone().requires_grad_()
    hx = tuple(h.clone().requires_grad_() for h in hx)
    outputs, grads = run_with_grads(module, lambda m: m(x, hx if len(hx) == 2 else hx[0]), [x, *hx])
    return outputs + grads


def _errors_beyond_ratio(backend, cell):
    """`{name: message}` of every output and gradient whose float32 error exceeds `RATIO` times torch.nn's."""
    ref64, ours = twins(cell, I, H, backend, torch.float64, num_layers=2)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(T, B, I, generator=generator, dtype=torch.float64)
    hx = tuple(torch.randn(2, B, H, generator=generator, dtype=torch.float64) for _ in range(1 + (cell == "lstm")))
    truth = _outputs_and_grads(ref64, x, hx)
    ref32 = twins(cell, I, H, None, torch.float32, num_layers=2)[0]
    ref32.load_state_dict(ref64.state_dict())
    ours = ours.float()
    x32, hx32 = x.float(), tuple(h.float() for h in hx)
    theirs = _outputs_and_grads(ref32, x32, hx32)
    mine = _outputs_and_grads(ours, x32, hx32)
    names = ["output", "h_n"] + (["c_n"] if cell == "lstm" else []) + ["grad input", "grad h0"]
    names += (["grad c0"] if cell == "lstm" else []) + [f"grad {n}" for n, _ in ours.named_parameters()]
    assert len(names) == len(truth) == len(theirs) == len(mine)
    worse = {}
    for name, e, t, m in zip(names, truth, theirs, mine, strict=True):
        torch_err, our_err = rel_rms(t, e), rel_rms(m, e)
        if our_err > RATIO * torch_err:
            worse[name] = f"{name}: {our_err:.2e} > {RATIO} x torch.nn's {torch_err:.2e}"
    return worse


@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "gru"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float32_error_at_most_twice_torchs(backend, cell):
    worse = _errors_beyond_ratio(backend, cell)
    assert not worse, "; ".join(worse.values())
