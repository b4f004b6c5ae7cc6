"""Error parity with torch.nn: bad arguments and inputs raise the same exception type with the same first line.

Every expectation comes from running torch.nn live on the same arguments; no torch text is written down here.
Forward errors also leave nothing half-written: parameters, their `.grad` and a passed-in state stay as they were.
"""

from dataclasses import dataclass

import pytest
import torch
from conftest import CPU_BACKENDS
from helpers import flatten, twins
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import seqfast
from seqfast import dispatch

TYPE_ONLY = {
    "lstm-hx-f64": "torch's message comes from its oneDNN path",
    "lstm-cx-f64": "torch's message comes from its oneDNN path",
    "lstm-hx-f16": "torch's message comes from its oneDNN path",
    "lstm-hx-int": "torch's message comes from its oneDNN path",
    "lstm-nobias-hx-f64": "torch's message comes from its oneDNN path",
    "lstm-nobias-cx-f64": "torch's message comes from its oneDNN path",
    "lstm-nobias-hx-f16": "torch's message comes from its oneDNN path",
    "lstm-nobias-hx-int": "torch's message comes from its oneDNN path",
    "lstm-packed-sorted-h-batch": "torch.nn.LSTM skips its hx check for packed input; C++ broadcasting raises",
    "lstm-packed-sorted-c-batch": "torch.nn.LSTM skips its hx check for packed input; C++ broadcasting raises",
    "lstm-packed-sorted-h-hidden": "torch.nn.LSTM skips its hx check for packed input; a C++ weight check raises",
    "lstm-packed-unsorted-c-hidden": "torch.nn.LSTM skips its hx check for packed input; a C++ weight check raises",
    "RNNCell-x-meta": "torch's cell message comes from meta-tensor device propagation",
    "RNNCell-hx-meta": "torch's cell message comes from meta-tensor device propagation",
    "LSTMCell-x-meta": "torch's cell message comes from meta-tensor device propagation",
    "LSTMCell-hx-meta": "torch's cell message comes from meta-tensor device propagation",
    "GRUCell-x-meta": "torch's cell message comes from meta-tensor device propagation",
    "GRUCell-hx-meta": "torch's cell message comes from meta-tensor device propagation",
}

PACKED_LSTM_UNCHECKED = {
    "h-layers": "torch.nn.LSTM segfaults",
    "c-layers": "torch.nn.LSTM accepts it and reads only the first layers",
    "input-size": "torch.nn.LSTM raises from its input GEMM",
    "x-f64": "torch.nn.LSTM raises a RuntimeError from its input GEMM; seqfast raises that type, with the message of "
    "check_forward_args' ValueError",
}

B, T, IN = 3, 4, 5
F64, F16, I64 = torch.float64, torch.float16, torch.int64


def _raised(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - any exception is what gets compared
        return e
    return None


def _first_line(error):
    text = str(error)
    return text.splitlines()[0] if text else ""


def _describe(error):
    return f"{type(error).__name__}: {_first_line(error)}"


def assert_same_error(expected, actual, case_id):
    assert expected is not None, f"{case_id}: torch.nn raised nothing, so this is not an error case"
    assert actual is not None, f"{case_id}: seqfast raised nothing; torch.nn raised {_describe(expected)}"
    what = f"{case_id}: seqfast raised {_describe(actual)}; torch.nn raised {_describe(expected)}"
    assert type(actual) is type(expected), what
    if case_id not in TYPE_ONLY:
        assert _first_line(actual) == _first_line(expected), what


@dataclass
class Geo:
    """State geometry of a module: `L` layer-directions, state width `P`, hidden size `H`."""

    L: int
    P: int
    H: int
    lstm: bool
    batch_first: bool

    @classmethod
    def of(cls, m):
        directions = 2 if m.bidirectional else 1
        return cls(
            m.num_layers * directions, m.proj_size or m.hidden_size, m.hidden_size, m.mode == "LSTM", m.batch_first
        )

    def x(self, batch=B, steps=T, size=IN, dtype=torch.float32):
        shape = (batch, steps, size) if self.batch_first else (steps, batch, size)
        return torch.randn(shape).to(dtype)

    def xu(self, steps=T, size=IN):
        return torch.randn(steps, size)

    def packed(self, lengths, sorted_, size=IN, dtype=torch.float32):
        x = torch.randn(max(lengths), len(lengths), size).to(dtype)
        return pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=sorted_)

    def hx(self, *batch, L=None, P=None, H=None, h_dtype=torch.float32, c_dtype=torch.float32, c_batch=None):
        h = torch.randn(L or self.L, *batch, P or self.P).to(h_dtype)
        if not self.lstm:
            return h
        c_batch = batch if c_batch is None else c_batch
        return h, torch.randn(L or self.L, *c_batch, H or self.H).to(c_dtype)

    def h(self, *shape):
        return torch.randn(shape)


SORTED, UNSORTED = [4, 2, 1], [2, 4, 1]

COMMON = {
    "x-0d": lambda g: (torch.tensor(1.0), None),
    "x-1d": lambda g: (torch.randn(IN), None),
    "x-4d": lambda g: (torch.randn(T, B, IN, 1), None),
    "input-size": lambda g: (g.x(size=IN + 2), None),
    "input-size-unbatched": lambda g: (g.xu(size=IN - 1), None),
    "T0": lambda g: (g.x(steps=0), None),
    "T0-unbatched": lambda g: (g.xu(steps=0), None),
    "T0-hx": lambda g: (g.x(steps=0), g.hx(B)),
    "x-f64": lambda g: (g.x(dtype=F64), None),
    "x-f16": lambda g: (g.x(dtype=F16), None),
    "x-int": lambda g: (g.x(dtype=I64), None),
    "x-meta": lambda g: (g.x().to("meta"), None),
    "h-layers": lambda g: (g.x(), g.hx(B, L=g.L + 1)),
    "h-batch": lambda g: (g.x(), g.hx(B - 1)),
    "h-hidden": lambda g: (g.x(), g.hx(B, P=g.P + 1)),
    "u-h-layers": lambda g: (g.xu(), g.hx(L=g.L + 1)),
    "u-h-hidden": lambda g: (g.xu(), g.hx(P=g.P - 1)),
}

PACKED_INPUT = {
    "packed-input-size": lambda g: (g.packed(SORTED, True, size=IN + 1), None),
    "packed-x-f64": lambda g: (g.packed(UNSORTED, False, dtype=F64), None),
}

SINGLE_STATE = {
    "hx-2d": lambda g: (g.x(), g.hx()),
    "hx-4d": lambda g: (g.x(), g.hx(B, 1)),
    "u-hx-3d": lambda g: (g.xu(), g.hx(1)),
    "u-hx-1d": lambda g: (g.xu(), g.h(g.P)),
    "hx-tuple": lambda g: (g.x(), (g.hx(B),)),
    "hx-list": lambda g: (g.x(), [g.hx(B)]),
    "hx-meta": lambda g: (g.x(), g.hx(B).to("meta")),
    "packed-sorted-h-batch": lambda g: (g.packed(SORTED, True), g.hx(B - 1)),
    "packed-unsorted-h-batch": lambda g: (g.packed(UNSORTED, False), g.hx(B - 1)),
    "packed-h-layers": lambda g: (g.packed(SORTED, True), g.hx(B, L=g.L + 1)),
    "packed-h-hidden": lambda g: (g.packed(UNSORTED, False), g.hx(B, P=g.P + 1)),
    "packed-hx-2d": lambda g: (g.packed(SORTED, True), g.hx()),
}

LSTM_STATE = {
    "c-layers": lambda g: (g.x(), (g.h(g.L, B, g.P), g.h(g.L + 1, B, g.H))),
    "c-batch": lambda g: (g.x(), g.hx(B, c_batch=(B + 1,))),
    "c-hidden": lambda g: (g.x(), g.hx(B, H=g.H + 1)),
    "u-c-layers": lambda g: (g.xu(), (g.h(g.L, g.P), g.h(g.L + 2, g.H))),
    "hx-2d-2d": lambda g: (g.x(), g.hx()),
    "hx-3d-2d": lambda g: (g.x(), (g.h(g.L, B, g.P), g.h(g.L, g.H))),
    "hx-2d-3d": lambda g: (g.x(), (g.h(g.L, g.P), g.h(g.L, B, g.H))),
    "hx-4d": lambda g: (g.x(), g.hx(B, 1)),
    "u-hx-3d-3d": lambda g: (g.xu(), g.hx(1)),
    "u-hx-2d-3d": lambda g: (g.xu(), (g.h(g.L, g.P), g.h(g.L, 1, g.H))),
    "u-hx-3d-2d": lambda g: (g.xu(), (g.h(g.L, 1, g.P), g.h(g.L, g.H))),
    "hx-tensor": lambda g: (g.x(), g.h(g.L, B, g.P)),
    "hx-1tuple": lambda g: (g.x(), (g.h(g.L, B, g.P),)),
    "hx-3tuple": lambda g: (g.x(), (*g.hx(B), g.h(g.L, B, g.H))),
    "hx-meta": lambda g: (g.x(), tuple(t.to("meta") for t in g.hx(B))),
    "packed-sorted-hx-3tuple": lambda g: (g.packed(SORTED, True), (*g.hx(B), g.h(g.L, B, g.H))),
}

PROJ_STATE = {
    "h-is-H": lambda g: (g.x(), g.hx(B, P=g.H)),
    "c-is-P": lambda g: (g.x(), g.hx(B, H=g.P)),
}

STATE_DTYPE = {
    "hx-f64": lambda g: (g.x(), g.hx(B, h_dtype=F64)),
    "hx-f16": lambda g: (g.x(), g.hx(B, h_dtype=F16)),
    "hx-int": lambda g: (g.x(), g.hx(B, h_dtype=I64)),
    "packed-hx-f64": lambda g: (g.packed(UNSORTED, False), g.hx(B, h_dtype=F64)),
}

LSTM_STATE_DTYPE = {
    "cx-f64": lambda g: (g.x(), g.hx(B, c_dtype=F64)),
}

PACKED_LSTM = {
    "packed-sorted-h-batch": lambda g: (g.packed(SORTED, True), g.hx(B - 1, c_batch=(B,))),
    "packed-sorted-c-batch": lambda g: (g.packed(SORTED, True), g.hx(B, c_batch=(B - 1,))),
    "packed-unsorted-h-batch": lambda g: (g.packed(UNSORTED, False), g.hx(B - 1, c_batch=(B,))),
    "packed-unsorted-c-batch": lambda g: (g.packed(UNSORTED, False), g.hx(B, c_batch=(B - 1,))),
    "packed-sorted-h-hidden": lambda g: (g.packed(SORTED, True), g.hx(B, P=g.P + 1)),
    "packed-unsorted-c-hidden": lambda g: (g.packed(UNSORTED, False), g.hx(B, H=g.H + 1)),
}

# (tag, cell, module kwargs, case tables)
CONFIGS = [
    ("rnn_tanh", "rnn_tanh", {}, [COMMON, PACKED_INPUT, SINGLE_STATE, STATE_DTYPE]),
    ("rnn_relu-bf", "rnn_relu", dict(batch_first=True), [COMMON, PACKED_INPUT, SINGLE_STATE]),
    ("rnn_tanh-nobias", "rnn_tanh", dict(bias=False), [STATE_DTYPE]),
    ("gru", "gru", {}, [COMMON, PACKED_INPUT, SINGLE_STATE, STATE_DTYPE]),
    (
        "gru-L2-bi-bf",
        "gru",
        dict(num_layers=2, bidirectional=True, batch_first=True),
        [COMMON, PACKED_INPUT, SINGLE_STATE],
    ),
    ("gru-nobias", "gru", dict(bias=False), [STATE_DTYPE]),
    ("lstm", "lstm", {}, [COMMON, LSTM_STATE, STATE_DTYPE, LSTM_STATE_DTYPE, PACKED_LSTM]),
    ("lstm-nobias", "lstm", dict(bias=False), [STATE_DTYPE, LSTM_STATE_DTYPE]),
    ("lstm-proj", "lstm", dict(proj_size=3), [COMMON, LSTM_STATE, PROJ_STATE, STATE_DTYPE, LSTM_STATE_DTYPE]),
    ("lstm-proj-nobias", "lstm", dict(proj_size=3, bias=False), [STATE_DTYPE, LSTM_STATE_DTYPE]),
    (
        "lstm-proj-L2-bi-bf",
        "lstm",
        dict(proj_size=3, num_layers=2, bidirectional=True, batch_first=True),
        [COMMON, LSTM_STATE, PROJ_STATE],
    ),
]

FORWARD_CASES = [
    pytest.param(cell, module, build, id=f"{tag}-{name}")
    for tag, cell, module, tables in CONFIGS
    for table in tables
    for name, build in table.items()
]


def _twins_and_inputs(cell, module, build):
    ref, ours = twins(cell, IN, 6, **module)
    torch.manual_seed(1)
    x, hx = build(Geo.of(ref))
    return ref, ours, x, hx


@pytest.mark.parametrize(("cell", "module", "build"), FORWARD_CASES)
def test_forward_error_matches_torch(request, cell, module, build):
    ref, ours, x, hx = _twins_and_inputs(cell, module, build)
    expected = _raised(lambda: ref(x, hx))
    actual = _raised(lambda: ours(x, hx))
    assert_same_error(expected, actual, request.node.callspec.id)


@pytest.mark.parametrize(("cell", "module", "build"), FORWARD_CASES)
def test_forward_error_matches_torch_after_remembered_calls(request, cell, module, build):
    """Valid calls first, batched and unbatched, with and without `hx`, with and without grad, twice each (the second
    runs as the first did, see `seqfast.functional.remembered`): the bad call after them still raises torch.nn's
    error."""
    ref, ours, x, hx = _twins_and_inputs(cell, module, build)
    geo = Geo.of(ref)
    for good_x, good_hx in [(geo.x(), geo.hx(B)), (geo.xu(), geo.hx()), (geo.x(), None)]:
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                ours(good_x, good_hx)
                ours(good_x, good_hx)
    expected = _raised(lambda: ref(x, hx))
    actual = _raised(lambda: ours(x, hx))
    assert_same_error(expected, actual, request.node.callspec.id)


@pytest.mark.parametrize("name", list(PACKED_LSTM_UNCHECKED))
@pytest.mark.parametrize("sorted_", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize(
    "module", [{}, dict(proj_size=3, num_layers=2, bidirectional=True)], ids=["plain", "proj-L2-bi"]
)
def test_packed_lstm_checked_as_torch_checks_rnn_and_gru(name, sorted_, module):
    """torch.nn.LSTM runs no `check_forward_args` on packed input (see PACKED_LSTM_UNCHECKED); seqfast does, as
    torch.nn.RNN and GRU do: the expectation is torch's own check on the permuted state, run live."""
    ref, ours = twins("lstm", IN, 6, **module)
    g = Geo.of(ref)
    lengths = SORTED if sorted_ else UNSORTED
    size, dtype = (IN + 1, torch.float32) if name == "input-size" else (IN, F64 if name == "x-f64" else torch.float32)
    x = g.packed(lengths, sorted_, size=size, dtype=dtype)
    hx = {
        "h-layers": (g.h(g.L + 1, B, g.P), g.h(g.L, B, g.H)),
        "c-layers": (g.h(g.L, B, g.P), g.h(g.L + 1, B, g.H)),
    }.get(name)
    state = g.hx(B) if hx is None else ref.permute_hidden(hx, x.sorted_indices)
    expected = _raised(lambda: ref.check_forward_args(x.data, state, x.batch_sizes))
    if name == "x-f64":
        expected = type(_raised(lambda: ref(x, hx)))(str(expected))
    actual = _raised(lambda: ours(x, hx))
    assert_same_error(expected, actual, f"packed-lstm-{name}")


PACKED_LSTM_STATE = {
    "hx-2d": lambda g: (g.h(g.L, g.P), g.h(g.L, g.H)),
    "h-2d": lambda g: (g.h(g.L, g.P), g.h(g.L, B, g.H)),
    "hx-1tuple": lambda g: (g.h(g.L, B, g.P),),
    "hx-tensor": lambda g: g.h(g.L, B, g.P),
    "hx-3tuple": lambda g: (g.h(g.L, B, g.P),) * 3,
}


@pytest.mark.parametrize("name", list(PACKED_LSTM_STATE))
@pytest.mark.parametrize("sorted_", [True, False], ids=["sorted", "unsorted"])
def test_packed_lstm_state_structure_error_types(name, sorted_):
    """A packed LSTM's `hx` of the wrong structure: torch.nn's C++ loop raises (a TypeError, IndexError or
    RuntimeError, depending also on whether the batch was sorted); seqfast raises the same type with its own message."""
    ref, ours = twins("lstm", IN, 6)
    g = Geo.of(ref)
    x = g.packed(SORTED if sorted_ else UNSORTED, sorted_)
    hx = PACKED_LSTM_STATE[name](g)
    expected, actual = _raised(lambda: ref(x, hx)), _raised(lambda: ours(x, hx))
    if expected is None:
        assert actual is None, f"packed-lstm-{name}: seqfast raised {_describe(actual)}; torch.nn accepted it"
        return
    assert actual is not None and type(actual) is type(expected), (
        f"packed-lstm-{name}: seqfast raised {_describe(actual) if actual else 'nothing'}; torch.nn raised "
        f"{_describe(expected)}"
    )


# Unusual arguments torch.nn accepts: seqfast accepts them too and gives torch's outputs.
ACCEPTED = {
    "lstm-hx-list": ("lstm", {}, lambda g: (g.x(), list(g.hx(B)))),
    "lstm-u-hx-3tuple": ("lstm", {}, lambda g: (g.xu(), (*g.hx(), g.h(g.L, g.H)))),
    "lstm-packed-unsorted-hx-3tuple": ("lstm", {}, lambda g: (g.packed(UNSORTED, False), (*g.hx(B), g.h(1)))),
    "gru-packed-unsorted-h-wider-batch": ("gru", {}, lambda g: (g.packed(UNSORTED, False), g.hx(B + 1))),
    "rnn_tanh-B0": ("rnn_tanh", {}, lambda g: (g.x(batch=0), g.hx(0))),
}


@pytest.mark.parametrize("case_id", list(ACCEPTED))
def test_accepted_like_torch(case_id):
    cell, module, build = ACCEPTED[case_id]
    ref, ours, x, hx = _twins_and_inputs(cell, module, build)
    expected = flatten(ref(x, hx))
    actual = flatten(ours(x, hx))
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


# (class name, positional args, keyword args)
CONSTRUCTOR_CASES = {
    "RNN-nonlinearity-kw": ("RNN", (5, 6), dict(nonlinearity="sigmoid")),
    "RNN-nonlinearity-pos": ("RNN", (5, 6, 1, "sigmoid"), {}),
    "RNN-nonlinearity-None": ("RNN", (5, 6), dict(nonlinearity=None)),
    "RNN-nonlinearity-twice": ("RNN", (5, 6, 1, "tanh"), dict(nonlinearity="tanh")),
    "RNN-too-many-positional": ("RNN", (5, 6, 1, "relu", True, False, 0.0, False, None, None, 3), {}),
    "LSTM-too-many-positional": ("LSTM", (5, 6, 1, True, False, 0.0, False, 3, None, None, 7), {}),
    "GRU-proj-positional": ("GRU", (5, 6, 1, True, False, 0.0, False, None, None), {}),
    "LSTM-missing-hidden": ("LSTM", (5,), {}),
    "GRU-missing-both": ("GRU", (), {}),
    "LSTM-unknown-kw": ("LSTM", (5, 6), dict(foo=1)),
    "GRU-unknown-kw": ("GRU", (5, 6), dict(foo=1)),
    "RNN-unknown-kw": ("RNN", (5, 6), dict(foo=1)),
    "LSTM-hidden-twice": ("LSTM", (5, 6), dict(hidden_size=6)),
    "RNN-input-twice": ("RNN", (5, 6), dict(input_size=6)),
    "GRU-bias-twice": ("GRU", (5, 6, 1, True), dict(bias=True)),
    "LSTM-dropout-negative": ("LSTM", (5, 6), dict(dropout=-0.1)),
    "GRU-dropout-above-1": ("GRU", (5, 6), dict(dropout=1.5)),
    "RNN-dropout-bool": ("RNN", (5, 6), dict(dropout=True)),
    "LSTM-dropout-str": ("LSTM", (5, 6), dict(dropout="0.1")),
    "LSTM-proj-equal-hidden": ("LSTM", (5, 6), dict(proj_size=6)),
    "LSTM-proj-above-hidden": ("LSTM", (5, 6), dict(proj_size=7)),
    "LSTM-proj-negative": ("LSTM", (5, 6), dict(proj_size=-1)),
    "LSTM-proj-float": ("LSTM", (5, 6), dict(proj_size=2.0)),
    "GRU-proj": ("GRU", (5, 6), dict(proj_size=2)),
    "RNN-proj": ("RNN", (5, 6), dict(proj_size=2)),
    "GRU-proj-zero": ("GRU", (5, 6), dict(proj_size=0)),
    "RNN-proj-zero": ("RNN", (5, 6), dict(proj_size=0)),
    "LSTM-hidden-zero": ("LSTM", (5, 0), {}),
    "RNN-hidden-negative": ("RNN", (5, -1), {}),
    "GRU-input-zero": ("GRU", (0, 6), {}),
    "LSTM-input-negative": ("LSTM", (-2, 6), {}),
    "RNN-layers-zero": ("RNN", (5, 6), dict(num_layers=0)),
    "GRU-layers-negative": ("GRU", (5, 6), dict(num_layers=-1)),
    "LSTM-bias-str": ("LSTM", (5, 6), dict(bias="yes")),
    "GRU-bias-int": ("GRU", (5, 6), dict(bias=1)),
    "RNN-batch_first-str": ("RNN", (5, 6), dict(batch_first="yes")),
    "LSTM-batch_first-int": ("LSTM", (5, 6), dict(batch_first=1)),
    "LSTM-hidden-float": ("LSTM", (5, 6.0), {}),
    "GRU-input-float": ("GRU", (5.0, 6), {}),
    "RNN-input-str": ("RNN", ("5", 6), {}),
    "LSTM-layers-float": ("LSTM", (5, 6), dict(num_layers=2.0)),
    "RNN-dtype-int": ("RNN", (5, 6), dict(dtype=torch.int64)),
    "RNNCell-missing-hidden": ("RNNCell", (5,), {}),
    "LSTMCell-hidden-negative": ("LSTMCell", (5, -1), {}),
    "GRUCell-hidden-float": ("GRUCell", (5, 6.0), {}),
    "GRUCell-unknown-kw": ("GRUCell", (5, 6), dict(foo=1)),
    "LSTMCell-num_chunks": ("LSTMCell", (5, 6), dict(num_chunks=4)),
    "LSTMCell-too-many-positional": ("LSTMCell", (5, 6, True, None, None, 3), {}),
    "RNNCell-too-many-positional": ("RNNCell", (5, 6, True, "relu", None, None, 3), {}),
    "GRUCell-dtype-int": ("GRUCell", (5, 6), dict(dtype=torch.int64)),
}


@pytest.mark.parametrize("case_id", list(CONSTRUCTOR_CASES))
def test_constructor_error_matches_torch(case_id):
    name, args, kwargs = CONSTRUCTOR_CASES[case_id]
    expected = _raised(lambda: getattr(torch.nn, name)(*args, **kwargs))
    actual = _raised(lambda: getattr(seqfast, name)(*args, **kwargs))
    assert_same_error(expected, actual, case_id)


# Arguments torch.nn's constructors accept without complaint; seqfast builds the same module from them.
CONSTRUCTOR_ACCEPTED = {
    "RNN-all-positional": ("RNN", (5, 6, 2, "relu", False, True, 0.25, True), {}),
    "LSTM-all-positional": ("LSTM", (5, 6, 2, False, True, 0.25, True, 3, None, torch.float64), {}),
    "GRU-all-positional": ("GRU", (5, 6, 2, False, True, 0.25, True, 0, None, torch.float64), {}),
    "LSTM-bidirectional-int": ("LSTM", (5, 6), dict(bidirectional=1)),
    "RNN-layers-bool": ("RNN", (5, 6), dict(num_layers=True)),
    "GRU-input-bool": ("GRU", (True, 6), {}),
    "LSTM-dropout-one-layer": ("LSTM", (5, 6), dict(dropout=0.5)),
    "LSTM-dropout-int": ("LSTM", (5, 6, 2), dict(dropout=1)),
    "RNNCell-nonlinearity-unknown": ("RNNCell", (5, 6), dict(nonlinearity="sigmoid")),
    "RNNCell-hidden-zero": ("RNNCell", (5, 0), {}),
    "GRUCell-input-zero": ("GRUCell", (0, 6), {}),
    "LSTMCell-bias-str": ("LSTMCell", (5, 6), dict(bias="x")),
    "RNNCell-all-positional": ("RNNCell", (5, 6, False, "relu", None, torch.float64), {}),
}


@pytest.mark.filterwarnings("ignore:dropout option adds dropout")
@pytest.mark.parametrize("case_id", list(CONSTRUCTOR_ACCEPTED))
def test_constructor_accepts_what_torch_accepts(case_id):
    name, args, kwargs = CONSTRUCTOR_ACCEPTED[case_id]
    ref = getattr(torch.nn, name)(*args, **kwargs)
    ours = getattr(seqfast, name)(*args, **kwargs)
    state = {k: v for k, v in vars(ours).items() if k != "backend"}
    assert {k: v for k, v in state.items() if not k.startswith("_")} == {
        k: v for k, v in vars(ref).items() if not k.startswith("_")
    }
    assert [(n, p.shape, p.dtype) for n, p in ours.named_parameters()] == [
        (n, p.shape, p.dtype) for n, p in ref.named_parameters()
    ]


@dataclass
class CellGeo:
    H: int
    lstm: bool

    def s(self, *shape, dtype=torch.float32, c_shape=None, c_dtype=torch.float32):
        h = torch.randn(shape).to(dtype)
        return (h, torch.randn(c_shape or shape).to(c_dtype)) if self.lstm else h


CELL_COMMON = {
    "x-0d": lambda g: (torch.tensor(1.0), None),
    "x-3d": lambda g: (torch.randn(2, B, IN), None),
    "input-size": lambda g: (torch.randn(B, IN - 1), None),
    "input-size-unbatched": lambda g: (torch.randn(IN + 1), None),
    "input-size-hx": lambda g: (torch.randn(B, IN + 1), g.s(B, g.H)),
    "x-f64": lambda g: (torch.randn(B, IN, dtype=F64), None),
    "x-f16": lambda g: (torch.randn(B, IN).half(), g.s(B, g.H, dtype=F16)),
    "x-int": lambda g: (torch.ones(B, IN, dtype=I64), None),
    "hx-3d": lambda g: (torch.randn(B, IN), g.s(1, B, g.H)),
    "hx-0d": lambda g: (torch.randn(B, IN), g.s()),
    "batch": lambda g: (torch.randn(B, IN), g.s(B - 1, g.H)),
    "B0-batch": lambda g: (torch.randn(0, IN), g.s(1, g.H)),
    "hidden": lambda g: (torch.randn(B, IN), g.s(B, g.H + 1)),
    "u-hidden": lambda g: (torch.randn(IN), g.s(g.H - 1)),
    "u-hx-2d": lambda g: (torch.randn(IN), g.s(1, g.H)),
    "hx-1d": lambda g: (torch.randn(B, IN), g.s(g.H)),
    "hx-f64": lambda g: (torch.randn(B, IN), g.s(B, g.H, dtype=F64)),
    "hx-int": lambda g: (torch.randn(B, IN), g.s(B, g.H, dtype=I64)),
}

CELL_DEVICE = {
    "x-meta": lambda g: (torch.randn(B, IN, device="meta"), None),
    "hx-meta": lambda g: (torch.randn(B, IN), _meta_state(g)),
}


def _meta_state(g):
    h = torch.randn(B, g.H, device="meta")
    return (h, torch.randn(B, g.H)) if g.lstm else h


LSTM_CELL = {
    "c-3d": lambda g: (torch.randn(B, IN), (torch.randn(B, g.H), torch.randn(1, B, g.H))),
    "c-batch": lambda g: (torch.randn(B, IN), g.s(B, g.H, c_shape=(B + 1, g.H))),
    "c-hidden": lambda g: (torch.randn(B, IN), g.s(B, g.H, c_shape=(B, g.H + 1))),
    "hx-tensor": lambda g: (torch.randn(B, IN), torch.randn(B, g.H)),
    "hx-1tuple": lambda g: (torch.randn(B, IN), (torch.randn(B, g.H),)),
    "hx-3tuple": lambda g: (torch.randn(B, IN), (*g.s(B, g.H), torch.randn(B, g.H))),
    "hx-3tuple-bad-input": lambda g: (torch.randn(B, IN + 1), (*g.s(B, g.H), torch.randn(B, g.H))),
    "u-c-2d": lambda g: (torch.randn(IN), (torch.randn(g.H), torch.randn(1, g.H))),
}

SINGLE_CELL = {
    "hx-tuple": lambda g: (torch.randn(B, IN), (torch.randn(B, g.H),)),
}

CELL_DTYPE = {
    "x-f64": CELL_COMMON["x-f64"],
    "x-int": CELL_COMMON["x-int"],
    "hx-f64": CELL_COMMON["hx-f64"],
    "hx-f16": lambda g: (torch.randn(B, IN), g.s(B, g.H, dtype=F16)),
}

# (tag, class name, constructor kwargs, case tables)
CELL_CONFIGS = [
    ("RNNCell", "RNNCell", {}, [CELL_COMMON, CELL_DEVICE, SINGLE_CELL]),
    ("RNNCell-relu-nobias", "RNNCell", dict(nonlinearity="relu", bias=False), [CELL_COMMON, SINGLE_CELL]),
    ("LSTMCell", "LSTMCell", {}, [CELL_COMMON, CELL_DEVICE, LSTM_CELL]),
    ("LSTMCell-nobias", "LSTMCell", dict(bias=False), [CELL_DTYPE, LSTM_CELL]),
    ("GRUCell", "GRUCell", {}, [CELL_COMMON, CELL_DEVICE, SINGLE_CELL]),
    ("GRUCell-nobias", "GRUCell", dict(bias=False), [CELL_DTYPE]),
]

CELL_CASES = [
    pytest.param(name, kwargs, build, id=f"{tag}-{case}")
    for tag, name, kwargs, tables in CELL_CONFIGS
    for table in tables
    for case, build in table.items()
]


def _cell_twins(name, kwargs, H=6):
    ref = getattr(torch.nn, name)(IN, H, **kwargs)
    ours = getattr(seqfast, name)(IN, H, **kwargs)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize(("name", "kwargs", "build"), CELL_CASES)
def test_cell_error_matches_torch(request, name, kwargs, build):
    ref, ours = _cell_twins(name, kwargs)
    x, hx = build(CellGeo(6, name == "LSTMCell"))
    expected = _raised(lambda: ref(x, hx))
    actual = _raised(lambda: ours(x, hx))
    assert_same_error(expected, actual, request.node.callspec.id)


@pytest.mark.parametrize(("name", "kwargs", "build"), CELL_CASES)
def test_cell_error_matches_torch_after_remembered_steps(request, name, kwargs, build):
    """Valid steps first, batched and unbatched, with and without `hx`, twice each (the second runs as the first
    did, see `seqfast.functional.remembered`): the bad call after them still raises torch.nn's error."""
    ref, ours = _cell_twins(name, kwargs)
    geo = CellGeo(6, name == "LSTMCell")
    for x, hx in [(torch.randn(B, IN), geo.s(B, geo.H)), (torch.randn(IN), geo.s(geo.H)), (torch.randn(B, IN), None)]:
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                ours(x, hx)
                ours(x, hx)
    x, hx = build(geo)
    expected = _raised(lambda: ref(x, hx))
    actual = _raised(lambda: ours(x, hx))
    assert_same_error(expected, actual, request.node.callspec.id)


@pytest.mark.parametrize("nonlinearity", ["sigmoid", None, "TANH"])
@pytest.mark.parametrize("unbatched", [False, True], ids=["batched", "unbatched"])
def test_rnn_cell_unknown_nonlinearity_raises_at_forward(nonlinearity, unbatched):
    ref, ours = _cell_twins("RNNCell", dict(nonlinearity=nonlinearity))
    x = torch.randn(IN) if unbatched else torch.randn(B, IN)
    assert_same_error(_raised(lambda: ref(x)), _raised(lambda: ours(x)), f"RNNCell-{nonlinearity}")


def test_rnn_cell_nonlinearity_changed_after_construction():
    ref, ours = _cell_twins("RNNCell", {})
    ref.nonlinearity = ours.nonlinearity = "gelu"
    x = torch.randn(B, IN)
    assert_same_error(_raised(lambda: ref(x)), _raised(lambda: ours(x)), "RNNCell-gelu")
    ref.nonlinearity = ours.nonlinearity = "relu"
    torch.testing.assert_close(ours(x), ref(x))


def _tensors(obj):
    if obj is None:
        return []
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, PackedSequence):
        return [obj.data]
    return [t for item in obj for t in _tensors(item)]


def _snapshot(module, hx):
    """Clones of every parameter, its `.grad` (set to random values first) and every tensor in `hx`."""
    for p in module.parameters():
        p.grad = torch.randn_like(p)
    params = [(p, p.detach().clone(), p.grad.clone()) for p in module.parameters()]
    states = [(t, t.clone()) for t in _tensors(hx) if t.device.type != "meta"]
    return params, states


def _assert_untouched(snapshot, what):
    params, states = snapshot
    for p, value, grad in params:
        assert torch.equal(p.detach(), value), f"{what}: a parameter changed"
        assert torch.equal(p.grad, grad), f"{what}: a parameter's .grad changed"
    for t, value in states:
        assert torch.equal(t, value), f"{what}: the passed-in state changed"


@pytest.mark.parametrize(("cell", "module", "build"), FORWARD_CASES)
def test_forward_error_leaves_module_and_state_untouched(request, cell, module, build):
    _, ours, x, hx = _twins_and_inputs(cell, module, build)
    snapshot = _snapshot(ours, hx)
    error = _raised(lambda: ours(x, hx))
    if error is None:
        pytest.fail(f"{request.node.callspec.id}: seqfast raised nothing")
    _assert_untouched(snapshot, request.node.callspec.id)


@pytest.mark.parametrize(("name", "kwargs", "build"), CELL_CASES)
def test_cell_error_leaves_module_and_state_untouched(request, name, kwargs, build):
    _, ours = _cell_twins(name, kwargs)
    x, hx = build(CellGeo(6, name == "LSTMCell"))
    snapshot = _snapshot(ours, hx)
    error = _raised(lambda: ours(x, hx))
    if error is None:
        pytest.fail(f"{request.node.callspec.id}: seqfast raised nothing")
    _assert_untouched(snapshot, request.node.callspec.id)


@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "gru"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kernel_failure_mid_stack_leaves_module_and_state_untouched(monkeypatch, backend, cell):
    """The third layer-direction's kernel fails: nothing is written, and the next call is torch's again."""
    ref, ours = twins(cell, IN, 6, backend, num_layers=2, bidirectional=True)
    g = Geo.of(ref)
    x, hx = g.x(), g.hx(B)
    x.requires_grad_()
    kernels = dispatch.load(backend)
    calls = []

    def failing(run):
        def call(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("injected kernel failure")
            return run(*args, **kwargs)

        return call

    # a layer-direction runs on the backend's fwd, or on its own autograd node where it has one
    runs = {name: getattr(kernels, name) for name in ("fwd", "layer") if hasattr(kernels, name)}
    for name, run in runs.items():
        monkeypatch.setattr(kernels, name, failing(run))
    snapshot = _snapshot(ours, hx)
    with pytest.raises(RuntimeError, match="injected kernel failure"):
        ours(x, hx)
    assert len(calls) == 3
    _assert_untouched(snapshot, "mid-stack failure")
    assert x.grad is None
    for name, run in runs.items():
        monkeypatch.setattr(kernels, name, run)
    for a, e in zip(flatten(ours(x, hx)), flatten(ref(x, hx)), strict=True):
        torch.testing.assert_close(a, e)
