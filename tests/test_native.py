"""The `native` backend (torch's own recurrent op for a whole module call) and the automatic route to it."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import flatten, run_with_grads, twins
from torch.nn.utils.rnn import pack_padded_sequence

import seqfast
from seqfast import dispatch, native

# (cell, constructor kwargs, packed): every module kind, two layers both ways, projection, packed, no bias
CASES = {
    "lstm-L2-bi": ("lstm", dict(num_layers=2, bidirectional=True), False),
    "lstm-proj-packed": ("lstm", dict(proj_size=3, batch_first=True), True),
    "gru-packed-bi-nobias": ("gru", dict(bidirectional=True, bias=False), True),
    "rnn_relu-L2": ("rnn_relu", dict(num_layers=2), False),
}


def _call(packed, batch_first):
    x = torch.randn(*((3, 5) if batch_first else (5, 3)), 4, requires_grad=True)

    def call(m):
        return m(pack_padded_sequence(x, [5, 2, 4], batch_first, enforce_sorted=False) if packed else x)

    return x, call


@pytest.mark.parametrize("case", list(CASES))
def test_forced_native_is_torch_nn_bitwise(case):
    """`backend="native"`: outputs, states and every gradient exactly torch.nn's, packed input included."""
    cell, kwargs, packed = CASES[case]
    ref, ours = twins(cell, 4, 6, backend="native", **kwargs)
    x, call = _call(packed, ref.batch_first)
    expected, expected_grads = run_with_grads(ref, call, [x])
    actual, actual_grads = run_with_grads(ours, call, [x])
    for a, e in zip(actual + actual_grads, expected + expected_grads, strict=True):
        assert torch.equal(a, e)


def test_forced_native_dropout_draws_torch_nns_mask():
    ref, ours = twins("lstm", 4, 6, backend="native", num_layers=3, dropout=0.5)
    x = torch.randn(5, 3, 4)
    torch.manual_seed(7)
    expected = flatten(ref(x))
    torch.manual_seed(7)
    actual = flatten(ours(x))
    assert all(torch.equal(a, e) for a, e in zip(actual, expected, strict=True))


@pytest.mark.parametrize("name", ["RNNCell", "LSTMCell", "GRUCell"])
def test_forced_native_cells_are_torch_nn_bitwise(name):
    kwargs = dict(nonlinearity="relu") if name == "RNNCell" else {}
    ref = getattr(torch.nn, name)(4, 6, bias=name != "GRUCell", **kwargs)
    ours = getattr(seqfast, name)(4, 6, bias=name != "GRUCell", backend="native", **kwargs)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 4, requires_grad=True)
    expected, expected_grads = run_with_grads(ref, lambda m: m(x), [x])
    actual, actual_grads = run_with_grads(ours, lambda m: m(x), [x])
    for a, e in zip(actual + actual_grads, expected + expected_grads, strict=True):
        assert torch.equal(a, e)


def test_native_declines_a_single_layer_with_its_reason():
    w_ih, w_hh, h0 = torch.randn(18, 4), torch.randn(18, 6), torch.zeros(3, 6)
    with pytest.raises(RuntimeError, match="native runs whole module calls and cell steps"):
        seqfast.functional.layer("gru", torch.randn(2, 3, 4), w_ih, w_hh, None, None, h0, backend="native")
    row = {r.name: r for r in seqfast.backends()}["native"]
    assert row.available and row.devices == ("cpu", "cuda")
    assert "native" not in dispatch.names("cpu"), "never a layer's automatic choice"


@pytest.fixture
def calibrations(monkeypatch, empty_calibration_cache):
    """Automatic routing calibrated afresh; returns the calls `_calibrate` answered, in order."""
    monkeypatch.delenv("SEQFAST_NATIVE")
    monkeypatch.setattr(native, "_routes", {})
    return []


def _counting(monkeypatch, answer, answers):
    """`_calibrate` runs each side once and answers `answer`, or False where torch's side raises (as it does)."""

    def calibrate(ours, theirs, wrt):
        ours()
        try:
            theirs()
        except RuntimeError:
            answers.append(False)
            return False
        answers.append(answer)
        return answer

    monkeypatch.setattr(native, "_calibrate", calibrate)


@pytest.mark.parametrize("faster", [True, False], ids=["torch-faster", "seqfast-faster"])
def test_automatic_route_follows_the_calibration_and_caches_it(calibrations, monkeypatch, faster):
    _counting(monkeypatch, faster, calibrations)
    ref, ours = twins("lstm", 4, 6, num_layers=2)
    x = torch.randn(5, 3, 4, requires_grad=True)
    expected, expected_grads = run_with_grads(ref, lambda m: m(x), [x])
    for _ in range(2):
        actual, actual_grads = run_with_grads(ours, lambda m: m(x), [x])
        same = all(torch.equal(a, e) for a, e in zip(actual + actual_grads, expected + expected_grads, strict=True))
        assert same == faster
    ours(torch.randn(7, 4, 4, requires_grad=True))  # same bucket of T and B: no new calibration
    assert calibrations == [faster]
    (entry,) = json.loads(native.cache_path().read_text()).values()
    assert entry == {f"lstm-float32-I4-H6-P0-B4-T8-L2-D1-bias1-threads{torch.get_num_threads()}-grad2-cpp": faster}
    monkeypatch.setattr(native, "_machine_choices", None)
    monkeypatch.setattr(native, "_routes", {})
    ours(torch.randn(5, 3, 4, requires_grad=True))
    assert calibrations == [faster], "a new process reads the cache instead of calibrating again"


def test_another_build_calibrates_again_and_replaces_the_old_answers(calibrations, monkeypatch):
    """A rebuild or reinstall under the same version (an editable install, one from git) may time differently: its
    first process calibrates again, and the cache keeps its answers instead of the old build's, beside other
    machines'."""
    native.cache_path().parent.mkdir(parents=True)
    native.cache_path().write_text(json.dumps({"another machine": {"key": True}}))
    _counting(monkeypatch, False, calibrations)
    module, x = seqfast.GRU(4, 6), torch.randn(5, 3, 4, requires_grad=True)
    module(x)
    assert f" build {native.build()} " in native._machine()
    monkeypatch.setattr(native, "build", lambda: "rebuilt")
    monkeypatch.setattr(native, "_machine_choices", None)
    monkeypatch.setattr(native, "_routes", {})
    module(x)
    assert calibrations == [False, False]
    saved = json.loads(native.cache_path().read_text())
    assert sorted(saved) == sorted(["another machine", native._machine()])
    assert " build rebuilt " in native._machine()


def test_each_backend_has_its_own_route(calibrations, monkeypatch):
    """Where seqfast._C is not built, automatic selection runs numba's loops: the answer timed for cpp's is not
    theirs, so such a call calibrates under its own key."""
    pytest.importorskip("seqfast.kernels.numba")
    monkeypatch.delenv("SEQFAST_STRICT", raising=False)  # the fall-through to numba is the case
    _counting(monkeypatch, False, calibrations)
    module, x = seqfast.LSTM(4, 6), torch.randn(5, 3, 4, requires_grad=True)
    module(x)
    monkeypatch.setattr(dispatch, "_loaded", {**dispatch._loaded, "cpp": "ImportError: seqfast._C is not built"})
    module(x)
    module(x)
    assert calibrations == [False, False]
    (entry,) = json.loads(native.cache_path().read_text()).values()
    assert sorted(key.rsplit("-", 1)[1] for key in entry) == ["cpp", "numba"]


def test_calibration_leaves_the_random_state_and_grads_alone(calibrations):
    """A real calibration of a training call with dropout: the call then draws torch.nn's dropout masks from the
    seed, and no parameter has a `.grad` until the caller's backward."""
    ref, ours = twins("lstm", 4, 6, num_layers=3, dropout=0.5)
    x = torch.randn(5, 3, 4, requires_grad=True)
    torch.manual_seed(11)
    expected = flatten(ref(x))
    torch.manual_seed(11)
    actual = flatten(ours(x))
    assert json.loads(native.cache_path().read_text()), "calibrated"
    assert all(p.grad is None for p in ours.parameters()) and x.grad is None
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["gru", "lstm-cell"])
def test_calibration_runs_unseen_by_the_callers_hooks(calibrations, kind):
    """A first call that calibrates, inside non-reentrant activation checkpointing and with hooks on its input and a
    weight: checkpointing recomputes it (the same saved tensors as the first time), each hook fires once, as a
    second call's do, and the gradients are torch.nn's."""
    from torch.utils.checkpoint import checkpoint

    if kind == "lstm-cell":
        ref, ours = torch.nn.LSTMCell(3, 4), seqfast.LSTMCell(3, 4)
        ours.load_state_dict(ref.state_dict())
    else:
        ref, ours = twins(kind, 3, 4)
    x0 = torch.randn((2, 3) if kind == "lstm-cell" else (5, 2, 3))

    def run(m):
        x = x0.clone().requires_grad_()
        fired = []
        x.register_hook(lambda g: fired.append("input"))
        weight = m.weight_hh if kind == "lstm-cell" else m.weight_hh_l0
        handle = weight.register_hook(lambda g: fired.append("weight"))
        y = checkpoint(lambda v: flatten(m(v))[0], x, use_reentrant=False)
        grads = torch.autograd.grad(y.square().sum(), [x, *m.parameters()])
        handle.remove()
        return fired, grads

    expected_fired, expected = run(ref)
    for _ in range(2):
        fired, actual = run(ours)
        assert sorted(fired) == sorted(expected_fired)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    assert json.loads(native.cache_path().read_text()), "calibrated"


# case: (cell, constructor kwargs, dtype, calibrated)
ROUTED = {
    "gru-f64": ("gru", {}, torch.float64, True),
    "rnn_tanh-bi": ("rnn_tanh", dict(bidirectional=True), torch.float32, True),
    "lstm-proj": ("lstm", dict(proj_size=2), torch.float32, True),
    "lstm-explicit-cpp": ("lstm", dict(backend="cpp"), torch.float32, False),
}


@pytest.mark.parametrize("case", list(ROUTED))
def test_automatic_route_calibrates_unpacked_cpu_module_calls(calibrations, monkeypatch, case):
    """Every cell, float32 or float64, with a projection too, is calibrated (and then runs torch.nn's op here); a
    module with an explicit backend never is."""
    _counting(monkeypatch, True, calibrations)
    cell, kwargs, dtype, calibrated = ROUTED[case]
    backend = kwargs.pop("backend", None)
    ref, ours = twins(cell, 4, 6, backend=backend, dtype=dtype, **kwargs)
    x = torch.randn(5, 3, 4, dtype=dtype)
    same = all(torch.equal(a, e) for a, e in zip(flatten(ours(x)), flatten(ref(x)), strict=True))
    assert (calibrations == [True]) == calibrated == same


def test_packed_input_is_never_routed_and_cells_only_with_grad(calibrations, monkeypatch):
    _counting(monkeypatch, True, calibrations)
    x = torch.randn(5, 3, 4, requires_grad=True)
    seqfast.LSTM(4, 6)(pack_padded_sequence(x, [5, 2, 4], enforce_sorted=False))
    ref, ours = torch.nn.LSTMCell(4, 6), seqfast.LSTMCell(4, 6)
    ours.load_state_dict(ref.state_dict())
    with torch.no_grad():
        ours(x[0])
    assert calibrations == []
    assert all(torch.equal(a, e) for a, e in zip(ours(x[0]), ref(x[0]), strict=True))
    (entry,) = json.loads(native.cache_path().read_text()).values()
    assert list(entry) == [f"lstm_cell-float32-I4-H6-P0-B4-T1-L0-D1-bias1-threads{torch.get_num_threads()}-grad2-cpp"]


def _autocast_call(module, x, cell_step):
    """`module`'s outputs of a forward under CPU autocast (bfloat16) and the gradients of `x` and every parameter,
    the backward outside autocast as a training step runs it; or the error's type where the forward raises (torch's
    LSTM on a oneDNN without a bfloat16 LSTM, AVX2 only)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        try:
            out = module(x[0]) if cell_step else module(x)
        except RuntimeError as e:
            return [type(e)]
    outputs = flatten(out)
    if not torch.is_grad_enabled():
        return outputs
    loss = sum(o.float().sum() for o in outputs)
    grads = torch.autograd.grad(loss, [x, *module.parameters()], allow_unused=True)
    return [o.detach() for o in outputs] + list(grads)


# case: (torch.nn's class, constructor kwargs, a cell's step)
AUTOCAST = {
    "lstm-L2": ("LSTM", dict(num_layers=2), False),
    "gru-bi": ("GRU", dict(bidirectional=True), False),
    "lstm-cell": ("LSTMCell", {}, True),
    "rnn_tanh-cell": ("RNNCell", {}, True),
}


def _autocast_twins(name, *backends, **kwargs):
    """torch.nn's module `name`, then seqfast's with each of `backends`, from the same state_dict."""
    ref = getattr(torch.nn, name)(4, 6, **kwargs)
    modules = [getattr(seqfast, name)(4, 6, backend=backend, **kwargs) for backend in backends]
    for module in modules:
        module.load_state_dict(ref.state_dict())
    return ref, *modules


@pytest.mark.parametrize("faster", [True, False], ids=["torch-faster", "seqfast-faster"])
@pytest.mark.parametrize("case", list(AUTOCAST))
def test_calls_under_cpu_autocast_calibrate_their_own_route(calibrations, monkeypatch, case, faster):
    """Under CPU autocast a module's call and a cell's step, with and without grad, calibrate routes of their own (the
    call that seqfast runs on rounded operands without autocast has its own); routed, they give torch.nn's results
    bitwise, else those of seqfast's kernels on rounded operands."""
    name, kwargs, cell_step = AUTOCAST[case]
    ref, ours, kernels = _autocast_twins(name, None, "cpp", **kwargs)
    x = torch.randn(5, 3, 4, requires_grad=True)
    if faster and _autocast_call(ref, x, cell_step) == [RuntimeError]:
        pytest.skip("torch's op raises under CPU autocast on this CPU's oneDNN, so no calibration answers True")
    _counting(monkeypatch, faster, calibrations)
    actual = _autocast_call(ours, x, cell_step)
    expected = _autocast_call(ref if faster else kernels, x, cell_step)
    assert all(torch.equal(a, e) for a, e in zip(actual, expected, strict=True))
    with torch.no_grad():
        _autocast_call(ours, x.detach(), cell_step)
    (entry,) = json.loads(native.cache_path().read_text()).values()
    routes = [key for key in entry if key.endswith("-cpp-autocast-bfloat16")]
    assert [key.split("-grad")[1][0] for key in sorted(routes)] == ["0", "2"], "with grad and without"


def test_native_backend_under_cpu_autocast_is_torch_nn_bitwise():
    """`backend="native"` under CPU autocast runs torch's op under it, as torch.nn does, without calibrating."""
    for name, cell_step in (("LSTM", False), ("GRUCell", True)):
        ref, ours = _autocast_twins(name, "native")
        x = torch.randn(5, 3, 4, requires_grad=True)
        actual, expected = _autocast_call(ours, x, cell_step), _autocast_call(ref, x, cell_step)
        assert all(a is e or torch.equal(a, e) for a, e in zip(actual, expected, strict=True))


def test_calibration_keeps_seqfasts_side_where_torchs_op_raises():
    """Under CPU autocast on a oneDNN without a bfloat16 LSTM torch's LSTM raises: the route keeps seqfast's kernels,
    which run the call."""

    def theirs():
        raise RuntimeError("could not create a primitive descriptor for the LSTM forward propagation primitive")

    x = torch.randn(3, requires_grad=True)
    assert native._calibrate(lambda: (x * 2,), theirs, [x]) is False


def test_seqfast_native_1_routes_without_calibrating(monkeypatch):
    monkeypatch.setenv("SEQFAST_NATIVE", "1")
    monkeypatch.setattr(native, "_calibrate", None)
    ref, ours = twins("lstm", 4, 6, bidirectional=True)
    x = torch.randn(5, 3, 4)
    assert all(torch.equal(a, e) for a, e in zip(flatten(ours(x)), flatten(ref(x)), strict=True))


def test_compiled_calls_stay_on_seqfasts_kernels(monkeypatch):
    """The route is for eager calls: `torch.compile(fullgraph=True)` traces seqfast's custom ops as before."""
    monkeypatch.setenv("SEQFAST_NATIVE", "1")
    model = seqfast.LSTM(4, 6)
    x = torch.randn(5, 3, 4)
    eager = seqfast.LSTM(4, 6, backend="cpp")
    eager.load_state_dict(model.state_dict())
    expected = flatten(eager(x))
    monkeypatch.setattr(native, "rnn", None)
    actual = flatten(torch.compile(model, fullgraph=True, backend="aot_eager")(x))
    torch.testing.assert_close(actual, expected, rtol=2e-5, atol=2e-5)


def test_calibration_in_a_fresh_process_imports_no_compiler_stack(tmp_path):
    code = textwrap.dedent("""
        import sys
        import torch
        import seqfast
        out, _ = seqfast.LSTM(8, 16, 2)(torch.randn(6, 32, 8, requires_grad=True))
        out.sum().backward()
        print(sorted(m for m in ("torch._dynamo", "torch._inductor", "sympy") if m in sys.modules))
    """)
    env = {k: v for k, v in os.environ.items() if k != "SEQFAST_NATIVE"} | {"XDG_CACHE_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"
    assert (tmp_path / "seqfast" / "native.json").exists()
