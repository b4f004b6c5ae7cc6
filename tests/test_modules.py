"""Module behaviour beyond the parity matrix: construction, parameters, state, live weights, autograd modes,
conversions, hooks, step-by-step use, the cells, and gradcheck through whole modules."""

import copy
import inspect
import io
import typing

import pytest
import torch
from conftest import CPU_BACKENDS
from helpers import DTYPE_IDS, DTYPES, HALF_TOLS, assert_all_close, assert_close, flatten, run_with_grads, twins
from torch.nn.utils.rnn import pack_padded_sequence

import seqfast
from seqfast import dispatch

MODULES = ["RNN", "LSTM", "GRU"]
CELLS = ["RNNCell", "LSTMCell", "GRUCell"]
F64 = torch.float64

# A non-default value for every documented constructor argument.
NON_DEFAULT = dict(
    input_size=5,
    hidden_size=6,
    num_layers=2,
    nonlinearity="relu",
    bias=False,
    batch_first=True,
    dropout=0.25,
    bidirectional=True,
    proj_size=3,
    device="cpu",
    dtype=F64,
)


def _documented_signature(name):
    """torch.nn's documented constructor signature (the typed overload for the modules), without `self`."""
    init = getattr(torch.nn, name).__init__
    overloads = typing.get_overloads(init)
    sig = inspect.signature(overloads[0] if overloads else init)
    return [p for p in sig.parameters.values() if p.name != "self"]


def _public_state(module):
    """Every attribute torch.nn's constructor sets that is not a tensor container, minus seqfast's `backend`."""
    state = {k: v for k, v in vars(module).items() if not k.startswith("_") and k != "backend"}
    for key in ("_flat_weights_names", "_all_weights"):
        if key in vars(module):
            state[key] = vars(module)[key]
    state["parameters"] = [(n, tuple(p.shape), p.dtype, p.device) for n, p in module.named_parameters()]
    return state


def _build(cls, args, kwargs):
    try:
        return cls(*args, **kwargs), None
    except Exception as e:  # noqa: BLE001 - compared with torch's outcome
        return None, e


def _ways(params):
    """(id, args, kwargs): required args only, all keyword, all positional, half and half."""
    required = [p.name for p in params if p.default is inspect.Parameter.empty]
    values = [NON_DEFAULT[p.name] for p in params]
    names = [p.name for p in params]
    half = len(names) // 2
    return [
        ("defaults", [NON_DEFAULT[n] for n in required], {}),
        ("keyword", [], dict(zip(names, values, strict=True))),
        ("positional", values, {}),
        ("mixed", values[:half], dict(zip(names[half:], values[half:], strict=True))),
    ]


@pytest.mark.filterwarnings("ignore:dropout option adds dropout")
@pytest.mark.parametrize("name", MODULES + CELLS)
def test_constructor_arguments_and_defaults_match_torch(name):
    params = _documented_signature(name)
    for way, args, kwargs in _ways(params):
        ref, ref_error = _build(getattr(torch.nn, name), args, kwargs)
        ours, our_error = _build(getattr(seqfast, name), args, kwargs)
        assert ref_error is None or way not in ("defaults", "keyword"), (way, ref_error)
        if ref_error is not None:
            assert type(our_error) is type(ref_error) and str(our_error) == str(ref_error), (way, our_error, ref_error)
            continue
        assert our_error is None, (way, our_error)
        assert _public_state(ours) == _public_state(ref), way
        assert ours.backend is None


@pytest.mark.parametrize("name", CELLS)
def test_cell_signature_is_torchs_plus_keyword_backend_and_options(name):
    def plain(params):
        return [(p.name, p.kind, p.default) for p in params]

    ours = [p for p in inspect.signature(getattr(seqfast, name).__init__).parameters.values() if p.name != "self"]
    assert plain(ours[:-3]) == plain(_documented_signature(name))
    keyword = inspect.Parameter.KEYWORD_ONLY
    assert plain(ours[-3:]) == [("backend", keyword, None), ("layer_norm", keyword, False), ("zoneout", keyword, 0.0)]


CONFIGS = {
    "rnn_tanh": ("RNN", dict(num_layers=2)),
    "rnn_relu-bi": ("RNN", dict(nonlinearity="relu", bidirectional=True)),
    "lstm-L2-bi": ("LSTM", dict(num_layers=2, bidirectional=True)),
    "lstm-proj-nobias": ("LSTM", dict(proj_size=3, bias=False)),
    "gru-bf": ("GRU", dict(batch_first=True)),
    "RNNCell-relu": ("RNNCell", dict(nonlinearity="relu")),
    "LSTMCell-nobias": ("LSTMCell", dict(bias=False)),
    "GRUCell": ("GRUCell", {}),
}


def _seeded(namespace, name, kwargs, seed=3):
    torch.manual_seed(seed)
    return getattr(namespace, name)(5, 6, **kwargs)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_parameters_initialisation_state_dict_and_repr_match_torch(config):
    name, kwargs = CONFIGS[config]
    ref, ours = _seeded(torch.nn, name, kwargs), _seeded(seqfast, name, kwargs)
    ref_params, our_params = list(ref.named_parameters()), list(ours.named_parameters())
    assert [(n, p.shape) for n, p in our_params] == [(n, p.shape) for n, p in ref_params]
    for (n, p), (_, q) in zip(our_params, ref_params, strict=True):
        assert torch.equal(p, q), f"{n} initialised differently under the same seed"
    assert repr(ours) == repr(ref)
    assert list(ours.state_dict()) == list(ref.state_dict())
    other = _seeded(torch.nn, name, kwargs, seed=4)
    other.load_state_dict(ours.state_dict(), strict=True)
    ours_again = _seeded(seqfast, name, kwargs, seed=5)
    ours_again.load_state_dict(ref.state_dict(), strict=True)
    for (n, p), (_, q), (_, r) in zip(other.named_parameters(), ours_again.named_parameters(), ref_params, strict=True):
        assert torch.equal(p, r) and torch.equal(q, r), n
    assert isinstance(ours, torch.nn.RNNCellBase if name in CELLS else torch.nn.RNNBase)


@pytest.mark.parametrize("config", [c for c in CONFIGS if CONFIGS[c][0] in MODULES])
def test_flat_weights_and_all_weights_match_torch(config):
    name, kwargs = CONFIGS[config]
    ref, ours = _seeded(torch.nn, name, kwargs), _seeded(seqfast, name, kwargs)
    assert ours._flat_weights_names == ref._flat_weights_names
    assert ours._all_weights == ref._all_weights
    assert [[tuple(w.shape) for w in layer] for layer in ours.all_weights] == [
        [tuple(w.shape) for w in layer] for layer in ref.all_weights
    ]
    for layer_ours, layer_ref in zip(ours.all_weights, ref.all_weights, strict=True):
        for a, b in zip(layer_ours, layer_ref, strict=True):
            assert torch.equal(a, b)
    ours.flatten_parameters()
    x = torch.randn(2, 4, 5)
    torch.testing.assert_close(flatten(ours(x)), flatten(ref(x)), rtol=1e-5, atol=1e-6)


def _close(actual, expected, tol, what):
    assert len(actual) == len(expected), f"{what}: {len(actual)} tensors != {len(expected)}"
    assert_all_close(actual, expected, tol, [f"{what}[{i}]" for i in range(len(expected))])


def _sequence_twins(cell="lstm", dtype=F64, backend=None, **kwargs):
    ref, ours = twins(cell, 5, 6, backend, dtype, **kwargs)
    return ref, ours, torch.randn(7, 3, 5, dtype=dtype)


def _outputs_equal(ours, ref, x, tol=1e-10):
    expected, actual = flatten(ref(x)), flatten(ours(x))
    _close(actual, expected, tol, "output")
    return actual


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_in_place_weight_edit_changes_output(cell):
    ref, ours, x = _sequence_twins(cell, num_layers=2)
    before = _outputs_equal(ours, ref, x)
    with torch.no_grad():
        for m in (ref, ours):
            m.weight_hh_l1.mul_(1.5)
            m.bias_ih_l0.add_(0.3)
    after = _outputs_equal(ours, ref, x)
    assert (after[0] - before[0]).abs().max() > 1e-3


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_reassigned_parameter_takes_effect(cell):
    ref, ours, x = _sequence_twins(cell, proj_size=3) if cell == "lstm" else _sequence_twins(cell)
    before = _outputs_equal(ours, ref, x)
    names = ["weight_hh_l0", "weight_hr_l0"] if cell == "lstm" else ["weight_hh_l0", "bias_hh_l0"]
    for n in names:
        new = torch.randn_like(getattr(ref, n))
        setattr(ref, n, torch.nn.Parameter(new.clone()))
        setattr(ours, n, torch.nn.Parameter(new.clone()))
    after = _outputs_equal(ours, ref, x)
    assert (after[0] - before[0]).abs().max() > 1e-3
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_weight_norm_parametrization_matches_torch(cell):
    ref, ours, x = _sequence_twins(cell, num_layers=2, bidirectional=True)
    x.requires_grad_()
    for m in (ref, ours):
        torch.nn.utils.parametrizations.weight_norm(m, "weight_hh_l0")
        torch.nn.utils.parametrizations.weight_norm(m, "weight_ih_l1_reverse")
    ours.load_state_dict(ref.state_dict(), strict=True)
    expected, expected_grads = run_with_grads(ref, lambda m: m(x), [x])
    actual, actual_grads = run_with_grads(ours, lambda m: m(x), [x])
    assert_all_close(actual, expected, 1e-10, ["output", "h_n", "c_n"][: len(expected)])
    assert_all_close(actual_grads, expected_grads, 1e-10, ["d_input"] + [n for n, _ in ref.named_parameters()])
    with torch.no_grad():
        for m in (ref, ours):
            m.parametrizations.weight_hh_l0.original0.mul_(3.0)
    after = _outputs_equal(ours, ref, x.detach())
    assert (after[0] - actual[0]).abs().max() > 1e-3


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_relu"])
def test_functional_call_with_substituted_parameters_matches_torch(cell):
    kwargs = dict(proj_size=3) if cell == "lstm" else dict(num_layers=2)
    ref, ours, x = _sequence_twins(cell, **kwargs)
    subs = {n: torch.randn_like(p, requires_grad=True) for n, p in ref.named_parameters()}
    results = []
    for m in (ref, ours):
        out = flatten(torch.func.functional_call(m, subs, (x,)))
        loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=F64).reshape(o.shape)).sum() for o in out)
        results.append(([o.detach() for o in out], torch.autograd.grad(loss, list(subs.values()))))
    (expected, expected_grads), (actual, actual_grads) = results
    assert_all_close(actual, expected, 1e-10, ["output", "h_n", "c_n"][: len(expected)])
    assert_all_close(list(actual_grads), list(expected_grads), 1e-10, list(subs))
    assert (actual[0] - flatten(ours(x))[0]).abs().max() > 1e-3


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_backward_in_eval_mode_matches_torch(cell):
    ref, ours, x = _sequence_twins(cell, num_layers=2, dropout=0.5)
    ref.eval()
    ours.eval()
    x.requires_grad_()
    expected, expected_grads = run_with_grads(ref, lambda m: m(x), [x])
    actual, actual_grads = run_with_grads(ours, lambda m: m(x), [x])
    assert_all_close(actual, expected, 1e-10, ["output", "h_n", "c_n"][: len(expected)])
    assert_all_close(actual_grads, expected_grads, 1e-10, ["d_input"] + [n for n, _ in ref.named_parameters()])


@pytest.mark.parametrize(
    "config",
    [("gru", {}), ("rnn_tanh", dict(num_layers=2)), ("lstm", dict(proj_size=2, batch_first=True)), ("lstm", {})],
    ids=["gru", "rnn-L2", "lstm-proj-batch_first", "lstm"],
)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_output_changed_in_place_then_backward_matches_torch(backend, config):
    """An in-place op on the output before the backward (a residual added in place, `relu_`), which torch.nn's float64
    modules allow: the gradients are those of the changed output, as torch.nn's."""
    cell, kwargs = config
    ref, ours, x = _sequence_twins(cell, backend=backend, **kwargs)
    x.requires_grad_()

    def call(m):
        output, hidden = m(x)
        output.mul_(2).relu_()
        return output, hidden

    expected, expected_grads = run_with_grads(ref, call, [x])
    actual, actual_grads = run_with_grads(ours, call, [x])
    assert_all_close(actual, expected, 1e-10, ["output", "h_n", "c_n"][: len(expected)])
    assert_all_close(actual_grads, expected_grads, 1e-10, ["d_input"] + [n for n, _ in ref.named_parameters()])


@pytest.fixture
def saved_spy(monkeypatch):
    """Records `(need_saved, saved.numel())` of every kernel forward on every backend, `(True, "layer")` for a
    backend's own autograd node, and `"stack"` for a backend's whole stack without grad (which keeps nothing: its
    one-call forward has no workspace to return)."""
    calls = []
    for name in dispatch.names("cpu"):
        try:
            kernels = dispatch.load(name)
        except RuntimeError:
            continue

        def spy(*args, _fwd=kernels.fwd, **kwargs):
            out = _fwd(*args, **kwargs)
            calls.append((args[-1] if len(args) == 10 else kwargs.get("need_saved"), out[3].numel()))
            return out

        monkeypatch.setattr(kernels, "fwd", spy)
        if hasattr(kernels, "layer"):

            def layer_spy(*args, _layer=kernels.layer, **kwargs):
                calls.append((True, "layer"))  # the backend's own autograd node always keeps its workspace
                return _layer(*args, **kwargs)

            monkeypatch.setattr(kernels, "layer", layer_spy)
        if hasattr(kernels, "stack"):

            def stack_spy(*args, _stack=kernels.stack, **kwargs):
                calls.append("stack")
                return _stack(*args, **kwargs)

            monkeypatch.setattr(kernels, "stack", stack_spy)
    return calls


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_no_grad_keeps_no_workspace_and_no_graph(saved_spy, cell):
    _, ours, x = _sequence_twins(cell, num_layers=2, bidirectional=True)
    out = ours(x)
    assert all(t.grad_fn is not None for t in flatten(out))
    assert len(saved_spy) == 4 and all(need for need, _ in saved_spy), saved_spy
    saved_spy.clear()
    with torch.no_grad():
        out = ours(x)
    assert all(t.grad_fn is None for t in flatten(out))
    assert saved_spy in ([(False, 0)] * 4, ["stack"])
    saved_spy.clear()
    ours.requires_grad_(False)
    out = ours(x)
    assert all(t.grad_fn is None for t in flatten(out))
    assert saved_spy == [(False, 0)] * 4


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_relu"])
def test_recurrence_op_without_need_saved_returns_empty_workspace(cell):
    G = {"lstm": 4, "gru": 3, "rnn_relu": 1}[cell] * 4
    gx, w_hh, h0 = torch.randn(5, 2, G), torch.randn(G, 4), torch.randn(2, 4)
    c0 = torch.randn(2, 4) if cell == "lstm" else None
    for need_saved in (False, True):
        y, hT, cT, saved = torch.ops.seqfast.recurrence(
            "reference", cell, False, need_saved, gx, w_hh, None, h0, c0, None, None, None, None, None, 0.0
        )
        assert (saved.numel() == 0) != need_saved
        assert y.shape == (5, 2, 4) and hT.shape == (2, 4)


def test_subclass_of_rnnbase_not_of_torch_lstm():
    """seqfast's modules subclass RNNBase/RNNCellBase; `isinstance(m, torch.nn.LSTM)` is False (not mirrored)."""
    assert isinstance(seqfast.LSTM(2, 3), torch.nn.RNNBase)
    assert isinstance(seqfast.GRU(2, 3), torch.nn.RNNBase)
    assert isinstance(seqfast.RNN(2, 3), torch.nn.RNNBase)
    assert isinstance(seqfast.LSTMCell(2, 3), torch.nn.RNNCellBase)
    assert not isinstance(seqfast.LSTM(2, 3), torch.nn.LSTM)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_deepcopy_and_whole_module_save_load(cell):
    ref, ours, x = _sequence_twins(cell, proj_size=2) if cell == "lstm" else _sequence_twins(cell)
    ours.backend = "reference"
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    copied = copy.deepcopy(ours)
    for clone in (loaded, copied):
        assert type(clone) is type(ours) and clone.backend == "reference"
        _outputs_equal(clone, ref, x)
        with torch.no_grad():
            clone.weight_hh_l0.zero_()
    _outputs_equal(ours, ref, x)


@pytest.mark.parametrize("name", ["LSTM", "GRU", "LSTMCell"])
def test_dtype_conversions_match_torch(name):
    kwargs = dict(num_layers=2) if name in MODULES else {}
    ref, ours = _seeded(torch.nn, name, kwargs), _seeded(seqfast, name, kwargs)
    x = torch.randn(4, 3, 5) if name in MODULES else torch.randn(3, 5)
    for convert in (lambda m: m.to(F64), lambda m: m.double(), lambda m: m.to(dtype=F64).float()):
        r, o = convert(copy.deepcopy(ref)), convert(copy.deepcopy(ours))
        assert type(o) is type(ours)
        assert [(n, p.dtype) for n, p in o.named_parameters()] == [(n, p.dtype) for n, p in r.named_parameters()]
        xx = x.to(r.weight_ih_l0.dtype if name in MODULES else r.weight_ih.dtype)
        tol = 1e-10 if xx.dtype == F64 else 2e-5
        _close(flatten(o(xx)), flatten(r(xx)), tol, "output")
    # 16-bit modules run on the cpp backend (float32 inside; strict mode: no fall-through), torch.nn in the 16-bit
    # dtype itself: measured <= 7.0e-4 (float16) and <= 6.4e-3 (bfloat16) over four seeds, about one roundoff each
    for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 2e-2)):
        r, o = ref.to(dtype), ours.to(dtype)
        xh = x.to(dtype)
        half = flatten(o(xh))
        assert all(t.dtype == dtype for t in half)
        for a, e in zip(half, flatten(r(xh)), strict=True):
            assert_close(a.float(), e.float(), tol, f"{dtype} output")
    r, o = r.float(), o.float()
    for (n, p), (_, q) in zip(o.named_parameters(), r.named_parameters(), strict=True):
        assert p.dtype == torch.float32 and torch.equal(p, q), n
    _close(flatten(o(x)), flatten(r(x)), 2e-5, "output")


@pytest.mark.parametrize("dtype_id", ["f16", "bf16"])
@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("LSTM", dict(num_layers=2, bidirectional=True)),
        ("LSTM", dict(proj_size=3)),
        ("GRU", dict(num_layers=2)),
        ("RNN", {}),
        ("LSTMCell", {}),
        ("GRUCell", {}),
    ],
    ids=["LSTM-2-bi", "LSTM-proj", "GRU-2", "RNN", "LSTMCell", "GRUCell"],
)
def test_16bit_modules_match_reference_backend(name, kwargs, dtype_id):
    """A float16 or bfloat16 module with grad, padded and packed, on the cpp backend against the reference backend
    (the spec): outputs and the gradients of the input and every parameter, in the module's dtype, within the
    contract's 16-bit bound for cpp (`HALF_TOLS`)."""
    dtype = {"f16": torch.float16, "bf16": torch.bfloat16}[dtype_id]
    torch.manual_seed(0)
    cpp = getattr(seqfast, name)(5, 7, **kwargs).to(dtype)
    ref = copy.deepcopy(cpp)
    cpp.backend, ref.backend = "cpp", "reference"
    cell = name.endswith("Cell")
    x = (torch.randn(4, 5) if cell else torch.randn(6, 4, 5)).to(dtype)
    for packed in (False,) if cell else (False, True):
        results = []
        for module in (cpp, ref):
            xx = x.clone().requires_grad_()
            out = module(pack_padded_sequence(xx, [6, 5, 3, 2]) if packed else xx)
            out = out[0] if isinstance(out, tuple) else out
            out = out.data if packed else out
            grads = torch.autograd.grad(out.float().pow(2).sum(), [xx, *module.parameters()])
            results.append([out, *grads])
        for what, a, e in zip(["output", "input", *(n for n, _ in cpp.named_parameters())], *results, strict=True):
            assert a.dtype == dtype
            assert_close(a.float(), e.float(), HALF_TOLS["cpp", "cpu"][dtype_id], f"{what} (packed={packed})")


@pytest.mark.parametrize("name", ["LSTM", "GRUCell"])
def test_hooks_fire_like_torch(name):
    def shift(mod, args, out):
        return (out[0] + 1, out[1]) if name == "LSTM" else out + 1

    results = []
    for namespace in (torch.nn, seqfast):
        m = _seeded(namespace, name, {})
        log = []
        m.register_forward_pre_hook(lambda mod, args, log=log: log.append("pre") or (args[0] * 2,))
        m.register_forward_hook(lambda mod, args, out, log=log: log.append("fwd"))
        m.register_forward_hook(shift)
        m.register_full_backward_hook(lambda mod, gin, gout, log=log: log.append("bwd"))
        torch.manual_seed(9)
        x = torch.randn((4, 3, 5) if name == "LSTM" else (3, 5), requires_grad=True)
        out = m(x)
        flatten(out)[0].sum().backward()
        results.append((log, [t.detach() for t in flatten(out)], x.grad))
    (ref_log, ref_out, ref_grad), (log, out, grad) = results
    assert log == ref_log == ["pre", "fwd", "bwd"]
    _close(out, ref_out, 2e-5, "output")
    assert_close(grad, ref_grad, 2e-5, "d_input")


@pytest.mark.parametrize("batch_first", [False, True], ids=["time-major", "batch_first"])
@pytest.mark.parametrize("cell", ["lstm", "lstm-proj", "gru", "rnn_tanh"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_step_by_step_equals_one_call(backend, cell, batch_first):
    kwargs = dict(num_layers=2, batch_first=batch_first)
    if cell == "lstm-proj":
        cell, kwargs["proj_size"] = "lstm", 4
    ref, ours = twins(cell, 5, 6, backend, F64, **kwargs)
    T, B = 6, 3
    x = torch.randn(B, T, 5, dtype=F64) if batch_first else torch.randn(T, B, 5, dtype=F64)
    time_dim = 1 if batch_first else 0
    out_full, state_full = ours(x)
    ref_out, ref_state = ref(x)
    state, steps = None, []
    for t in range(T):
        out, state = ours(x.narrow(time_dim, t, 1), state)
        steps.append(out)
    out_steps = torch.cat(steps, dim=time_dim)
    assert_close(out_steps, out_full, 1e-10, "stepwise output")
    _close(flatten(state), flatten(state_full), 1e-10, "stepwise state")
    assert_close(out_full, ref_out, 1e-10, "output vs torch")
    _close(flatten(state_full), flatten(ref_state), 1e-10, "state vs torch")


@pytest.mark.parametrize(("dtype", "tol"), DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("hx", [False, True], ids=["hx-none", "hx"])
@pytest.mark.parametrize("unbatched", [False, True], ids=["batched", "unbatched"])
@pytest.mark.parametrize("cell", ["rnn_tanh", "rnn_relu", "lstm", "gru"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cell_matches_torch(backend, cell, unbatched, hx, bias, dtype, tol):
    name = {"rnn_tanh": "RNNCell", "rnn_relu": "RNNCell", "lstm": "LSTMCell", "gru": "GRUCell"}[cell]
    kwargs = dict(bias=bias, dtype=dtype)
    if name == "RNNCell":
        kwargs["nonlinearity"] = cell[4:]
    ref = getattr(torch.nn, name)(7, 9, **kwargs)
    ours = getattr(seqfast, name)(7, 9, backend=backend, **kwargs)
    ours.load_state_dict(ref.state_dict(), strict=True)
    batch = () if unbatched else (4,)
    x = torch.randn(*batch, 7, dtype=dtype, requires_grad=True)
    states = []
    if hx:
        states = [torch.randn(*batch, 9, dtype=dtype, requires_grad=True) for _ in range(2 if cell == "lstm" else 1)]

    def call(m):
        if not hx:
            return m(x)
        return m(x, tuple(states) if cell == "lstm" else states[0])

    expected, expected_grads = run_with_grads(ref, call, [x, *states])
    actual, actual_grads = run_with_grads(ours, call, [x, *states])
    assert_all_close(actual, expected, tol, ["h", "c"][: len(expected)])
    names = ["d_input"] + [f"d_state{i}" for i in range(len(states))] + [n for n, _ in ref.named_parameters()]
    assert_all_close(actual_grads, expected_grads, tol, names)


@pytest.mark.parametrize("sizes", [(10, 0), (0, 4)], ids=["H0", "I0"])
@pytest.mark.parametrize("hx", [False, True], ids=["hx-none", "hx"])
@pytest.mark.parametrize("name", CELLS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cell_without_hidden_units_or_inputs_matches_torch(backend, name, hx, sizes):
    """hidden_size 0 or input_size 0, which torch.nn's cells accept: `[B, H]` states, and every gradient, as
    torch.nn's (zeros where nothing reaches them)."""
    I, H = sizes
    ref = getattr(torch.nn, name)(I, H)
    ours = getattr(seqfast, name)(I, H, backend=backend)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3, I, requires_grad=True)
    states = [torch.randn(3, H, requires_grad=True) for _ in range(2 if name == "LSTMCell" else 1)] if hx else []

    def call(m):
        return m(x, (tuple(states) if len(states) == 2 else states[0]) if hx else None)

    with torch.no_grad():
        assert [t.shape for t in flatten(call(ours))] == [(3, H)] * (2 if name == "LSTMCell" else 1)
    expected, expected_grads = run_with_grads(ref, call, [x, *states])
    actual, actual_grads = run_with_grads(ours, call, [x, *states])
    tol = 0 if H == 0 else 1e-6  # with units, float32 rounding of the same math in another order
    assert_all_close(actual, expected, tol, ["h", "c"][: len(expected)])
    names = ["d_input"] + [f"d_state{i}" for i in range(len(states))] + [n for n, _ in ref.named_parameters()]
    assert_all_close(actual_grads, expected_grads, tol, names)


def _tiny(name, backend, **kwargs):
    torch.manual_seed(11)
    return getattr(seqfast, name)(2, 3, dtype=F64, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_lstm_proj_two_layers_bidirectional(backend):
    m = _tiny("LSTM", backend, num_layers=2, bidirectional=True, proj_size=2)
    x = torch.randn(3, 2, 2, dtype=F64, requires_grad=True)
    h0 = torch.randn(4, 2, 2, dtype=F64, requires_grad=True)
    c0 = torch.randn(4, 2, 3, dtype=F64, requires_grad=True)
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]

    def fn(x, h0, c0, *ps):
        out, (hn, cn) = torch.func.functional_call(m, dict(zip(names, ps, strict=True)), (x, (h0, c0)))
        return out, hn, cn

    assert torch.autograd.gradcheck(fn, (x, h0, c0, *params))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_gru_packed_mixed_lengths(backend):
    m = _tiny("GRU", backend, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(3, 4, 2, dtype=F64, requires_grad=True)
    h0 = torch.randn(4, 3, 3, dtype=F64, requires_grad=True)
    lengths = torch.tensor([2, 4, 1])
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]

    def fn(x, h0, *ps):
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, hn = torch.func.functional_call(m, dict(zip(names, ps, strict=True)), (packed, h0))
        return out.data, hn

    assert torch.autograd.gradcheck(fn, (x, h0, *params))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_rnn_unbatched_and_cells(backend):
    m = _tiny("RNN", backend, nonlinearity="tanh", batch_first=True)
    x = torch.randn(4, 2, dtype=F64, requires_grad=True)
    h0 = torch.randn(1, 3, dtype=F64, requires_grad=True)
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]

    def rnn(x, h0, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps, strict=True)), (x, h0))

    assert torch.autograd.gradcheck(rnn, (x, h0, *params))
    for name in ("LSTMCell", "GRUCell"):
        cell = _tiny(name, backend)
        xc = torch.randn(2, 2, dtype=F64, requires_grad=True)
        states = [torch.randn(2, 3, dtype=F64, requires_grad=True) for _ in range(2 if name == "LSTMCell" else 1)]

        def step(xc, *s, cell=cell):
            return tuple(flatten(cell(xc, tuple(s) if len(s) == 2 else s[0])))

        assert torch.autograd.gradcheck(step, (xc, *states))


BF16 = torch.bfloat16

# Under CPU autocast torch.nn runs its GEMMs on bfloat16 operands and rounds its gates (and RNN's state) to bfloat16
# at every step; seqfast rounds the same operands but keeps gates and state in float32. Measured against torch.nn
# over this matrix: rel RMS <= 7.6e-3 (outputs and gradients); bfloat16's unit roundoff is 3.9e-3.
CPU_AUTOCAST_TOL = 3e-2

# id: (module, constructor kwargs, input, state dtypes or None for torch.nn's zeros); torch.nn's output dtypes
# depend on the module, the input being packed, a projection, and the state's dtype.
CPU_AUTOCAST_CASES = {
    "RNN": ("RNN", {}, "seq", None),
    "LSTM": ("LSTM", {}, "seq", None),
    "GRU": ("GRU", {}, "seq", None),
    "RNNCell": ("RNNCell", {}, "step", None),
    "LSTMCell": ("LSTMCell", {}, "step", None),
    "GRUCell": ("GRUCell", {}, "step", None),
    "RNN-relu-L2-bi": ("RNN", dict(nonlinearity="relu", num_layers=2, bidirectional=True), "seq", None),
    "GRU-L2-bi-bf16-state": ("GRU", dict(num_layers=2, bidirectional=True), "seq", (BF16,)),
    "LSTM-packed": ("LSTM", {}, "packed", None),
    "LSTM-packed-bf16-c": ("LSTM", {}, "packed", (torch.float32, BF16)),
    "LSTM-proj": ("LSTM", dict(proj_size=5, batch_first=True), "seq", None),
    "LSTMCell-bf16-h": ("LSTMCell", {}, "step", (BF16, torch.float32)),
    "GRUCell-bf16-state": ("GRUCell", {}, "step", (BF16,)),
}


def _run_cpu_autocast(module, case, x, states, grad):
    """`module`'s outputs under CPU autocast (bfloat16), and with `grad` the gradients of `x` and every parameter."""
    name, _, kind, _ = CPU_AUTOCAST_CASES[case]

    def call(m):
        seq = pack_padded_sequence(x, [5, 3, 2]) if kind == "packed" else x
        hx = None if states is None else states[0] if len(states) == 1 else states
        with torch.autocast("cpu", dtype=BF16):
            return m(seq, hx)

    if grad:
        return run_with_grads(module, call, [x])
    with torch.no_grad():
        return flatten(call(module)), []


@pytest.mark.parametrize("mode", ["infer", "fwdbwd"])
@pytest.mark.parametrize("case", list(CPU_AUTOCAST_CASES))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cpu_autocast_as_torch(backend, case, mode):
    """Under `torch.autocast("cpu")` every module returns torch.nn's dtypes (outputs, states, gradients) and its
    values within bfloat16's error, at a shape whose input projection is a small GEMM."""
    name, kwargs, kind, state_dtypes = CPU_AUTOCAST_CASES[case]
    ref = getattr(torch.nn, name)(8, 16, **kwargs)
    ours = getattr(seqfast, name)(8, 16, backend=backend, **kwargs)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 3, 8) if kind != "step" else torch.randn(3, 8)
    x.requires_grad_(mode == "fwdbwd")
    states = None
    if state_dtypes is not None:
        lead = () if kind == "step" else (ref.num_layers * (2 if ref.bidirectional else 1),)
        widths = (getattr(ref, "proj_size", 0) or 16, 16)
        states = tuple(torch.randn(*lead, 3, w, dtype=d) for w, d in zip(widths, state_dtypes, strict=False))
    try:
        out_ref, grads_ref = _run_cpu_autocast(ref, case, x, states, mode == "fwdbwd")
        dtypes_ref = [t.dtype for t in out_ref]
    except RuntimeError as e:
        if "primitive descriptor" not in str(e):
            raise
        # this CPU's oneDNN has no bfloat16 LSTM: torch.nn's dtypes are those of its `mkldnn_rnn_layer`, on CPU
        # autocast's list (everything bfloat16), its values those of its own loop
        with torch.backends.mkldnn.flags(enabled=False):
            out_ref, grads_ref = _run_cpu_autocast(ref, case, x, states, mode == "fwdbwd")
        dtypes_ref = [BF16] * len(out_ref)
    out_ours, grads_ours = _run_cpu_autocast(ours, case, x, states, mode == "fwdbwd")
    assert [t.dtype for t in out_ours] == dtypes_ref
    for i, (a, e) in enumerate(zip(out_ours, out_ref, strict=True)):
        assert_close(a.float(), e.float(), CPU_AUTOCAST_TOL, f"out{i}")
    names = ["x"] + [n for n, _ in ref.named_parameters()] if grads_ref else []
    assert_all_close(grads_ours, grads_ref, CPU_AUTOCAST_TOL, names)


@pytest.mark.parametrize("case", ["LSTM", "GRU-L2-bi-bf16-state", "LSTMCell"])
def test_cpu_autocast_compiles_fullgraph_as_eager(case):
    """Under `torch.compile(fullgraph=True)` a module under CPU autocast (which torch.nn's modules cannot compile)
    gives the eager call's dtypes and values, gradients included."""
    name, kwargs, kind, state_dtypes = CPU_AUTOCAST_CASES[case]
    module = getattr(seqfast, name)(8, 16, **kwargs)
    x = torch.randn(5, 3, 8) if kind != "step" else torch.randn(3, 8)
    x.requires_grad_()
    states = None
    if state_dtypes is not None:
        lead = () if kind == "step" else (module.num_layers * (2 if module.bidirectional else 1),)
        states = tuple(torch.randn(*lead, 3, 16, dtype=d) for d in state_dtypes)
    expected = _run_cpu_autocast(module, case, x, states, True)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    actual = _run_cpu_autocast(compiled, case, x, states, True)
    for a, e in zip(actual[0] + actual[1], expected[0] + expected[1], strict=True):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad", "no-grad"])
def test_packed_input_pads_and_packs_as_torch_does(grad_mode):
    """The eager path pads a `PackedSequence` (`seqfast.nn._padded`: the cpp extension's copy of each step where it is
    built, else one index copy): the same `x`, bitwise, and lengths as `pad_packed_sequence`, and its gather takes `x`
    back into the packed `data`; gradients flow through both copies as through torch's, and through the gather."""
    from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

    from seqfast.nn import _padded

    lengths = torch.tensor([3, 7, 1, 7, 5])
    x = torch.randn(5, 7, 4, requires_grad=True)
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    expected, expected_lengths = pad_packed_sequence(PackedSequence(packed.data, packed.batch_sizes))
    with torch.set_grad_enabled(grad_mode):
        padded, padded_lengths, packed_rows = _padded(packed.data, packed.batch_sizes)
        assert torch.equal(padded, expected) and torch.equal(padded_lengths, expected_lengths)
        assert torch.equal(packed_rows(padded), packed.data)
    if not grad_mode:
        return
    cotangent = torch.randn_like(padded)
    (grad,) = torch.autograd.grad(padded, x, cotangent, retain_graph=True)
    (expected_grad,) = torch.autograd.grad(expected, x, cotangent)
    assert torch.equal(grad, expected_grad)
    y = torch.randn_like(padded, requires_grad=True)
    d_data = torch.randn_like(packed.data)
    (grad,) = torch.autograd.grad(packed_rows(y), y, d_data)
    (expected_grad,) = torch.autograd.grad(pack_padded_sequence(y, padded_lengths).data, y, d_data)
    assert torch.equal(grad, expected_grad)


@pytest.mark.parametrize("name", ["RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell"])
def test_forward_mode_ad_and_func_transforms_match_torch(name):
    """Forward-mode AD (`torch.autograd.forward_ad`, `torch.func.jvp`) and `torch.func.grad`/`jacrev`, after calls
    seqfast remembered: tangents, gradients and Jacobians are torch.nn's (float64, where torch.nn's modules run
    without oneDNN), as the reference's torch ops differentiated by autograd give them."""
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    ref = getattr(torch.nn, name)(3, 4, dtype=F64)
    ours = getattr(seqfast, name)(3, 4, dtype=F64)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn((2, 3) if name.endswith("Cell") else (5, 2, 3), dtype=F64)
    tangent = torch.randn_like(x)
    for _ in range(2):
        ours(x)
        with torch.no_grad():
            ours(x)

    def first(m):
        return lambda v: flatten(m(v))[0]

    def dual_tangent(m):
        with fwAD.dual_level():
            return fwAD.unpack_dual(first(m)(fwAD.make_dual(x, tangent))).tangent

    def param_grads(m):
        params = dict(m.named_parameters())
        return torch.func.grad(lambda p: torch.func.functional_call(m, p, (x,))[0].sin().sum())(params)

    transforms = {
        "func.jvp": lambda m: torch.func.jvp(first(m), (x,), (tangent,))[1],
        "forward_ad": dual_tangent,
        "func.jacrev": lambda m: torch.func.jacrev(first(m))(x),
        "func.grad": lambda m: list(param_grads(m).values()),
    }
    for what, transform in transforms.items():
        expected = flatten(transform(ref))
        assert_all_close(flatten(transform(ours)), expected, 1e-10, [what] * len(expected))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNNCell", "LSTMCell"])
def test_jit_script_compiles_the_torch_twin_on_the_same_parameters(name):
    """`torch.jit.script` of a cell, or of a model holding a module, compiles its torch.nn twin on the same parameters:
    torch.nn's outputs, and its gradients reach the seqfast module's parameters; options beyond torch.nn's raise."""

    class Head(torch.nn.Module):
        def __init__(self, rnn):
            super().__init__()
            self.rnn = rnn

        def forward(self, x):
            return self.rnn(x)[0].sum()

    ref = getattr(torch.nn, name)(3, 4)
    ours = getattr(seqfast, name)(3, 4)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn((2, 3) if name.endswith("Cell") else (5, 2, 3))
    if name.endswith("Cell"):  # torch.nn's sequence modules script only inside a model (their forward is overloaded)
        _close(flatten(torch.jit.script(ours)(x)), flatten(ref(x)), 1e-6, "scripted cell")
    scripted = torch.jit.script(Head(ours))
    scripted(x).backward()
    Head(ref)(x).backward()
    for (n, p), r in zip(ours.named_parameters(), ref.parameters(), strict=True):
        _close([p.grad], [r.grad], 1e-6, n)
    with pytest.raises(RuntimeError, match="torch.jit.script cannot compile"):
        torch.jit.script(getattr(seqfast, name)(3, 4, zoneout=0.1))


def test_lstm_cell_takes_a_wider_cell_state_as_torch():
    """torch.nn's `LSTMCell` takes `c` in another dtype than its weights (float64 here) and returns `(h', c')` in the
    promoted one; seqfast's gives its outputs and gradients."""
    ref = torch.nn.LSTMCell(3, 4)
    ours = seqfast.LSTMCell(3, 4)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, requires_grad=True)
    h, c = torch.randn(2, 4), torch.randn(2, 4, dtype=F64, requires_grad=True)
    expected, expected_grads = run_with_grads(ref, lambda m: m(x, (h, c)), [x, c])
    actual, actual_grads = run_with_grads(ours, lambda m: m(x, (h, c)), [x, c])
    assert [t.dtype for t in actual] == [F64, F64]
    assert_all_close(actual, expected, 0, ["h'", "c'"])
    assert_all_close(actual_grads, expected_grads, 0, ["d_input", "d_c"] + [n for n, _ in ref.named_parameters()])
