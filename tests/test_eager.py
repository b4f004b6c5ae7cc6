"""The eager path (`seqfast.autograd.Layer`, or the kernels directly without grad) against the custom ops: when each
is taken, that both give bitwise the same outputs and gradients, and that an eager call needs no compiler stack."""

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import CPU_BACKENDS
from helpers import flatten, run_with_grads, twins
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import seqfast
from seqfast import functional


class PassThroughFunctions(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class PassThroughDispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class Tagged(torch.Tensor):
    """A tensor subclass that changes nothing."""


def _grad_fn_names(out):
    return {type(t.grad_fn).__name__ for t in flatten(out)}


def test_eager_only_without_modes_transforms_tracing_or_special_tensors():
    x = torch.randn(2, 3)
    assert functional.eager(x, None, torch.nn.Parameter(x))
    with PassThroughFunctions():
        assert not functional.eager(x)
    with PassThroughDispatch():
        assert not functional.eager(x)
    assert not functional.eager(x, x.as_subclass(Tagged))
    assert not functional.eager(torch.empty(2, 3, device="meta"), x)
    with FakeTensorMode() as fake_mode:
        fake = torch.randn(2, 3)
    assert not functional.eager(x, fake) and not functional.eager(fake_mode.from_tensor(x))
    seen = []
    torch.func.vmap(lambda t: seen.append(functional.eager(t)) or t)(x)
    torch.jit.trace(lambda t: seen.append(functional.eager(t)) or t * 2, (x,), check_trace=False)
    assert seen == [False, False]


# (T, B, dtype, bias): a sequence, one step of one row in float64, one step without biases
_PATH_CASES = [(6, 4, torch.float32, True), (1, 1, torch.float64, True), (1, 3, torch.float32, False)]


@pytest.mark.parametrize("case", _PATH_CASES, ids=["T6-B4", "T1-B1-f64", "T1-B3-nobias"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_eager_and_custom_op_paths_give_identical_results(backend, cell, case):
    """Outputs and every gradient bitwise equal; a pass-through function mode sends the call to the custom ops."""
    T, B, dtype, bias = case
    extra = {"proj_size": 3} if cell == "lstm" else {}
    _, ours = twins(cell, 5, 7, backend, dtype, num_layers=2, bidirectional=True, bias=bias, **extra)
    x = torch.randn(T, B, 5, dtype=dtype, requires_grad=True)

    def call(module):
        return module(x)

    eager_out, eager_grads = run_with_grads(ours, call, [x])
    assert _grad_fn_names(call(ours)) <= {"LayerBackward", "StackBackward0", "CatBackward0"}
    with PassThroughFunctions():
        assert "LayerBackward" not in _grad_fn_names(call(ours))
        op_out, op_grads = run_with_grads(ours, call, [x])
    for a, e in zip(eager_out + eager_grads, op_out + op_grads, strict=True):
        assert torch.equal(a, e)
    with torch.no_grad():
        eager_out = flatten(ours(x))
        with PassThroughFunctions():
            op_out = flatten(ours(x))
    for a, e in zip(eager_out, op_out, strict=True):
        assert torch.equal(a, e)


@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cells_take_the_eager_path(name):
    cell = getattr(seqfast, name)(4, 6)
    out = cell(torch.randn(3, 4, requires_grad=True))
    assert _grad_fn_names(out) == {"LayerBackward"}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_eager_forward_backward_imports_no_compiler_stack(backend):
    code = textwrap.dedent(f"""
        import sys
        import torch
        import seqfast
        for module in (seqfast.LSTM(5, 6, 2, backend="{backend}"), seqfast.GRUCell(5, 6, backend="{backend}")):
            out = module(torch.randn(3, 5, requires_grad=True))
            sum(t.sum() for t in (out[0] if isinstance(out, tuple) else out,)).backward()
            with torch.no_grad():
                module(torch.randn(3, 5))
        print(sorted(m for m in ("torch._dynamo", "torch._inductor", "sympy") if m in sys.modules))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
