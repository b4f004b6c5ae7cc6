"""Shared test helpers: twin modules from one state_dict, outputs with all gradients, error metrics, random
problems of the backend contract (`seqfast.kernels.reference`), and the one check of that contract for every backend
(`check_contract`)."""

import contextlib

import torch
from torch.nn.utils.rnn import PackedSequence

import seqfast
from seqfast.kernels import reference
from seqfast.kernels.common import GATES, Extensions

# (dtype, relative RMS tolerance). Both sides differ only in summation order and the order of elementwise ops.
# Measured against torch.nn over tests/test_parity.py's matrix with the reference backend: float64 <= 3.5e-15,
# float32 <= 5.3e-7 (T = 200 gradients). The bounds leave ~300x and ~20x of room for other summation orders.
DTYPES = [(torch.float64, 1e-12), (torch.float32, 1e-5)]
DTYPE_IDS = ["f64", "f32"]

TORCH_MODULES = {"rnn_tanh": torch.nn.RNN, "rnn_relu": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}
SEQFAST_MODULES = {"rnn_tanh": seqfast.RNN, "rnn_relu": seqfast.RNN, "lstm": seqfast.LSTM, "gru": seqfast.GRU}


class Output(torch.nn.Module):
    """Keeps only the output of a recurrent module, so it can sit in a Sequential."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        return self.rnn(x)[0]


def twins(cell, input_size, hidden_size, backend=None, dtype=torch.float32, **kwargs):
    """A torch.nn module and its seqfast twin loaded from the same `state_dict` (strict)."""
    if cell.startswith("rnn_"):
        kwargs["nonlinearity"] = cell[4:]
    ref = TORCH_MODULES[cell](input_size, hidden_size, dtype=dtype, **kwargs)
    ours = SEQFAST_MODULES[cell](input_size, hidden_size, dtype=dtype, backend=backend, **kwargs)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def flatten(out):
    """Every tensor in a module's output, `PackedSequence` as its data, in a fixed order."""
    if isinstance(out, PackedSequence):
        return [out.data]
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for item in out for t in flatten(item)]


def run_with_grads(module, call, inputs, seed=1234):
    """Outputs of `call(module)` and gradients of every input and parameter for random cotangents on every output.

    The cotangents come from `seed`, drawn in float32 and cast to each output's dtype, so two modules called alike
    get the same ones, also in different dtypes.
    """
    outputs = flatten(call(module))
    generator = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=generator).to(o.device, o.dtype)).sum() for o in outputs)
    wrt = [t for t in inputs if t.requires_grad] + list(module.parameters())
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    return [o.detach() for o in outputs], list(grads)


def rel_rms(actual, expected):
    """Relative RMS error of `actual` against `expected` (absolute when `expected` is all zero)."""
    diff = (actual.double() - expected.double()).norm()
    scale = expected.double().norm()
    return (diff / scale).item() if scale > 0 else diff.item()


# 16-bit inputs, (backend, device) -> dtype id -> relative RMS against the reference on the same inputs (shapes:
# test_contract's `HALF_SHAPES`, `CPP_HALF_SHAPES`). triton multiplies in fp32, the kernel rounds h (and
# dgh in backward) to the input dtype before each recurrent product, as tensor cores do, and stores y/dgx/dgh in it.
# Interpreter: measured <= 1.1e-2 for bfloat16 (8-bit mantissa; worst is dh0, eight steps through rounded dgh) and
# <= 5.6e-4 for float16 (11-bit) on `HALF_SHAPES`, so the bounds leave ~3x and ~3.5x; CUDA: products of length up
# to 520 at B70-T6-H520, hence the wider bounds.
# cpp computes 16-bit calls as the reference does (float32 inside, 16-bit y/dgx/dgh), but its backward reads h from
# the 16-bit y (RNN's tanh', GRU's h_prev) where the reference keeps it in float32: measured <= 6.1e-3 (bfloat16) and
# <= 9.1e-4 (float16) over those shapes (LSTM <= 1.6e-5), bounds ~2.5x and ~2.2x.
HALF_TOLS = {
    ("triton", "cpu"): {"bf16": 3e-2, "f16": 2e-3},
    ("triton", "cuda"): {"bf16": 5e-2, "f16": 5e-3},
    ("cpp", "cpu"): {"bf16": 1.5e-2, "f16": 2e-3},
}


def assert_close(actual, expected, tol, what):
    """Relative RMS within `tol`; the message gives the max abs error and the first bad index."""
    assert actual is not None and expected is not None, f"{what}: missing ({actual is None}, {expected is None})"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert torch.isfinite(actual).all() or not torch.isfinite(expected).all(), f"{what}: non-finite values"
    if actual.numel() == 0:
        return
    err = rel_rms(actual, expected)
    if err > tol:
        diff = (actual.double() - expected.double()).abs()
        bad = (diff > tol * expected.double().abs().clamp(min=1)).nonzero()
        first = tuple(bad[0].tolist()) if len(bad) else None
        raise AssertionError(
            f"{what}: rel RMS {err:.3e} > {tol:.1e}; max abs err {diff.max().item():.3e}; first bad index {first}"
        )


def assert_all_close(actual, expected, tol, names):
    assert len(actual) == len(expected), f"{len(actual)} tensors != {len(expected)}"
    for a, e, name in zip(actual, expected, names, strict=True):
        assert_close(a, e, tol, name)


# The outputs of one forward + backward of the backend contract, in `run_contract`'s order.
CONTRACT_OUTPUTS = ("y", "hT", "cT", "dgx", "dgh", "dh0", "dc0", "dw_hr")


def mixed_lengths(T, B):
    """Lengths covering T, 0, 1 and a middle value, not sorted, the last row full."""
    return torch.tensor([[T, 0, 1, max(T // 2, 1)][b % 4] if b else T for b in range(B)][::-1])


def contract_problem(cell, T, B, H, P=None, *, lengths=None, bias=True, dtype=torch.float64, device="cpu", seed=0):
    """Random inputs and cotangents of one layer-direction call of the backend contract.

    Weights are scaled by `1/sqrt(fan-in)`; `P` (LSTM, `< H`) adds the projection `w_hr [P, H]`. Values are drawn in
    float64 from `seed`, then cast to `dtype` on `device`.

    Returns:
        `args`, the keyword arguments of `fwd` (`gx, w_hh, b_hh, h0, c0, lengths, w_hr`), and the cotangents
        `(dy, dhT, dcT)`.
    """
    gen = torch.Generator().manual_seed(seed)
    G, width, lstm = GATES[cell] * H, P or H, cell == "lstm"

    def rand(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    args = dict(
        gx=rand(T, B, G),
        w_hh=rand(G, width, scale=width**-0.5),
        b_hh=rand(G) if bias else None,
        h0=rand(B, width),
        c0=rand(B, H) if lstm else None,
        lengths=None if lengths is None else torch.as_tensor(lengths, dtype=torch.int64, device=device),
        w_hr=rand(P, H, scale=H**-0.5) if P else None,
    )
    return args, (rand(T, B, width), rand(B, width), rand(B, H) if lstm else None)


def kind_problem(kind, T, B, H, P=None, *, lengths=None, **kwargs):
    """`contract_problem` of a test kind: a cell, or `lstm-proj` (an LSTM projecting to `P`); `lengths` may also
    be "full" (None) or "mixed" (`mixed_lengths`).

    Returns:
        `(cell, args, cot)`.
    """
    cell = "lstm" if kind == "lstm-proj" else kind
    if isinstance(lengths, str):
        lengths = mixed_lengths(T, B) if lengths == "mixed" else None
    args, cot = contract_problem(cell, T, B, H, P if kind == "lstm-proj" else None, lengths=lengths, **kwargs)
    return cell, args, cot


def cast(args, cot, dtype):
    """`contract_problem`'s `args` and `cot` with their floating tensors in `dtype`."""

    def to(t):
        return t.to(dtype) if torch.is_tensor(t) and t.is_floating_point() else t

    return {k: to(v) for k, v in args.items()}, tuple(to(t) for t in cot)


def run_contract(module, cell, args, cot, reverse):
    """`fwd` then `bwd` of the backend `module`: the outputs named by `CONTRACT_OUTPUTS`."""
    y, hT, cT, saved = module.fwd(cell, **args, reverse=reverse)
    a = args
    ext = {"ext": a["ext"]} if "ext" in a else {}  # resets, passed only to a backend that runs them
    grads = module.bwd(
        cell, *cot, a["w_hh"], a["b_hh"], a["w_hr"], a["h0"], a["c0"], a["lengths"], y, saved, reverse, **ext
    )
    return [y, hT, cT, *grads]


def assert_outputs_close(actual, expected, tol, dtype=None):
    """`run_contract` outputs against expected ones: present alike, each within relative RMS `tol`.

    With `dtype`, `actual` must be in it and is compared in float64 with `expected` of any dtype.
    """
    for a, e, name in zip(actual, expected, CONTRACT_OUTPUTS, strict=True):
        assert (a is None) == (e is None), f"{name}: {a is None=} {e is None=}"
        if e is None:
            continue
        if dtype is not None:
            assert a.dtype == dtype, f"{name}: dtype {a.dtype} != {dtype}"
            a, e = a.double(), e.double()
        assert_close(a, e, tol, name)


# float32 with TF32 products (torch's default for cuDNN's RNNs) against float64 on CUDA: the interpreter's emulation
# of rounded TF32 operands measures <= 3.8e-4 (tests/test_triton.py); 3e-3 leaves room for hardware that truncates
# operands and for the longer sequences of the CUDA tests.
TF32_TOL = 3e-3


@contextlib.contextmanager
def fp32_precision(value):
    """torch's float32 precision for cuDNN's RNNs (`"ieee"`, `"tf32"`), which the triton backend follows, inside."""
    rnn = torch.backends.cudnn.rnn
    before = rnn.fp32_precision
    rnn.fp32_precision = value
    try:
        yield value
    finally:
        rnn.fp32_precision = before


# The tensors of a call that `unsupported()` and `dispatch.select` judge, in their order.
CALL_TENSORS = ("gx", "w_hh", "h0", "c0", "lengths", "w_hr")


def float64_reference(cell, args, cot, reverse):
    """`run_contract` of the reference backend on `args` and `cot` cast to float64: exact math on the same values."""
    return run_contract(reference, cell, *cast(args, cot, torch.float64), reverse)


def check_contract(module, cell, args, cot, reverse, tol, expected=None):
    """The backend contract of `module` on one problem, for every backend and device: `module` accepts the call
    (`unsupported()` gives None), and its `fwd` + `bwd` outputs (`run_contract`) are in the inputs' dtype, present
    where the expected ones are, and each within relative RMS `tol` of them, compared in float64.

    Args:
        module: a backend module (`seqfast.dispatch.load(name)`).
        cell, args, cot: a problem (`contract_problem`, `kind_problem`), its tensors on the backend's device.
        reverse: walk the sequences backwards.
        tol: relative RMS tolerance of every output.
        expected: outputs to compare with (`float64_reference` for exact math); default None, the reference
            backend on the same inputs in their dtype.

    Returns:
        `module`'s outputs, in `CONTRACT_OUTPUTS`' order.
    """
    reason = module.unsupported(cell, *(args[n] for n in CALL_TENSORS))
    assert reason is None, f"{module.__name__} declines {args['gx'].dtype} {cell}: {reason}"
    if expected is None:
        expected = run_contract(reference, cell, args, cot, reverse)
    actual = run_contract(module, cell, args, cot, reverse)
    assert_outputs_close(actual, expected, tol, args["gx"].dtype)
    return actual


def layer_norm_problem(cell, T, B, H, *, lengths=None, resets=False, zoneout=None, dtype=torch.float64, seed=0):
    """`contract_problem` with the `layer_norm` option (gains and LSTM's bias drawn around their initial values), and
    optionally resets (`[T, B]`, about one step in five, the first and last set) and zoneout (`"train"`: Bernoulli(0.3)
    masks; `"eval"`: the weight 0.3).

    Returns:
        `args` with `ext` (`seqfast.kernels.common.Extensions`), and the cotangents.
    """
    args, cot = contract_problem(cell, T, B, H, lengths=lengths, dtype=dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    G, lstm = GATES[cell] * H, cell == "lstm"

    def rand(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)

    zero = keep_h = keep_c = None
    if resets:
        zero = torch.rand(T, B, generator=gen) < 0.2
        zero[0, 0] = zero[-1, -1] = True
    if zoneout == "eval":
        keep_h = keep_c = 0.3
    elif zoneout == "train":
        keep_h = (torch.rand(T, B, H, generator=gen) < 0.3).to(dtype)
        keep_c = (torch.rand(T, B, H, generator=gen) < 0.3).to(dtype) if lstm else None
    ln = (1 + 0.3 * rand(G), 1 + 0.3 * rand(H) if lstm else None, 0.3 * rand(H) if lstm else None)
    args["ext"] = Extensions(zero, keep_h, keep_c, None, *ln)
    return args, cot


def layer_norm_oracle(cell, args, cot, reverse):
    """What a backend's `fwd` + `bwd` must give with `layer_norm` (the contract in `seqfast.kernels.reference`): the
    reference's forward in float64, differentiated by autograd.

    Returns:
        `{"y", "hT", "cT", "dgx", "dh0", "dc0", "dw_hh", "db_hh", "d_ln_hh", "d_ln_c_weight", "d_ln_c_bias"}`, float64
        (None where the cell has none); `dw_hh` is what `dgh` must give as `sum_t dgh_t^T h_prev_t`.
    """
    a = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in args.items()}
    ext = a.pop("ext")
    ext = ext._replace(
        **{k: getattr(ext, k).double() for k in ext._fields if torch.is_tensor(getattr(ext, k)) and k != "zero"}
    )
    names = ("gx", "w_hh", "b_hh", "h0", "c0")
    leaves = {n: a[n].detach().requires_grad_() for n in names if a[n] is not None}
    ln_names = ("ln_hh", "ln_c_weight", "ln_c_bias")
    ln = {n: getattr(ext, n).detach().requires_grad_() for n in ln_names if getattr(ext, n) is not None}
    ext = ext._replace(**ln)
    call = {**a, **leaves}
    y, hT, cT, _ = reference.fwd(cell, **call, reverse=reverse, need_saved=False, ext=ext)
    outs = [(o, c.double()) for o, c in zip((y, hT, cT), cot, strict=True) if o is not None]
    wrt = list(leaves.values()) + list(ln.values())
    grads = torch.autograd.grad([o for o, _ in outs], wrt, [c for _, c in outs])
    named = dict(zip(list(leaves) + list(ln), grads, strict=True))
    return {
        "y": y.detach(),
        "hT": hT.detach(),
        "cT": None if cT is None else cT.detach(),
        "dgx": named["gx"],
        "dh0": named["h0"],
        "dc0": named.get("c0"),
        "dw_hh": named["w_hh"],
        "db_hh": named.get("b_hh"),
        "d_ln_hh": named["ln_hh"],
        "d_ln_c_weight": named.get("ln_c_weight"),
        "d_ln_c_bias": named.get("ln_c_bias"),
    }


def check_layer_norm(module, cell, args, cot, reverse, tol):
    """`module`'s `fwd` + `bwd` with the `layer_norm` option (`layer_norm_problem`) against `layer_norm_oracle`:
    every output and gradient within relative RMS `tol`, `dgh` through the `w_hh` gradient it gives with `h_prev`
    (`seqfast.autograd.h_prev`, zeroed at resets), and nothing where the cell has none."""
    from seqfast.autograd import h_prev

    assert "layer_norm" in getattr(module, "EXTENSIONS", ()), f"{module.__name__} does not run layer_norm"
    expected = layer_norm_oracle(cell, args, cot, reverse)
    a, ext = args, args["ext"]
    call = {k: v for k, v in a.items() if k != "ext"}
    y, hT, cT, saved = module.fwd(cell, **call, reverse=reverse, ext=ext)
    H, P = a["w_hh"].shape[0] // GATES[cell], a["w_hh"].shape[1]
    assert saved.shape == tuple(
        module.saved_shape(cell, *y.shape[:2], H, P, layer_norm=True, zoneout=ext.keep_h is not None)
    ), "saved has saved_shape(..., layer_norm=True)"
    out = module.bwd(cell, *cot, a["w_hh"], a["b_hh"], None, a["h0"], a["c0"], a["lengths"], y, saved, reverse, ext)
    assert len(out) == 6, "bwd with layer_norm returns a sixth value"
    dgx, dgh, dh0, dc0, dw_hr, (db_hh, d_ln_hh, d_ln_c_weight, d_ln_c_bias) = out
    assert dw_hr is None and dgh is not None and dgh.shape == dgx.shape
    prev = h_prev(y.double(), a["h0"].double(), a["lengths"], reverse, ext.zero)
    dw_hh = dgh.double().flatten(0, 1).T @ prev.flatten(0, 1)
    actual = dict(
        y=y,
        hT=hT,
        cT=cT,
        dgx=dgx,
        dh0=dh0,
        dc0=dc0,
        dw_hh=dw_hh,
        db_hh=db_hh,
        d_ln_hh=d_ln_hh,
        d_ln_c_weight=d_ln_c_weight,
        d_ln_c_bias=d_ln_c_bias,
    )
    for name, want in expected.items():
        got = actual[name]
        assert (got is None) == (want is None), f"{name}: {got is None=} but expected {want is None=}"
        if want is not None:
            assert_close(got.double(), want, tol, name)
