"""What is particular to the numba backend; its float64/float32 contract is tests/test_contract.py's."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from seqfast.kernels import common, reference

try:
    import seqfast.kernels.numba as nb
except ImportError as e:
    nb, _why = None, f"seqfast.kernels.numba does not import: {e}"
else:
    _why = None

needs_numba = pytest.mark.skipif(nb is None, reason=_why or "")

CELLS = ["rnn_tanh", "rnn_relu", "lstm", "gru"]
# (T, B, H, P): B17 covers the 4-row tiles of the recurrent product and a remainder row, H33 an odd row count
SHAPES = [(7, 3, 33, None), (1, 1, 1, None), (9, 17, 20, None)]
PROJ_SHAPES = [(5, 4, 8, 3), (6, 17, 12, 5)]
NAMES = ("y", "hT", "cT", "dgx", "dgh", "dh0", "dc0", "dw_hr")


def problem(cell, T, B, H, P, mixed):
    """Random float64 inputs of one call (weights scaled by `1/sqrt(fan-in)`), cotangents, and lengths."""
    g = torch.Generator().manual_seed(T * 1000 + B * 10 + H)
    G = common.GATES[cell] * H
    P = P or H

    def rand(*shape, scale=1.0):
        return torch.randn(shape, generator=g, dtype=torch.float64) * scale

    lstm = cell == "lstm"
    args = {
        "gx": rand(T, B, G),
        "w_hh": rand(G, P, scale=P**-0.5),
        "b_hh": rand(G),
        "h0": rand(B, P),
        "c0": rand(B, H) if lstm else None,
        "w_hr": rand(P, H, scale=H**-0.5) if P != H else None,
    }
    grads = {"dy": rand(T, B, P), "dhT": rand(B, P), "dcT": rand(B, H) if lstm else None}
    lengths = None
    if mixed:
        lengths = torch.randint(0, T + 1, (B,), generator=g)
        lengths[0] = T
        if B > 1:
            lengths[-1] = 0
    return args, grads, lengths


def run(backend, cell, args, grads, lengths, reverse):
    """`fwd` then `bwd` of `backend`: the eight outputs named in `NAMES`."""
    y, hT, cT, saved = backend.fwd(cell, lengths=lengths, reverse=reverse, need_saved=True, **args)
    dgx, dgh, dh0, dc0, dw_hr = backend.bwd(
        cell,
        grads["dy"],
        grads["dhT"],
        grads["dcT"],
        args["w_hh"],
        args["b_hh"],
        args["w_hr"],
        args["h0"],
        args["c0"],
        lengths,
        y,
        saved,
        reverse=reverse,
    )
    return y, hT, cT, dgx, dgh, dh0, dc0, dw_hr


def check(actual, expected, tol, dtype, what):
    assert (actual is None) == (expected is None), f"{what}: presence differs"
    if actual is None:
        return
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype} != {dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    if actual.numel() == 0:
        return
    diff = actual.double() - expected
    scale = expected.norm().item()
    err = diff.norm().item() / scale if scale > 0 else diff.norm().item()
    if err > tol:
        bad = (diff.abs() > tol * expected.abs().clamp(min=1)).nonzero()
        first = tuple(bad[0].tolist()) if len(bad) else None
        raise AssertionError(
            f"{what}: rel RMS {err:.3e} > {tol:.0e}; max abs err {diff.abs().max().item():.3e}; first bad index {first}"
        )


@needs_numba
@pytest.mark.parametrize("cell", CELLS)
def test_inference_matches_training_forward(cell):
    args, _, lengths = problem(cell, 6, 5, 16, None, True)
    args = {k: None if v is None else v.float() for k, v in args.items()}
    train = nb.fwd(cell, lengths=lengths, reverse=True, need_saved=True, **args)
    infer = nb.fwd(cell, lengths=lengths, reverse=True, need_saved=False, **args)
    assert infer[3].shape == (0,)
    assert train[3].shape == nb.saved_shape(cell, 6, 5, 16, 16)
    for a, b in zip(train[:3], infer[:3], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


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
    args, _, _ = problem("rnn_tanh", 4, 2, 8, None, False)
    with pytest.raises(ValueError, match="lengths"):
        nb.fwd("rnn_tanh", lengths=torch.tensor([5, 1]), **args)


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


@needs_numba
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("cell", CELLS)
def test_more_chunks_than_threads(cell, threads, monkeypatch):
    """Five chunks per phase on fewer threads: a prange iteration that runs late or after another on the same thread
    finds its chunks taken, so the loops neither deadlock nor change the result."""
    numba = pytest.importorskip("numba")
    T, B, H, P = PROJ_SHAPES[1] if cell == "lstm" else SHAPES[2]
    args, grads, lengths = problem(cell, T, B, H, P, True)
    expected = run(reference, cell, args, grads, lengths, True)
    nc = 5

    def launch(H):
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        return nc, np.zeros(nb.loops.LINE * (nc + 1), dtype=np.int64)

    monkeypatch.setattr(nb, "_launch", launch)
    f32 = {k: None if v is None else v.float() for k, v in args.items()}
    g32 = {k: None if v is None else v.float() for k, v in grads.items()}
    actual = run(nb, cell, f32, g32, lengths, True)
    for a, e, name in zip(actual, expected, NAMES, strict=True):
        # float32 with a rational tanh of a few ulp over 6-9 steps: measured <= 2e-5 relative RMS
        check(a, e, 1e-4, torch.float32, name)
