"""User contract: seqfast modules match torch.nn built from the same state_dict, outputs and every gradient."""

from dataclasses import dataclass, field

import pytest
import torch
from conftest import CPU_BACKENDS
from helpers import DTYPE_IDS, DTYPES, assert_all_close, assert_close, run_with_grads, twins
from torch.nn.utils.rnn import pack_padded_sequence


@dataclass
class Case:
    id: str
    B: int = 3
    T: int = 7
    I: int = 5
    H: int = 9
    hx: bool = False
    unbatched: bool = False
    packed: str | None = None
    lengths: list = field(default_factory=list)
    module: dict = field(default_factory=dict)


CASES = [
    Case("B3-T7-I5-H9"),
    Case("B3-T7-I5-H9-hx", hx=True),
    Case("T1", B=2, T=1, I=4, H=6, hx=True),
    Case("B1", B=1, T=5, I=4, H=6, hx=True),
    Case("H1", B=3, T=5, I=2, H=1, hx=True),
    Case("B5-T13-I17-H33-L2-bi", B=5, T=13, I=17, H=33, hx=True, module=dict(num_layers=2, bidirectional=True)),
    Case("batch_first-bi", hx=True, module=dict(batch_first=True, bidirectional=True)),
    Case("nobias-L2", hx=True, module=dict(bias=False, num_layers=2)),
    Case("unbatched", unbatched=True),
    Case("unbatched-hx-bi", unbatched=True, hx=True, module=dict(bidirectional=True)),
    Case("unbatched-batch_first-hx", unbatched=True, hx=True, module=dict(batch_first=True)),
    Case("packed-sorted", B=4, packed="sorted", lengths=[7, 5, 5, 2]),
    Case(
        "packed-sorted-hx-batch_first",
        B=4,
        hx=True,
        packed="sorted",
        lengths=[7, 6, 3, 1],
        module=dict(batch_first=True),
    ),
    Case(
        "packed-unsorted-hx-L2-bi",
        B=5,
        hx=True,
        packed="unsorted",
        lengths=[3, 7, 1, 5, 7],
        module=dict(num_layers=2, bidirectional=True),
    ),
    Case("packed-B1", B=1, hx=True, packed="unsorted", lengths=[4]),
    Case("B0", B=0, hx=True, module=dict(num_layers=2, bidirectional=True)),
    Case("T200-H8", B=2, T=200, I=3, H=8, hx=True),
]

# lstm-proj: LSTM with proj_size = H // 2 (or none when H = 1 leaves no room for it)
CELLS = ["rnn_tanh", "rnn_relu", "lstm", "lstm-proj", "gru"]


def _build(cell, case, backend, dtype):
    kwargs = dict(case.module)
    if cell == "lstm-proj":
        cell = "lstm"
        if case.H > 1:
            kwargs["proj_size"] = case.H // 2
    ref, ours = twins(cell, case.I, case.H, backend, dtype, **kwargs)
    return cell, ref, ours


def _inputs(cell, case, ref, dtype):
    directions = 2 if ref.bidirectional else 1
    P = ref.proj_size or ref.hidden_size
    shape = (case.B, case.T, case.I) if ref.batch_first else (case.T, case.B, case.I)
    x = torch.randn(shape, dtype=dtype)
    state_batch = () if case.unbatched else (case.B,)
    if case.unbatched:
        x = x.select(0 if ref.batch_first else 1, 0)
    x.requires_grad_()
    hx = []
    if case.hx:
        hx.append(torch.randn(ref.num_layers * directions, *state_batch, P, dtype=dtype, requires_grad=True))
        if cell == "lstm":
            hx.append(
                torch.randn(ref.num_layers * directions, *state_batch, ref.hidden_size, dtype=dtype, requires_grad=True)
            )
    return x, hx


def _call(x, hx, cell, case, batch_first):
    def call(module):
        inp = x
        if case.packed:
            inp = pack_padded_sequence(
                x, torch.tensor(case.lengths), batch_first=batch_first, enforce_sorted=case.packed == "sorted"
            )
        state = None
        if hx:
            state = tuple(hx) if cell == "lstm" else hx[0]
        return module(inp, state)

    return call


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize(("dtype", "tol"), DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_module_matches_torch(backend, dtype, tol, cell, case):
    cell, ref, ours = _build(cell, case, backend, dtype)
    x, hx = _inputs(cell, case, ref, dtype)
    call = _call(x, hx, cell, case, ref.batch_first)
    expected, expected_grads = run_with_grads(ref, call, [x, *hx])
    actual, actual_grads = run_with_grads(ours, call, [x, *hx])
    names = ["output", "h_n", "c_n"][: len(expected)]
    assert_all_close(actual, expected, tol, names)
    grad_names = ["d_input", *(f"d_{n}" for n in ("h0", "c0")[: len(hx)])]
    grad_names += [f"d_{n}" for n, _ in ref.named_parameters()]
    assert_all_close(actual_grads, expected_grads, tol, grad_names)


@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "gru"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dropout_between_layers_matches_torch(backend, cell):
    """Same seed, same masks: dropout is torch's own, applied to every layer's output but the last."""
    ref, ours = twins(cell, 6, 10, backend, torch.float64, num_layers=3, dropout=0.4, bidirectional=True)
    x = torch.randn(8, 4, 6, dtype=torch.float64, requires_grad=True)
    results = []
    for module in (ref, ours):
        torch.manual_seed(7)
        results.append(run_with_grads(module, lambda m: m(x), [x]))
    (expected, expected_grads), (actual, actual_grads) = results
    assert_all_close(actual, expected, 1e-10, ["output", "h_n", "c_n"][: len(expected)])
    assert_all_close(actual_grads, expected_grads, 1e-10, [f"grad{i}" for i in range(len(expected_grads))])


@pytest.mark.parametrize("sorted_", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dropout_on_packed_input_matches_torch(backend, cell, sorted_):
    """torch.nn drops out a packed batch's data (valid steps only, packed order): same seed, same masks, same
    outputs and gradients, and the generator left where torch.nn leaves it."""
    ref, ours = twins(cell, 6, 10, backend, torch.float64, num_layers=3, dropout=0.4, bidirectional=True)
    x = torch.randn(8, 4, 6, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([8, 6, 3, 1] if sorted_ else [3, 8, 1, 6])

    def call(module):
        out, state = module(pack_padded_sequence(x, lengths, enforce_sorted=sorted_))
        return out.data, state

    results, after = [], []
    for module in (ref, ours):
        torch.manual_seed(7)
        results.append(run_with_grads(module, call, [x]))
        after.append(torch.rand(3))
    (expected, expected_grads), (actual, actual_grads) = results
    assert_all_close(actual, expected, 1e-10, ["output", "h_n", "c_n"][: len(expected)])
    assert_all_close(actual_grads, expected_grads, 1e-10, [f"grad{i}" for i in range(len(expected_grads))])
    assert torch.equal(after[0], after[1])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dropout_only_in_training(backend):
    ref, ours = twins("lstm", 6, 10, backend, torch.float64, num_layers=2, dropout=0.9)
    x = torch.randn(5, 3, 6, dtype=torch.float64)
    ref.eval()
    ours.eval()
    assert_all_close(ours(x)[0:1], ref(x)[0:1], 1e-10, ["output"])
    ours.train()
    assert (ours(x)[0] - ref(x)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "gru"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_saturation_and_non_finite_match_torch(backend, cell):
    """float32 activations of huge, infinite and NaN pre-activations: exactly torch's (tanh is +-1 and sigmoid 0 or 1
    once float32 rounds them there, so their gradients vanish exactly), NaN stays NaN."""
    ref, ours = twins(cell, 1, 1, backend, bias=False)
    with torch.no_grad():
        for module in (ref, ours):
            module.weight_ih_l0.fill_(1.0)
            module.weight_hh_l0.fill_(0.0)
    x = torch.tensor([20.0, -30.0, 9.5, -1e20, float("inf"), float("-inf"), float("nan"), 0.5]).view(1, -1, 1)
    expected, actual = ref(x)[0], ours(x)[0]
    finite = expected.isfinite()
    assert torch.equal(actual.isnan(), expected.isnan())
    torch.testing.assert_close(actual[finite], expected[finite], rtol=0, atol=2e-7)
    assert torch.equal(actual[expected.abs() == 1], expected[expected.abs() == 1])


@pytest.mark.parametrize("value", [float("inf"), float("-inf")], ids=["+inf", "-inf"])
@pytest.mark.parametrize(("dtype", "tol"), DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("cell", ["rnn_tanh", "rnn_relu", "lstm", "gru"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_infinite_input_gives_torchs_non_finite_pattern(backend, cell, dtype, tol, value):
    """One infinite input element: NaN, +inf and -inf in the outputs and every gradient exactly where torch.nn has
    them (a gate saturated by it has an exactly zero derivative, so its weight gradient is 0 * inf = NaN; relu's
    gradient passes through a NaN state), the finite values within the usual tolerance."""
    ref, ours = twins(cell, 8, 16, backend, dtype)
    x = torch.randn(5, 3, 8, dtype=dtype)
    x[2, 1, 3] = value
    x.requires_grad_()
    expected, expected_grads = run_with_grads(ref, lambda m: m(x), [x])
    actual, actual_grads = run_with_grads(ours, lambda m: m(x), [x])
    names = ["output", "h_n", "c_n"][: len(expected)] + ["d_input"] + [f"d_{n}" for n, _ in ref.named_parameters()]
    for a, e, name in zip(actual + actual_grads, expected + expected_grads, names, strict=True):
        for where in (torch.isnan, torch.isposinf, torch.isneginf):
            differ = (where(a) != where(e)).nonzero()
            assert len(differ) == 0, f"{name}: {where.__name__} differs first at {differ[0].tolist()}"
        finite = e.isfinite()
        assert_close(a[finite], e[finite], tol, name)
