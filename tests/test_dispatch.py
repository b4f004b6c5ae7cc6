"""Dispatch rules (table, precedence, errors, fall-through logging, strict mode, lazy imports) and the torch
integration of the custom ops (`torch.compile(fullgraph=True)`, `torch.library.opcheck`)."""

import importlib
import logging
import re
import subprocess
import sys
import textwrap
import types

import pytest
import torch
from conftest import CPU_BACKENDS
from helpers import assert_all_close, flatten, twins

import seqfast
from seqfast import dispatch
from seqfast.autograd import h_prev
from seqfast.kernels.common import GATES

reference = importlib.import_module("seqfast.kernels.reference")


def _accept(*args):
    return None


def _fake(name, log, unsupported=_accept):
    """A backend module that runs the reference kernels and records `(name, "fwd"|"bwd")` in `log`."""
    module = types.ModuleType(f"seqfast_test_fake_{name}")
    module.unsupported = unsupported
    module.saved_shape = reference.saved_shape

    def fwd(*args, **kwargs):
        log.append((name, "fwd"))
        return reference.fwd(*args, **kwargs)

    def bwd(*args, **kwargs):
        log.append((name, "bwd"))
        return reference.bwd(*args, **kwargs)

    module.fwd, module.bwd = fwd, bwd
    return module


@pytest.fixture
def table(monkeypatch):
    """Replace the backend table for one test (monkeypatch restores it).

    `install(entries, priority)`: `entries` maps a name to `(module, devices)`: a module object (already loaded),
    whose `DEVICES` become `devices`, or an import path (loaded on first use, then its own `DEVICES`; the table
    reports one that cannot load for the device types `priority` names it for); `priority` maps a device type to
    names.
    """
    monkeypatch.delenv("SEQFAST_BACKEND", raising=False)

    def install(entries, priority):
        rows, loaded = [], {}
        for name, (module, devices) in entries.items():
            path = module if isinstance(module, str) else module.__name__
            rows.append(dispatch.Backend(name, path))
            if not isinstance(module, str):
                monkeypatch.setattr(module, "DEVICES", tuple(devices), raising=False)
                loaded[name] = module
        monkeypatch.setattr(dispatch, "_TABLE", tuple(rows))
        monkeypatch.setattr(dispatch, "_BY_NAME", {b.name: b for b in rows})
        monkeypatch.setattr(dispatch, "_PRIORITY", {k: tuple(v) for k, v in priority.items()})
        monkeypatch.setattr(dispatch, "_loaded", loaded)
        monkeypatch.setattr(dispatch, "_logged", set())

    return install


def _run(module, T=4, B=2, grad=True):
    x = torch.randn(T, B, module.input_size, dtype=torch.float64, requires_grad=grad)
    out = module(x)
    if grad:
        sum(t.sum() for t in flatten(out)).backward()
    return out


def test_backends_table_fields():
    rows = seqfast.backends()
    assert [r.name for r in rows] == dispatch.names()
    assert "reference" in dispatch.names("cpu") and dispatch.names("cpu")[-1] == "reference"
    for row in rows:
        assert row._fields == ("name", "devices", "available", "why_not")
        assert isinstance(row.devices, tuple) and row.devices
        assert isinstance(row.available, bool)
        assert (row.why_not is None) == row.available
        if not row.available:
            assert isinstance(row.why_not, str) and row.name in row.why_not
    by_name = {r.name: r for r in rows}
    assert by_name["reference"].available and set(by_name["reference"].devices) >= {"cpu", "cuda"}
    for device in ("cpu", "cuda"):
        for name in dispatch.names(device):
            assert device in by_name[name].devices


def test_explicit_beats_environment_beats_automatic(table, monkeypatch):
    log = []
    table({n: (_fake(n, log), ["cpu"]) for n in ("alpha", "beta", "gamma")}, {"cpu": ["gamma", "alpha", "beta"]})
    ref, ours = twins("lstm", 3, 4, None, torch.float64, num_layers=2)

    _run(ours)
    assert log == [("gamma", "fwd")] * 2 + [("gamma", "bwd")] * 2
    log.clear()
    monkeypatch.setenv("SEQFAST_BACKEND", "beta")
    _run(ours)
    assert {n for n, _ in log} == {"beta"} and len(log) == 4
    log.clear()
    ours.backend = "alpha"
    out = _run(ours)
    assert {n for n, _ in log} == {"alpha"} and len(log) == 4
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    assert_all_close(flatten(ours(x)), flatten(ref(x)), 1e-10, ["output", "h_n", "c_n"])
    assert out[0].shape == (4, 2, 4)


def test_backward_runs_on_the_backend_that_ran_forward(table):
    log = []
    table({n: (_fake(n, log), ["cpu"]) for n in ("alpha", "beta")}, {"cpu": ["alpha", "beta"]})
    _, ours = twins("gru", 3, 4, "alpha", torch.float64)
    out, _ = ours(torch.randn(5, 2, 3, dtype=torch.float64))
    ours.backend = "beta"
    out.sum().backward()
    assert log == [("alpha", "fwd"), ("alpha", "bwd")]


def test_unknown_backend_name_raises_value_error(monkeypatch):
    with pytest.raises(ValueError, match="unknown seqfast backend 'nope'.*reference"):
        dispatch.load("nope")
    _, ours = twins("rnn_tanh", 3, 4, "nope")
    with pytest.raises(ValueError, match="'nope'"):
        ours(torch.randn(2, 1, 3))
    _, ours = twins("lstm", 3, 4)
    monkeypatch.setenv("SEQFAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="'nope'"):
        ours(torch.randn(2, 1, 3))
    cell = seqfast.GRUCell(3, 4, backend="nope")
    with pytest.raises(ValueError, match="'nope'"):
        cell(torch.randn(2, 3))


def _odd_hidden(cell, gx, w_hh, h0, c0=None, lengths=None, w_hr=None):
    H = w_hh.shape[0] // GATES[cell]
    return f"hidden size {H} is odd" if H % 2 else None


def test_explicit_backend_that_cannot_run_raises_with_reason(table, monkeypatch, tmp_path):
    log = []
    (tmp_path / "seqfast_test_needs_compiler.py").write_text("raise RuntimeError('needs a C++ compiler')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    table(
        {
            "picky": (_fake("picky", log, _odd_hidden), ["cpu"]),
            "gpu_only": (_fake("gpu_only", log), ["cuda"]),
            "broken": ("seqfast_test_needs_compiler", ["cpu"]),
            "reference": (reference, ["cpu", "cuda"]),
        },
        {"cpu": ["picky", "broken", "reference"], "cuda": ["gpu_only"]},
    )
    for backend, reason in [
        ("picky", "hidden size 5 is odd"),
        ("gpu_only", "runs on cuda, not cpu"),
        ("broken", "RuntimeError: needs a C++ compiler"),
    ]:
        _, ours = twins("lstm", 3, 5, backend)
        with pytest.raises(RuntimeError, match=f"'{backend}'.*{re.escape(reason)}"):
            ours(torch.randn(2, 1, 3))
        _, ours = twins("gru", 3, 5)
        monkeypatch.setenv("SEQFAST_BACKEND", backend)
        with pytest.raises(RuntimeError, match=f"'{backend}'.*{re.escape(reason)}"):
            ours(torch.randn(2, 1, 3))
        monkeypatch.delenv("SEQFAST_BACKEND")
    assert log == []
    _, ours = twins("lstm", 3, 6, "picky")
    ours(torch.randn(2, 1, 3))
    assert log == [("picky", "fwd")]


def test_automatic_fall_through_logs_once_per_cell_backend_reason(table, monkeypatch, caplog):
    log = []
    table(
        {"picky": (_fake("picky", log, _odd_hidden), ["cpu"]), "plain": (_fake("plain", log), ["cpu"])},
        {"cpu": ["picky", "plain"]},
    )
    monkeypatch.setenv("SEQFAST_STRICT", "0")
    caplog.set_level(logging.WARNING, logger="seqfast")
    ref, ours = twins("lstm", 3, 5, None, torch.float64, num_layers=2)
    for _ in range(2):
        _run(ours)
    assert {n for n, _ in log} == {"plain"}
    assert len(caplog.records) == 1
    record = caplog.records[0]
    assert record.name == "seqfast" and record.levelno == logging.WARNING
    message = record.getMessage()
    assert "picky" in message and "lstm" in message and "hidden size 5 is odd" in message
    x = torch.randn(3, 2, 3, dtype=torch.float64)
    assert_all_close(flatten(ours(x)), flatten(ref(x)), 1e-10, ["output", "h_n", "c_n"])

    _run(twins("gru", 3, 5, None, torch.float64)[1])
    _run(twins("lstm", 3, 7, None, torch.float64)[1])
    _run(twins("lstm", 3, 5, None, torch.float64)[1])
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3, messages
    assert "gru" in messages[1] and "hidden size 7 is odd" in messages[2]
    log.clear()
    _run(twins("lstm", 3, 6, None, torch.float64)[1])
    assert {n for n, _ in log} == {"picky"} and len(caplog.records) == 3


def test_strict_mode_turns_fall_through_into_error(table, monkeypatch, caplog):
    log = []
    table(
        {"picky": (_fake("picky", log, _odd_hidden), ["cpu"]), "plain": (_fake("plain", log), ["cpu"])},
        {"cpu": ["picky", "plain"]},
    )
    monkeypatch.setenv("SEQFAST_STRICT", "1")
    _, ours = twins("rnn_relu", 3, 5)
    with pytest.raises(RuntimeError, match="strict.*'plain'.*picky: hidden size 5 is odd"):
        ours(torch.randn(2, 1, 3))
    assert log == []
    _, ours = twins("rnn_relu", 3, 4)
    ours(torch.randn(2, 1, 3))
    assert log == [("picky", "fwd")]


def test_no_backend_can_run_lists_every_reason(table, monkeypatch):
    table(
        {"picky": (_fake("picky", [], _odd_hidden), ["cpu"]), "gone": ("seqfast_test_no_such_module", ["cpu"])},
        {"cpu": ["picky", "gone"]},
    )
    monkeypatch.setenv("SEQFAST_STRICT", "0")
    _, ours = twins("gru", 3, 5)
    reasons = "no backend can run.*picky: hidden size 5 is odd.*gone: .*ModuleNotFoundError"
    with pytest.raises(RuntimeError, match=reasons):
        ours(torch.randn(2, 1, 3))


def test_backend_whose_import_fails_is_unavailable_with_reason(table, monkeypatch, tmp_path, caplog):
    log = []
    (tmp_path / "seqfast_test_needs_compiler.py").write_text("raise RuntimeError('needs a C++ compiler')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "seqfast_test_halted", None)
    table(
        {
            "compiled": ("seqfast_test_needs_compiler", ["cpu"]),
            "gone": ("seqfast_test_no_such_module", ["cpu"]),
            "halted": ("seqfast_test_halted", ["cpu"]),
            "plain": (_fake("plain", log), ["cpu"]),
        },
        {"cpu": ["compiled", "gone", "halted", "plain"]},
    )
    rows = {r.name: r for r in seqfast.backends()}
    assert not rows["compiled"].available and "RuntimeError: needs a C++ compiler" in rows["compiled"].why_not
    assert not rows["gone"].available and "ModuleNotFoundError" in rows["gone"].why_not
    assert not rows["halted"].available and "import of seqfast_test_halted halted" in rows["halted"].why_not
    assert rows["plain"].available and rows["plain"].why_not is None
    monkeypatch.setenv("SEQFAST_STRICT", "0")
    caplog.set_level(logging.WARNING, logger="seqfast")
    _run(twins("lstm", 3, 4, None, torch.float64)[1])
    assert {n for n, _ in log} == {"plain"}
    assert len(caplog.records) == 3 and "needs a C++ compiler" in caplog.records[0].getMessage()
    monkeypatch.setenv("SEQFAST_STRICT", "1")
    with pytest.raises(RuntimeError, match="strict.*needs a C\\+\\+ compiler"):
        _run(twins("lstm", 3, 4, None, torch.float64)[1])


def test_import_seqfast_loads_no_backend():
    code = textwrap.dedent("""
        import sys
        import seqfast
        banned = ["triton", "numba", "seqfast._C", "seqfast.kernels.cpp", "seqfast.kernels.numba",
                  "seqfast.kernels.triton"]
        print(sorted(m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in banned)))
        seqfast.LSTM(3, 4)
        print(sorted(m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in banned)))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.split("\n")[:2] == ["[]", "[]"], result.stdout


class Tagger(torch.nn.Module):
    """Linear -> seqfast recurrent stack -> Linear."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(4, 5)
        self.lstm = seqfast.LSTM(5, 6, num_layers=2, bidirectional=True, proj_size=3, batch_first=True)
        self.gru = seqfast.GRU(6, 4, batch_first=True)
        self.rnn = seqfast.RNN(4, 4, nonlinearity="relu", batch_first=True)
        self.out = torch.nn.Linear(4, 2)

    def forward(self, x):
        y, (h, c) = self.lstm(self.inp(x))
        y, g = self.gru(y)
        y, r = self.rnn(y)
        return self.out(y), h, c, g, r


def _compiled_matches_eager(model, compiled, x):
    results = []
    for fn in (compiled, model):
        xx = x.clone().requires_grad_()
        out = fn(xx)
        grads = torch.autograd.grad(sum((o * o).sum() for o in out), [xx, *model.parameters()])
        results.append(([o.detach() for o in out], list(grads)))
    (actual, actual_grads), (expected, expected_grads) = results
    assert_all_close(actual, expected, 2e-5, [f"out{i}" for i in range(len(expected))])
    assert_all_close(actual_grads, expected_grads, 2e-5, ["d_input"] + [n for n, _ in model.named_parameters()])


def test_compile_fullgraph_matches_eager_even_before_backends_load(monkeypatch):
    """The compiled model runs first, so the backends load inside the trace; then a new shape retraces."""
    monkeypatch.setattr(dispatch, "_loaded", {})
    torch.manual_seed(0)
    model = Tagger()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    _compiled_matches_eager(model, compiled, torch.randn(3, 7, 4))
    _compiled_matches_eager(model, compiled, torch.randn(2, 5, 4))


def test_compile_warns_about_nothing_of_seqfasts():
    """Dynamo traces seqfast's Python without a warning pointing at it (a fresh process: Dynamo warns once)."""
    code = textwrap.dedent("""
        import warnings
        import torch
        import seqfast
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            torch.compile(seqfast.GRU(3, 4), fullgraph=True, backend="aot_eager")(torch.randn(2, 1, 3))
        print([str(w.message) for w in caught if "seqfast" in str(w.message) or ".py:" in str(w.message)])
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert result.stdout.strip() == "[]", result.stdout


@pytest.mark.slow
def test_compile_fullgraph_inductor_matches_eager():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), TakeOutput(seqfast.LSTM(5, 6, batch_first=True, proj_size=2)))
    compiled = torch.compile(model, fullgraph=True)
    results = []
    for fn in (model, compiled):
        x = torch.randn(3, 6, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
        y = fn(x)
        results.append([y.detach(), *torch.autograd.grad(y.square().sum(), [x, *model.parameters()])])
    assert_all_close(results[1], results[0], 2e-5, [f"t{i}" for i in range(len(results[0]))])


@pytest.mark.parametrize("name", ["GRU", "LSTM", "LSTMCell"])
def test_jit_trace_checks_and_differentiates(name):
    """`torch.jit.trace` with its default check (a second run under `no_grad`), then backward through the trace."""
    torch.manual_seed(0)
    ours = getattr(seqfast, name)(3, 4)
    ref = getattr(torch.nn, name)(3, 4)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(5, 2, 3) if name != "LSTMCell" else torch.randn(2, 3)
    traced = torch.jit.trace(TakeOutput(ours), x)
    results = []
    for fn, module in ((traced, ours), (TakeOutput(ref), ref)):
        xg = x.clone().requires_grad_()
        y = fn(xg)
        results.append([y.detach(), *torch.autograd.grad(y.square().sum(), [xg, *module.parameters()])])
    assert_all_close(results[0], results[1], 2e-5, [f"t{i}" for i in range(len(results[0]))])


@pytest.mark.parametrize("name", ["RNN", "GRU", "LSTM", "LSTMCell"])
def test_meta_device_shapes(name):
    """Shape inference on the meta device, as torch.nn allows: outputs and gradients have torch.nn's shapes."""
    kwargs = {} if name == "LSTMCell" else dict(num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(*((2, 3) if name == "LSTMCell" else (2, 5, 3)), device="meta", requires_grad=True)
    shapes = []
    for lib in (seqfast, torch.nn):
        module = getattr(lib, name)(3, 4, device="meta", **kwargs)
        out = torch.utils._pytree.tree_leaves(module(x))
        grads = torch.autograd.grad(out[0].sum(), [x, *module.parameters()])
        assert all(t.device.type == "meta" for t in out + list(grads))
        shapes.append([t.shape for t in out + list(grads)])
    assert shapes[0] == shapes[1]


class TakeOutput(torch.nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        return self.rnn(x)[0]


OP_CELLS = ["rnn_tanh", "rnn_relu", "lstm", "lstm-proj", "gru"]


def _op_args(backend, cell, lengths, reverse, resets=False, zoneout=False, layer_norm=False):
    """Arguments of `seqfast::recurrence` for a tiny case; `lstm-proj` also drops `b_hh`; `resets` sets `zero`,
    `zoneout` the masks `keep_h`, `keep_c`, `layer_norm` the gains `ln_hh` (and LSTM's `ln_c_weight`, `ln_c_bias`)."""
    proj = cell == "lstm-proj"
    cell = "lstm" if proj else cell
    T, B, H = 5, 3, 4
    P = 2 if proj else H
    G = GATES[cell] * H

    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    lens = None if lengths is None else torch.tensor(lengths)
    return (
        backend,
        cell,
        reverse,
        True,
        rand(T, B, G),
        rand(G, P),
        None if proj else rand(G),
        rand(B, P),
        rand(B, H) if cell == "lstm" else None,
        lens,
        rand(P, H) if proj else None,
        torch.tensor([[True, False, False], [False, True, False]] + [[False, False, True]] * (T - 2))
        if resets
        else None,
        torch.rand(T, B, P, dtype=torch.float64).round() if zoneout else None,
        torch.rand(T, B, H, dtype=torch.float64).round() if zoneout and cell == "lstm" else None,
        0.0,
        *((rand(G), *((rand(H), rand(H)) if cell == "lstm" else (None, None))) if layer_norm else ()),
    )


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("lengths", [None, [5, 2, 3]], ids=["full", "mixed"])
@pytest.mark.parametrize("cell", OP_CELLS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_recurrence_and_backward(backend, cell, lengths, reverse):
    _opcheck(_op_args(backend, cell, lengths, reverse))


@pytest.mark.parametrize("cell", OP_CELLS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("option", ["resets", "zoneout", "layer_norm"])
def test_opcheck_recurrence_with_options(backend, cell, option):
    """The ops with `zero` (resets), zoneout's masks or layer_norm's gains on a backend that runs them; one that does
    not is never chosen for them. (layer_norm with a projection is not defined: the modules refuse it.)"""
    if option == "layer_norm" and cell == "lstm-proj":
        return
    if option not in getattr(dispatch.load(backend), "EXTENSIONS", ()):
        _, cell, _, _, gx, w_hh, _, h0, c0, lens, w_hr, *_ = _op_args(backend, cell, None, False)
        with pytest.raises(RuntimeError, match=f"does not run the {option} option"):
            dispatch.select(cell, gx, w_hh, h0, c0, lens, w_hr, backend, (option,))
        return
    if backend == "reference" and option != "resets":  # autograd differentiates its forward, never the ops
        with pytest.raises(ValueError, match="runs resets alone"):
            torch.ops.seqfast.recurrence(*_op_args(backend, cell, None, False, **{option: True}))
        return
    for reverse in (False, True):
        _opcheck(_op_args(backend, cell, [5, 2, 3], reverse, **{option: True}))


def _opcheck(args):
    """`opcheck` of `seqfast::recurrence` on `args`, then of its backward on the outputs."""
    torch.library.opcheck(torch.ops.seqfast.recurrence.default, args)
    backend, cell, reverse, _, gx, w_hh, b_hh, h0, c0, lens, w_hr, *options = args
    y, hT, cT, saved = torch.ops.seqfast.recurrence(*args)
    H = c0.shape[1] if cell == "lstm" else w_hh.shape[0] // GATES[cell]
    used = {"zoneout": options[1] is not None, "layer_norm": len(options) > 4}
    used = {name: True for name, on in used.items() if on}
    assert saved.shape == dispatch.load(backend).saved_shape(cell, *gx.shape[:2], H, w_hh.shape[1], **used)

    def detached(t):
        return None if t is None else t.detach()

    dcT = torch.randn_like(cT) if cell == "lstm" else None
    backward_args = (
        backend,
        cell,
        reverse,
        torch.randn_like(y),
        torch.randn_like(hT),
        dcT,
        detached(w_hh),
        detached(b_hh),
        detached(w_hr),
        detached(h0),
        detached(c0),
        lens,
        y.detach(),
        saved,
        *(detached(o) if torch.is_tensor(o) else o for o in options),
    )
    torch.library.opcheck(torch.ops.seqfast.recurrence_backward.default, backward_args)


@pytest.mark.parametrize("cell", ["lstm-proj", "gru"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_recurrence_without_saved_workspace(backend, cell):
    args = list(_op_args(backend, cell, [5, 1, 3], True))
    args[3] = False
    args[4:] = [t.detach() if isinstance(t, torch.Tensor) else t for t in args[4:]]
    torch.library.opcheck(torch.ops.seqfast.recurrence.default, tuple(args))
    assert torch.ops.seqfast.recurrence(*args)[3].numel() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_opcheck_linear_and_backward(dtype, bias):
    x = torch.randn(4, 3, 5, dtype=dtype, requires_grad=True)
    w = torch.randn(7, 5, dtype=dtype, requires_grad=True)
    b = torch.randn(7, dtype=dtype, requires_grad=True) if bias else None
    torch.library.opcheck(torch.ops.seqfast.linear.default, (x, w, b))
    dy = torch.randn(4, 3, 7, dtype=dtype)
    for needs in [(True, True, bias), (False, True, False), (True, False, False), (False, False, bias)]:
        torch.library.opcheck(torch.ops.seqfast.linear_backward.default, (dy, x.detach(), w.detach(), *needs))


@pytest.mark.parametrize("lengths", ["full", "mixed", "resets"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("T", [1, 6])
def test_hidden_grads_are_dgh_times_h_prev(T, reverse, lengths):
    """`w_hh`'s gradient read from `y` in place equals `dgh^T h_prev` with `h_prev` formed; dgh and y are zero past
    each length (one sequence of length 0), as the backends leave them. Also opcheck of the op."""
    B, G, P = 4, 6, 5
    lens = torch.tensor([T, 0, max(T - 2, 1), 1]) if lengths != "full" else None
    active = torch.arange(T)[:, None] < (lens if lens is not None else torch.full((B,), T))
    y = torch.randn(T, B, P, dtype=torch.float64) * active[..., None]
    dgh = torch.randn(T, B, G, dtype=torch.float64) * active[..., None]
    h0 = torch.randn(B, P, dtype=torch.float64)
    zero = torch.rand(T, B) < 0.4 if lengths == "resets" else None
    dw, db = torch.ops.seqfast.hidden_grads(dgh, y, h0, lens, reverse, zero, True)
    states = h_prev(y, h0, lens, reverse, zero)
    torch.testing.assert_close(dw, dgh.flatten(0, 1).T @ states.flatten(0, 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(db, dgh.sum((0, 1)), rtol=1e-12, atol=1e-12)
    torch.library.opcheck(torch.ops.seqfast.hidden_grads.default, (dgh, y, h0, lens, reverse, zero, False))
