"""Shared test helpers: twin modules from one state_dict, outputs with all gradients, error metrics."""

import torch
from torch.nn.utils.rnn import PackedSequence

import seqfast

# (dtype, relative RMS tolerance). Both sides differ only in summation order and the order of elementwise ops.
# Measured against torch.nn over tests/test_parity.py's matrix with the reference backend: float64 <= 3.5e-15,
# float32 <= 5.3e-7 (T = 200 gradients). The bounds leave ~300x and ~20x of room for other summation orders.
DTYPES = [(torch.float64, 1e-12), (torch.float32, 1e-5)]
DTYPE_IDS = ["f64", "f32"]

TORCH_MODULES = {"rnn_tanh": torch.nn.RNN, "rnn_relu": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}
SEQFAST_MODULES = {"rnn_tanh": seqfast.RNN, "rnn_relu": seqfast.RNN, "lstm": seqfast.LSTM, "gru": seqfast.GRU}


def twins(cell, input_size, hidden_size, backend=None, dtype=torch.float32, **kwargs):
    """A torch.nn module and its seqfast twin loaded from the same `state_dict` (strict)."""
    if cell.startswith("rnn_"):
        kwargs["nonlinearity"] = cell[4:]
    ref = TORCH_MODULES[cell](input_size, hidden_size, dtype=dtype, **kwargs)
    ours = SEQFAST_MODULES[cell](input_size, hidden_size, dtype=dtype, backend=backend, **kwargs)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def flatten(out):
    """Every tensor in a module's output, `PackedSequence` as its data, in a fixed order."""
    if isinstance(out, PackedSequence):
        return [out.data]
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for item in out for t in flatten(item)]


def run_with_grads(module, call, inputs, seed=1234):
    """Outputs of `call(module)` and gradients of every input and parameter for random cotangents on every output.

    The cotangents come from `seed`, so two modules called alike get the same ones.
    """
    outputs = flatten(call(module))
    generator = torch.Generator().manual_seed(seed)
    loss = sum(
        (o * torch.randn(o.shape, generator=generator, dtype=o.dtype).to(o.device)).sum() for o in outputs
    )
    wrt = [t for t in inputs if t.requires_grad] + list(module.parameters())
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    return [o.detach() for o in outputs], list(grads)


def rel_rms(actual, expected):
    """Relative RMS error of `actual` against `expected` (absolute when `expected` is all zero)."""
    diff = (actual.double() - expected.double()).norm()
    scale = expected.double().norm()
    return (diff / scale).item() if scale > 0 else diff.item()


def assert_close(actual, expected, tol, what):
    """Relative RMS within `tol`; the message gives the max abs error and the first bad index."""
    assert actual is not None and expected is not None, f"{what}: missing ({actual is None}, {expected is None})"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert torch.isfinite(actual).all() or not torch.isfinite(expected).all(), f"{what}: non-finite values"
    if actual.numel() == 0:
        return
    err = rel_rms(actual, expected)
    if err > tol:
        diff = (actual.double() - expected.double()).abs()
        bad = (diff > tol * expected.double().abs().clamp(min=1)).nonzero()
        first = tuple(bad[0].tolist()) if len(bad) else None
        raise AssertionError(
            f"{what}: rel RMS {err:.3e} > {tol:.1e}; max abs err {diff.max().item():.3e}; first bad index {first}"
        )


def assert_all_close(actual, expected, tol, names):
    assert len(actual) == len(expected), f"{len(actual)} tensors != {len(expected)}"
    for a, e, name in zip(actual, expected, names, strict=True):
        assert_close(a, e, tol, name)
