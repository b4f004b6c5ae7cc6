"""The triton backend's compiled kernels on CUDA beyond the kernel contract (tests/test_contract.py runs that for
every backend, triton on CUDA included, in float32, TF32 and 16-bit): a batch split over several launches, the split
mode's determinism, and modules against torch.nn (cuDNN), also under autocast.
"""

import copy

import pytest
import torch
from helpers import (
    TF32_TOL,
    assert_all_close,
    assert_close,
    check_contract,
    fp32_precision,
    kind_problem,
    rel_rms,
    run_contract,
    run_with_grads,
    twins,
)

import seqfast

pytestmark = pytest.mark.gpu


@pytest.fixture(name="fp32_precision")
def fp32_precision_param(request):
    """Sets torch's float32 precision for cuDNN's RNNs, which the triton backend follows, for one test."""
    with fp32_precision(request.param) as value:
        yield value


def _tb():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import seqfast.kernels.triton as module

    if module.INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 is set: the compiled kernels are not in use")
    return module


@pytest.mark.parametrize("fp32_precision", ["ieee"], indirect=True)
def test_batch_over_several_launches(monkeypatch, fp32_precision):
    """Split mode with one batch block per launch (the path taken when blocks x NH exceed the SM count)."""
    tb = _tb()
    config = tb._config

    def one_block_per_launch(B, H, device, dtype):
        return dict(config(B, H, device, dtype), BB=16, per_launch=1)

    monkeypatch.setattr(tb, "_config", one_block_per_launch)
    cell, args, cot = kind_problem("lstm", 7, 40, 300, lengths="mixed", dtype=torch.float32, device="cuda")
    check_contract(tb, cell, args, cot, True, 2e-5)  # float32 on CUDA, as in tests/test_contract.py


def test_repeated_launches_are_deterministic():
    """The split mode's exchange is race-free: 20 runs give bit-identical outputs."""
    tb = _tb()
    cell, args, cot = kind_problem("gru", 25, 64, 1024, dtype=torch.float32, device="cuda")
    first = run_contract(tb, cell, args, cot, False)
    for _ in range(19):
        for a, b in zip(run_contract(tb, cell, args, cot, False), first, strict=True):
            if a is not None:
                assert torch.equal(a, b)


@pytest.mark.parametrize("fp32_precision", ["ieee", "tf32"], indirect=True)
@pytest.mark.parametrize("kind", ["rnn_tanh", "lstm", "lstm-proj", "gru"])
def test_module_vs_cudnn_f32(kind, fp32_precision):
    """seqfast modules on the triton backend and torch.nn (cuDNN) under the same float32 precision rule, each against
    torch.nn in float64: outputs, states and every gradient. Each tensor's bound is the larger of the precision's
    own (2e-5 for exact products, `TF32_TOL`) and twice torch.nn's own error on it (cuDNN may keep exact products
    at some sizes even when TF32 is allowed)."""
    _tb()
    cell = "lstm" if kind == "lstm-proj" else kind
    kwargs = dict(num_layers=2, bidirectional=True, device="cuda")
    if kind == "lstm-proj":
        kwargs["proj_size"] = 64
    ref, ours = twins(cell, 96, 256, backend="triton", **kwargs)
    exact = copy.deepcopy(ref).double()
    x = torch.randn(19, 6, 96, device="cuda", requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    out_exact, grads_exact = run_with_grads(exact, lambda m: m(x64), [x64])
    out_ref, grads_ref = run_with_grads(ref, lambda m: m(x), [x])
    out_ours, grads_ours = run_with_grads(ours, lambda m: m(x), [x])
    floor = TF32_TOL if fp32_precision == "tf32" else 2e-5
    names = [f"out{i}" for i in range(len(out_ref))] + ["x"] + [n for n, _ in ref.named_parameters()]
    for name, a, r, e in zip(names, out_ours + grads_ours, out_ref + grads_ref, out_exact + grads_exact, strict=True):
        assert_close(a.double(), e, max(floor, 2 * rel_rms(r, e)), name)


def test_module_vs_cudnn_bf16():
    """bfloat16 modules on the triton backend against torch.nn (cuDNN) in bfloat16."""
    _tb()
    ref, ours = twins(
        "lstm", 96, 256, backend="triton", dtype=torch.bfloat16, num_layers=2, bidirectional=True, device="cuda"
    )
    x = torch.randn(19, 6, 96, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out_ref, grads_ref = run_with_grads(ref, lambda m: m(x), [x])
    out_ours, grads_ours = run_with_grads(ours, lambda m: m(x), [x])
    assert_all_close(out_ours, out_ref, 5e-2, [f"out{i}" for i in range(len(out_ref))])
    assert_all_close(grads_ours, grads_ref, 5e-2, ["x"] + [n for n, _ in ref.named_parameters()])


@pytest.mark.parametrize("name, dtype", [("LSTM", torch.float16), ("GRUCell", torch.bfloat16)])
def test_module_under_cuda_autocast(name, dtype):
    """CUDA autocast casts torch.nn's recurrent ops whole, float32 gradients: a cell to the autocast dtype, a module's
    cuDNN op to float16 whatever that dtype is (seen on an H200, torch 2.11)."""
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
    assert [t.dtype for t in out_ours] == [t.dtype for t in out_ref] == [dtype] * len(out_ref)
    assert_all_close(out_ours, out_ref, 5e-2, [f"out{i}" for i in range(len(out_ref))])
    assert_all_close(grads_ours, grads_ref, 5e-2, ["x"] + [n for n, _ in ref.named_parameters()])


@pytest.mark.parametrize("fp32_precision", ["ieee"], indirect=True)
@pytest.mark.parametrize("kind", ["lstm-proj", "gru", "rnn_tanh"])
def test_options_vs_reference(kind, fp32_precision):
    """Resets and zoneout (training masks from the same seed, then evaluation's constant weight) in a bidirectional
    module in the split-hidden mode (H520, two batch blocks), float32 against the reference backend in float64 (its
    forward differentiated by autograd) on the same device: outputs, states and every gradient."""
    _tb()
    modules = {"lstm-proj": seqfast.LSTM, "gru": seqfast.GRU, "rnn_tanh": seqfast.RNN}
    kwargs = dict(bidirectional=True, zoneout=0.3, device="cuda")
    if kind == "lstm-proj":
        kwargs["proj_size"] = 173
    ours = modules[kind](96, 520, backend="triton", **kwargs)
    exact = copy.deepcopy(ours).double()
    exact.backend = "reference"
    x = torch.randn(6, 70, 96, device="cuda", requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    resets = torch.rand(6, 70, device="cuda") < 0.2
    names = ["x"] + [n for n, _ in ours.named_parameters()]
    for training in (True, False):
        ours.train(training), exact.train(training)
        torch.manual_seed(3)
        out, grads = run_with_grads(ours, lambda m: m(x, resets=resets), [x])
        torch.manual_seed(3)
        out_exact, grads_exact = run_with_grads(exact, lambda m: m(x64, resets=resets), [x64])
        expected = [t.float() for t in out_exact + grads_exact]
        assert_all_close(out + grads, expected, 2e-5, [f"out{i}" for i in range(len(out))] + names)
