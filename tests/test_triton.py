"""The triton backend under the interpreter (`TRITON_INTERPRET=1`, CPU tensors): what is its own beyond the kernel
contract, which tests/test_contract.py checks for every backend.

Launch splitting (with the resets and zoneout options too), edge lengths, optional outputs, declined calls, TF32
products and torch's rule for them, and the modules on CPU tensors as users run them (`backend="triton"`,
`SEQFAST_BACKEND=triton`) against torch.nn. The interpreter runs one program per batch block owning every hidden unit
(`NH == 1`); the split-hidden mode with its grid barrier only runs on a GPU (`tests/test_triton_cuda.py`). Here it is
compiled for sm_90 instead (`tests/triton_compile_check.py`), which checks that it lowers and that the barrier becomes
the intended atomics.

`TRITON_INTERPRET=1` must be set before triton is imported: tests/conftest.py sets it when nothing has imported triton
yet and there is no CUDA device (on a GPU machine the compiled kernels are what gets tested).
"""

import os
import pathlib
import subprocess
import sys

import pytest
import torch
from helpers import (
    assert_all_close,
    assert_outputs_close,
    cast,
    check_contract,
    float64_reference,
    kind_problem,
    rel_rms,
    run_contract,
    run_with_grads,
    twins,
)
from torch.nn.utils.rnn import pack_padded_sequence

import seqfast
from seqfast import dispatch
from seqfast.kernels import common, reference
from seqfast.kernels.common import Extensions

triton = pytest.importorskip("triton")

# float32 against the reference in float32 differs in summation order only: measured <= 3.5e-7 over shapes like
# these (H <= 32, T <= 8), so 1e-5 leaves ~30x.
F32_TOL = 1e-5

# float32 with TF32 products against float64: each operand rounded to 10 mantissa bits (unit roundoff 2^-11 = 4.9e-4);
# measured <= 3.8e-4 over the kinds below, so 2e-3 leaves 5x (2.6x should hardware truncate instead of round).
TF32_TOL = 2e-3


@pytest.fixture(scope="module")
def tb():
    """`seqfast.kernels.triton` in interpreter mode, or a skip saying why it cannot be."""
    if type(triton.language.zeros).__name__ != "InterpretedFunction":
        pytest.skip(
            "triton was imported without TRITON_INTERPRET=1 (a CUDA device is present, or something imported triton "
            "first); run `TRITON_INTERPRET=1 pytest tests/test_triton.py`"
        )
    import seqfast.kernels.triton as module

    assert module.INTERPRET and "cpu" in module.DEVICES
    return module


@pytest.mark.parametrize("kind", ["lstm-proj", "gru"])
def test_several_batch_blocks_and_launches(tb, kind, monkeypatch):
    """B = 37 spans three 16-row blocks; one block per launch exercises the launch offset `i_b0`."""
    config = tb._config

    def one_block_per_launch(B, H, device, dtype):
        return dict(config(B, H, device, dtype), BB=16, per_launch=1)

    monkeypatch.setattr(tb, "_config", one_block_per_launch)
    cell, args, cot = kind_problem(kind, 4, 37, 9, 5, lengths="mixed", dtype=torch.float32)
    check_contract(tb, cell, args, cot, True, F32_TOL)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_edge_lengths(tb, kind):
    """Zero-length and full-length sequences, T = 1."""
    for T, lengths in ((1, [1, 0]), (3, [0, 3])):
        cell, args, cot = kind_problem(kind, T, 2, 6, lengths=lengths, dtype=torch.float32)
        for reverse in (False, True):
            check_contract(tb, cell, args, cot, reverse, F32_TOL)


@pytest.mark.parametrize("kind", ["lstm-proj", "gru"])
def test_options_over_batch_blocks_launches_and_16bit(tb, kind, monkeypatch):
    """Resets and zoneout (LSTM: per-step masks, GRU: the constant weight) read at each row's own step: one block,
    three 16-row blocks in three launches alike; bfloat16 with bfloat16 masks within the 16-bit bound of float32
    (the options' math itself is checked against the reference in tests/test_extensions.py)."""
    T, B, H, P = 5, 37, 9, 5
    cell, args, cot = kind_problem(kind, T, B, H, P, lengths="mixed", dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    zero = torch.rand(T, B, generator=gen) < 0.3
    if cell == "lstm":
        keep_h, keep_c = (torch.rand(T, B, n, generator=gen).lt(0.4).float() for n in (P, H))
    else:
        keep_h = keep_c = 0.3
    args["ext"] = Extensions(zero, keep_h, keep_c)
    expected = run_contract(tb, cell, args, cot, True)
    assert expected[0].abs().sum() > 0
    config = tb._config
    monkeypatch.setattr(tb, "_config", lambda *a: dict(config(*a), BB=16, per_launch=1))
    assert_outputs_close(run_contract(tb, cell, args, cot, True), expected, F32_TOL)
    monkeypatch.setattr(tb, "_config", config)
    half, half_cot = cast(args, cot, torch.bfloat16)
    half["ext"] = Extensions(zero, *(k.bfloat16() if torch.is_tensor(k) else k for k in (keep_h, keep_c)))
    assert_outputs_close(run_contract(tb, cell, half, half_cot, True), expected, 3e-2, torch.bfloat16)


def test_no_saved_and_no_output_gradients(tb):
    """`need_saved=False` gives the same outputs; `dhT`/`dcT` of None mean zero."""
    cell, args, (dy, dhT, dcT) = kind_problem("lstm", 4, 3, 11, lengths="mixed", dtype=torch.float32)
    full = tb.fwd(cell, **args, need_saved=True)
    lean = tb.fwd(cell, **args, need_saved=False)
    assert lean[3].numel() == 0 and full[3].shape == tb.saved_shape(cell, 4, 3, 11, 11)
    for x, y in zip(full[:3], lean[:3], strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    expected = run_contract(reference, cell, args, (dy, torch.zeros_like(dhT), torch.zeros_like(dcT)), False)
    assert_outputs_close(run_contract(tb, cell, args, (dy, None, None), False), expected, F32_TOL)


def test_unsupported(tb):
    _, a, _ = kind_problem("lstm", 3, 2, 5, dtype=torch.float32)
    assert tb.unsupported("lstm", a["gx"], a["w_hh"], a["h0"], a["c0"]) is None
    assert "float64" in tb.unsupported("lstm", a["gx"].double(), a["w_hh"].double(), a["h0"].double(), a["c0"].double())
    assert "unknown cell" in tb.unsupported("lstm2", a["gx"], a["w_hh"], a["h0"])
    w_hr = torch.randn(7, 5)
    assert "proj_size" in tb.unsupported("lstm", a["gx"], torch.randn(20, 7), torch.randn(2, 7), a["c0"], None, w_hr)
    meta = torch.empty(3, 2, 20, device="meta")
    assert "meta" in tb.unsupported("lstm", meta, a["w_hh"], a["h0"], a["c0"])


def test_cell_ids_are_the_contracts():
    from seqfast.kernels.triton import recurrence

    assert recurrence.CELLS == common.CELL_IDS
    assert [recurrence.RNN_TANH, recurrence.RNN_RELU, recurrence.LSTM, recurrence.GRU] == [0, 1, 2, 3]


def test_fp32_precision_follows_torchs_rule_for_cudnn_rnns(tb):
    """TF32 products for float32 on CUDA exactly while torch lets cuDNN's RNNs use TF32 (new and legacy flags)."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    cudnn = torch.backends.cudnn
    before = cudnn.rnn.fp32_precision
    try:
        cudnn.rnn.fp32_precision = "tf32"
        assert tb._precision(torch.float32, cuda) == "tf32"
        assert tb._precision(torch.float32, cpu) == "ieee"
        assert tb._precision(torch.bfloat16, cuda) == tb._precision(torch.float16, cuda) == "ieee"
        cudnn.rnn.fp32_precision = "ieee"
        assert tb._precision(torch.float32, cuda) == "ieee"
        cudnn.rnn.fp32_precision = "none"
        cudnn.allow_tf32 = False
        assert tb._precision(torch.float32, cuda) == "ieee"
        cudnn.allow_tf32 = True
        assert tb._precision(torch.float32, cuda) == "tf32"
    finally:
        cudnn.rnn.fp32_precision = before


@pytest.mark.parametrize("kind", ["rnn_tanh", "lstm-proj", "gru"])
def test_tf32_products(tb, kind, monkeypatch):
    """With TF32 asked for, every recurrent product rounds its operands to TF32 (emulated by the interpreter path):
    the results leave the exact products' (float32 error ~1e-7) and stay within TF32's bound of float64."""
    cell, args, cot = kind_problem(kind, 6, 4, 40, 9, lengths="mixed", dtype=torch.float32)
    ieee = run_contract(tb, cell, args, cot, False)
    monkeypatch.setattr(tb, "_precision", lambda dtype, device: "tf32")
    tf32 = check_contract(tb, cell, args, cot, False, TF32_TOL, float64_reference(cell, args, cot, False))
    moved = [rel_rms(t, i) for t, i in zip(tf32, ieee, strict=True) if t is not None]
    assert min(moved) > 1e-5, moved


@pytest.mark.parametrize(
    "variant",
    ["lstm-proj-len-bf16", "gru-fp32", "rnn_tanh-single-ieee-fp32", "lstm-proj-len-resets-zoneout-bf16"],
)
def test_split_mode_compiles_for_sm90(variant):
    """The kernels lower for sm_90 (in a fresh interpreter-free process): TF32 products where asked, and in the
    grid-barrier mode the acq_rel add and acquire spin; also with the resets and zoneout options."""
    script = pathlib.Path(__file__).with_name("triton_compile_check.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(script), variant], env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and "ptxas" in done.stdout + done.stderr and "ok " not in done.stdout:
        pytest.skip(f"cannot compile for sm_90 here: {done.stderr[-500:]}")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]


# id: (cell, constructor kwargs, packed): two layers both ways, a projection, packed input; tiny (the interpreter
# is slow)
MODULE_CASES = {
    "rnn_relu-L2-bi": ("rnn_relu", dict(num_layers=2, bidirectional=True), False),
    "lstm-proj-batch_first": ("lstm", dict(proj_size=3, batch_first=True), False),
    "gru-packed-bi": ("gru", dict(bidirectional=True), True),
}


@pytest.mark.parametrize("case", list(MODULE_CASES))
def test_module_matches_torch(tb, case):
    """A seqfast module with `backend="triton"` on CPU tensors: outputs, states and every gradient as torch.nn."""
    cell, kwargs, packed = MODULE_CASES[case]
    ref, ours = twins(cell, 4, 6, backend="triton", **kwargs)
    x = torch.randn(*((3, 5) if ref.batch_first else (5, 3)), 4, requires_grad=True)
    h0 = torch.randn(ref.num_layers * (2 if ref.bidirectional else 1), 3, ref.proj_size or 6, requires_grad=True)

    def call(m):
        seq = pack_padded_sequence(x, [5, 2, 4], ref.batch_first, enforce_sorted=False) if packed else x
        return m(seq, (h0, torch.zeros(h0.shape[0], 3, 6)) if cell == "lstm" else h0)

    expected, expected_grads = run_with_grads(ref, call, [x, h0])
    actual, actual_grads = run_with_grads(ours, call, [x, h0])
    assert_all_close(actual, expected, 1e-5, ["output", "h_n", "c_n"][: len(expected)])
    names = ["x", "h0"] + [n for n, _ in ref.named_parameters()]
    assert_all_close(actual_grads, expected_grads, 1e-5, names)


@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell"])
def test_cell_under_seqfast_backend_env_matches_torch(tb, name, monkeypatch):
    """`SEQFAST_BACKEND=triton` picks the interpreted kernels for a cell on CPU tensors; results as torch.nn's."""
    monkeypatch.setenv("SEQFAST_BACKEND", "triton")
    ref = getattr(torch.nn, name)(4, 5)
    ours = getattr(seqfast, name)(4, 5)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 4, requires_grad=True)
    expected, expected_grads = run_with_grads(ref, lambda m: m(x), [x])
    actual, actual_grads = run_with_grads(ours, lambda m: m(x), [x])
    assert_all_close(actual, expected, 1e-5, ["h", "c"][: len(expected)])
    assert_all_close(actual_grads, expected_grads, 1e-5, ["x"] + [n for n, _ in ref.named_parameters()])


def test_backends_table_under_the_interpreter(tb):
    row = {r.name: r for r in seqfast.backends()}["triton"]
    assert row.available and "cpu" in row.devices
    assert "triton" not in dispatch.names("cpu"), "the interpreter is a check, never an automatic choice"


def test_unavailable_without_cuda_or_interpreter():
    """Without a CUDA device and without `TRITON_INTERPRET=1` the triton backend can run nothing: `backends()` says
    so, and asking for it raises with that reason (a fresh process, since triton reads the flag at import)."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    code = (
        "import torch, seqfast\n"
        "row = {r.name: r for r in seqfast.backends()}['triton']\n"
        "print(row.available, row.why_not)\n"
        "try:\n"
        "    seqfast.LSTM(3, 4, backend='triton')(torch.randn(2, 1, 3))\n"
        "except RuntimeError as e:\n"
        "    print('raised', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    table_line, raised_line = done.stdout.splitlines()
    assert table_line.startswith("False ") and "TRITON_INTERPRET=1" in table_line
    assert raised_line.startswith("raised ") and "TRITON_INTERPRET=1" in raised_line
