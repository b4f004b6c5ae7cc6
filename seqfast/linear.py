"""The large GEMMs around the recurrence: the input projection and the weight gradients, over all steps at once; and
the `layer_norm` option's LayerNorm of the input projection (`input_layer_norm`).

`seqfast::linear` is `x @ w.T + b` (`project`) with registered autograd; its backward and the recurrent weight
gradient share `seqfast::linear_backward` (`project_backward`); the eager path calls the plain functions. On CPU
float32 a large input projection or `dx` runs on oneDNN's GEMM, which torch.nn's own LSTM uses and which measures
about twice MKL's rate (torch's default for `F.linear`) on AVX-512 AMD CPUs, on par elsewhere, at a fixed cost per
call of 15-50 us; from which size it pays is measured per machine (see `onednn_min_macs`). Smaller products, other
devices and dtypes, and every weight and bias gradient use torch's GEMM and sum.
"""

import time

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch, native
from .kernels.common import LN_EPS, Projection, extension, poisoning

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# The sizes the calibration times, `[M, 128] @ [128, 512]` at these multiply-adds; oneDNN must beat BLAS by
# `_ONEDNN_MARGIN` at a size and every larger one to be used from it, and is used above the largest.
_CALIBRATION_MACS = (1 << 20, 1 << 22, 1 << 24, 1 << 26)
_CALIBRATION_RUNS = 4
# A near-tie goes to BLAS: a product on oneDNN also takes a call off the cpp backend's own node (which runs plain GEMMs
# only, see `plain`), and near-ties came out either way between calibrations (Ice Lake at 64M: 0.94-1.06x; a Xeon of
# model 167 at 64M: oneDNN 1.04-1.15x faster, which at a 10% margin sent the word-level LM's LSTM H200 B20 T35 fwd+bwd
# there, 10.4 -> 11.6 ms, and LSTM H256 B16 T32 fwd 1.90 -> 2.18 ms).
_ONEDNN_MARGIN = 0.2
# No product runs on oneDNN: where it is slower at the largest size timed. Taking it from twice that size instead sent
# the input projections of LSTM H256 B16 T32 and larger to oneDNN on Ice Lake, where it ran 1.0-1.13x BLAS's time,
# and their calls with grad off the cpp backend's own node (which takes plain GEMMs only): fwd+bwd 9.0 against 10.3 ms.
_NEVER = 1 << 62
# The threshold while compiling before any eager call has measured it.
_DEFAULT_MIN_MACS = 1 << 20
_min_macs = {}  # by thread count, for this process


def onednn_min_macs():
    """The multiply-adds from which a float32 CPU product runs on oneDNN rather than torch's BLAS, at the current
    thread count: `SEQFAST_ONEDNN_MIN_MACS` when set; else the smallest size of `_CALIBRATION_MACS` at which
    oneDNN's best of `_CALIBRATION_RUNS` runs beats BLAS's by `_ONEDNN_MARGIN`, there and at every larger size
    (`_NEVER` when none). Measured once per machine and thread count (about 50 ms) and kept with the native route's
    calibrations (`seqfast.native.cache_path`)."""
    setting = dispatch.env("SEQFAST_ONEDNN_MIN_MACS")
    if setting:
        return int(setting)
    threads = torch.get_num_threads()
    found = _min_macs.get(threads)
    if found is None:
        if torch.compiler.is_compiling():
            return _DEFAULT_MIN_MACS
        found = _min_macs[threads] = native.calibrated(f"onednn-min-macs-threads{threads}", _calibrate_onednn)
    return found


def _calibrate_onednn():
    """The threshold `onednn_min_macs` describes, timed here."""
    if not _ONEDNN:
        return _NEVER
    threshold = _NEVER
    for macs in reversed(_CALIBRATION_MACS):
        blas_s, onednn_s = _best_times(macs)
        if onednn_s > blas_s * (1 - _ONEDNN_MARGIN):
            break
        threshold = macs
    return threshold


def _best_times(macs):
    """`(BLAS, oneDNN)`: the best of `_CALIBRATION_RUNS` runs each, in turns after one to warm up, in seconds, of a
    product of `macs` multiply-adds (random operands of their own generator: the caller's random state is left as
    it was)."""
    generator = torch.Generator().manual_seed(0)
    shapes = ((macs // (128 * 512), 128), (512, 128), (512,))
    # float32 whatever the default dtype: the products this times are float32 ones
    a, w, b = (torch.randn(shape, generator=generator, dtype=torch.float32, device="cpu") for shape in shapes)
    best = [float("inf"), float("inf")]
    for _ in range(_CALIBRATION_RUNS + 1):
        for k, run in enumerate((F.linear, _onednn_linear)):
            start = time.perf_counter()
            run(a, w, b)
            best[k] = min(best[k], time.perf_counter() - start)
    return best[0], best[1]


def _onednn_linear(a, w, b):
    return torch.ops.mkldnn._linear_pointwise(a, w, b, "none", [], "")


def _onednn(a, w, b, numel=None):
    """Whether `a @ w.T + b` runs on oneDNN: float32 on CPU, at least `onednn_min_macs()` multiply-adds (for an `a` of
    `numel` elements when given, default `a`'s own)."""
    return (
        _ONEDNN
        and a.dtype == w.dtype == torch.float32
        and a.is_cpu
        and (b is None or b.dtype == torch.float32)
        and (a.numel() if numel is None else numel) * w.shape[0] >= onednn_min_macs()
    )


def plain(macs):
    """Whether a product of `macs` multiply-adds, and each of its gradients, runs as one plain torch GEMM here (below
    oneDNN's threshold)."""
    return macs < onednn_min_macs()


def dense(a, w, b=None):
    """`a @ w.T + b` for `a [M, K]`, `w [N, K]` (either may be a transposed view), `b [N]` or None.

    Returns:
        `[M, N]`.
    """
    return _onednn_linear(a, w, b) if _onednn(a, w, b) else F.linear(a, w, b)


def project(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """`x @ w.T + b` over every leading index; one row, or an `x` of few features (see `_small`), on CPU through
    `seqfast._C` when it is built, which forms the cpp backend's own projections, so that every path gives the same
    result.

    Args:
        x: `[..., K]`; w: `[N, K]`; b: `[N]` or None.

    Returns:
        `[..., N]`.
    """
    if (x.numel() == x.shape[-1] or _small(x)) and x.is_cpu and w.is_cpu and (C := extension()):
        # one row: the matrix-vector kernel; a small K: a row at a time, as the cpp backend's loops form it
        return C.project(x, w, b)
    if x.is_contiguous() and not _onednn(x, w, b):
        return F.linear(x, w, b)  # folds the leading dimensions into the one GEMM dense would run
    return dense(x.reshape(-1, x.shape[-1]), w, b).reshape(*x.shape[:-1], w.shape[0])


def _small(x):
    """Whether `x [..., K]` has a `K` small enough that `seqfast._C` forms its projection a row at a time (see
    `project`)."""
    C = extension()
    return C is not None and x.shape[-1] <= C.small_projection_k


linear = torch.library.custom_op("seqfast::linear", project, mutates_args=())


def bias_sum(a, b):
    """`a + b`, either may be None."""
    if b is None:
        return a
    return b if a is None else a + b


def fused(backend, x, w, b, numel=None):
    """Whether `backend` (a backend module) forms `x @ w.T + b` itself, from a `Projection`: when it fuses
    projections and `project` would run `F.linear` for them (`numel` as in `_onednn`)."""
    return getattr(backend, "FUSES_PROJECTION", False) and (_small(x) or not _onednn(x, w, b, numel))


def preactivations(backend, x, w, b):
    """`x @ w.T + b` for `backend` (a backend module): a `Projection` when it forms it itself (see `fused`), else the
    tensor from `project`."""
    if fused(backend, x, w, b):
        return Projection(x, w, b)
    return project(x, w, b)


@linear.register_fake
def _(x, w, b):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def project_backward(
    dy: Tensor, x: Tensor, w: Tensor, need_dx: bool, need_dw: bool, need_db: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of `y = x @ w.T + b` from `dy [..., N]`, `x [..., K]`, `w [N, K]`.

    Returns:
        `dx [..., K]`, `dw [N, K]`, `db [N]`; each an empty `[0]` tensor when not needed.
    """
    dy2, x2 = dy.flatten(0, -2), x.flatten(0, -2)
    dx = dense(dy2, w.T).reshape(x.shape) if need_dx else dy.new_empty(0)
    # torch's GEMM and sum: oneDNN's GEMM reduces all rows in one chain, about 2x further from the exact sum (see
    # tests/test_fidelity.py), and needs both operands transposed
    dw = weight_grad((dy2, x2)).to(w.dtype) if need_dw else dy.new_empty(0)
    db = dy2.sum(0).to(w.dtype) if need_db else dy.new_empty(0)
    return dx, dw, db


# Weight gradients `dy^T x` whose `x` has at most this many columns, summed over at least `_TRANSPOSED_ROWS_PER_COL`
# rows per column (counting at least 16 columns), are formed transposed, `x^T dy`, then copied into place: MKL runs
# that layout of a long reduction faster (Xeon model 167, 2 threads: 1.2-4x at 8-28 columns from 256 rows, 1.1-1.5x at
# 64 columns from 1024), while over fewer rows the copy cost more than it gained (0.35-0.6x at 64 rows of 16-64
# columns: a cell's step). seqfast._C's node chooses alike (`transposed_weight_grad`).
TRANSPOSED_MAX_COLS = 64
_TRANSPOSED_ROWS_PER_COL = 16


def transposed_weight_grad(rows: int, cols: int) -> bool:
    """Whether `weight_grad` forms a gradient reduced over `rows` rows with `cols` columns transposed."""
    return cols <= TRANSPOSED_MAX_COLS and rows >= _TRANSPOSED_ROWS_PER_COL * max(cols, 16)


def weight_grad(*pairs: tuple[Tensor, Tensor]) -> Tensor:
    """`sum dy^T x` over `pairs` of `dy [M, N]` and `x [M, K]` (`M` may differ between pairs), summed by BLAS in order:
    `[N, K]`, formed transposed where `x` has few columns and the pairs many rows (`transposed_weight_grad`)."""
    transposed = transposed_weight_grad(sum(dy.shape[0] for dy, _ in pairs), pairs[0][1].shape[1])
    out = None
    for dy, x in pairs:
        a, b = (x.T, dy) if transposed else (dy.T, x)
        out = torch.mm(a, b) if out is None else out.addmm_(a, b)
    return out.T.contiguous() if transposed else out


linear_backward = torch.library.custom_op("seqfast::linear_backward", project_backward, mutates_args=())


@linear_backward.register_fake
def _(dy, x, w, need_dx, need_dw, need_db):
    return (
        x.new_empty(x.shape) if need_dx else dy.new_empty(0),
        w.new_empty(w.shape) if need_dw else dy.new_empty(0),
        w.new_empty(w.shape[0]) if need_db else dy.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    # `linear`'s and `input_layer_norm_op`'s: inputs `(x, w, b)`, `x` and `w` saved
    x, w, b = inputs
    ctx.has_bias = b is not None
    ctx.save_for_backward(x, w)


def _backward(ctx, dy):
    x, w = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad
    dx, dw, db = linear_backward(dy, x, w, need_dx, need_dw, need_db and ctx.has_bias)
    return dx if need_dx else None, dw if need_dw else None, db if need_db and ctx.has_bias else None


linear.register_autograd(_backward, setup_context=_setup_context)


def input_layer_norm(z: Tensor, weight: Tensor, bias: Tensor | None, eager: bool = True) -> Tensor:
    """The `layer_norm` option's LayerNorm of the input projection, `LN(z) weight + bias` over the last dimension (eps
    `LN_EPS`): float32 and float64 on CPU through `seqfast._C` when it is built (one pass a row each way; the output
    and the input gradient on recycled blocks, which spares the page faults of fresh ones), as `InputLayerNorm` on an
    `eager` call (default True) and as the custom op `seqfast::input_layer_norm` otherwise, with bitwise the same
    results; else torch's `F.layer_norm`.

    Args:
        z: `[..., N]`; weight: `[N]`; bias: `[N]` or None.

    Returns:
        `[..., N]`.
    """
    if (
        z.is_cpu
        and z.dtype in (torch.float32, torch.float64)
        and weight.dtype == z.dtype
        and (bias is None or bias.dtype == z.dtype)
        and extension()
    ):
        return InputLayerNorm.apply(z, weight, bias) if eager else input_layer_norm_op(z, weight, bias)
    return F.layer_norm(z, weight.shape, weight, bias, LN_EPS)


def _input_layer_norm(z: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return extension().layer_norm(z, weight, bias, poisoning())


def _input_layer_norm_backward(
    dy: Tensor, z: Tensor, weight: Tensor, need_dz: bool, need_dw: bool, need_db: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """`input_layer_norm`'s gradients from `dy`: `dz`, `dweight`, `dbias`, each an empty `[0]` tensor when not
    needed."""
    return tuple(extension().layer_norm_backward(dy, z, weight, need_dz, need_dw, need_db, poisoning()))


input_layer_norm_op = torch.library.custom_op("seqfast::input_layer_norm", _input_layer_norm, mutates_args=())
input_layer_norm_backward = torch.library.custom_op(
    "seqfast::input_layer_norm_backward", _input_layer_norm_backward, mutates_args=()
)


@input_layer_norm_op.register_fake
def _(z, weight, bias):
    return z.new_empty(z.shape)


@input_layer_norm_backward.register_fake
def _(dy, z, weight, need_dz, need_dw, need_db):
    return (
        z.new_empty(z.shape) if need_dz else z.new_empty(0),
        weight.new_empty(weight.shape) if need_dw else z.new_empty(0),
        weight.new_empty(weight.shape) if need_db else z.new_empty(0),
    )


def _input_layer_norm_grads(dy, z, weight, needs, has_bias, backward):
    """The gradients of `input_layer_norm`'s `(z, weight, bias)` from `dy`, None where `needs` says not needed, by
    `backward` (`_input_layer_norm_backward`'s arguments); under `create_graph=True` by autograd through torch's
    LayerNorm instead, so that they differentiate again."""
    need_dz, need_dw, need_db = needs
    need_db = need_db and has_bias
    if torch.is_grad_enabled():
        wrt = [t for t, need in ((z, need_dz), (weight, need_dw)) if need]
        y = F.layer_norm(z, weight.shape, weight, None, LN_EPS)
        grads = iter(torch.autograd.grad(y, wrt, dy, create_graph=True))
        dz, dw = (next(grads) if need else None for need in (need_dz, need_dw))
        return dz, dw, dy.flatten(0, -2).sum(0) if need_db else None
    dz, dw, db = backward(dy, z, weight, need_dz, need_dw, need_db)
    return dz if need_dz else None, dw if need_dw else None, db if need_db else None


class InputLayerNorm(torch.autograd.Function):
    """`input_layer_norm` on an eager call: `seqfast._C`'s kernels without the custom ops' per-call cost."""

    @staticmethod
    def forward(ctx, z, weight, bias):
        ctx.save_for_backward(z, weight)
        ctx.has_bias = bias is not None
        return _input_layer_norm(z, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        z, weight = ctx.saved_tensors
        return _input_layer_norm_grads(dy, z, weight, ctx.needs_input_grad, ctx.has_bias, _input_layer_norm_backward)


def _input_layer_norm_op_backward(ctx, dy):
    z, weight = ctx.saved_tensors
    return _input_layer_norm_grads(dy, z, weight, ctx.needs_input_grad, ctx.has_bias, input_layer_norm_backward)


input_layer_norm_op.register_autograd(_input_layer_norm_op_backward, setup_context=_setup_context)
