"""The eager path (`seqfast.autograd.Layer`, or the kernels directly without grad) against the custom ops: when each
is taken, that both give bitwise the same outputs and gradients, and that an eager call needs no compiler stack."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import CPU_BACKENDS
from helpers import flatten, run_with_grads, twins
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.utils.rnn import pack_padded_sequence
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
    """The names of the autograd nodes that made `out`'s tensors, looking through the copy a module's unpacked output
    is of its last layer's (see `functional._stack`)."""
    nodes = [t.grad_fn for t in flatten(out)]
    nodes = [n.next_functions[0][0] if type(n).__name__ == "CloneBackward0" else n for n in nodes]
    return {type(n).__name__ for n in nodes}


def _assert_bitwise(actual, expected, strict=True):
    """Each tensor of `actual` bitwise equal to its twin in `expected` (`strict`, default True: as many of each)."""
    for a, e in zip(actual, expected, strict=strict):
        assert torch.equal(a, e)


# the eager path's autograd nodes: `seqfast.autograd.Layer`'s, and the cpp backend's own (`seqfast.kernels.cpp.layer`)
EAGER_NODES = {"LayerBackward", "CppFunction"}


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


def test_call_key_only_on_the_eager_path():
    """A call is remembered (`functional.call_key` not None) exactly where it may take the eager path."""
    pytest.importorskip("seqfast._C", reason="seqfast._C is not built")
    x, w, b = torch.randn(2, 3), torch.nn.Parameter(torch.randn(3, 3)), torch.nn.Parameter(torch.randn(3))

    def key(x=x, h=x, c=None):
        return functional.call_key((x, h, c, w, w, None, b), "gru")

    plain = key()
    assert plain is not None and plain == key() != key(c=x)
    assert plain != key(x=x.double()) and plain != key(h=x[:1]) and plain != key(x=x.clone().requires_grad_())
    with torch.no_grad():
        assert key() is not None and key() != plain
    with PassThroughFunctions():
        assert key() is None
    with PassThroughDispatch():
        assert key() is None
    with torch.autocast("cpu"):
        assert key() is None
    assert key(h=x.as_subclass(Tagged)) is None and key(x=torch.empty(2, 3, device="meta")) is None
    with FakeTensorMode() as fake_mode:
        assert key(x=fake_mode.from_tensor(x)) is None
    seen = []
    torch.func.vmap(lambda t: seen.append(key(x=t)) or t)(x)
    torch.func.grad(lambda t: seen.append(key(h=t)) or t.sum())(x)
    torch.jit.trace(lambda t: seen.append(key(x=t)) or t * 2, (x,), check_trace=False)
    assert seen == [None, None, None]


def _assert_agree_twice(ref, ours, x, grad_fns):
    """Twice (the second call remembered): `ours(x)` gives `ref(x)`'s outputs, each from the same seed, and its
    outputs' `grad_fn`s are among `grad_fns`."""
    for _ in range(2):
        torch.manual_seed(5)
        expected = flatten(ref(x))
        torch.manual_seed(5)
        actual = flatten(ours(x))
        for a, e in zip(actual, expected, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
        assert _grad_fn_names(actual) <= grad_fns


@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
def test_remembered_steps_follow_what_changed(name, monkeypatch):
    """A step that runs as an earlier one did (see `functional.remembered`) follows what changed since: the
    parameters' dtype and whether they need grad, grad mode, the backend asked for; results stay torch.nn's."""
    ref = getattr(torch.nn, name)(4, 5)
    ours = getattr(seqfast, name)(4, 5)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 4)

    def agree(dtype=torch.float32, grad_fns=EAGER_NODES):
        _assert_agree_twice(ref, ours, x.to(dtype), grad_fns)

    agree()
    with torch.no_grad():
        agree(grad_fns={"NoneType"})
    ref.double(), ours.double()
    with pytest.raises(RuntimeError, match="same dtype"):
        ours(x)
    agree(torch.float64)
    ref.float(), ours.float()
    for module in (ref, ours):
        module.requires_grad_(False)
    agree(grad_fns={"NoneType"})
    for module in (ref, ours):
        module.requires_grad_(True)
    agree()
    monkeypatch.setenv("SEQFAST_BACKEND", "reference")
    agree(grad_fns={"LayerBackward"})
    monkeypatch.setenv("SEQFAST_BACKEND", "native")
    agree(grad_fns={"AddBackward0", "MulBackward0", "TanhBackward0"})  # the last ops of torch's cells


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_remembered_module_calls_follow_what_changed(cell, monkeypatch):
    """A module's call that runs as an earlier one did (see `functional.remembered`) follows what changed since:
    training (dropout between layers, from the same seed), the parameters' dtype and whether they need grad, grad
    mode, `batch_first`, the backend asked for; results stay torch.nn's."""
    ref, ours = twins(cell, 4, 5, num_layers=2, dropout=0.5)
    x = torch.randn(3, 2, 4)

    def agree(dtype=torch.float32, grad_fns=EAGER_NODES | {"StackBackward0", "TransposeBackward0"}):
        _assert_agree_twice(ref, ours, x.to(dtype), grad_fns)

    agree()
    ref.train(), ours.train()
    agree(grad_fns=EAGER_NODES | {"StackBackward0", "MulBackward0"})
    ref.eval(), ours.eval()
    with torch.no_grad():
        agree(grad_fns={"NoneType"})
    ref.double(), ours.double()
    with pytest.raises(ValueError, match="dtype"):
        ours(x)
    agree(torch.float64)
    ref.float(), ours.float()
    ref.requires_grad_(False), ours.requires_grad_(False)
    agree(grad_fns={"NoneType"})
    ref.requires_grad_(True), ours.requires_grad_(True)
    ref.batch_first = ours.batch_first = True
    agree()
    monkeypatch.setenv("SEQFAST_BACKEND", "reference")
    agree(grad_fns={"LayerBackward", "StackBackward0", "TransposeBackward0"})


# (T, B, dtype, bias, input and hidden size): a sequence, one step of one row in float64, one step without biases,
# sizes past `seqfast.linear.TRANSPOSED_MAX_COLS`, and rows enough for both paths to form the weight gradients
# transposed (`seqfast.linear.transposed_weight_grad`)
_PATH_CASES = [
    (6, 4, torch.float32, True, 5, 7),
    (1, 1, torch.float64, True, 5, 7),
    (1, 3, torch.float32, False, 5, 7),
    (3, 2, torch.float32, True, 66, 65),
    (16, 17, torch.float32, True, 5, 7),
]


@pytest.mark.parametrize("case", _PATH_CASES, ids=["T6-B4", "T1-B1-f64", "T1-B3-nobias", "T3-B2-wide", "T16-B17"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_eager_and_custom_op_paths_give_identical_results(backend, cell, case):
    """Outputs and every gradient bitwise equal; a pass-through function mode sends the call to the custom ops."""
    T, B, dtype, bias, I, H = case
    extra = {"proj_size": 3} if cell == "lstm" else {}
    _, ours = twins(cell, I, H, backend, dtype, num_layers=2, bidirectional=True, bias=bias, **extra)
    x = torch.randn(T, B, I, dtype=dtype, requires_grad=True)

    def call(module):
        return module(x)

    eager_out, eager_grads = run_with_grads(ours, call, [x])
    assert _grad_fn_names(call(ours)) <= EAGER_NODES | {"StackBackward0", "CatBackward0"}
    with PassThroughFunctions():
        assert not _grad_fn_names(call(ours)) & EAGER_NODES
        op_out, op_grads = run_with_grads(ours, call, [x])
    _assert_bitwise(eager_out + eager_grads, op_out + op_grads)
    with torch.no_grad():
        eager_out = flatten(ours(x))
        with PassThroughFunctions():
            op_out = flatten(ours(x))
    _assert_bitwise(eager_out, op_out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_packed_eager_and_custom_op_paths_give_identical_results(backend, cell, dtype):
    """A packed batch of mixed lengths, unsorted: outputs and every gradient bitwise equal on both paths, two layers
    both ways; the cpp backend's eager call runs on its own node. Without grad (the cpp extension's padding and
    gather on the eager path), the outputs of the call with grad on both paths."""
    extra = {"proj_size": 3} if cell == "lstm" else {}
    _, ours = twins(cell, 5, 7, backend, dtype, num_layers=2, bidirectional=True, **extra)
    x = torch.randn(6, 4, 5, dtype=dtype, requires_grad=True)

    def call(module):
        return module(pack_padded_sequence(x, [3, 6, 1, 4], enforce_sorted=False))

    eager_out, eager_grads = run_with_grads(ours, call, [x])
    names = _graph_names(call(ours))
    assert ("CppFunction" in names) == (backend == "cpp"), names
    with PassThroughFunctions():
        assert not _graph_names(call(ours)) & EAGER_NODES
        op_out, op_grads = run_with_grads(ours, call, [x])
    _assert_bitwise(eager_out + eager_grads, op_out + op_grads)
    with torch.no_grad():
        no_grad_out = flatten(call(ours))
        with PassThroughFunctions():
            no_grad_out += flatten(call(ours))
    _assert_bitwise(no_grad_out, eager_out + eager_out)


def _graph_names(out):
    """The names of every autograd node a packed output's data reaches."""
    seen, todo = set(), [out[0].data.grad_fn]
    while todo:
        n = todo.pop()
        if n is not None and n not in seen:
            seen.add(n)
            todo.extend(f for f, _ in n.next_functions)
    return {type(n).__name__ for n in seen}


@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cells_take_the_eager_path(name):
    cell = getattr(seqfast, name)(4, 6)
    out = cell(torch.randn(3, 4, requires_grad=True))
    names = _grad_fn_names(out)
    assert len(names) == 1 and names <= EAGER_NODES, names


@pytest.mark.parametrize(
    "frozen",
    [{"bias_ih_l0"}, {"weight_ih_l0", "bias_hh_l0"}, {"weight_ih_l0", "weight_hh_l0"}, {"weight_ih_l0", "bias_ih_l0"}],
    ids=["b_ih", "w_ih-b_hh", "weights", "w_ih-b_ih"],
)
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_frozen_parameters_same_on_both_paths(backend, cell, frozen):
    """With some parameters frozen (a bias reduced without its weight's GEMM, gradients skipped) the eager path still
    gives bitwise the custom ops' outputs and gradients."""
    _, ours = twins(cell, 5, 7, backend, num_layers=2, batch_first=True)
    for name, p in ours.named_parameters():
        p.requires_grad_(name not in frozen)
    x = torch.randn(3, 4, 5, requires_grad=True)
    wrt = [x] + [p for p in ours.parameters() if p.requires_grad]

    def outputs_and_grads():
        out = flatten(ours(x))
        cotangents = torch.Generator().manual_seed(7)
        loss = sum((o * torch.randn(o.shape, generator=cotangents)).sum() for o in out)
        return [o.detach() for o in out] + list(torch.autograd.grad(loss, wrt))

    eager = outputs_and_grads()
    with PassThroughFunctions():
        custom_ops = outputs_and_grads()
    _assert_bitwise(eager, custom_ops)


@pytest.mark.parametrize("steps", [1, 7])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_cpp_node_runs_resets_as_the_custom_ops(cell, steps):
    """Resets alone take the cpp backend's own node, which zeroes the reset steps' rows of the gradient that its
    `w_hh` gradient reads instead of their states: outputs and every gradient bitwise the custom ops', through two
    layers and both directions (LSTM with a projection); with zoneout too the call takes `Layer`."""
    pytest.importorskip("seqfast.kernels.cpp", reason="seqfast._C is not built")
    extra = {"proj_size": 3} if cell == "lstm" else {}
    _, ours = twins(cell, 5, 7, "cpp", num_layers=2, bidirectional=True, **extra)
    x = torch.randn(steps, 4, 5, requires_grad=True)
    resets = torch.rand(steps, 4, generator=torch.Generator().manual_seed(1)) < 0.3
    resets[0, 0] = resets[-1, 1] = True

    def call(module):
        return module(x, resets=resets)

    eager_out, eager_grads = run_with_grads(ours, call, [x])
    assert _grad_fn_names(call(ours)) <= {"CppFunction", "StackBackward0", "CatBackward0"}
    with PassThroughFunctions():
        op_out, op_grads = run_with_grads(ours, call, [x])
    _assert_bitwise(eager_out + eager_grads, op_out + op_grads)
    zoned = seqfast.__dict__[type(ours).__name__](5, 7, backend="cpp", zoneout=0.1).eval()
    assert "LayerBackward" in _grad_fn_names(zoned(x, resets=resets))


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("backend", [p for p in CPU_BACKENDS if p.values[0] != "reference"])
def test_layer_norm_eager_recurrence_is_the_custom_ops(backend, cell):
    """With layer_norm a fused backend's eager path runs the recurrence as `seqfast.autograd.Recurrence` after torch's
    LayerNorm of the input projection: outputs and every gradient bitwise the custom ops', with resets and zoneout
    too."""
    options = {"num_layers": 2, "bidirectional": True, "layer_norm": True, "zoneout": 0.2}
    ours = getattr(seqfast, cell)(5, 7, backend=backend, **options)
    x = torch.randn(6, 3, 5, requires_grad=True)
    resets = torch.rand(6, 3, generator=torch.Generator().manual_seed(2)) < 0.3

    def call(module):
        torch.manual_seed(0)
        return module(x, resets=resets)

    eager_out, eager_grads = run_with_grads(ours, call, [x])
    one_layer = getattr(seqfast, cell)(5, 7, backend=backend, layer_norm=True)
    assert _grad_fn_names(one_layer(x)[0]) == {"RecurrenceBackward"}
    with PassThroughFunctions():
        assert _grad_fn_names(one_layer(x)[0]) != {"RecurrenceBackward"}
        op_out, op_grads = run_with_grads(ours, call, [x])
    _assert_bitwise(eager_out + eager_grads, op_out + op_grads)


def test_cpp_node_differentiates_its_backward_with_resets():
    """Under `create_graph=True` the cpp backend's own node with resets gives the first-order gradients of a plain
    backward, with a graph."""
    pytest.importorskip("seqfast.kernels.cpp", reason="seqfast._C is not built")
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    lstm = seqfast.LSTM(3, 5, backend="cpp", dtype=torch.float64)
    resets = torch.tensor([[False, True], [True, False], [False, False], [False, True]])
    out, _ = lstm(x, resets=resets)
    assert _grad_fn_names(out) == {"CppFunction"}
    grads = torch.autograd.grad(out.sum(), [x, lstm.weight_hh_l0], create_graph=True)
    assert all(g.requires_grad for g in grads)
    plain = torch.autograd.grad(lstm(x, resets=resets)[0].sum(), [x, lstm.weight_hh_l0])
    for g, p in zip(grads, plain, strict=True):
        torch.testing.assert_close(g, p, rtol=1e-12, atol=1e-14)


def test_cpp_node_differentiates_its_backward():
    """The cpp backend's own node under `create_graph=True`: its gradients carry a graph and equal the first-order
    ones a plain backward gives."""
    pytest.importorskip("seqfast.kernels.cpp", reason="seqfast._C is not built")
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    cell = seqfast.GRUCell(4, 3, backend="cpp", dtype=torch.float64)
    out = cell(x)
    assert _grad_fn_names(out) == {"CppFunction"}
    (dx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    assert dx.requires_grad
    (plain,) = torch.autograd.grad(cell(x).sum(), x)
    torch.testing.assert_close(dx, plain, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_cpp_node_forms_dh0_only_when_wanted(cell, steps):
    """The cpp backend's own node skips the first step's product with w_hh when the initial state needs no gradient:
    every other gradient is bitwise the one it gives when the state needs it, and that state's gradient is the
    custom ops'."""
    pytest.importorskip("seqfast.kernels.cpp", reason="seqfast._C is not built")
    _, ours = twins(cell, 5, 6, "cpp", torch.float64)
    x = torch.randn(steps, 3, 5, dtype=torch.float64, requires_grad=True)
    states = [torch.randn(1, 3, 6, dtype=torch.float64) for _ in range(2 if cell == "lstm" else 1)]

    def outputs_and_grads(need_state):
        hx = [s.clone().requires_grad_(need_state) for s in states]
        out = flatten(ours(x, tuple(hx) if cell == "lstm" else hx[0]))
        cotangents = torch.Generator().manual_seed(3)
        loss = sum((o * torch.randn(o.shape, generator=cotangents, dtype=o.dtype)).sum() for o in out)
        wrt = [x, *ours.parameters()] + (hx if need_state else [])
        return [o.detach() for o in out] + list(torch.autograd.grad(loss, wrt))

    assert _grad_fn_names(ours(x)[0]) == {"CppFunction"}
    without_state = outputs_and_grads(False)
    with_state = outputs_and_grads(True)
    _assert_bitwise(without_state, with_state, strict=False)
    with PassThroughFunctions():
        custom_ops = outputs_and_grads(True)
    _assert_bitwise(with_state, custom_ops)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_grad_in_time_chunks_gives_bitwise_one_call(backend, cell, packed, dtype, monkeypatch):
    """Without grad the input projection and the loop run in chunks of steps (three here, the fewest steps a chunk
    may have): two layers both ways (reverse chunks from the end, or from each packed sequence's own last step),
    packed lengths clipped to each chunk; outputs and states bitwise those of one call. (32 features and units:
    BLAS's GEMM may round a gathered row of a narrower product by where it sits.)"""
    extra = {"proj_size": 16} if cell == "lstm" else {}
    _, ours = twins(cell, 32, 32, backend, dtype, num_layers=2, bidirectional=True, **extra)
    x = torch.randn(100, 6, 32, dtype=dtype)

    def run():
        seq = pack_padded_sequence(x, [67, 100, 9, 100, 70, 93], enforce_sorted=False) if packed else x
        with torch.no_grad():
            return flatten(ours(seq))

    whole = run()
    chunks = []
    project = functional.preactivations
    monkeypatch.setattr(functional, "preactivations", lambda k, x, *a: chunks.append(len(x)) or project(k, x, *a))
    monkeypatch.setattr(functional, "_INFER_CHUNK_BYTES", 1)
    monkeypatch.setattr(functional, "_runners", {})  # the remembered calls chose one chunk
    _assert_bitwise(run(), whole)
    assert sorted(chunks) == [32] * 4 + [34] * 8  # per layer-direction: 34, 34, 32 steps


_PEAK_SCRIPT = """
import sys
import torch
import seqfast


def status(name):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(name + ":"))


def peak(fn):
    # the resident high-water mark during fn() over what was resident before (writing 5 to clear_refs resets it)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    out = fn()
    return status("VmHWM") - before


ref = torch.nn.LSTM(32, 32)
ours = seqfast.LSTM(32, 32, backend=sys.argv[1])
ours.load_state_dict(ref.state_dict())
x = torch.randn(20000, 8, 32)
with torch.no_grad():
    ref(x[:50]), ours(x[:50])
    ref_peaks, our_peaks = [], []
    for _ in range(2):
        ref_peaks.append(peak(lambda: ref(x)))
        our_peaks.append(peak(lambda: ours(x)))
print(min(ref_peaks), min(our_peaks))
"""


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_grad_peak_memory_of_a_long_sequence_near_torchs(backend):
    """LSTM, T = 20000, B = 8, H = 32 under no_grad: the peak resident memory of a call at most 1.3x torch.nn's,
    measured in one fresh process (glibc told to unmap freed blocks, so each call starts from the same footprint).
    All steps' input projections at once peaked at 2.5x (98 MB against 39 MB); in chunks, 0.95-0.98x."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the resident high-water mark")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, backend], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    torch_peak, our_peak = map(int, done.stdout.split())
    assert our_peak <= 1.3 * torch_peak, f"seqfast {our_peak / 2**20:.1f} MB, torch.nn {torch_peak / 2**20:.1f} MB"
