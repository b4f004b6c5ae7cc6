"""The triton backend's compiled kernels on CUDA: kernel contract against the reference, modules against torch.nn.

Covers both modes: one program per batch block owning every hidden unit (`H <= 128`) and the split-hidden mode
with the per-step grid barrier (`H > 128`), several batch blocks, and a batch split over several launches.
"""

import pytest
import torch
from helpers import assert_all_close, assert_outputs_close, kind_problem, run_contract, run_with_grads, twins
from seqfast.kernels import reference

import seqfast

pytestmark = pytest.mark.gpu

# (dtype, relative RMS tolerance) against the reference on the same inputs; see tests/test_triton.py for the
# 16-bit reasoning. Longer sequences and larger H than the interpreter tests, hence the wider 16-bit bounds.
DTYPES = {"f32": (torch.float32, 2e-5), "bf16": (torch.bfloat16, 5e-2), "f16": (torch.float16, 5e-3)}

# (B, T, H): single mode, split mode with H off multiples of 16 and two batch blocks. Kept small in number: every
# (cell, options, dtype, block sizes) combination is a compilation.
SHAPES = [(3, 9, 40), (70, 6, 520)]
SHAPE_IDS = [f"B{b}-T{t}-H{h}" for b, t, h in SHAPES]
KINDS = ["rnn_tanh", "rnn_relu", "lstm", "lstm-proj", "gru"]


def _tb():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import seqfast.kernels.triton as module

    if module.INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 is set: the compiled kernels are not in use")
    return module


def check(tb, shape, kind, lengths, reverse, dtype_id):
    B, T, H = shape
    dtype, tol = DTYPES[dtype_id]
    cell, args, cot = kind_problem(kind, T, B, H, H // 3, lengths=lengths, dtype=dtype, device="cuda")
    assert tb.unsupported(cell, args["gx"], args["w_hh"], args["h0"], args["c0"], args["lengths"], args["w_hr"]) is None
    expected = run_contract(reference, cell, args, cot, reverse)
    assert_outputs_close(run_contract(tb, cell, args, cot, reverse), expected, tol)


@pytest.mark.parametrize("options", [("full", False), ("mixed", True)], ids=["full-fwd", "mixed-rev"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_contract_f32(shape, kind, options):
    check(_tb(), shape, kind, *options, "f32")


@pytest.mark.parametrize(
    "kind_dtype", [(k, "bf16") for k in KINDS] + [("lstm", "f16"), ("gru", "f16")], ids=lambda kd: "-".join(kd)
)
def test_contract_16bit(kind_dtype):
    check(_tb(), SHAPES[1], kind_dtype[0], "mixed", True, kind_dtype[1])


def test_batch_over_several_launches(monkeypatch):
    """Split mode with one batch block per launch (the path taken when blocks x NH exceed the SM count)."""
    tb = _tb()
    config = tb._config

    def one_block_per_launch(B, H, device, dtype):
        return dict(config(B, H, device, dtype), BB=16, per_launch=1)

    monkeypatch.setattr(tb, "_config", one_block_per_launch)
    cell, args, cot = kind_problem("lstm", 7, 40, 300, lengths="mixed", dtype=torch.float32, device="cuda")
    expected = run_contract(reference, cell, args, cot, True)
    assert_outputs_close(run_contract(tb, cell, args, cot, True), expected, 2e-5)


def test_repeated_launches_are_deterministic():
    """The split mode's exchange is race-free: 20 runs give bit-identical outputs."""
    tb = _tb()
    cell, args, cot = kind_problem("gru", 25, 64, 1024, dtype=torch.float32, device="cuda")
    first = run_contract(tb, cell, args, cot, False)
    for _ in range(19):
        for a, b in zip(run_contract(tb, cell, args, cot, False), first, strict=True):
            if a is not None:
                assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kind_dtype",
    [(k, "f32") for k in ("rnn_tanh", "lstm", "lstm-proj", "gru")] + [("lstm", "bf16")],
    ids=lambda kd: "-".join(kd),
)
def test_module_vs_cudnn(kind_dtype):
    """seqfast modules on the triton backend against torch.nn (cuDNN): outputs, states and every gradient."""
    _tb()
    kind, dtype_id = kind_dtype
    dtype, tol = {"f32": (torch.float32, 2e-5), "bf16": (torch.bfloat16, 5e-2)}[dtype_id]
    cell = "lstm" if kind == "lstm-proj" else kind
    kwargs = dict(num_layers=2, bidirectional=True, device="cuda")
    if kind == "lstm-proj":
        kwargs["proj_size"] = 64
    ref, ours = twins(cell, 96, 256, backend="triton", dtype=dtype, **kwargs)
    x = torch.randn(19, 6, 96, device="cuda", dtype=dtype, requires_grad=True)
    out_ref, grads_ref = run_with_grads(ref, lambda m: m(x), [x])
    out_ours, grads_ours = run_with_grads(ours, lambda m: m(x), [x])
    assert_all_close(out_ours, out_ref, tol, [f"out{i}" for i in range(len(out_ref))])
    names = ["x"] + [n for n, _ in ref.named_parameters()]
    assert_all_close(grads_ours, grads_ref, tol, names)


@pytest.mark.parametrize("name", ["LSTM", "GRUCell"])
def test_module_under_cuda_autocast(name):
    """CUDA autocast casts torch.nn's recurrent ops whole: bfloat16 outputs and states, float32 gradients."""
    _tb()
    ref = getattr(torch.nn, name)(24, 40, device="cuda")
    ours = getattr(seqfast, name)(24, 40, device="cuda", backend="triton")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(*((7,) if name == "LSTM" else ()), 5, 24, device="cuda", requires_grad=True)

    def call(m):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return m(x)

    out_ref, grads_ref = run_with_grads(ref, call, [x])
    out_ours, grads_ours = run_with_grads(ours, call, [x])
    assert [t.dtype for t in out_ours] == [t.dtype for t in out_ref] == [torch.bfloat16] * len(out_ref)
    assert_all_close(out_ours, out_ref, 5e-2, [f"out{i}" for i in range(len(out_ref))])
    assert_all_close(grads_ours, grads_ref, 5e-2, ["x"] + [n for n, _ in ref.named_parameters()])
