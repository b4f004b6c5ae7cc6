"""The recurrent extensions beyond torch.nn (opt-in keyword arguments): `weight_drop` (DropConnect on `weight_hh`),
`resets`, `layer_norm` and `zoneout`."""

import pytest
import torch
from conftest import CPU_BACKENDS, TRITON_CPU
from helpers import assert_all_close, flatten, mixed_lengths, rel_rms, run_with_grads, twins
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import seqfast
from seqfast import dispatch, functional
from seqfast.kernels.common import GATES, Extensions


def assert_same(actual, expected, tol):
    """Lists of tensors alike within relative RMS `tol`, named by position."""
    assert_all_close(actual, expected, tol, [f"tensor {i}" for i in range(len(expected))])


KINDS = [("lstm", {}), ("gru", {"bidirectional": True}), ("rnn_tanh", {"num_layers": 2, "batch_first": True})]


def masked_twin(ref, p):
    """A function calling torch.nn's module `ref` with every `weight_hh` times a mask drawn as `weight_drop` draws
    them (per layer-direction in parameter order, from the default generator), the parameters staying leaves."""

    def call(*args):
        params = dict(ref.named_parameters())
        for layer in ref._all_weights:
            name = layer[1]
            keep = torch.rand(params[name].shape) < 1 - p  # one float32 uniform per element, as documented
            params[name] = params[name] * keep.to(params[name].dtype).div_(1 - p)
        return torch.func.functional_call(ref, params, args)

    return call


@pytest.mark.parametrize(("cell", "kwargs"), KINDS, ids=[k for k, _ in KINDS])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_weight_drop_is_torch_nn_with_masked_recurrent_weights(backend, cell, kwargs):
    """In training each call draws one mask per `weight_hh`, scaled by 1 / (1 - p), for all steps; the gradients
    reach the unmasked parameters. Packed input with mixed lengths, random cotangents on every output."""
    p = 0.3
    ref, ours = twins(cell, 3, 5, backend, torch.float64, **kwargs)
    ours.weight_drop = p
    ref.train(), ours.train()
    shape = (4, 6, 3) if kwargs.get("batch_first") else (6, 4, 3)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    lengths = [6, 4, 4, 1]
    reference = masked_twin(ref, p)
    for packed in (False, True):

        def call(module, packed=packed):
            data = pack_padded_sequence(x, lengths, batch_first=kwargs.get("batch_first", False)) if packed else x
            return module(data)

        torch.manual_seed(5)
        expected = run_with_grads(ref, lambda m, call=call: call(reference), [x])
        torch.manual_seed(5)
        actual = run_with_grads(ours, call, [x])
        assert_same(actual[0] + actual[1], expected[0] + expected[1], 1e-10)


def test_weight_drop_draws_a_new_mask_per_call_and_none_in_eval():
    torch.manual_seed(0)
    ref, ours = twins("lstm", 3, 4, None, torch.float64, num_layers=2)
    ours.weight_drop = 0.5
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    first, second = flatten(ours(x)), flatten(ours(x))
    assert not torch.equal(first[0], second[0])
    torch.manual_seed(1)
    a = flatten(ours(x))
    torch.manual_seed(1)
    assert all(torch.equal(u, v) for u, v in zip(a, flatten(ours(x)), strict=True))
    ours.eval()
    assert_same(flatten(ours(x)), flatten(ref(x)), 1e-12)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), ref.parameters(), strict=True))


def test_weight_drop_argument():
    """A keyword of the three modules, in `repr` when set, checked; `state_dict` keys stay torch.nn's; `patch`
    leaves it off."""
    m = seqfast.GRU(3, 4, 2, weight_drop=0.25, bidirectional=True)
    assert m.weight_drop == 0.25
    assert repr(m) == "GRU(3, 4, num_layers=2, bidirectional=True, weight_drop=0.25)"
    assert repr(seqfast.LSTM(3, 4)) == "LSTM(3, 4)"
    assert list(m.state_dict()) == list(torch.nn.GRU(3, 4, 2, bidirectional=True).state_dict())
    assert seqfast.RNN(3, 4, 1, "relu", weight_drop=0.1).weight_drop == 0.1
    for bad in (-0.1, 1.0, "0.5", True):
        with pytest.raises(ValueError, match="weight_drop"):
            seqfast.LSTM(3, 4, weight_drop=bad)
    patched = seqfast.patch(torch.nn.Sequential(torch.nn.LSTM(3, 4)))
    assert patched[0].weight_drop == 0.0
    with pytest.raises(TypeError):
        seqfast.LSTMCell(3, 4, weight_drop=0.1)


def test_weight_drop_compiles_fullgraph():
    """Under `torch.compile(fullgraph=True)` a training call draws the same masks as an eager one from the same
    seed."""
    torch.manual_seed(0)
    model = seqfast.LSTM(3, 4, 2, weight_drop=0.5, bidirectional=True)
    x = torch.randn(5, 2, 3)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    expected = flatten(model(x))
    torch.manual_seed(3)
    assert_same(flatten(compiled(x)), expected, 1e-6)


OPTION_SETS = {
    "resets": ({}, True),
    "layer_norm": ({"layer_norm": True}, False),
    "zoneout": ({"zoneout": 0.3}, False),
    "all": ({"layer_norm": True, "zoneout": 0.3}, True),
}
MODULES = {"lstm": seqfast.LSTM, "gru": seqfast.GRU, "rnn_tanh": seqfast.RNN, "rnn_relu": seqfast.RNN}
CONFIGS = {
    "L2-bi": {"num_layers": 2, "bidirectional": True, "dropout": 0.25},
    "bf-nobias": {"batch_first": True, "bias": False},
}


def build(cell, options, backend="reference", I=3, H=4, dtype=torch.float64, **kwargs):
    """A seqfast module of `cell` with `options`, random parameters (gains and LayerNorm bias too)."""
    if cell.startswith("rnn_"):
        kwargs["nonlinearity"] = cell[4:]
    module = MODULES[cell](I, H, dtype=dtype, backend=backend, **options, **kwargs)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith("ln_"):
                p.uniform_(0.5, 1.5) if "weight" in name else p.uniform_(-0.5, 0.5)
    return module


def inputs(module, T, B, with_resets, dtype=torch.float64):
    """`(x, hx, resets)` for `module`, leaves requiring grad; resets at step 0 of one row and inside others."""
    D = 2 if module.bidirectional else 1
    shape = (B, T, module.input_size) if module.batch_first else (T, B, module.input_size)
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    h0 = torch.randn(module.num_layers * D, B, module.hidden_size, dtype=dtype, requires_grad=True)
    hx = (h0, torch.randn_like(h0).requires_grad_()) if module.mode == "LSTM" else h0
    resets = None
    if with_resets:
        resets = torch.rand(T, B) < 0.3
        resets[0, 0] = True
        resets[T // 2, -1] = True
        resets = resets.T.contiguous() if module.batch_first else resets
    return x, hx, resets


def leaves(x, hx):
    return [x, *(hx if isinstance(hx, tuple) else (hx,))]


@pytest.mark.parametrize("config", CONFIGS, ids=list(CONFIGS))
@pytest.mark.parametrize("option", OPTION_SETS, ids=list(OPTION_SETS))
@pytest.mark.parametrize("cell", MODULES, ids=list(MODULES))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_options_are_the_cell_loop(cell, option, config, training):
    """`resets`, `layer_norm` and `zoneout` on the reference backend give the outputs, final states and gradients (of
    the input, `hx` and every parameter, random cotangents) of the same math written as a Python loop over steps
    (`benchmarks.cell_loop`), with the same seed: zoneout's masks and dropout drawn alike."""
    from benchmarks.cell_loop import cell_loop

    options, with_resets = OPTION_SETS[option]
    module = build(cell, options, **CONFIGS[config]).train(training)
    x, hx, resets = inputs(module, 7, 3, with_resets)
    torch.manual_seed(5)
    expected = run_with_grads(module, lambda m: cell_loop(m, x, hx, resets), leaves(x, hx))
    torch.manual_seed(5)
    actual = run_with_grads(module, calling(x, hx, resets), leaves(x, hx))
    assert_same(actual[0] + actual[1], expected[0] + expected[1], 1e-12)


@pytest.mark.parametrize("cell", MODULES, ids=list(MODULES))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_each_backend_runs_an_option_or_declines_it_with_the_reason(backend, cell):
    """A backend that lists an option in `EXTENSIONS` matches the reference on it, with and without grad; one that
    does not declines it: an explicit request raises the reason."""
    listed = getattr(dispatch.load(backend), "EXTENSIONS", ())
    for option, (options, with_resets) in OPTION_SETS.items():
        if option == "all":
            continue
        module = build(cell, options, backend, num_layers=2, bidirectional=True).eval()
        x, hx, resets = inputs(module, 6, 3, with_resets)
        if option not in listed:
            with pytest.raises(RuntimeError, match=f"does not run the {option} option"):
                module(x, hx, resets=resets)
            continue
        reference = build(cell, options, "reference", num_layers=2, bidirectional=True).eval()
        reference.load_state_dict(module.state_dict())
        expected = run_with_grads(reference, calling(x, hx, resets), leaves(x, hx))
        actual = run_with_grads(module, calling(x, hx, resets), leaves(x, hx))
        assert_same(actual[0] + actual[1], expected[0] + expected[1], 1e-12)
        with torch.no_grad():
            assert_same(flatten(module(x, hx, resets=resets)), expected[0], 1e-12)


CELL_MODULES = {"lstm": seqfast.LSTMCell, "gru": seqfast.GRUCell, "rnn_tanh": seqfast.RNNCell}


@pytest.mark.parametrize("cell", CELL_MODULES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cells_run_an_option_on_each_backend_or_decline_it(backend, cell):
    """A cell with `layer_norm` or `zoneout` on a backend that lists the option gives the reference's results and
    gradients, in training (same seed, same masks) and evaluation; another backend declines it with the reason."""
    listed = getattr(dispatch.load(backend), "EXTENSIONS", ())
    for option, value in (("layer_norm", True), ("zoneout", 0.4)):
        ours = CELL_MODULES[cell](3, 4, dtype=torch.float64, backend=backend, **{option: value})
        ref = CELL_MODULES[cell](3, 4, dtype=torch.float64, backend="reference", **{option: value})
        ref.load_state_dict(ours.state_dict())
        x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
        h = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        hx = (h, torch.randn_like(h).requires_grad_()) if cell == "lstm" else h
        if option not in listed:
            with pytest.raises(RuntimeError, match=f"does not run the {option} option"):
                ours(x, hx)
            continue
        for training in (True, False):
            ours.train(training), ref.train(training)
            torch.manual_seed(2)
            expected = run_with_grads(ref, lambda m, x=x, hx=hx: m(x, hx), leaves(x, hx))
            torch.manual_seed(2)
            actual = run_with_grads(ours, lambda m, x=x, hx=hx: m(x, hx), leaves(x, hx))
            assert_same(actual[0] + actual[1], expected[0] + expected[1], 1e-12)


FUSED_CELLS = ["lstm", "lstm-proj", "gru", "rnn_tanh", "rnn_relu"]


FUSED_OPTIONS = ["resets", "zoneout", "zoneout-eval", "resets-zoneout", "layer_norm", "layer_norm-resets-zoneout"]


def fused_cases(options, kinds):
    """`(kind, option)` pairs of `options` and `kinds` but for layer_norm with a projection, which is not defined."""
    return [(k, o) for k in kinds for o in options if not (k == "lstm-proj" and "layer_norm" in o)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize(("kind", "option"), fused_cases(FUSED_OPTIONS, FUSED_CELLS))
@pytest.mark.parametrize("backend", [p for p in CPU_BACKENDS if p.values[0] != "reference"])
def test_fused_options_are_the_reference_layer(backend, kind, option, reverse, dtype):
    """One layer-direction with resets (`ext.zero`), zoneout's masks (`ext.keep_h`, `ext.keep_c`) or its evaluation
    weight, or both, through `functional.layer` on a backend that fuses them, against the reference's in float64:
    outputs and the gradients of every input for random cotangents, with mixed lengths (as the contract allows) and
    without; float32 at sizes that run the threaded, packed loops. They run the cpp loops split by hidden units
    (B < 12, and with a projection) and by rows (B >= 12), and numba's on packed weights. `layer_norm` adds the
    gains' and LSTM's bias's gradients. A backend that does not fuse them refuses the call with the reason."""
    shapes = [(9, 5, 6), (9, 50, 6)] if dtype == torch.float64 else [(40, 10, 70), (40, 48, 70)]
    for T, B, H in shapes:
        check_fused_options(backend, kind, reverse, dtype, option, T, B, H)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize(("kind", "option"), fused_cases(FUSED_OPTIONS, FUSED_CELLS))
@pytest.mark.parametrize("backend", TRITON_CPU)
def test_fused_options_on_triton_interpreter(backend, kind, option, reverse):
    """`test_fused_options_are_the_reference_layer` for the triton kernels on CPU tensors through triton's
    interpreter (slow: one tiny float32 size, T5-B3-H6)."""
    check_fused_options(backend, kind, reverse, torch.float32, option, 5, 3, 6)


def check_fused_options(backend, kind, reverse, dtype, option, T, B, H):
    """`test_fused_options_are_the_reference_layer` at one size."""
    cell, proj = kind.removesuffix("-proj"), kind == "lstm-proj"
    lstm = cell == "lstm"
    P, G = 3 if proj else H, GATES[cell] * H
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return torch.randn(shape, generator=gen, dtype=torch.float64) * scale

    tensors = dict(
        x=rand(T, B, 4),
        w_ih=rand(G, 4, scale=0.5),
        w_hh=rand(G, P, scale=P**-0.5),
        b_ih=rand(G),
        b_hh=rand(G),
        h0=rand(B, P),
        c0=rand(B, H) if lstm else None,
        w_hr=rand(P, H, scale=H**-0.5) if proj else None,
    )
    if "layer_norm" in option:
        tensors.update(ln_ih=1 + 0.3 * rand(G), ln_hh=1 + 0.3 * rand(G))
        if lstm:
            tensors.update(ln_c_weight=1 + 0.3 * rand(H), ln_c_bias=0.3 * rand(H))
    cot = [rand(T, B, P), rand(B, P)] + ([rand(B, H)] if lstm else [])
    options = option.removesuffix("-eval").split("-")
    for lengths in (None, mixed_lengths(T, B)):
        zero = keep_h = keep_c = None
        if "resets" in options:
            zero = torch.rand(T, B, generator=gen) < 0.2
            zero[0, 0] = zero[-1, -1] = True
        if option == "zoneout-eval":
            keep_h = keep_c = 0.3
        elif "zoneout" in options:
            keep_h = torch.rand(T, B, P, generator=gen).lt(0.3).double()
            keep_c = torch.rand(T, B, H, generator=gen).lt(0.3).double() if lstm else None
        results = []
        # LN divides by each row's spread, which magnifies float32 rounding over the steps: there the bound is four
        # times the reference's own float32 error (the cpp LSTM's measured 0.9-3.0x of it over four seeds at T40 B10
        # H70, in the old one-block schedule as in the chunked one; GRU's 1.0-1.3x)
        sides = [(backend, dtype), ("reference", torch.float64)]
        sides += [("reference", dtype)] if "layer_norm" in options and dtype == torch.float32 else []
        for name, dt in sides:
            keep = [k.to(dt) if torch.is_tensor(k) else k for k in (keep_h, keep_c)]
            leaves = {k: v.to(dt).requires_grad_() for k, v in tensors.items() if v is not None}
            a = {k: leaves.get(k) for k in (*tensors, "ln_ih", "ln_hh", "ln_c_weight", "ln_c_bias")}
            ext = Extensions(zero, *keep, a["ln_ih"], a["ln_hh"], a["ln_c_weight"], a["ln_c_bias"])
            args = (cell, a["x"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], a["h0"], a["c0"], a["w_hr"])
            args += (lengths, reverse, name, ext)
            missing = [o for o in options if o not in getattr(dispatch.load(name), "EXTENSIONS", ())]
            if missing:
                with pytest.raises(RuntimeError, match=f"does not run the {', '.join(missing)} option"):
                    functional.layer(*args)
                return
            outputs = [o for o in functional.layer(*args) if o is not None]
            loss = sum((o * c.to(dt)).sum() for o, c in zip(outputs, cot, strict=True))
            grads = torch.autograd.grad(loss, list(leaves.values()))
            results.append([o.detach() for o in outputs] + list(grads))
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        if len(results) == 3:
            tol = max(tol, 4 * max(rel_rms(a, e) for a, e in zip(results[2], results[1], strict=True)))
        assert_same(results[0], [t.to(dtype) for t in results[1]], tol)


def calling(x, hx, resets):
    """A function that calls a module on `(x, hx, resets=resets)`."""
    return lambda module: module(x, hx, resets=resets)


@pytest.mark.parametrize("cell", MODULES, ids=list(MODULES))
def test_options_gradcheck_and_gradgradcheck(cell):
    """First and second derivatives of a bidirectional layer with all three options (zoneout in evaluation, whose
    weights are fixed), with respect to the input, `hx` and the parameters, in float64."""
    module = build(cell, {"layer_norm": True, "zoneout": 0.25}, bidirectional=True, H=2).eval()
    x, hx, resets = inputs(module, 3, 2, True)
    names = [n for n, _ in module.named_parameters()]

    def f(x, h0, *rest):
        n_states = 2 if cell == "lstm" else 1
        hx = (h0, rest[0]) if cell == "lstm" else h0
        params = dict(zip(names, rest[n_states - 1 :], strict=True))
        return tuple(flatten(torch.func.functional_call(module, params, (x, hx), {"resets": resets})))

    args = (*leaves(x, hx), *(p.detach().requires_grad_() for p in module.parameters()))
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


@pytest.mark.parametrize("layer_norm", [False, True], ids=["", "layer_norm"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("backend", [p for p in CPU_BACKENDS if p.values[0] in ("cpp", "numba")])
def test_fused_options_gradcheck_and_gradgradcheck(backend, cell, training, layer_norm):
    """First and second derivatives of a bidirectional layer with resets and zoneout, and with layer_norm too, on a
    backend that fuses them (training masks redrawn from the same seed on every call), with respect to the input and
    the parameters, in float64."""
    options = {"zoneout": 0.3, "layer_norm": layer_norm}
    module = build(cell, options, backend, bidirectional=True, H=2).train(training)
    x, _, resets = inputs(module, 4, 2, True)
    names = [n for n, _ in module.named_parameters()]

    def f(x, *params):
        torch.manual_seed(5)
        out = torch.func.functional_call(module, dict(zip(names, params, strict=True)), (x,), {"resets": resets})
        return tuple(flatten(out))

    args = (x, *(p.detach().requires_grad_() for p in module.parameters()))
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


def test_resets_start_each_episode_from_zeros():
    """After a reset the forward direction continues as a fresh call from zeros on the rest of the sequence, the
    reverse direction before it as a fresh call on the part before; no gradient crosses the boundary."""
    module = build("lstm", {}, bidirectional=True).eval()
    T, t = 8, 3
    x = torch.randn(T, 2, 3, dtype=torch.float64, requires_grad=True)
    resets = torch.zeros(T, 2, dtype=torch.bool)
    resets[t, 1] = True
    y, _ = module(x, resets=resets)
    H = module.hidden_size
    after, _ = module(x[t:, 1:])
    before, _ = module(x[:t, 1:])
    assert_same([y[t:, 1:, :H], y[:t, 1:, H:]], [after[:, :, :H], before[:, :, H:]], 1e-12)
    (dx,) = torch.autograd.grad(y[t:, 1, :H].sum(), x, retain_graph=True)
    assert dx[:t, 1].abs().max() == 0 and dx[t:, 1].abs().min() > 0
    (dx,) = torch.autograd.grad(y[:t, 1, H:].sum(), x)
    assert dx[t:, 1].abs().max() == 0 and dx[:t, 1].abs().min() > 0
    no_resets = module(x, resets=torch.zeros(T, 2, dtype=torch.bool))
    assert_same(flatten(no_resets), flatten(module(x)), 0)


def test_resets_unbatched_and_batch_first_are_the_batched_call():
    module = build("gru", {}, num_layers=2, bidirectional=True).eval()
    x = torch.randn(6, 1, 3, dtype=torch.float64)
    resets = torch.tensor([False, False, True, False, True, False])
    expected = flatten(module(x, resets=resets[:, None]))
    unbatched = module(x[:, 0], resets=resets)
    assert_same([unbatched[0], unbatched[1]], [expected[0][:, 0], expected[1][:, 0]], 0)
    module.batch_first = True
    assert_same(
        flatten(module(x.transpose(0, 1), resets=resets[None, :])), [expected[0].transpose(0, 1), expected[1]], 0
    )


def test_options_with_packed_input_are_each_sequence_alone():
    """`layer_norm` and evaluation-mode `zoneout` on a `PackedSequence` of mixed lengths give each sequence's
    results alone; steps past a length leave the state as it is."""
    module = build("lstm", {"layer_norm": True, "zoneout": 0.2}, num_layers=2, bidirectional=True).eval()
    lengths = [5, 2, 4]
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    out, (hn, cn) = module(pack_padded_sequence(x, lengths, enforce_sorted=False))
    y, _ = pad_packed_sequence(out)
    for b, n in enumerate(lengths):
        y_b, (h_b, c_b) = module(x[:n, b : b + 1])
        assert_same([y[:n, b : b + 1], hn[:, b : b + 1], cn[:, b : b + 1]], [y_b, h_b, c_b], 1e-12)


def test_zoneout_masks_follow_the_seed_and_evaluation_is_deterministic():
    module = build("gru", {"zoneout": 0.5}, num_layers=2)
    x = torch.randn(6, 3, 3, dtype=torch.float64)
    torch.manual_seed(7)
    first = flatten(module(x))
    assert not torch.equal(first[0], flatten(module(x))[0])
    torch.manual_seed(7)
    assert_same(flatten(module(x)), first, 0)
    module.eval()
    assert_same(flatten(module(x)), flatten(module(x)), 0)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_cells_with_options_are_one_step_of_the_cell_loop(cell):
    """A cell with `layer_norm` and `zoneout` is one step of the module with the same parameters; zoneout keeps a
    unit's value from `hx`."""
    from benchmarks.cell_loop import cell_loop

    cells = {"lstm": seqfast.LSTMCell, "gru": seqfast.GRUCell, "rnn_tanh": seqfast.RNNCell}
    one = cells[cell](3, 4, dtype=torch.float64, layer_norm=True, zoneout=0.4, backend="reference")
    module = build(cell, {"layer_norm": True, "zoneout": 0.4})
    module.load_state_dict({k + "_l0": v for k, v in one.state_dict().items()})
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    h = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    hx = (h, torch.randn_like(h).requires_grad_()) if cell == "lstm" else h
    for training in (True, False):
        one.train(training), module.train(training)
        batched = (hx[0][None], hx[1][None]) if cell == "lstm" else hx[None]
        torch.manual_seed(5)
        expected = run_with_grads(module, lambda m, b=batched: cell_loop(m, x[None], b)[1], leaves(x, hx))
        torch.manual_seed(5)
        actual = run_with_grads(one, lambda m: m(x, hx), leaves(x, hx))
        assert_same(actual[0] + actual[1], [o[0] for o in expected[0]] + expected[1], 1e-12)


def test_layer_norm_parameters():
    """Registered after each layer-direction's torch.nn parameters, named and initialised as specified, kept by
    `reset_parameters`; torch.nn's `state_dict` loads with `strict=False` and leaves them alone."""
    m = seqfast.LSTM(3, 4, 2, bidirectional=True, layer_norm=True)
    names = [n for n, _ in m.named_parameters()]
    torch_names = [n for n, _ in torch.nn.LSTM(3, 4, 2, bidirectional=True).named_parameters()]
    assert [n for n in names if not n.startswith("ln_")] == torch_names
    assert names[:8] == [
        "weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0",
        "ln_ih_weight_l0", "ln_hh_weight_l0", "ln_c_weight_l0", "ln_c_bias_l0",
    ]  # fmt: skip
    assert "ln_c_bias_l1_reverse" in names
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes["ln_ih_weight_l1_reverse"] == (16,) and shapes["ln_c_weight_l0"] == (4,)
    m.reset_parameters()
    assert m.ln_hh_weight_l1.eq(1).all() and m.ln_c_bias_l0_reverse.eq(0).all()
    missing, unexpected = m.load_state_dict(torch.nn.LSTM(3, 4, 2, bidirectional=True).state_dict(), strict=False)
    assert len(missing) == 16 and not unexpected
    assert [n for n, _ in seqfast.GRU(3, 4, layer_norm=True).named_parameters()][4:] == [
        "ln_ih_weight_l0",
        "ln_hh_weight_l0",
    ]
    assert [n for n, _ in seqfast.LSTMCell(3, 4, layer_norm=True).named_parameters()][4:] == [
        "ln_ih_weight", "ln_hh_weight", "ln_c_weight", "ln_c_bias",
    ]  # fmt: skip
    assert [n for n, _ in seqfast.RNNCell(3, 4, bias=False, layer_norm=True).named_parameters()] == [
        "weight_ih", "weight_hh", "ln_ih_weight", "ln_hh_weight",
    ]  # fmt: skip


def test_option_arguments():
    """Keywords of the modules and cells, in `repr` when on; off by default and after `patch`; bad values raise."""
    assert repr(seqfast.GRU(3, 4, layer_norm=True, zoneout=0.1)) == "GRU(3, 4, layer_norm=True, zoneout=0.1)"
    assert repr(seqfast.LSTMCell(3, 4, zoneout=0.5)) == "LSTMCell(3, 4, zoneout=0.5)"
    assert repr(seqfast.RNNCell(3, 4)) == "RNNCell(3, 4)"
    assert list(seqfast.GRU(3, 4, zoneout=0.2).state_dict()) == list(torch.nn.GRU(3, 4).state_dict())
    patched = seqfast.patch(torch.nn.Sequential(torch.nn.LSTM(3, 4), torch.nn.GRUCell(3, 4)))
    assert not patched[0].layer_norm and patched[0].zoneout == 0 and not patched[1].layer_norm
    for bad in (-0.1, 1.0, "0.5", True):
        with pytest.raises(ValueError, match="zoneout"):
            seqfast.LSTM(3, 4, zoneout=bad)
        with pytest.raises(ValueError, match="zoneout"):
            seqfast.GRUCell(3, 4, zoneout=bad)
    with pytest.raises(TypeError, match="layer_norm"):
        seqfast.GRU(3, 4, layer_norm=1)
    with pytest.raises(ValueError, match="proj_size"):
        seqfast.LSTM(3, 4, proj_size=2, layer_norm=True)


def test_bad_resets_raise():
    gru = seqfast.GRU(3, 4, backend="reference")
    x = torch.randn(5, 2, 3)
    good = torch.zeros(5, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="PackedSequence"):
        gru(pack_padded_sequence(x, [5, 3]), resets=good)
    with pytest.raises(ValueError, match=r"shape \[T, B\] = \[5, 2\]"):
        gru(x, resets=good.T)
    with pytest.raises(TypeError, match="bool"):
        gru(x, resets=good.float())
    with pytest.raises(TypeError, match="bool"):
        gru(x, resets=[[False] * 2] * 5)
    with pytest.raises(ValueError, match="meta"):
        gru(x, resets=good.to("meta"))
    with pytest.raises(TypeError):
        seqfast.GRUCell(3, 4)(x[0], resets=good[0])
    with pytest.raises(TypeError, match="positional"):  # a keyword only: torch.nn's forward takes two arguments
        gru(x, None, good)


def test_options_under_strict_automatic_selection_name_the_backends_that_decline(monkeypatch):
    """Strict mode (as in these tests) refuses to fall through to the reference for an option no faster backend
    runs, and says which backend declined it and why (every CPU backend runs every option, so here they pretend
    not to run layer_norm)."""
    for info in dispatch.backends():
        if info.name in ("cpp", "numba") and info.available:
            monkeypatch.setattr(dispatch.load(info.name), "EXTENSIONS", ("resets", "zoneout"))
    with pytest.raises(RuntimeError, match="strict mode forbids.*: it does not run the layer_norm option"):
        seqfast.LSTM(3, 4, layer_norm=True)(torch.randn(2, 1, 3))


@pytest.mark.parametrize(
    ("backend", "options"),
    [("reference", {"layer_norm": True, "zoneout": 0.3}), ("cpp", {"layer_norm": True, "zoneout": 0.3})],
    ids=["reference-all", "cpp-all"],
)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_options_compile_fullgraph(cell, backend, options):
    """`torch.compile(fullgraph=True)` of a module with the options gives the eager call's results and zoneout's
    masks from the same seed: the reference's ops traced, or a fused backend's through the custom ops."""
    module = build(cell, options, backend, num_layers=2, bidirectional=True, dtype=torch.float32)
    x, hx, resets = inputs(module, 5, 2, True, torch.float32)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    expected = run_with_grads(module, lambda m: m(x, hx, resets=resets), leaves(x, hx))
    torch.manual_seed(3)
    actual = run_with_grads(module, lambda m: compiled(x, hx, resets=resets), leaves(x, hx))
    assert_same(actual[0] + actual[1], expected[0] + expected[1], 1e-6)
