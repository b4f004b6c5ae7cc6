"""The triton backend's compiled kernels on CUDA: kernel contract against the reference, modules against torch.nn.

Covers both modes: one program per batch block owning every hidden unit (`H <= 128`) and the split-hidden mode
with the per-step grid barrier (`H > 128`), several batch blocks, and a batch split over several launches.
"""

import pytest
import torch
from helpers import assert_all_close, assert_close, run_with_grads, twins
from seqfast.kernels import common, reference

pytestmark = pytest.mark.gpu

NAMES = ["y", "hT", "cT", "dgx", "dgh", "dh0", "dc0", "dw_hr"]

# (dtype, relative RMS tolerance) against the reference on the same inputs; see tests/test_triton.py for the
# 16-bit reasoning. Longer sequences and larger H than the interpreter tests, hence the wider 16-bit bounds.
DTYPES = {"f32": (torch.float32, 2e-5), "bf16": (torch.bfloat16, 5e-2), "f16": (torch.float16, 5e-3)}

# (B, T, H): single mode, split mode with H off multiples of 16 and two batch blocks. Kept small in number: every
# (cell, options, dtype, block sizes) combination is a compilation.
SHAPES = [(3, 9, 40), (70, 6, 520)]
SHAPE_IDS = [f"B{b}-T{t}-H{h}" for b, t, h in SHAPES]
KINDS = ["rnn_tanh", "rnn_relu", "lstm", "lstm-proj", "gru"]


def _tb():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import seqfast.kernels.triton as module

    if module.INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 is set: the compiled kernels are not in use")
    return module


def make_args(kind, B, T, H, lengths, dtype, device="cuda"):
    cell = "lstm" if kind == "lstm-proj" else kind
    G = common.GATES[cell] * H
    P = H // 3 if kind == "lstm-proj" else H
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    args = dict(
        gx=rand(T, B, G),
        w_hh=rand(G, P, scale=P**-0.5),
        b_hh=rand(G),
        h0=rand(B, P),
        c0=rand(B, H) if cell == "lstm" else None,
        lengths=None,
        w_hr=rand(P, H, scale=H**-0.5) if kind == "lstm-proj" else None,
    )
    if lengths == "mixed":
        lens = torch.randint(0, T + 1, (B,), generator=gen)
        lens[0] = T
        args["lengths"] = lens.to(device)
    return cell, args


def run(module, cell, args, reverse):
    a = args
    y, hT, cT, saved = module.fwd(
        cell, a["gx"], a["w_hh"], a["b_hh"], a["h0"], a["c0"], a["lengths"], a["w_hr"], reverse
    )
    gen = torch.Generator().manual_seed(3)
    dy = torch.randn(y.shape, generator=gen).to(y)
    dhT = torch.randn(hT.shape, generator=gen).to(hT)
    dcT = None if cT is None else torch.randn(cT.shape, generator=gen).to(cT)
    grads = module.bwd(
        cell, dy, dhT, dcT, a["w_hh"], a["b_hh"], a["w_hr"], a["h0"], a["c0"], a["lengths"], y, saved, reverse
    )
    return [y, hT, cT, *grads]


def check(tb, shape, kind, lengths, reverse, dtype_id):
    B, T, H = shape
    dtype, tol = DTYPES[dtype_id]
    cell, args = make_args(kind, B, T, H, lengths, dtype)
    assert tb.unsupported(cell, args["gx"], args["w_hh"], args["h0"], args["c0"], args["lengths"], args["w_hr"]) is None
    actual, expected = run(tb, cell, args, reverse), run(reference, cell, args, reverse)
    for a, e, name in zip(actual, expected, NAMES, strict=True):
        assert (a is None) == (e is None), name
        if a is not None:
            assert_close(a, e, tol, name)


@pytest.mark.parametrize("options", [("full", False), ("mixed", True)], ids=["full-fwd", "mixed-rev"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_contract_f32(shape, kind, options):
    check(_tb(), shape, kind, *options, "f32")


@pytest.mark.parametrize(
    "kind_dtype", [(k, "bf16") for k in KINDS] + [("lstm", "f16"), ("gru", "f16")], ids=lambda kd: "-".join(kd)
)
def test_contract_16bit(kind_dtype):
    check(_tb(), SHAPES[1], kind_dtype[0], "mixed", True, kind_dtype[1])


def test_batch_over_several_launches(monkeypatch):
    """Split mode with one batch block per launch (the path taken when blocks x NH exceed the SM count)."""
    tb = _tb()
    config = tb._config

    def one_block_per_launch(B, H, device, dtype):
        return dict(config(B, H, device, dtype), BB=16, per_launch=1)

    monkeypatch.setattr(tb, "_config", one_block_per_launch)
    cell, args = make_args("lstm", 40, 7, 300, "mixed", torch.float32)
    actual, expected = run(tb, cell, args, True), run(reference, cell, args, True)
    for a, e, name in zip(actual, expected, NAMES, strict=True):
        if a is not None:
            assert_close(a, e, 2e-5, name)


def test_repeated_launches_are_deterministic():
    """The split mode's exchange is race-free: 20 runs give bit-identical outputs."""
    tb = _tb()
    cell, args = make_args("gru", 64, 25, 1024, "full", torch.float32)
    first = run(tb, cell, args, False)
    for _ in range(19):
        for a, b in zip(run(tb, cell, args, False), first, strict=True):
            if a is not None:
                assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kind_dtype",
    [(k, "f32") for k in ("rnn_tanh", "lstm", "lstm-proj", "gru")] + [("lstm", "bf16")],
    ids=lambda kd: "-".join(kd),
)
def test_module_vs_cudnn(kind_dtype):
    """seqfast modules on the triton backend against torch.nn (cuDNN): outputs, states and every gradient."""
    _tb()
    kind, dtype_id = kind_dtype
    dtype, tol = {"f32": (torch.float32, 2e-5), "bf16": (torch.bfloat16, 5e-2)}[dtype_id]
    cell = "lstm" if kind == "lstm-proj" else kind
    kwargs = dict(num_layers=2, bidirectional=True, device="cuda")
    if kind == "lstm-proj":
        kwargs["proj_size"] = 64
    ref, ours = twins(cell, 96, 256, backend="triton", dtype=dtype, **kwargs)
    x = torch.randn(19, 6, 96, device="cuda", dtype=dtype, requires_grad=True)
    out_ref, grads_ref = run_with_grads(ref, lambda m: m(x), [x])
    out_ours, grads_ours = run_with_grads(ours, lambda m: m(x), [x])
    assert_all_close(out_ours, out_ref, tol, [f"out{i}" for i in range(len(out_ref))])
    names = ["x"] + [n for n, _ in ref.named_parameters()]
    assert_all_close(grads_ours, grads_ref, tol, names)
